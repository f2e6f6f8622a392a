"""The warm-up gate: when the puller may remove `cedar.io/warming:NoSchedule` from its node."""

from __future__ import annotations

from collections.abc import Collection, Iterable

import pytest

from cedar.proto.models import PodScheduling, Toleration
from cedar.proto.scheduling import NodeInfo, Taint, admits
from cedar.puller.errors import PullerConfigError
from cedar.puller.warmup import (
    DEFAULT_WARM_TIMEOUT,
    WARMING_TAINT_KEY,
    GateDecision,
    WarmTimeoutError,
    check_timeout,
    decide,
    has_warming_taint,
    removal_patch,
    taints_without_warming,
)

A, B, C = "reg.example.com/a:1", "reg.example.com/b:1", "reg.example.com/c:1"
WARMING = Taint(key=WARMING_TAINT_KEY, effect="NoSchedule")
GPU = Taint(key="nvidia.com/gpu", effect="NoSchedule", value="true")


def gate(
    *,
    tainted: bool = True,
    loaded: bool = True,
    desired: Iterable[str] = (A, B),
    present: Collection[str] = frozenset({A}),
    unpullable: Collection[str] = (),
    now: float = 200.0,
    timeout: float = DEFAULT_WARM_TIMEOUT,
    limit: int = 20,
) -> GateDecision:
    return decide(
        tainted=tainted,
        loaded=loaded,
        desired=desired,
        present=present,
        unpullable=unpullable,
        since=100.0,
        now=now,
        timeout=timeout,
        limit=limit,
    )


def test_default_timeout_is_ten_minutes() -> None:
    assert DEFAULT_WARM_TIMEOUT == 600.0
    assert gate().deadline == 700.0


def test_closed_while_a_desired_image_is_missing() -> None:
    decision = gate()
    assert not decision.remove
    assert decision.reason == "cold"
    assert decision.missing == (B,)
    assert decision.missing_count == 1


def test_open_once_every_desired_image_is_present() -> None:
    decision = gate(present={A, B, C})
    assert decision.remove and decision.reason == "warm" and decision.missing == ()


def test_an_empty_desired_set_once_loaded_is_warm() -> None:
    assert gate(desired=[], present=set()).reason == "warm"


def test_unpullable_images_do_not_hold_the_gate() -> None:
    assert gate(unpullable={B}).reason == "warm"


def test_the_timeout_opens_it_whatever_is_missing() -> None:
    assert not gate(now=699.9).remove
    decision = gate(now=700.0)
    assert decision.remove and decision.reason == "timeout" and decision.missing == (B,)
    assert gate(now=700.0, timeout=60.0, present=set()).reason == "timeout"
    assert gate(now=150.0, timeout=60.0).reason == "cold"


def test_not_loaded_stays_closed_until_the_timeout() -> None:
    assert gate(loaded=False, desired=[], present=set()).reason == "loading"
    assert not gate(loaded=False, desired=[]).remove
    assert gate(loaded=False, now=700.0).reason == "timeout"


def test_nothing_to_do_without_the_taint() -> None:
    decision = gate(tainted=False, present={A, B})
    assert not decision.remove and decision.reason == "no-taint"


def test_missing_list_is_bounded_and_sorted() -> None:
    many = [f"reg.example.com/i{n:02d}:1" for n in range(30)]
    decision = gate(desired=list(reversed(many)), present=set(), limit=5)
    assert decision.missing == tuple(many[:5])
    assert decision.missing_count == 30


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_timeouts_are_refused(bad: float) -> None:
    with pytest.raises(WarmTimeoutError, match="CEDAR_WARM_TIMEOUT") as info:
        check_timeout(bad)
    assert isinstance(info.value, PullerConfigError)
    assert check_timeout(90) == 90.0


def test_the_taint_is_not_a_constraint_for_cedars_matching() -> None:
    node = NodeInfo(name="n1", labels={"pool": "gpu"}, taints=(WARMING, GPU))
    assert has_warming_taint(node)
    assert node.blocking_taints() == (GPU,)
    tolerates_gpu = PodScheduling(
        node_selector={"pool": "gpu"},
        tolerations=(Toleration(key="nvidia.com/gpu", operator="Exists"),),
    )
    assert admits(tolerates_gpu, node)  # the warming taint itself needs no toleration
    assert not admits(PodScheduling(node_selector={"pool": "gpu"}), node)  # GPU taint stays
    # Whatever its effect, like the node.kubernetes.io/* condition taints.
    execute = NodeInfo(name="n2", taints=(Taint(key=WARMING_TAINT_KEY, effect="NoExecute"),))
    assert execute.blocking_taints() == ()
    assert admits(PodScheduling(), execute)
    assert not has_warming_taint(execute)  # but it is not the gate's taint
    # A key that only looks like it is an ordinary taint.
    other = NodeInfo(name="n3", taints=(Taint(key="cedar.io/warming-up", effect="NoSchedule"),))
    assert not admits(PodScheduling(), other)


def test_only_the_warming_taint_is_removed_from_the_spec() -> None:
    taints = [
        {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"},
        {"key": WARMING_TAINT_KEY, "effect": "NoSchedule"},
        {"key": WARMING_TAINT_KEY, "effect": "NoExecute"},  # not the gate's taint: kept
        {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"},
    ]
    kept = taints_without_warming(taints)
    assert kept == [taints[0], taints[2], taints[3]]
    assert taints_without_warming(kept) is None
    assert taints_without_warming(None) is None
    assert taints_without_warming([]) is None


def test_the_patch_tests_the_old_taints_then_replaces_them() -> None:
    taints = [
        {"key": WARMING_TAINT_KEY, "effect": "NoSchedule"},
        {"key": "x", "effect": "NoSchedule"},
    ]
    patch = removal_patch(taints)
    assert patch == [
        {"op": "test", "path": "/spec/taints", "value": taints},
        {"op": "replace", "path": "/spec/taints", "value": [taints[1]]},
    ]
    assert removal_patch([{"key": "x", "effect": "NoSchedule"}]) is None
