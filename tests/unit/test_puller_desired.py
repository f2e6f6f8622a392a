"""The incremental desired set."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cedar.proto.models import ContainerImage, PodScheduling, WorkloadImageSet
from cedar.proto.scheduling import NodeInfo
from cedar.puller.desired import DesiredSet

NOW = datetime(2026, 1, 1, tzinfo=UTC)
NODE = NodeInfo("n1", {"kubernetes.io/arch": "amd64", "pool": "a"})


def wis(
    name: str,
    *images: str,
    selector: dict[str, str] | None = None,
    deleted: bool = False,
    kind: str = "Deployment",
    expires_at: datetime | None = None,
) -> WorkloadImageSet:
    return WorkloadImageSet(
        kind=kind,
        namespace="ns",
        name=name,
        uid=f"uid-{name}",
        containers=tuple(
            ContainerImage(container=f"c{i}", image=img, reference=img)
            for i, img in enumerate(images)
        ),
        scheduling=PodScheduling(node_selector=selector or {}),
        replicas=0,
        observed_at=NOW,
        deleted=deleted,
        expires_at=expires_at,
    )


def test_union_refcount_and_priority() -> None:
    d = DesiredSet(NODE)
    c1 = d.apply(wis("a", "r/x:1", "r/y:1"), NOW)
    assert set(c1.added) == {"r/x:1", "r/y:1"}
    c2 = d.apply(wis("b", "r/x:1"), NOW)
    assert not c2  # r/x:1 was already desired: nothing new
    assert d.priority("r/x:1") == 2
    assert d.priority("r/y:1") == 1
    assert d.workloads_of("r/x:1") == ("Deployment/ns/a", "Deployment/ns/b")


def test_update_and_delete_are_incremental() -> None:
    d = DesiredSet(NODE)
    d.apply(wis("a", "r/x:1"), NOW)
    d.apply(wis("b", "r/x:1"), NOW)
    change = d.apply(wis("a", "r/x:2"), NOW)
    assert set(change.added) == {"r/x:2"}
    assert change.removed == set()  # b still wants r/x:1
    change = d.apply(wis("b", deleted=True), NOW)
    assert change.removed == {"r/x:1"}
    assert d.images() == ["r/x:2"]


def test_scaled_to_zero_counts() -> None:
    d = DesiredSet(NODE)
    d.apply(wis("idle", "r/idle:1"), NOW)
    assert "r/idle:1" in d


def test_unschedulable_workload_contributes_nothing_until_node_changes() -> None:
    d = DesiredSet(NODE)
    change = d.apply(wis("b", "r/b:1", selector={"pool": "b"}), NOW)
    assert not change
    assert len(d) == 0
    change = d.set_node(NodeInfo("n1", {"pool": "b"}))
    assert set(change.added) == {"r/b:1"}
    change = d.set_node(NODE)
    assert change.removed == {"r/b:1"}


def test_invalid_reference_is_kept_under_raw_text() -> None:
    d = DesiredSet(NODE)
    bad = WorkloadImageSet(
        kind="Deployment",
        namespace="ns",
        name="bad",
        uid="u",
        containers=(ContainerImage(container="c", image="Bad Image", error="contains whitespace"),),
        observed_at=NOW,
    )
    d.apply(bad, NOW)
    assert d.images() == ["Bad Image"]


def test_prepull_entries_expire() -> None:
    d = DesiredSet(NODE)
    later = NOW + timedelta(minutes=5)
    d.apply(wis("release", "r/p:1", kind="Prepull", expires_at=later), NOW)
    assert "r/p:1" in d
    assert d.next_expiry() == later
    assert not d.expire(NOW)
    assert d.expire(later).removed == {"r/p:1"}
    # An entry already expired when it arrives is ignored.
    assert not d.apply(wis("old", "r/o:1", kind="Prepull", expires_at=NOW), NOW)


def test_many_workloads_share_strings() -> None:
    d = DesiredSet(NODE)
    for i in range(1000):
        d.apply(wis(f"w{i}", "r/common:1", f"r/own-{i % 10}:1"), NOW)
    assert len(d) == 11
    assert d.priority("r/common:1") == 1000
    assert len(d.workloads_of("r/common:1")) == 20  # capped


def test_skips_are_reported_once_with_the_reason() -> None:
    d = DesiredSet(NODE)
    change = d.apply(wis("gpu", "r/gpu:1", selector={"pool": "gpu"}), NOW)
    assert change.skipped == {
        "Deployment/ns/gpu": (frozenset({"r/gpu:1"}), "nodeSelector pool=gpu (node has pool=a)")
    }
    # The same workload again (a status-only re-publish, a restart): no new skip.
    assert not d.apply(wis("gpu", "r/gpu:1", selector={"pool": "gpu"}), NOW).skipped
    # Admitted workloads are never skips.
    assert not d.apply(wis("web", "r/web:1", selector={"pool": "a"}), NOW).skipped
    # The node changes so that a workload it ran no longer fits: that is a skip too; the
    # one that did not fit before is not reported again.
    change = d.set_node(NodeInfo("n1", {"pool": "b"}))
    assert set(change.skipped) == {"Deployment/ns/web"}
    assert change.removed == {"r/web:1"}


def test_want_is_the_share_of_the_workloads_that_could_run_here() -> None:
    d = DesiredSet(NODE)
    assert d.want("r/x:1") == 0.0  # nothing here yet: no division by zero
    d.apply(wis("a", "r/x:1", "r/y:1"), NOW)
    d.apply(wis("b", "r/x:1"), NOW)
    d.apply(wis("c", "r/z:1"), NOW)
    d.apply(wis("d", "r/z:1"), NOW)
    # Workloads that cannot run here do not count, in the share or under it.
    d.apply(wis("elsewhere", "r/x:1", selector={"pool": "b"}), NOW)
    assert (d.want("r/x:1"), d.want("r/y:1"), d.want("r/z:1")) == (0.5, 0.25, 0.5)
    assert d.want("r/absent:1") == 0.0
    d.apply(wis("c", deleted=True), NOW)
    assert (d.want("r/x:1"), d.want("r/z:1")) == (2 / 3, 1 / 3)
