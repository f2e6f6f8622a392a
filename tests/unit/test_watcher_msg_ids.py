"""Nats-Msg-Id of the watcher's messages: the same for the same change (two replicas, a
retry), another one for every other change, A -> B -> A included.

CEDAR_HISTORY drops a repeated id within its duplicate window, and CEDAR_WORKLOADS, which
copies the history, drops one within its own (100 ms, the least NATS accepts) — so a
repeated id for a different change could hide that change from the desired state when a
lagging copy catches up in one burst (tests/chaos/test_history_sourcing.py shows it).
"""

from __future__ import annotations

from datetime import UTC, datetime

from cedar.proto.models import ContainerImage, WorkloadImageSet
from cedar.watcher.messages import live_workload, workload_marker

NOW = datetime(2026, 12, 2, tzinfo=UTC)


def _item(image: str, *, rv: str, generation: int | None) -> WorkloadImageSet:
    return WorkloadImageSet(
        kind="Pod",
        namespace="t",
        name="web",
        uid="u1",
        containers=(ContainerImage(container="c", image=image),),
        resource_version=rv,
        generation=generation,
        observed_at=NOW,
    )


def test_without_a_generation_a_change_back_gets_a_new_id() -> None:
    a1 = live_workload(_item("a:1", rv="10", generation=None))
    b = live_workload(_item("b:1", rv="11", generation=None))
    a2 = live_workload(_item("a:1", rv="12", generation=None))
    assert a1.digest == a2.digest  # the same content...
    assert len({a1.msg_id, b.msg_id, a2.msg_id}) == 3  # ...stored again under its own id
    assert live_workload(_item("a:1", rv="10", generation=None)).msg_id == a1.msg_id


def test_with_a_generation_the_id_follows_the_generation_not_the_resource_version() -> None:
    a1 = live_workload(_item("a:1", rv="10", generation=1))
    b = live_workload(_item("b:1", rv="11", generation=2))
    a3 = live_workload(_item("a:1", rv="12", generation=3))
    assert len({a1.msg_id, b.msg_id, a3.msg_id}) == 3
    # A replica that saw the same spec at a later status update: one message, not two.
    assert live_workload(_item("a:1", rv="19", generation=1)).msg_id == a1.msg_id


def _marker(rv: str, because: tuple[str, ...]) -> str:
    return workload_marker(
        "ReplicaSet",
        "t",
        "web-1",
        "u1",
        observed_at=NOW,
        ttl=60,
        resource_version=rv,
        because=because,
    ).msg_id


def test_a_revision_dropped_twice_gets_two_ids_and_a_deletion_one() -> None:
    kept = ("u2", "u3")
    assert _marker("20", kept) != _marker("25", kept)  # dropped, kept again, dropped again
    assert _marker("20", kept) == _marker("20", kept)  # the same drop seen twice
    # A uid is deleted once: replicas that saw the deletion at other versions agree.
    assert _marker("20", ()) == _marker("31", ())
