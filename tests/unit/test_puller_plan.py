"""Pull planning and per-image bookkeeping."""

from __future__ import annotations

import random
from collections.abc import Callable

from cedar.puller.plan import (
    ImageRecord,
    Policy,
    failure_delay,
    on_evicted,
    on_pull_failed,
    on_pull_succeeded,
    plan,
    refresh_delay,
    spread,
)

POLICY = Policy(
    refresh_interval=3600,
    refresh_jitter=0.1,
    backoff_base=2,
    backoff_max=600,
    permanent_retry=3600,
    node="node-1",
)
A = "reg.example.com/team/a:1"
B = "reg.example.com/team/b:1"
C = "other.example.com/c:1"
D = "reg.example.com/team/d@sha256:" + "a" * 64


def prio(mapping: dict[str, int]) -> Callable[[str], int]:
    return lambda image: mapping.get(image, 1)


def test_missing_first_by_priority_within_slots() -> None:
    result = plan([A, B, C], prio({A: 1, B: 5, C: 3}), {}, (), {}, now=0, slots=2)
    assert result.pulls == [(B, "pull"), (C, "pull")]


def test_in_flight_never_twice_and_present_skipped() -> None:
    result = plan([A, B, C], prio({}), {C: None}, {A}, {}, now=0, slots=3)
    assert result.pulls == [(B, "pull")]


def test_backoff_and_breaker_and_disk() -> None:
    records = {A: ImageRecord(A, next_attempt=100.0)}
    result = plan(
        [A, B, C], prio({}), {}, (), records, now=50, slots=3, registry_down={"other.example.com"}
    )
    assert result.pulls == [(B, "pull")]
    assert result.blocked_registry == [C]
    assert result.next_wakeup == 100.0
    low = plan([A, B], prio({}), {}, (), {}, now=0, slots=3, disk_low=True)
    assert low.pulls == []


def test_refresh_after_missing_and_never_for_digests() -> None:
    records = {
        A: ImageRecord(A, state="present", refresh_at=10.0),
        D: ImageRecord(D, state="present", refresh_at=None),
    }
    result = plan([A, B, D], prio({}), {A: "sha256:x", D: None}, (), records, now=20, slots=3)
    assert result.pulls == [(B, "pull"), (A, "refresh")]
    not_due = plan(
        [A], prio({}), {A: None}, (), {A: ImageRecord(A, refresh_at=30.0)}, now=20, slots=3
    )
    assert not_due.pulls == [] and not_due.next_wakeup == 30.0


def test_invalid_references_reported_not_pulled() -> None:
    result = plan(["Bad Image"], prio({}), {}, (), {}, now=0, slots=3)
    assert result.pulls == []
    assert result.invalid[0][0] == "Bad Image"


def test_refresh_jitter_is_per_node_and_bounded() -> None:
    other = Policy(**{**POLICY.__dict__, "node": "node-2"})
    assert spread("node-1", A) != spread("node-2", A)
    assert 0 <= spread("node-1", A) < 1
    for policy in (POLICY, other):
        after_pull = refresh_delay(policy, A, after_start=False)
        assert 3600 * 0.9 <= after_pull <= 3600
        assert 0 <= refresh_delay(policy, A, after_start=True) < 3600
    delays = {
        refresh_delay(Policy(**{**POLICY.__dict__, "node": f"n{i}"}), A, after_start=True)
        for i in range(100)
    }
    assert len(delays) == 100  # a fleet does not refresh in the same second


def test_permanent_failures_retry_slowly() -> None:
    rng = random.Random(1)
    for _ in range(50):
        assert failure_delay(POLICY, "not_found", 1, rng) >= 3600 * 0.9
        assert failure_delay(POLICY, "unauthorized", 9, rng) >= 3600 * 0.9
    transient = [failure_delay(POLICY, "timeout", n, rng) for n in range(1, 20)]
    assert all(d <= 600 for d in transient)
    assert failure_delay(POLICY, "timeout", 1, rng) <= 2


def state_of(record: ImageRecord) -> str:
    return record.state


def test_record_transitions() -> None:
    rng = random.Random(2)
    record = ImageRecord(A)
    on_pull_failed(record, POLICY, reason="timeout", error="slow", now=0, rng=rng, present=False)
    assert record.state == "failed" and record.failures == 1 and record.next_attempt > 0
    on_pull_succeeded(record, POLICY, "sha256:1", 10, by_digest=False)
    assert state_of(record) == "present" and record.failures == 0 and record.brought
    assert record.refresh_at is not None and record.refresh_at > 10
    # A failed refresh keeps the image present.
    on_pull_failed(record, POLICY, reason="timeout", error="x", now=20, rng=rng, present=True)
    assert state_of(record) == "present"
    first = on_evicted(record, POLICY, 30, rng)
    assert state_of(record) == "missing" and not record.brought and record.evictions == 1
    record.brought = True
    second = on_evicted(record, POLICY, 30, rng)
    assert second > first / 2  # the wait grows with each eviction
    assert record.next_attempt > 30
