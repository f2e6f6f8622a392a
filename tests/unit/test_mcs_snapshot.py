"""Ledger snapshots (pure): a mirror encoded and decoded is the same mirror; damage is refused."""

from __future__ import annotations

import json
import zlib
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cedar.mcs_allocator import snapshot
from cedar.mcs_allocator.errors import SnapshotError
from cedar.mcs_allocator.ledger_view import LedgerView
from cedar.proto.ledger import LabelEntry, NsEntry, label_key, ns_key
from cedar.proto.levels import Level

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
WEEK = 7 * 86400.0


def state_of(view: LedgerView) -> dict[str, object]:
    """Everything a mirror holds, including its indexes and its pool."""
    pool = view.pool
    return {
        "labels": view.labels,
        "ns": view.ns,
        # Which of a uid's labels is "first" is an implementation detail.
        "held": {uid: view.labels_of(uid) for uid in view._by_uid},
        "by_name": view._by_name,
        "misfits": sorted(view.misfits),
        "masks": pool._masks,
        "taken": pool._taken,
        "tree": pool._tree,
        "quarantined": pool._quarantined,
        "heap": sorted(pool._heap),
    }


def round_trip(view: LedgerView, categories: int = 64, per_label: int = 2) -> LedgerView:
    labels, bindings = snapshot.of_view(view)
    data = snapshot.encode(
        labels, bindings, seq=42, stream_created="2026-01-01T00:00:00+00:00", replica="r-0", now=T0
    )
    header, labels2, bindings2 = snapshot.decode(data)
    assert header.seq == 42 and header.labels == len(labels) and header.bindings == len(bindings)
    assert header.stream_created == "2026-01-01T00:00:00+00:00" and header.replica == "r-0"
    return LedgerView.assemble(categories, per_label, WEEK, labels2, bindings2)


def mixed_entries() -> list[tuple[str, bytes, int]]:
    """Every kind of entry a ledger can hold, each with its own revision."""
    out: list[tuple[str, bytes, int]] = []

    def label(level: Level, state: str, name: str, uid: str, *, at: datetime, rep: str) -> None:
        entry = LabelEntry(level, state, name, uid, at, rep)  # type: ignore[arg-type]
        out.append((label_key(level), entry.encode(), len(out) + 1))

    def bind(uid: str, name: str, level: Level, written: bool, at: datetime) -> None:
        out.append((ns_key(uid), NsEntry(uid, name, level, written, at).encode(), len(out) + 1))

    for i in range(40):
        level = Level((i, i + 1 + i % 7))
        uid = f"0b5c{i:04d}-7d2e-4f1a-9c3b-5e6f7a8b9c0d"
        name = f"tenant-{i}"
        if i % 5 == 4:
            label(level, "quarantined", name, uid, at=T0 - timedelta(days=i), rep="cedar-mcs-1")
        else:
            at = T0 + timedelta(microseconds=i)
            label(level, "allocated", name, uid, at=at, rep=f"cedar-mcs-{i % 3}")
            bind(uid, name, level, i % 2 == 0, T0 + timedelta(seconds=i))
    # One uid holding two labels (an interrupted race), a binding that names no label of its
    # uid, a binding without any label, a label of three categories in a two-category pool
    # (a misfit), one past the pool's range, and a name that is not ASCII.
    label(
        Level((60, 61)),
        "allocated",
        "tenant-3",
        "0b5c0003-7d2e-4f1a-9c3b-5e6f7a8b9c0d",
        at=T0,
        rep="x",
    )
    bind("uid-loose", "loose", Level((1, 2)), False, T0)
    bind("uid-no-label", "orphan", Level((50, 52)), True, T0)
    label(Level((2, 5, 9)), "allocated", "three", "uid-three", at=T0, rep="old")
    label(Level((3, 900)), "quarantined", "wide", "uid-wide", at=T0, rep="old")
    label(Level((62, 63)), "allocated", "tenant-é", "uid-é", at=T0, rep="ré")
    return out


def test_round_trip_keeps_every_entry_index_and_the_pool() -> None:
    view = LedgerView.build(64, 2, WEEK, mixed_entries())
    assert len(view.misfits) == 2 and view._more  # the test covers what it says
    again = round_trip(view)
    assert state_of(again) == state_of(view)
    assert again.labels_of("0b5c0003-7d2e-4f1a-9c3b-5e6f7a8b9c0d") == {
        Level((3, 7)),
        Level((60, 61)),
    }
    assert again.counts(T0) == view.counts(T0)


def test_bindings_share_their_labels_strings() -> None:
    view = LedgerView.build(64, 2, WEEK, mixed_entries())
    again = round_trip(view)
    uid = "0b5c0000-7d2e-4f1a-9c3b-5e6f7a8b9c0d"
    label = again.labels[Level((0, 1))]
    assert again.ns[uid].uid is label.uid and again.ns[uid].level is label.level


def test_empty_ledger() -> None:
    view = LedgerView.build(64, 2, WEEK, [])
    assert state_of(round_trip(view)) == state_of(view)


def test_three_categories_per_label() -> None:
    entries = [
        (label_key(level), LabelEntry(level, "allocated", f"n{i}", f"u{i}", T0).encode(), i + 1)
        for i, level in enumerate([Level((0, 1, 2)), Level((3, 7, 9)), Level((1, 2, 30))])
    ]
    view = LedgerView.build(32, 3, WEEK, entries)
    assert state_of(round_trip(view, 32, 3)) == state_of(view)


names = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sets(st.integers(0, 15), min_size=2, max_size=2),
            st.booleans(),
            names,
            st.sampled_from(["u1", "u2", "u3", "u4"]),
            st.integers(0, 10**12),
            names,
            st.booleans(),
        ),
        max_size=40,
    )
)
def test_round_trip_any_ledger(
    rows: list[tuple[set[int], bool, str, str, int, str, bool]],
) -> None:
    entries: list[tuple[str, bytes, int]] = []
    for cats, quarantined, name, uid, micros, replica, bound in rows:
        level = Level(tuple(sorted(cats)))
        at = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
        state = "quarantined" if quarantined else "allocated"
        entry = LabelEntry(level, state, name, uid, at, replica)  # type: ignore[arg-type]
        entries.append((label_key(level), entry.encode(), len(entries) + 1))
        if bound:
            entries.append(
                (ns_key(uid), NsEntry(uid, name, level, True, at).encode(), len(entries) + 1)
            )
    # A read of the bucket holds each key once: its last value.
    last = {key: (key, value, rev) for key, value, rev in entries}
    view = LedgerView.build(16, 2, WEEK, sorted(last.values(), key=lambda e: e[2]))
    assert state_of(round_trip(view, 16)) == state_of(view)


def test_a_value_with_a_newline_cannot_be_encoded() -> None:
    entry = LabelEntry(Level((1, 2)), "allocated", "bad\nname", "u", T0)
    with pytest.raises(SnapshotError, match="newline"):
        snapshot.encode([entry], [], seq=1, stream_created="c", replica="r", now=T0)


def good_snapshot() -> bytes:
    view = LedgerView.build(64, 2, WEEK, mixed_entries())
    labels, bindings = snapshot.of_view(view)
    return snapshot.encode(labels, bindings, seq=9, stream_created="c", replica="r", now=T0)


def rebuilt(data: bytes, change: dict[str, object]) -> bytes:
    """The snapshot with header fields changed (and the body kept)."""
    start = len(snapshot.MAGIC) + 4
    size = int.from_bytes(data[len(snapshot.MAGIC) : start], "big")
    head = {**json.loads(data[start : start + size]), **change}
    raw = json.dumps(head).encode()
    return snapshot.MAGIC + len(raw).to_bytes(4, "big") + raw + data[start + size :]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: b"PK\x03\x04" + d, "not a Cedar ledger snapshot"),
        (lambda d: rebuilt(d, {"format": 2}), "format 2"),
        (lambda d: rebuilt(d, {"seq": None}), "incomplete header"),
        (lambda d: d[:-20], "corrupt body"),
        (lambda d: d[:-20] + bytes(20), "corrupt body"),
        (lambda d: rebuilt(d, {"sections": [1, 2]}), "sections"),
        (lambda d: rebuilt(d, {"labels": 41}), "wrong count"),
        (lambda d: rebuilt(d, {"replicas": []}), "replica"),
    ],
)
def test_damaged_snapshots_are_refused(damage: object, message: str) -> None:
    data = damage(good_snapshot())  # type: ignore[operator]
    with pytest.raises(SnapshotError, match=message):
        snapshot.decode(data)


def test_body_that_does_not_match_the_sections() -> None:
    data = good_snapshot()
    head, _ = snapshot._split(data)
    body = zlib.compress(b"short")
    raw = json.dumps(head).encode()
    with pytest.raises(SnapshotError, match="body is 5 bytes"):
        snapshot.decode(snapshot.MAGIC + len(raw).to_bytes(4, "big") + raw + body)
