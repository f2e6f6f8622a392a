"""Kubernetes object dict -> WorkloadImageSet / NamespaceEvent (cedar.proto.workloads)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cedar.proto.models import OwnerRef
from cedar.proto.workloads import (
    BadObject,
    controller_of,
    extract_namespace,
    extract_workload,
    identity,
    revision_of,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def workload(kind: str = "Deployment", **spec: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {"containers": [{"name": "app", "image": "nginx:1.25"}]}
    pod.update(spec.pop("pod", {}))
    template = {"spec": pod}
    body: dict[str, Any] = {"template": template, **spec}
    if kind == "CronJob":
        body = {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}, **spec}
    return {
        "kind": kind,
        "metadata": {
            "name": "web",
            "namespace": "tenant-a",
            "uid": "u1",
            "resourceVersion": "7",
            "generation": 3,
        },
        "spec": body,
    }


@pytest.mark.parametrize(
    ("kind", "replicas"),
    [
        ("Deployment", 1),
        ("ReplicaSet", 1),
        ("StatefulSet", 1),
        ("DaemonSet", None),
        ("Job", 1),
        ("CronJob", None),
    ],
)
def test_every_kind_yields_its_template_images(kind: str, replicas: int | None) -> None:
    item, problems = extract_workload(kind, workload(kind), NOW)
    assert problems == []
    assert item.kind == kind
    assert item.identity == f"{kind}/tenant-a/web"
    assert [c.reference for c in item.containers] == ["docker.io/library/nginx:1.25"]
    assert item.replicas == replicas
    assert item.generation == 3
    assert item.resource_version == "7"
    assert item.observed_at == NOW


def test_scaled_to_zero_counts_in_full() -> None:
    item, _ = extract_workload("Deployment", workload(replicas=0), NOW)
    assert item.replicas == 0
    assert item.references() == {"docker.io/library/nginx:1.25"}


def test_init_containers_pull_policy_and_scheduling() -> None:
    obj = workload(
        pod={
            "initContainers": [{"name": "init", "image": "busybox", "imagePullPolicy": "Always"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "zone", "operator": "In", "values": ["a", "b"]}
                                ]
                            }
                        ]
                    }
                }
            },
            "tolerations": [
                {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"operator": "Exists"},
            ],
        }
    )
    item, problems = extract_workload("Deployment", obj, NOW)
    assert problems == []
    init = item.containers[0]
    assert (init.container, init.init, init.pull_policy) == ("init", True, "Always")
    assert init.reference == "docker.io/library/busybox:latest"
    assert item.scheduling.node_selector == {"kubernetes.io/os": "linux"}
    term = item.scheduling.required_node_affinity[0]
    assert term.match_expressions[0].values == ("a", "b")
    assert [t.key for t in item.scheduling.tolerations] == ["gpu", None]


def test_invalid_image_is_kept_with_its_error() -> None:
    obj = workload(pod={"containers": [{"name": "bad", "image": "Nginx:latest"}]})
    item, problems = extract_workload("Deployment", obj, NOW)
    (container,) = item.containers
    assert container.reference is None
    assert container.error
    assert container.image == "Nginx:latest"
    assert [p.reason for p in problems] == ["invalid_image"]


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        ({"containers": "nginx"}, "malformed_containers"),
        ({"containers": [42]}, "malformed_containers"),
        ({"containers": [{"name": "x"}]}, "missing_image"),
        ({"containers": [{"name": "x", "image": "a", "imagePullPolicy": "Sometimes"}]}, None),
        ({"tolerations": [{"operator": "Maybe"}]}, "malformed_scheduling"),
        ({"nodeSelector": ["a"]}, "malformed_scheduling"),
    ],
)
def test_malformed_parts_are_reported_not_raised(pod: dict[str, Any], reason: str | None) -> None:
    item, problems = extract_workload("Deployment", workload(pod=pod), NOW)
    assert problems, "a problem must be reported"
    if reason is not None:
        assert reason in {p.reason for p in problems}
    assert item.uid == "u1"


def test_missing_template_is_a_problem() -> None:
    obj = workload()
    del obj["spec"]["template"]
    item, problems = extract_workload("Deployment", obj, NOW)
    assert item.containers == ()
    assert [p.reason for p in problems] == ["missing_template"]


@pytest.mark.parametrize(
    "obj",
    [None, "x", {}, {"metadata": {"name": "a"}}, {"metadata": {"uid": "u", "namespace": "n"}}],
)
def test_unidentifiable_objects_raise_bad_object(obj: Any) -> None:
    with pytest.raises(BadObject):
        identity(obj)


def test_namespace_event() -> None:
    obj = {
        "metadata": {
            "name": "tenant-a",
            "uid": "n1",
            "resourceVersion": "9",
            "labels": {"team": "a"},
            "annotations": {"cedar.io/selinux-level": "s0:c1,c2"},
        },
        "status": {"phase": "Active"},
    }
    event, problems = extract_namespace(obj, NOW)
    assert problems == []
    assert (event.name, event.uid, event.phase, event.resource_version) == (
        "tenant-a",
        "n1",
        "Active",
        "9",
    )
    assert event.annotations == {"cedar.io/selinux-level": "s0:c1,c2"}


def test_controller_and_revision() -> None:
    obj = workload("ReplicaSet")
    obj["metadata"]["ownerReferences"] = [
        {"kind": "Other", "name": "o", "uid": "x"},
        {"kind": "Deployment", "name": "web", "uid": "d1", "controller": True},
    ]
    obj["metadata"]["annotations"] = {"deployment.kubernetes.io/revision": "4"}
    assert controller_of(obj) == OwnerRef(kind="Deployment", name="web", uid="d1")
    assert revision_of(obj) == 4
    obj["metadata"]["annotations"] = {"deployment.kubernetes.io/revision": "x"}
    assert revision_of(obj) is None
