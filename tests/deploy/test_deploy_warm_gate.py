"""deploy/puller/warm-gate/, the warm-up gate's component, rendered and checked.

The component is rendered with `kubectl kustomize` on top of the base, as an operator's
overlay would, and every object is validated strictly with kubernetes-validate against the
Kubernetes 1.30 schemas (ValidatingAdmissionPolicy v1 and the bound token's node-name
extra are there from 1.30) and the newest. Then what the manifests promise: the puller's
ServiceAccount gets `patch` on nodes and nothing else, the policy that holds it to its own
Node's warm-up taint matches exactly that account and every update of a Node, fails
closed, and its binding denies; the puller's own settings agree on the taint. The CEL
itself is evaluated in tests/unit/test_puller_warm_gate_cel.py.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cedar.puller.settings import PullerSettings
from cedar.puller.warmup import WARMING_TAINT_KEY
from tests.deploy.test_deploy import checkov_failures

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPONENT = DEPLOY / "puller" / "warm-gate"
VERSIONS = ("1.30.0", "1.37.0")
PULLER_SA = {"kind": "ServiceAccount", "name": "cedar-puller", "namespace": "cedar-system"}


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not installed; install it with: apt-get install kubectl")
    return path


def _render(tmp: Path, with_component: bool) -> list[dict[str, Any]]:
    overlay = tmp / ("gate" if with_component else "base")
    overlay.mkdir(exist_ok=True)
    text = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
    text += f"resources:\n  - {os.path.relpath(DEPLOY, overlay)}\n"
    if with_component:
        text += f"components:\n  - {os.path.relpath(COMPONENT, overlay)}\n"
    (overlay / "kustomization.yaml").write_text(text)
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("warm-gate")
    return {"base": _render(tmp, False), "gate": _render(tmp, True)}


def new_objects(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    seen = {(d["kind"], d["metadata"]["name"]) for d in rendered["base"]}
    return [
        copy.deepcopy(d) for d in rendered["gate"] if (d["kind"], d["metadata"]["name"]) not in seen
    ]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("version", VERSIONS)
def test_the_component_validates_strictly(
    rendered: dict[str, list[dict[str, Any]]], version: str
) -> None:
    errors = []
    for doc in rendered["gate"]:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: no schema ({err})")
    assert not errors, "\n".join(errors)


def test_it_adds_the_role_its_binding_and_the_policy_only(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    added = new_objects(rendered)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in added) == [
        ("ClusterRole", "cedar-puller-warm-gate"),
        ("ClusterRoleBinding", "cedar-puller-warm-gate"),
        ("ValidatingAdmissionPolicy", "cedar-puller-warm-gate"),
        ("ValidatingAdmissionPolicyBinding", "cedar-puller-warm-gate"),
    ]
    for doc in added:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cedar"
        assert "namespace" not in doc["metadata"]  # all four are cluster-scoped
    # The base is unchanged: the component adds, it patches nothing.
    base = {(d["kind"], d["metadata"]["name"]): d for d in rendered["base"]}
    for doc in rendered["gate"]:
        key = (doc["kind"], doc["metadata"]["name"])
        if key in base:
            assert doc == base[key], key


def test_the_puller_may_patch_nodes_and_nothing_more(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    added = new_objects(rendered)
    (role,) = by_kind(added, "ClusterRole").values()
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}]
    (binding,) = by_kind(added, "ClusterRoleBinding").values()
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [PULLER_SA]
    # The ServiceAccount is the one the puller's DaemonSet runs as.
    daemonset = by_kind(rendered["gate"], "DaemonSet")["cedar-puller"]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == PULLER_SA["name"]
    assert daemonset["metadata"]["namespace"] == PULLER_SA["namespace"]
    assert pod.get("automountServiceAccountToken", True)  # a bound token: its node is in it


def test_the_policy_holds_every_node_update_by_that_account(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    added = new_objects(rendered)
    (policy,) = by_kind(added, "ValidatingAdmissionPolicy").values()
    (binding,) = by_kind(added, "ValidatingAdmissionPolicyBinding").values()
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == [""] and rule["apiVersions"] == ["v1"]
    assert rule["operations"] == ["UPDATE"]  # RBAC grants no create or delete
    assert set(rule["resources"]) == {"nodes", "nodes/status"}
    (condition,) = spec["matchConditions"]
    account = f"system:serviceaccount:{PULLER_SA['namespace']}:{PULLER_SA['name']}"
    assert condition["expression"] == f"request.userInfo.username == '{account}'"
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }
    text = json.dumps(spec)
    assert f"'{WARMING_TAINT_KEY}'" in text and "'NoSchedule'" in text
    for validation in spec["validations"]:
        assert validation["reason"] == "Forbidden"
        assert validation["messageExpression"]


def test_the_pullers_settings_agree() -> None:
    # The gate's timeout defaults to 10 minutes and the puller needs no setting to use it.
    assert PullerSettings(node_name="n").warm_timeout.total_seconds() == 600.0
    guide = (REPO / "docs" / "puller.md").read_text()
    assert "deploy/puller/warm-gate" in guide


def test_checkov_finds_nothing_new_in_the_component(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The base's accepted exceptions (deploy/checkov-skips.yaml) and nothing more."""
    scan = tmp_path / "scan"
    scan.mkdir()
    (scan / "cedar.yaml").write_text(yaml.safe_dump_all(rendered["gate"]))
    failed = checkov_failures("kubernetes", scan)
    skips = yaml.safe_load((DEPLOY / "checkov-skips.yaml").read_text())["skips"]
    allowed = {(s["check"], r) for s in skips for r in s["resources"]}
    assert failed <= allowed, f"new checkov failures: {sorted(failed - allowed)}"
