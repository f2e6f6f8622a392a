"""Ledger snapshots against a real NATS server: a replica that starts from the snapshot and
the ledger stream after it has exactly the mirror of one that reads every key, and any
snapshot it cannot trust is ignored (counted), never half-used."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import nats
import pytest
from nats.js import JetStreamContext
from prometheus_client import REGISTRY

from cedar.mcs_allocator import snapshot_keeper
from cedar.mcs_allocator.ledger_store import LedgerStore
from cedar.mcs_allocator.ledger_stream import LedgerStream
from cedar.mcs_allocator.ledger_view import LedgerView
from cedar.mcs_allocator.mirror import Mirror, NoSnapshots
from cedar.mcs_allocator.pool import Pool
from cedar.mcs_allocator.settings import AllocatorSettings
from cedar.mcs_allocator.snapshot import Header
from cedar.mcs_allocator.snapshot_keeper import SnapshotReader, SnapshotWriter
from cedar.mcs_allocator.snapshot_store import SnapshotStore
from cedar.proto import subjects
from cedar.proto.ledger import LabelEntry, NsEntry, label_key, ns_key
from cedar.proto.levels import Level
from cedar.runtime.bus import ensure_kv, ensure_object_store
from cedar.runtime.topology import mcs_ledger_bucket, mcs_snapshots_bucket

pytestmark = pytest.mark.integration

T0 = datetime(2026, 5, 1, tzinfo=UTC)


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


SETTINGS = AllocatorSettings(nats_url="nats://unused", mcs_categories=64, pod_name="r-test")


async def ledger(js: JetStreamContext) -> LedgerStore:
    kv = await ensure_kv(js, mcs_ledger_bucket(SETTINGS))
    return LedgerStore(kv)


async def store(js: JetStreamContext) -> SnapshotStore:
    config = mcs_snapshots_bucket(SETTINGS)
    return SnapshotStore(await ensure_object_store(js, config), js)


async def mirror(js: JetStreamContext, snapshots: bool = True) -> Mirror:
    """A replica's mirror, loaded as at start-up."""
    source = SnapshotReader(await store(js)) if snapshots else NoSnapshots()
    loaded = Mirror(SETTINGS, LedgerStream(js), await ledger(js), source)
    await loaded.load()
    return loaded


async def writer(js: JetStreamContext, of: Mirror, dry_run: bool = False) -> SnapshotWriter:
    return SnapshotWriter(of, await store(js), dry_run=dry_run)


def state_of(view: LedgerView) -> dict[str, object]:
    return {
        "labels": view.labels,
        "ns": view.ns,
        "held": {uid: view.labels_of(uid) for uid in view._by_uid},
        "by_name": view._by_name,
        "masks": view.pool._masks,
        "quarantined": view.pool._quarantined,
        "free": view.pool.free,
    }


def counted(result: str) -> float:
    return REGISTRY.get_sample_value("cedar_mcs_snapshots_total", {"result": result}) or 0.0


def level_of(i: int) -> Level:
    return Pool(64, 2).unrank(i)


async def fill(led: LedgerStore, start: int, count: int) -> None:
    for i in range(start, start + count):
        level = level_of(i)
        uid, name = f"uid-{i}", f"tenant-{i}"
        assert await led.claim(LabelEntry(level, "allocated", name, uid, T0, "r-fill"))
        assert await led.bind(NsEntry(uid, name, level, True, T0))


async def test_snapshot_plus_replay_equals_reading_every_key(js: JetStreamContext) -> None:
    led = await ledger(js)
    await fill(led, 0, 120)
    first = await mirror(js)
    assert first.loaded_from == "ledger" and first.snapshot_due
    header = await (await writer(js, first)).write()
    assert header.labels == 120 and header.bindings == 120

    # Every kind of change after the snapshot: new claims, quarantine, release, purge.
    await fill(led, 120, 60)
    for i in range(0, 20):
        level = level_of(i)
        value, revision = await led.get(label_key(level))
        assert value is not None
        entry = LabelEntry.decode(label_key(level), value, revision)
        quarantined = entry._replace(state="quarantined", at=T0 + timedelta(hours=1))
        assert await led.change(quarantined, revision)
        assert await led.delete(ns_key(f"uid-{i}"))
    for i in range(20, 30):
        assert await led.delete(label_key(level_of(i)))
    await led.kv.purge(ns_key("uid-31"))

    loaded = counted("loaded")
    fast = await mirror(js)
    full = await mirror(js, snapshots=False)
    assert fast.loaded_from == "snapshot" and full.loaded_from == "ledger"
    assert counted("loaded") == loaded + 1
    assert fast.replayed > 0
    assert state_of(fast.view) == state_of(full.view)
    assert fast.seq == full.seq
    assert fast.view.counts(T0) == {"allocated": 150, "quarantined": 20, "free": 2016 - 170}


async def test_snapshot_of_a_recreated_bucket_is_ignored(js: JetStreamContext) -> None:
    led = await ledger(js)
    await fill(led, 0, 30)
    await (await writer(js, await mirror(js))).write()
    # The bucket deleted and made again: its sequences start over, the snapshot is of the
    # old one and must not be used.
    await js.delete_key_value(subjects.KV_MCS_LEDGER)
    led = await ledger(js)
    await fill(led, 100, 40)
    unusable = counted("unusable")
    replica = await mirror(js)
    assert replica.loaded_from == "ledger"
    assert counted("unusable") == unusable + 1
    assert state_of(replica.view) == state_of((await mirror(js, snapshots=False)).view)
    assert len(replica.view.labels) == 40


async def test_damaged_snapshot_is_ignored(js: JetStreamContext) -> None:
    led = await ledger(js)
    await fill(led, 0, 10)
    first = await mirror(js)
    header = Header(first.seq, first.stream_created, 10, 10, "2026-05-01T00:00:00Z", "x")
    await (await store(js)).write(b"CEDAR-MCS-LEDGER-SNAPSHOT\n\x00\x00\x00\x02{}", header)
    unusable = counted("unusable")
    replica = await mirror(js)
    assert replica.loaded_from == "ledger"
    assert counted("unusable") == unusable + 1
    assert len(replica.view.labels) == 10


async def test_snapshot_too_far_behind_is_not_used(js: JetStreamContext) -> None:
    led = await ledger(js)
    await fill(led, 0, 5)
    await (await writer(js, await mirror(js))).write()
    # Far more messages since the snapshot than keys: reading every key is cheaper.
    level = level_of(0)
    for hour in range(30):
        value, revision = await led.get(label_key(level))
        assert value is not None
        entry = LabelEntry.decode(label_key(level), value, revision)
        assert await led.change(entry._replace(at=T0 + timedelta(hours=hour)), revision)
    replica = await mirror(js)
    assert replica.loaded_from == "ledger"
    assert replica.view.labels[level].at == T0 + timedelta(hours=29)


async def test_a_new_snapshot_only_when_due(js: JetStreamContext) -> None:
    led = await ledger(js)
    await fill(led, 0, 5)
    keeper = await writer(js, await mirror(js))
    assert await keeper.maybe_write(0.0)  # none stored yet
    assert not await keeper.maybe_write(0.0)  # the stored one is current
    await fill(led, 5, 1)
    replica = await mirror(js)
    keeper = await writer(js, replica)
    assert replica.loaded_from == "snapshot" and replica.replayed == 2
    assert not await keeper.maybe_write(3600.0)  # stale, but written moments ago
    assert await keeper.maybe_write(0.0)
    stored = await (await store(js)).stored()
    assert stored is not None and stored.seq == replica.seq


async def test_dry_run_never_writes_a_snapshot(js: JetStreamContext) -> None:
    led = await ledger(js)
    await fill(led, 0, 3)
    keeper = await writer(js, await mirror(js), dry_run=True)
    assert not await keeper.maybe_write(0.0)
    assert await (await store(js)).stored() is None


async def test_empty_ledger_loads_without_a_snapshot(js: JetStreamContext) -> None:
    replica = await mirror(js)
    assert replica.loaded_from == "ledger" and not replica.snapshot_due
    assert replica.view.labels == {} and replica.seq == 0


async def test_snapshot_at_the_ledger_end_replays_nothing(js: JetStreamContext) -> None:
    led = await ledger(js)
    await fill(led, 0, 4)
    await (await writer(js, await mirror(js))).write()
    replica = await mirror(js)
    assert replica.loaded_from == "snapshot" and replica.replayed == 0
    assert len(replica.view.labels) == 4


async def test_chunks_left_by_a_lost_race_are_purged(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    led = await ledger(js)
    await fill(led, 0, 3)
    keeper = await writer(js, await mirror(js))
    assert await keeper.maybe_write(0.0)
    # Chunks no snapshot names: what a writer that lost a race leaves behind.
    await js.publish("$O.cedar-mcs-snapshots.C.lostrace", b"x" * 1000)
    snapshots = await store(js)
    assert await snapshots.orphans() == {"lostrace"}
    monkeypatch.setattr(snapshot_keeper, "ORPHAN_AGE", 3600.0)
    assert not await keeper.maybe_write(0.0)  # first seen: could be a write in progress
    assert not await keeper.maybe_write(0.0)  # not old enough yet
    assert await snapshots.orphans() == {"lostrace"}
    monkeypatch.setattr(snapshot_keeper, "ORPHAN_AGE", 0.0)
    assert not await keeper.maybe_write(0.0)  # old enough: purged
    assert await snapshots.orphans() == set()
    assert await snapshots.read() is not None  # the current snapshot is untouched
