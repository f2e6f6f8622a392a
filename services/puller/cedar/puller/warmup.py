"""The warm-up gate of a new node: when its puller may lift `cedar.io/warming`. Pure: no I/O.

A node can join with the startup taint `cedar.io/warming:NoSchedule` (the kubelet's
`--register-with-taints`, or the node pool's taints), so that no tenant is scheduled onto it
while its image cache is cold. Its puller removes that taint, and only that one, once every
image desired on the node is present, or once `CEDAR_WARM_TIMEOUT` (default 10m) has passed
since the node was created, whichever comes first: a node never stays out of service longer
than that, whatever the registry does. Images that can never be pulled (a permanent failure:
not found, unauthorized, invalid reference) do not hold the gate, as they do not hold the
`warm` metric. Before the desired set is loaded the gate stays closed (an empty set then
means "not read yet", not "nothing to pull"); the timeout still applies.

The taint is not a scheduling constraint for Cedar's own matching, like the
`node.kubernetes.io/*` condition taints: a warming node must pull what tenants will run
there. The match itself ignores it (`cedar.proto.scheduling.NodeInfo.blocking_taints`).

It touches only its arguments; times are floats passed in (seconds, the caller's clock).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cedar.proto.scheduling import WARMING_TAINT_KEY, NodeInfo
from cedar.puller.errors import PullerConfigError

__all__ = [
    "DEFAULT_WARM_TIMEOUT",
    "WARMING_TAINT_EFFECT",
    "WARMING_TAINT_KEY",
    "WARM_TIMEOUT_VARIABLE",
    "GateDecision",
    "WarmTimeoutError",
    "check_timeout",
    "decide",
    "has_warming_taint",
    "is_warming_taint",
    "removal_patch",
    "taints_without_warming",
]

WARMING_TAINT_EFFECT = "NoSchedule"
WARM_TIMEOUT_VARIABLE = "CEDAR_WARM_TIMEOUT"
DEFAULT_WARM_TIMEOUT = 600.0

GateReason = Literal["no-taint", "warm", "timeout", "loading", "cold"]


class WarmTimeoutError(PullerConfigError):
    """`CEDAR_WARM_TIMEOUT` is unusable."""


def check_timeout(seconds: float) -> float:
    """The gate's timeout, validated: a positive number of seconds."""
    if not seconds > 0 or seconds == float("inf"):
        raise WarmTimeoutError(
            f"{WARM_TIMEOUT_VARIABLE} must be a positive duration (e.g. 10m), not {seconds!r}"
        )
    return float(seconds)


def is_warming_taint(key: str, effect: str) -> bool:
    return key == WARMING_TAINT_KEY and effect == WARMING_TAINT_EFFECT


def has_warming_taint(node: NodeInfo) -> bool:
    return any(is_warming_taint(t.key, t.effect) for t in node.taints)


@dataclass(frozen=True, slots=True)
class GateDecision:
    remove: bool  # lift the taint now
    reason: GateReason
    missing: tuple[str, ...]  # desired images not present yet (sorted; at most `limit`)
    missing_count: int
    deadline: float  # when the timeout lifts the gate regardless


def decide(
    *,
    tainted: bool,
    loaded: bool,
    desired: Iterable[str],
    present: Collection[str],
    unpullable: Collection[str] = (),
    since: float,
    now: float,
    timeout: float = DEFAULT_WARM_TIMEOUT,
    limit: int = 20,
) -> GateDecision:
    """Whether the puller may remove the warming taint from its node now.

    `tainted`: the node carries the taint (nothing to do otherwise). `loaded`: the desired
    set has been read to the end of the stream. `present`: the images the engine has;
    `unpullable`: desired images that failed permanently. `since`: when the node was
    created (or, if unknown, when the puller started).
    """
    deadline = since + timeout
    missing = sorted(i for i in desired if i not in present and i not in unpullable)
    shown = tuple(missing[:limit])
    if not tainted:
        return GateDecision(False, "no-taint", shown, len(missing), deadline)
    if now >= deadline:
        return GateDecision(True, "timeout", shown, len(missing), deadline)
    if not loaded:
        return GateDecision(False, "loading", shown, len(missing), deadline)
    if not missing:
        return GateDecision(True, "warm", (), 0, deadline)
    return GateDecision(False, "cold", shown, len(missing), deadline)


def taints_without_warming(
    taints: Sequence[Mapping[str, Any]] | None,
) -> list[dict[str, Any]] | None:
    """The Node's `spec.taints` with the warming taint taken out, every other entry as it
    was (order kept), for a patch that removes only that taint; None when it is not there."""
    entries = list(taints or ())
    kept = [
        dict(t)
        for t in entries
        if not is_warming_taint(str(t.get("key", "")), str(t.get("effect", "")))
    ]
    if len(kept) == len(entries):
        return None
    return kept


def removal_patch(taints: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """A JSON patch (RFC 6902) that removes only the warming taint, and fails (the `test`
    operation) if the node's taints changed since they were read, so that a concurrent
    change by someone else is never overwritten. None when the taint is not there."""
    kept = taints_without_warming(taints)
    if kept is None:
        return None
    old = [dict(t) for t in taints or ()]
    return [
        {"op": "test", "path": "/spec/taints", "value": old},
        {"op": "replace", "path": "/spec/taints", "value": kept},
    ]
