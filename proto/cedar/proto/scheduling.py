"""Could a workload's pods be scheduled on a node? Pure: Kubernetes' rules, no I/O.

Only the required, node-level constraints count: nodeSelector, required node affinity
(terms ORed, expressions within a term ANDed) and NoSchedule/NoExecute taints against the
pod's tolerations. Preferences and pod (anti-)affinity cannot rule a node out for good, so
they do not stop pre-pulling. Taints the node lifecycle controller sets for conditions
(`node.kubernetes.io/not-ready`, `unreachable`, `disk-pressure`, ...) are transient: a node
that is still becoming Ready is exactly the one that needs warming, so they are ignored;
so is Cedar's own warm-up taint (`cedar.io/warming`, which a node carries until its puller
has pulled what it must hold: it keeps tenants away, not the images they will need).
`kubernetes.io/os` and `kubernetes.io/arch` are ordinary node labels and match like any
other through the selector and affinity.

The puller applies it to its own node; `cedar prepull` to every node that reports status.
It touches nothing but its arguments (and `platform.machine()` for the local arch label).
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cedar.proto.models import (
    NodeSelectorRequirement,
    NodeSelectorTerm,
    PodScheduling,
    Toleration,
)

CONDITION_TAINT_PREFIX = "node.kubernetes.io/"
# Cedar's warm-up gate: the puller lifts it once the node's images are present.
WARMING_TAINT_KEY = "cedar.io/warming"
BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})
OS_LABEL = "kubernetes.io/os"
ARCH_LABEL = "kubernetes.io/arch"

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class Taint:
    key: str
    effect: str
    value: str = ""


@dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()

    def blocking_taints(self) -> tuple[Taint, ...]:
        """The taints that rule pods out: NoSchedule/NoExecute, except the transient
        condition taints and the warm-up taint (see the module docstring)."""
        return tuple(
            t
            for t in self.taints
            if t.effect in BLOCKING_EFFECTS
            and not t.key.startswith(CONDITION_TAINT_PREFIX)
            and t.key != WARMING_TAINT_KEY
        )


def node_from_object(obj: Mapping[str, Any]) -> NodeInfo:
    """A NodeInfo from a Node object as the API returns it (plain JSON)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    taints = tuple(
        Taint(
            key=str(t.get("key", "")), effect=str(t.get("effect", "")), value=t.get("value") or ""
        )
        for t in spec.get("taints") or ()
    )
    return NodeInfo(
        name=str(meta.get("name", "")), labels=dict(meta.get("labels") or {}), taints=taints
    )


def local_platform_labels() -> dict[str, str]:
    machine = platform.machine().lower()
    return {OS_LABEL: "linux", ARCH_LABEL: _ARCH.get(machine, machine)}


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` (a bare `k` means an empty value)."""
    labels: dict[str, str] = {}
    for raw in text.split(","):
        part = raw.strip()
        if part:
            key, _, value = part.partition("=")
            labels[key.strip()] = value.strip()
    return labels


def parse_taints(text: str) -> tuple[Taint, ...]:
    """`key=value:Effect,key:Effect` as in `kubectl taint`."""
    taints: list[Taint] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        body, sep, effect = part.rpartition(":")
        if not sep or effect not in {"NoSchedule", "PreferNoSchedule", "NoExecute"}:
            raise ValueError(f"invalid taint {part!r}: expected key[=value]:Effect")
        key, _, value = body.partition("=")
        taints.append(Taint(key=key, effect=effect, value=value))
    return tuple(taints)


def static_node(name: str, labels_text: str = "", taints_text: str = "") -> NodeInfo:
    """The node described by settings, with the local os/arch unless given."""
    labels = local_platform_labels() | {"kubernetes.io/hostname": name}
    labels |= parse_labels(labels_text)
    return NodeInfo(name=name, labels=labels, taints=parse_taints(taints_text))


def _requirement_matches(req: NodeSelectorRequirement, labels: Mapping[str, str]) -> bool:
    value = labels.get(req.key)
    op = req.operator
    if op == "In":
        return value is not None and value in req.values
    if op == "NotIn":
        return value is None or value not in req.values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    # Gt / Lt: one integer value; a label that is not an integer never matches.
    if value is None or len(req.values) != 1:
        return False
    try:
        have, want = int(value), int(req.values[0])
    except ValueError:
        return False
    return have > want if op == "Gt" else have < want


def _term_matches(term: NodeSelectorTerm, node: NodeInfo) -> bool:
    # An empty term matches no node (Kubernetes: "null or empty term matches no objects").
    if not term.match_expressions and not term.match_fields:
        return False
    if not all(_requirement_matches(r, node.labels) for r in term.match_expressions):
        return False
    # metadata.name is the only field Kubernetes supports in matchFields.
    fields = {"metadata.name": node.name}
    return all(_requirement_matches(r, fields) for r in term.match_fields)


def _tolerates(toleration: Toleration, taint: Taint) -> bool:
    if toleration.effect is not None and toleration.effect != taint.effect:
        return False
    if toleration.key is None or toleration.key == "":
        # An empty key with Exists tolerates every taint.
        return toleration.operator == "Exists"
    if toleration.key != taint.key:
        return False
    if toleration.operator == "Exists":
        return True
    return (toleration.value or "") == taint.value


def mismatch(scheduling: PodScheduling, node: NodeInfo) -> str | None:
    """Why a pod with this scheduling could not run on `node`, or None if it could."""
    for key, value in scheduling.node_selector.items():
        have = node.labels.get(key)
        if have != value:
            return f"nodeSelector {key}={value} (node has {key}={have or '<unset>'})"
    terms = scheduling.required_node_affinity
    if terms and not any(_term_matches(t, node) for t in terms):
        return "no required node affinity term matches the node's labels"
    tols = tuple(scheduling.tolerations)
    for taint in node.blocking_taints():
        if not any(_tolerates(t, taint) for t in tols):
            shown = f"{taint.key}={taint.value}" if taint.value else taint.key
            return f"taint {shown}:{taint.effect} not tolerated"
    return None


def admits(scheduling: PodScheduling, node: NodeInfo) -> bool:
    """Whether a pod with this scheduling could run on `node`."""
    return mismatch(scheduling, node) is None
