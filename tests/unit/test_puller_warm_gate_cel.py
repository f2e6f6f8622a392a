"""The warm-up gate's ValidatingAdmissionPolicy (deploy/puller/warm-gate/), evaluated with CEL.

The policy is run as the API server runs a ValidatingAdmissionPolicy: matchConstraints,
matchConditions, variables in order, then the validations, the first failure's
messageExpression being the answer (staging/src/k8s.io/apiserver/pkg/admission/plugin/
policy/validating/dispatcher.go uses deniedDecisions[0]), over a table of Node updates: the
puller's own patch (cedar.puller.warmup.removal_patch, applied as RFC 6902 by the
simulator's json_patch) is the one update allowed; every other change by the puller's
ServiceAccount is refused, and nobody else's update is the policy's business.

Library and the semantics relied on (see tests/unit/test_mcs_admission_cel.py): the
expressions are evaluated with cel-python (celpy), not cel-go, and kept to what both
evaluate alike. `object` and `oldObject` are plain JSON maps, as they are unstructured maps
(DynType) in the API server (staging/src/k8s.io/apiserver/pkg/admission/plugin/cel/
compile.go declares them `cel.DynType`); fields that may be absent are tested with `in`
or `has()` first, and maps are iterated with `all` over their keys. `request.userInfo.extra`
is map(string, list(string)) (compile.go's BuildRequestType); the node a pod's token is
bound to is extra["authentication.kubernetes.io/node-name"] = [node]
(staging/src/k8s.io/apiserver/pkg/authentication/serviceaccount/util.go, and the e2e
test test/e2e/auth/per_node_update.go reads it the same way).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel

from cedar.puller.warmup import WARMING_TAINT_KEY, removal_patch
from cedar.sandbox.kubeapi_ops import json_patch

POLICY = (
    Path(__file__).resolve().parents[2]
    / "deploy"
    / "puller"
    / "warm-gate"
    / ("admission-policy.yaml")
)
PULLER = "system:serviceaccount:cedar-system:cedar-puller"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
WARMING = {"key": WARMING_TAINT_KEY, "effect": "NoSchedule"}
GPU = {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}
UNREACHABLE = {
    "key": "node.kubernetes.io/unreachable",
    "effect": "NoExecute",
    "timeAdded": "2026-01-01T00:00:10Z",
}

_ENV = celpy.Environment()


def load() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(POLICY.read_text()) if d}


@cache
def _program(expr: str) -> Any:
    return _ENV.program(_ENV.compile(expr))


def evaluate(expr: str, activation: dict[str, Any]) -> Any:
    return _program(expr).evaluate(activation)


def node(name: str = "node-1", taints: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A Node as the API server holds it."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": "6d1f0a52-0c5e-4b8e-9d55-1d3f5c1c2a10",
            "resourceVersion": "1200",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"kubernetes.io/hostname": name, "pool": "gpu"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            "managedFields": [{"manager": "kubelet", "operation": "Update"}],
        },
        "spec": {
            "podCIDR": "10.0.3.0/24",
            "podCIDRs": ["10.0.3.0/24"],
            "providerID": "aws:///eu-west-1a/i-0abc",
            "taints": copy.deepcopy(taints if taints is not None else [GPU, WARMING]),
        },
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "nodeInfo": {"containerRuntimeVersion": "containerd://1.7.2"},
        },
    }


def puller_patch(old: dict[str, Any]) -> dict[str, Any]:
    """The Node after the puller's own patch, as the API server hands it to admission:
    its field manager has already updated managedFields."""
    ops = removal_patch(old["spec"].get("taints"))
    assert ops is not None
    new = json_patch(old, ops)
    new["metadata"]["managedFields"] = [
        *old["metadata"]["managedFields"],
        {"manager": "cedar-puller", "operation": "Update"},
    ]
    return new


@dataclass
class Case:
    id: str
    old: dict[str, Any]
    new: dict[str, Any]
    allowed: bool
    message: str = ""
    username: str = PULLER
    extra: dict[str, list[str]] = field(default_factory=lambda: {NODE_NAME_EXTRA: ["node-1"]})
    subresource: str = ""


def changed(old: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    new = puller_patch(old)
    target = new
    for key in path[:-1]:
        target = target.setdefault(key, {})
    if value is None:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    return new


OWN = "the puller may only remove the taint cedar.io/warming:NoSchedule from its Node, not change its other taints"  # noqa: E501
SPEC = "the puller may change nothing in a Node spec but its taints"
META = "the puller may not change a Node metadata (labels, annotations, ...)"
STATUS = "the puller may not change a Node status"
NO_NODE = (
    "the puller may change a Node only with a token bound to a pod on that node (no "
    "authentication.kubernetes.io/node-name in its credentials)"
)

BASE = node()
ONLY_WARMING = node(taints=[WARMING])
WITH_TIME = node(taints=[UNREACHABLE, WARMING, GPU])

CASES = [
    Case("own-node-removes-warming", BASE, puller_patch(BASE), True),
    Case("the-only-taint", ONLY_WARMING, puller_patch(ONLY_WARMING), True),
    Case("other-taints-kept-in-order", WITH_TIME, puller_patch(WITH_TIME), True),
    Case(
        "taints-key-dropped-when-empty",
        ONLY_WARMING,
        changed(ONLY_WARMING, ("spec", "taints"), None),
        True,
    ),
    Case(
        "server-managed-metadata-differs",
        BASE,
        changed(BASE, ("metadata", "resourceVersion"), "1201"),
        True,
    ),
    Case(
        "another-node",
        node("node-2"),
        puller_patch(node("node-2")),
        False,
        "the puller on node node-1 may not change Node node-2",
    ),
    Case("no-bound-node", BASE, puller_patch(BASE), False, NO_NODE, extra={}),
    Case(
        "two-nodes-in-the-token",
        BASE,
        puller_patch(BASE),
        False,
        NO_NODE,
        extra={NODE_NAME_EXTRA: ["node-1", "node-2"]},
    ),
    Case("nothing-changes", BASE, copy.deepcopy(BASE), False, OWN),
    Case("warming-already-gone", node(taints=[GPU]), node(taints=[GPU]), False, OWN),
    Case("removes-another-taint-too", BASE, node(taints=[]), False, OWN),
    Case("removes-another-taint-only", BASE, node(taints=[WARMING]), False, OWN),
    Case("adds-a-taint", BASE, node(taints=[GPU, UNREACHABLE]), False, OWN),
    Case("reorders-the-rest", WITH_TIME, node(taints=[GPU, UNREACHABLE]), False, OWN),
    Case(
        "changes-a-kept-taint",
        BASE,
        node(taints=[{**GPU, "value": "false"}]),
        False,
        OWN,
    ),
    Case(
        "warming-with-another-effect",
        node(taints=[{"key": WARMING_TAINT_KEY, "effect": "NoExecute"}]),
        node(taints=[]),
        False,
        OWN,
    ),
    Case("cordons", BASE, changed(BASE, ("spec", "unschedulable"), True), False, SPEC),
    Case("changes-pod-cidr", BASE, changed(BASE, ("spec", "podCIDR"), "10.9.0.0/24"), False, SPEC),
    Case("drops-provider-id", BASE, changed(BASE, ("spec", "providerID"), None), False, SPEC),
    Case(
        "relabels",
        BASE,
        changed(BASE, ("metadata", "labels"), {"kubernetes.io/hostname": "node-1"}),
        False,
        META,
    ),
    Case(
        "annotates",
        BASE,
        changed(BASE, ("metadata", "annotations", "x"), "1"),
        False,
        META,
    ),
    Case("drops-annotations", BASE, changed(BASE, ("metadata", "annotations"), None), False, META),
    Case("adds-a-finalizer", BASE, changed(BASE, ("metadata", "finalizers"), ["x"]), False, META),
    Case(
        "status-update",
        BASE,
        changed(BASE, ("status", "conditions"), [{"type": "Ready", "status": "False"}]),
        False,
        STATUS,
        subresource="status",
    ),
    Case(
        "drops-status",
        BASE,
        changed(BASE, ("status",), None),
        False,
        STATUS,
        subresource="status",
    ),
    Case("kubelet-is-not-held", BASE, node(taints=[]), True, username="system:node:node-1"),
    Case(
        "another-service-account-is-not-held",
        BASE,
        changed(BASE, ("metadata", "labels", "pool"), "cpu"),
        True,
        username="system:serviceaccount:cedar-system:cedar-watcher",
    ),
]


def run_policy(case: Case) -> tuple[bool, str]:
    """(allowed, the refusal's message) as the API server would answer the update."""
    docs = load()
    policy = docs["ValidatingAdmissionPolicy"]["spec"]
    binding = docs["ValidatingAdmissionPolicyBinding"]["spec"]
    assert binding["policyName"] == docs["ValidatingAdmissionPolicy"]["metadata"]["name"]
    assert "matchResources" not in binding  # Nodes are cluster-scoped: every one
    resource = "nodes" + (f"/{case.subresource}" if case.subresource else "")
    if not any(
        "UPDATE" in rule["operations"] and resource in rule["resources"]
        for rule in policy["matchConstraints"]["resourceRules"]
    ):
        return True, ""
    user: dict[str, Any] = {"username": case.username, "groups": ["system:authenticated"]}
    user["extra"] = case.extra  # an empty map when the credentials carry none
    request = {
        "operation": "UPDATE",
        "name": case.new["metadata"]["name"],
        "userInfo": user,
        "dryRun": False,
    }
    if case.subresource:
        request["subResource"] = case.subresource
    activation: dict[str, Any] = {
        "object": json_to_cel(case.new),
        "oldObject": json_to_cel(case.old),
        "request": json_to_cel(request),
    }
    for condition in policy.get("matchConditions", []):
        if not bool(evaluate(condition["expression"], activation)):
            return True, ""
    variables: dict[str, Any] = {}
    for var in policy.get("variables", []):
        activation["variables"] = celtypes.MapType(
            {celtypes.StringType(k): v for k, v in variables.items()}
        )
        variables[var["name"]] = evaluate(var["expression"], activation)
    activation["variables"] = celtypes.MapType(
        {celtypes.StringType(k): v for k, v in variables.items()}
    )
    for validation in policy["validations"]:
        value = evaluate(validation["expression"], activation)
        assert isinstance(value, celtypes.BoolType), f"{validation['expression']} gave {value!r}"
        if not value:
            message = evaluate(validation["messageExpression"], activation)
            assert isinstance(message, str)
            assert validation["reason"] == "Forbidden"
            return False, str(message)
    return True, ""


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_policy_allows_only_the_pullers_own_removal(case: Case) -> None:
    allowed, message = run_policy(case)
    assert (allowed, message) == (case.allowed, case.message)


def test_the_table_has_the_pullers_patch_and_refusals_of_every_kind() -> None:
    assert sum(c.allowed and c.username == PULLER for c in CASES) >= 4
    refused = {c.message for c in CASES if not c.allowed}
    assert refused == {OWN, SPEC, META, STATUS, NO_NODE, CASES[5].message}


def test_the_policy_fails_closed_and_names_the_pullers_account() -> None:
    docs = load()
    policy = docs["ValidatingAdmissionPolicy"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert docs["ValidatingAdmissionPolicyBinding"]["spec"]["validationActions"] == ["Deny"]
    (condition,) = policy["spec"]["matchConditions"]
    assert PULLER in condition["expression"]
    expressions = [v["expression"] for v in policy["spec"]["variables"]]
    assert any(WARMING_TAINT_KEY in e for e in expressions)  # the taint warmup.py removes
    assert any(NODE_NAME_EXTRA in e for e in expressions)
