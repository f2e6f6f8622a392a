"""The pod-level admission policies' CEL, evaluated over the shared table of pods and namespaces.

The MutatingAdmissionPolicy (v1 in deploy/mcs-allocator/pod-level/, v1beta1 in
pod-level-v1beta1/) and the ValidatingAdmissionPolicy (pod-guard/) are run as the API server
runs them — bindings' namespaceSelector, matchConstraints, matchConditions, variables in
order, the mutation merged into the pod, then the validations in order, the first failure's
messageExpression being the answer (staging/src/k8s.io/apiserver/pkg/admission/plugin/policy/
validating/dispatcher.go uses deniedDecisions[0]) — and must give the same answers, messages
included, as `cedar.mcs_allocator.podlevel.decide_pod`, the webhook's function.

Library and the semantics relied on. The expressions are evaluated with cel-python
(celpy 0.5.0), not cel-go, and are kept to what both evaluate alike:
- field selection on a map with a missing key is an error in both ("no such key"), so every
  optional field is guarded with `has()`; `object`, `namespaceObject` and `request` are
  plain JSON maps here, as they are unstructured maps in the API server
  (staging/src/k8s.io/apiserver/pkg/admission/plugin/cel/filter.go converts them with
  runtime.DefaultUnstructuredConverter, which drops empty `omitempty` fields: an empty
  level never reaches CEL there, and is treated as absent by the expressions anyway);
- cel-python's `has(a.b.c)` answers false when `a.b` is missing, where cel-go fails; so
  `test_every_has_is_guarded` checks that each `has(x.y)` over an optional `x` follows a
  `has(x)` in the same expression;
- only standard macros and operators: `has`, `filter`, `map`, `in`, `size`, `?:`, `+` on
  strings and on lists of strings (each container list is filtered on its own: Container
  and EphemeralContainer are different types to cel-go, their mapped strings are not);
  no Kubernetes extension library (no `join`, no optionals);
- `Object{...}` / `Object.spec{...}` apply configurations have no types in cel-python: the
  test rewrites each type name to one constructor that builds a map, which is what an apply
  configuration of non-atomic structs amounts to, and merges it into the pod field by field
  (server-side apply's merge for structs; seLinuxOptions is not atomic).
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel

from cedar.mcs_allocator.podlevel import level_patch
from cedar.sandbox.kubeapi_ops import json_patch
from tests.unit.test_mcs_admission_table import CASES, EXCLUDED, NAMESPACES, Case, decided

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mcs-allocator"
GUARD = DEPLOY / "pod-guard" / "pod-level-guard.yaml"
MUTATIONS = {
    "v1": DEPLOY / "pod-level" / "pod-level-mutation.yaml",
    "v1beta1": DEPLOY / "pod-level-v1beta1" / "pod-level-mutation.yaml",
}

_ENV = celpy.Environment()
_TYPE_NAME = re.compile(r"\bObject(?:\.\w+)*\s*\{")


def load(path: Path) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


@cache
def _program(expr: str) -> Any:
    return _ENV.program(_ENV.compile(_TYPE_NAME.sub("Object{", expr)))


def _object(fields: Any = None) -> Any:
    return celtypes.MapType(fields or {})


def evaluate(expr: str, activation: dict[str, Any]) -> Any:
    return _program(expr).evaluate({**activation, "Object": _object})


def to_python(value: Any) -> Any:
    if isinstance(value, celtypes.MapType):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, celtypes.ListType):
        return [to_python(v) for v in value]
    if isinstance(value, celtypes.BoolType):
        return bool(value)
    if isinstance(value, celtypes.StringType):
        return str(value)
    return value


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels and matchExpressions)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for req in selector.get("matchExpressions") or []:
        key, op, values = req["key"], req["operator"], req.get("values") or []
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[op]
        if not ok:
            return False
    return True


def rules_match(spec: dict[str, Any], operation: str, resource: str) -> bool:
    for rule in spec["matchConstraints"]["resourceRules"]:
        if operation in rule["operations"] and resource in rule["resources"]:
            return True
    return False


def merge_apply(obj: Any, config: Any) -> Any:
    """Merge an apply configuration of structs (no lists) into `obj`."""
    assert not isinstance(config, list), "the policy applies no lists"
    if not isinstance(config, dict):
        return copy.deepcopy(config)
    result = dict(obj) if isinstance(obj, dict) else {}
    for key, value in config.items():
        result[key] = merge_apply(result.get(key), value)
    return result


def _activation(case: Case, obj: dict[str, Any]) -> dict[str, Any]:
    request: dict[str, Any] = {
        "operation": case.operation,
        "namespace": case.namespace,
        "userInfo": {"username": "system:serviceaccount:tenant-a:deployer"},
        "dryRun": False,
    }
    if case.old is not None:
        request["subResource"] = "ephemeralcontainers"
    return {
        "object": json_to_cel(obj),
        "oldObject": json_to_cel(case.old),
        "request": json_to_cel(request),
        "namespaceObject": json_to_cel(NAMESPACES[case.namespace]),
    }


def _with_variables(spec: dict[str, Any], activation: dict[str, Any]) -> dict[str, Any]:
    variables: dict[str, Any] = {}
    for var in spec.get("variables", []):
        activation["variables"] = celtypes.MapType(
            {celtypes.StringType(k): v for k, v in variables.items()}
        )
        variables[var["name"]] = evaluate(var["expression"], activation)
    activation["variables"] = celtypes.MapType(
        {celtypes.StringType(k): v for k, v in variables.items()}
    )
    return activation


def _conditions_hold(spec: dict[str, Any], activation: dict[str, Any]) -> bool:
    # matchConditions see no `variables` and no `namespaceObject` (a real API server fails
    # such a condition with "no such key"): evaluate them without either.
    bare = {k: v for k, v in activation.items() if k not in ("variables", "namespaceObject")}
    return all(bool(evaluate(c["expression"], bare)) for c in spec.get("matchConditions", []))


def run_policies(case: Case, version: str) -> tuple[bool, dict[str, Any], str]:
    """(allowed, the pod after mutation, the refusal's message) as the API server would."""
    resource = "pods" if case.old is None else "pods/ephemeralcontainers"
    labels = NAMESPACES[case.namespace]["metadata"]["labels"]
    obj = copy.deepcopy(case.pod)
    mutation = load(MUTATIONS[version])
    policy, binding = (
        mutation["MutatingAdmissionPolicy"]["spec"],
        mutation["MutatingAdmissionPolicyBinding"]["spec"],
    )
    if selector_matches(binding["matchResources"]["namespaceSelector"], labels) and rules_match(
        policy, case.operation, resource
    ):
        activation = _activation(case, obj)
        if _conditions_hold(policy, activation):
            activation = _with_variables(policy, activation)
            for m in policy["mutations"]:
                assert m["patchType"] == "ApplyConfiguration"
                config = to_python(evaluate(m["applyConfiguration"]["expression"], activation))
                obj = merge_apply(obj, config)
    guard = load(GUARD)
    policy = guard["ValidatingAdmissionPolicy"]["spec"]
    binding = guard["ValidatingAdmissionPolicyBinding"]["spec"]
    if not (
        selector_matches(binding["matchResources"]["namespaceSelector"], labels)
        and rules_match(policy, case.operation, resource)
    ):
        return True, obj, ""
    activation = _activation(case, obj)
    if not _conditions_hold(policy, activation):
        return True, obj, ""
    activation = _with_variables(policy, activation)
    for validation in policy["validations"]:
        value = evaluate(validation["expression"], activation)
        assert isinstance(value, celtypes.BoolType), f"{validation['expression']} gave {value!r}"
        if not value:
            message = evaluate(validation["messageExpression"], activation)
            assert isinstance(message, str), f"{validation['messageExpression']} gave {message!r}"
            assert validation["reason"] == "Forbidden"
            return False, obj, str(message)
    return True, obj, ""


@pytest.mark.parametrize("version", sorted(MUTATIONS))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_policies_decide_as_the_webhook(case: Case, version: str) -> None:
    allowed, mutated, message = run_policies(case, version)
    decision = decided(case)
    assert allowed == decision.allowed == case.allowed
    assert message == decision.message
    expected = case.pod
    if decision.set_level is not None:
        expected = json_patch(case.pod, level_patch(case.pod, decision.set_level))
    if allowed:
        assert mutated == expected


def _expressions(doc: dict[str, Any]) -> list[str]:
    spec = doc["spec"]
    found = [c["expression"] for c in spec.get("matchConditions", [])]
    found += [v["expression"] for v in spec.get("variables", [])]
    for v in spec.get("validations", []):
        found += [v["expression"], v["messageExpression"]]
    found += [m["applyConfiguration"]["expression"] for m in spec.get("mutations", [])]
    return found


# Fields that are always there: the pod's spec and containers, the namespace's metadata,
# the request itself, and each element a macro iterates over.
ALWAYS = {"object", "object.spec", "namespaceObject", "namespaceObject.metadata", "c", "request"}


def _policy_docs() -> list[dict[str, Any]]:
    docs = list(load(GUARD).values()) + [d for p in MUTATIONS.values() for d in load(p).values()]
    return [d for d in docs if d["kind"].endswith("Policy")]


def test_every_has_is_guarded() -> None:
    unguarded = []
    for doc in _policy_docs():
        for expr in _expressions(doc):
            for match in re.finditer(r"has\(([\w.]+)\)", expr):
                parent = match.group(1).rsplit(".", 1)[0]
                if parent not in ALWAYS and f"has({parent})" not in expr[: match.start()]:
                    unguarded.append(f"{doc['kind']}: has({match.group(1)}) in {expr!r}")
    assert not unguarded, "\n".join(unguarded)


def test_match_conditions_read_only_the_pod() -> None:
    for doc in _policy_docs():
        for condition in doc["spec"].get("matchConditions", []):
            assert "namespaceObject" not in condition["expression"], condition
            assert "variables." not in condition["expression"], condition


def test_the_policies_hold_the_settings_defaults() -> None:
    guard = load(GUARD)
    variables = {
        v["name"]: v["expression"] for v in guard["ValidatingAdmissionPolicy"]["spec"]["variables"]
    }
    assert to_python(evaluate(variables["key"], {})) == "cedar.io/selinux-level"
    assert tuple(to_python(evaluate(variables["allowedTypes"], {}))) == ("container_t",)
    for path in (GUARD, *MUTATIONS.values()):
        for doc in load(path).values():
            if doc["kind"].endswith("Binding"):
                (req,) = doc["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
                assert req["key"] == "kubernetes.io/metadata.name"
                assert req["operator"] == "NotIn"
                assert set(req["values"]) == EXCLUDED
            else:
                assert doc["spec"]["failurePolicy"] == "Fail"
