"""Pure: which SELinux level a tenant pod gets at admission, and which pods are refused.

One decision, made here for the webhook (`webhook.py`) and written out as CEL in the
admission policies of deploy/mcs-allocator/ (pod-level/): the unit tests run one table of
pods and namespaces through both and require the same answers, messages included. In a
namespace in scope:

1. CREATE, no pod-level `spec.securityContext.seLinuxOptions.level`, the namespace has a
   level: the level is set (only where absent, so that a pod asking for another level is
   refused below instead of being silently "corrected").
2. Then, in this order, the first rule that fails refuses the pod: the namespace has a
   level; the pod-level level equals it; every container's, init container's and ephemeral
   container's own level (where set) equals it; the pod-level and containers' SELinux types
   (where set) are allowed; no container is privileged (a privileged container runs
   unconfined, as spc_t).

Windows pods (`spec.os.name: windows`) cannot carry seLinuxOptions (the API refuses them)
and are left alone. Empty strings count as absent, as in the objects the API server hands
to CEL and to webhooks (`omitempty` fields). No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CONTAINER_LISTS = (
    ("containers", "container"),
    ("initContainers", "init container"),
    ("ephemeralContainers", "ephemeral container"),
)

# The rules in the order they are checked (and named in metrics and the tests).
RULES = ("no-level", "pod-level", "container-level", "pod-type", "container-type", "privileged")


@dataclass(frozen=True)
class PodRules:
    """What the decision needs of the settings."""

    allowed_types: tuple[str, ...] = ("container_t",)


@dataclass(frozen=True)
class NamespaceLevel:
    """A namespace as admission sees it: its level ('' while none) and whether it is in scope."""

    name: str
    level: str
    in_scope: bool


@dataclass(frozen=True)
class PodDecision:
    allowed: bool
    set_level: str | None = None  # the pod-level level the mutation sets, if any
    rule: str = ""  # which rule refused (RULES), or why nothing applied ("out-of-scope", ...)
    message: str = ""


def _get(obj: Any, *path: str) -> Any:
    node = obj
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def pod_selinux(pod: Mapping[str, Any], field: str) -> str:
    """The pod-level `spec.securityContext.seLinuxOptions.<field>` ('' when unset)."""
    return _text(_get(pod, "spec", "securityContext", "seLinuxOptions", field))


def containers(pod: Mapping[str, Any]) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """(kind, container) for every container, init container and ephemeral container."""
    for key, kind in CONTAINER_LISTS:
        items = _get(pod, "spec", key)
        if isinstance(items, Sequence) and not isinstance(items, str):
            for item in items:
                if isinstance(item, Mapping):
                    yield kind, item


def container_selinux(container: Mapping[str, Any], field: str) -> str:
    return _text(_get(container, "securityContext", "seLinuxOptions", field))


def is_windows(pod: Mapping[str, Any]) -> bool:
    return bool(_get(pod, "spec", "os", "name") == "windows")


def _name(container: Mapping[str, Any]) -> str:
    return _text(container.get("name"))


def decide_pod(
    pod: Mapping[str, Any],
    namespace: NamespaceLevel,
    rules: PodRules,
    *,
    operation: str = "CREATE",
) -> PodDecision:
    """The admission decision for `pod` (CREATE, or UPDATE of pods/ephemeralcontainers)."""
    if not namespace.in_scope:
        return PodDecision(True, rule="out-of-scope")
    if is_windows(pod):
        return PodDecision(True, rule="windows")
    level = namespace.level
    pod_level = pod_selinux(pod, "level")
    set_level = None
    if operation == "CREATE" and not pod_level and level:
        set_level = pod_level = level
    refusal = _first_refusal(pod, namespace, pod_level, rules)
    if refusal is not None:
        rule, message = refusal
        return PodDecision(False, rule=rule, message=message)
    return PodDecision(True, set_level=set_level, rule="mutated" if set_level else "admitted")


def _first_refusal(
    pod: Mapping[str, Any], namespace: NamespaceLevel, pod_level: str, rules: PodRules
) -> tuple[str, str] | None:
    level = namespace.level
    if not level:
        return "no-level", (
            f"namespace {namespace.name} has no SELinux level yet: cedar-mcs-allocator is "
            "assigning it; the pod can be created once it has one"
        )
    suffix = f"; namespace {namespace.name} requires level {level}"
    if pod_level != level:
        if not pod_level:
            return "pod-level", (
                "the pod has no spec.securityContext.seLinuxOptions.level" + suffix
            )
        return "pod-level", (
            f"the pod asks for spec.securityContext.seLinuxOptions.level {pod_level}" + suffix
        )
    for kind, c in containers(pod):
        own = container_selinux(c, "level")
        if own and own != level:
            return "container-level", (
                f"{kind} {_name(c)} asks for seLinuxOptions.level {own}" + suffix
            )
    pod_type = pod_selinux(pod, "type")
    if pod_type and pod_type not in rules.allowed_types:
        return "pod-type", (
            f"the pod asks for SELinux type {pod_type}, which tenant pods may not use" + suffix
        )
    for kind, c in containers(pod):
        own = container_selinux(c, "type")
        if own and own not in rules.allowed_types:
            return "container-type", (
                f"{kind} {_name(c)} asks for SELinux type {own}, which tenant pods may not use"
                + suffix
            )
    for kind, c in containers(pod):
        if _get(c, "securityContext", "privileged") is True:
            return "privileged", (
                f"{kind} {_name(c)} is privileged, so it would run unconfined (spc_t)" + suffix
            )
    return None


def level_patch(pod: Mapping[str, Any], level: str) -> list[dict[str, Any]]:
    """The JSON Patch (RFC 6902) that sets the pod-level level, creating what is missing."""
    context = _get(pod, "spec", "securityContext")
    if not isinstance(context, Mapping):
        return [
            {
                "op": "add",
                "path": "/spec/securityContext",
                "value": {"seLinuxOptions": {"level": level}},
            }
        ]
    if not isinstance(context.get("seLinuxOptions"), Mapping):
        return [
            {
                "op": "add",
                "path": "/spec/securityContext/seLinuxOptions",
                "value": {"level": level},
            }
        ]
    return [{"op": "add", "path": "/spec/securityContext/seLinuxOptions/level", "value": level}]


# -- what a running pod runs as (the watchdog) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class PodLevels:
    """The few fields the watchdog keeps of a pod: whom it is, and the levels it runs at.

    `level` is the pod-level level ('' when unset: the runtime picks a random pair);
    `overrides` are the containers that set a level of their own, as (description, level).
    A container without its own level runs at the pod's (kubelet passes the container's
    seLinuxOptions when set, else the pod's; the runtime gives a container without a level
    its sandbox's).
    """

    namespace: str
    name: str
    uid: str
    level: str
    overrides: tuple[tuple[str, str], ...] = ()


def pod_levels(pod: Mapping[str, Any]) -> PodLevels | None:
    """What the watchdog keeps of `pod`; None for pods that run nothing SELinux applies to
    (finished, Windows)."""
    meta = pod.get("metadata") or {}
    phase = _get(pod, "status", "phase")
    if phase in ("Succeeded", "Failed") or is_windows(pod):
        return None
    overrides = tuple(
        (f"{kind} {_name(c)}", own)
        for kind, c in containers(pod)
        if (own := container_selinux(c, "level"))
    )
    return PodLevels(
        namespace=_text(meta.get("namespace")),
        name=_text(meta.get("name")),
        uid=_text(meta.get("uid")),
        level=pod_selinux(pod, "level"),
        overrides=overrides,
    )


def mismatch(pod: PodLevels, expected: str) -> tuple[str, str] | None:
    """(who, the level found: '' for a pair the runtime chose) for the first part of `pod`
    that does not run at `expected`; None when every container does."""
    if pod.level != expected:
        return "the pod", pod.level
    for what, level in pod.overrides:
        if level != expected:
            return what, level
    return None


def describe(who: str, found: str) -> str:
    return f"{who} runs at {found or 'a pair the runtime chose (no seLinuxOptions.level)'}"
