"""`cedar prepull`'s pure parts: manifests (load, strict validation, extraction), tracking."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cedar.ops import manifests
from cedar.ops.prepull import Tracker
from cedar.proto.models import NodeImageStatus, PullerDecision
from cedar.proto.scheduling import NodeInfo

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: team-a}
spec:
  replicas: 0
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      nodeSelector: {disktype: ssd}
      initContainers: [{name: init, image: "reg.example/init:v1"}]
      containers: [{name: web, image: "reg.example/web:v1"}]
"""
POD = """\
apiVersion: v1
kind: Pod
metadata: {name: one}
spec:
  containers: [{name: c, image: nginx}]
"""
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
"""


def _load(*texts: str) -> list[manifests.Manifest]:
    return manifests.load([(f"f{i}.yaml", t) for i, t in enumerate(texts)])


def test_examples_are_strictly_valid() -> None:
    docs = manifests.load(manifests.read_files([str(EXAMPLES)]))
    assert len(docs) >= 8
    assert [manifests.validate(d) for d in docs] == [None] * len(docs)
    kinds = {d.doc["kind"] for d in docs}
    assert {"Deployment", "DaemonSet", "CronJob", "Namespace", "Node"} <= kinds


def test_prepull_sets_use_the_watchers_extraction() -> None:
    docs = _load(DEPLOYMENT + "---\n" + SERVICE, POD)
    assert [manifests.validate(d) for d in docs] == [None, None, None]
    sets = [manifests.prepull_set(d, NOW, timedelta(hours=2)) for d in docs]
    web, service, pod = sets
    assert service is None
    assert web is not None and pod is not None
    assert web.kind == "Prepull" and web.namespace == "team-a" and web.name == "deployment-web"
    assert web.owner is not None and (web.owner.kind, web.owner.name) == ("Deployment", "web")
    assert web.references() == {"reg.example/init:v1", "reg.example/web:v1"}
    assert web.scheduling.node_selector == {"disktype": "ssd"}
    assert web.expires_at == NOW + timedelta(hours=2)
    assert pod.namespace == "default"
    assert pod.references() == {"docker.io/library/nginx:latest"}


def test_invalid_manifests_carry_the_validators_message() -> None:
    bad_field = DEPLOYMENT.replace("replicas: 0", "replicas: 0\n  replica: 1")
    (doc,) = _load(bad_field)
    problem = manifests.validate(doc)
    assert problem is not None
    assert problem.startswith("f0.yaml: document 1 (Deployment/web): spec: ")
    assert "'replica' was unexpected" in problem

    (doc,) = _load(DEPLOYMENT.replace("replicas: 0", "replicas: zero"))
    assert "'zero' is not of type 'integer'" in (manifests.validate(doc) or "")

    (doc,) = _load("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n")
    assert "no schema for Widget" in (manifests.validate(doc) or "")

    (doc,) = _load("kind: Deployment\n")
    assert "apiVersion and kind are required" in (manifests.validate(doc) or "")

    with pytest.raises(manifests.ManifestError, match="not valid YAML"):
        _load("a: [")
    with pytest.raises(manifests.ManifestError, match="not a mapping"):
        _load("- 1\n- 2\n")


def test_list_documents_are_unpacked() -> None:
    text = "apiVersion: v1\nkind: List\nitems:\n" + "".join(
        "  - " + line + "\n" if i == 0 else "    " + line + "\n"
        for i, line in enumerate(POD.splitlines())
    )
    docs = _load(text)
    assert [d.doc["kind"] for d in docs] == ["Pod"]


def _status(node: str, image: str, state: str, reason: str | None = None) -> NodeImageStatus:
    return NodeImageStatus.model_validate(
        {"node": node, "image": image, "state": state, "reason": reason, "updated_at": NOW}
    )


def test_tracker_with_node_labels() -> None:
    (doc,) = _load(DEPLOYMENT)
    web = manifests.prepull_set(doc, NOW, timedelta(hours=1))
    assert web is not None
    ssd = NodeInfo("n1", {"disktype": "ssd"})
    hdd = NodeInfo("n2", {"disktype": "hdd"})
    tracker = Tracker([web], node_info={"n1": ssd, "n2": hdd})
    assert tracker.progress() == (0, 0)
    assert not tracker.complete()  # no node reports anything yet
    tracker.see_status(_status("n2", "reg.example/other:v1", "present"))
    tracker.see_status(_status("n1", "reg.example/web:v1", "pulling"))
    assert tracker.progress() == (0, 2)  # n2 is not eligible: nodeSelector
    tracker.see_status(_status("n1", "reg.example/web:v1", "present"))
    tracker.see_status(_status("n1", "reg.example/init:v1", "failed", "not_found"))
    assert tracker.progress() == (1, 2)
    (row,) = tracker.missing()
    assert row["node"] == "n1" and row["state"] == "failed" and row["why"] == "not_found"
    assert row["workloads"] == ["Deployment/team-a/web"]
    tracker.see_status(_status("n1", "reg.example/init:v1", "present"))
    assert tracker.complete()


def test_tracker_without_node_labels_uses_skip_decisions() -> None:
    (doc,) = _load(DEPLOYMENT)
    web = manifests.prepull_set(doc, NOW, timedelta(hours=1))
    assert web is not None
    tracker = Tracker([web])
    tracker.see_status(_status("n1", "reg.example/web:v1", "present"))
    tracker.see_status(_status("n1", "reg.example/init:v1", "present"))
    tracker.see_status(_status("n2", "reg.example/unrelated:v1", "present"))
    assert tracker.progress() == (2, 4)
    missing = tracker.missing()
    assert {m["state"] for m in missing} == {"no report"}
    for image in ("reg.example/web:v1", "reg.example/init:v1"):
        tracker.see_decision(
            PullerDecision(node="n2", image=image, action="skip", reason="node_mismatch", at=NOW)
        )
    assert tracker.complete()
