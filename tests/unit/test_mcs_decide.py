from __future__ import annotations

from datetime import UTC, datetime

from cedar.mcs_allocator import decide as D
from cedar.mcs_allocator.ledger_view import LedgerView
from cedar.mcs_allocator.scope import Scope
from cedar.proto.ledger import LabelEntry, NsEntry
from cedar.proto.levels import Level

ANN = "cedar.io/selinux-level"
POLICY = D.Policy(Scope.of({"kube-system"}, "tier!=system"), (ANN,), 1024, 2)
NOW = datetime(2026, 1, 1, tzinfo=UTC)
L1, L2 = Level((5, 9)), Level((1, 2))


def view() -> LedgerView:
    return LedgerView.build(1024, 2, 3600.0, [])


def hold(v: LedgerView, level: Level, name: str, uid: str, written: bool | None = True) -> None:
    v.set_label(LabelEntry(level, "allocated", name, uid, NOW, revision=1))
    if written is not None:
        v.set_ns(NsEntry(uid, name, level, written, NOW, revision=2))


def ns(name: str = "t", uid: str = "u1", level: str | None = None, **labels: str) -> D.NsObject:
    return D.NsObject(name, uid, labels, {ANN: level} if level else {}, "7")


def test_new_namespace_is_allocated() -> None:
    assert D.decide(ns(), view(), POLICY) == [D.Allocate(previous=None)]


def test_out_of_scope() -> None:
    assert D.decide(ns("kube-system"), view(), POLICY) == [D.Noop("out-of-scope")]
    assert D.decide(ns(tier="system"), view(), POLICY) == [D.Noop("out-of-scope")]


def test_existing_consistent_in_any_spelling() -> None:
    v = view()
    hold(v, L1, "t", "u1")
    assert D.decide(ns(level="s0:c5,c9"), v, POLICY) == [D.Noop("existing", L1)]
    # another tool's high-to-low order is the same label, but we rewrite it canonically
    assert D.decide(ns(level="s0:c9,c5"), v, POLICY) == [D.Write(L1, False, "s0:c9,c5")]


def test_tamper_changed_and_removed() -> None:
    v = view()
    hold(v, L1, "t", "u1")
    assert D.decide(ns(level="s0:c1,c2"), v, POLICY) == [D.Write(L1, True, "s0:c1,c2")]
    assert D.decide(ns(), v, POLICY) == [D.Write(L1, True, None)]


def test_interrupted_allocation_is_not_tamper() -> None:
    v = view()
    hold(v, L1, "t", "u1", written=False)
    assert D.decide(ns(), v, POLICY) == [D.Write(L1, False, None)]
    v2 = view()
    hold(v2, L1, "t", "u1", written=None)  # claimed, never bound
    assert D.decide(ns(), v2, POLICY) == [D.Bind(L1), D.Write(L1, False, None)]


def test_adopt_and_conflict() -> None:
    v = view()
    assert D.decide(ns(level="s0:c9,c5"), v, POLICY) == [D.Adopt(L1)]
    hold(v, L1, "other", "u9")
    assert D.decide(ns(level="s0:c5,c9"), v, POLICY) == [
        D.LevelConflict(L1, "u9", "other", "allocated")
    ]


def test_invalid_annotation_replaced() -> None:
    assert D.decide(ns(level="s0:c0.c1023"), view(), POLICY) == [D.Allocate("s0:c0.c1023")]


def test_deleted_releases() -> None:
    v = view()
    hold(v, L1, "t", "u1")
    assert D.decide(ns().gone(), v, POLICY) == [D.Release("u1", "t", L1)]
    assert D.decide(ns(uid="u2").gone(), v, POLICY) == [D.Noop("no-label")]


def test_same_name_new_uid_releases_old_and_allocates() -> None:
    v = view()
    hold(v, L1, "t", "u1")
    # the deletion marker was overwritten by the re-creation before it was consumed
    assert D.decide(ns(uid="u2", level="s0:c5,c9"), v, POLICY) == [
        D.Release("u1", "t", L1),
        D.LevelConflict(L1, "u1", "t", "allocated"),
    ]
    assert D.decide(ns(uid="u2"), v, POLICY) == [D.Release("u1", "t", L1), D.Allocate(None)]


def test_two_labels_for_one_uid_keeps_the_bound_one() -> None:
    v = view()
    hold(v, L1, "t", "u1")
    v.set_label(LabelEntry(L2, "allocated", "t", "u1", NOW, revision=5))
    assert D.decide(ns(level="s0:c5,c9"), v, POLICY) == [
        D.Drop("u1", L2),
        D.Noop("existing", L1),
    ]


def test_conflicts_report() -> None:
    objs = [ns("a", "1", "s0:c5,c9"), ns("b", "2", "s0:c9,c5"), ns("c", "3", "s0:c1,c2")]
    assert list(D.conflicts(objs, POLICY)) == [L1]


def test_view_counts_and_indexes() -> None:
    v = view()
    hold(v, L1, "t", "u1")
    assert v.counts(NOW) == {"allocated": 1, "quarantined": 0, "free": 523_775}
    v.set_label(LabelEntry(L1, "quarantined", "t", "u1", NOW, revision=9))
    assert v.labels_of("u1") == set() and v.uid_for_name("t") is None
    assert v.counts(NOW) == {"allocated": 0, "quarantined": 1, "free": 523_775}
    v.apply("label.5_9", None, 10)
    assert v.counts(NOW)["free"] == 523_776
