"""When the stored ledger snapshot is used at start-up, and when a new one is written.

A snapshot is used only if it was taken of this very ledger stream and the stream has moved
on by fewer messages than it has keys; one that is missing, of another stream, damaged or
changing while read is logged, counted and ignored. Every replica checks on its own
jittered schedule whether a new one is due and writes it only if the stored one is behind
its mirror and older than half an interval, so replicas rarely duplicate the work.

I/O through `SnapshotStore` (the object store bucket `cedar-mcs-snapshots`); its failures
arrive as `BusError`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import UTC, datetime

from cedar.mcs_allocator import snapshot
from cedar.mcs_allocator.errors import SnapshotError, SnapshotUnavailable
from cedar.mcs_allocator.ledger_stream import StreamState
from cedar.mcs_allocator.metrics import SNAPSHOTS
from cedar.mcs_allocator.mirror import Mirror
from cedar.mcs_allocator.schedule import periodic, sleep_or_stop
from cedar.mcs_allocator.snapshot_store import SnapshotStore
from cedar.runtime.errors import BusError

log = logging.getLogger("cedar.mcs_allocator")

# Snapshot chunks no snapshot uses are purged after this long (a lost write race's leftovers).
ORPHAN_AGE = 300.0


class SnapshotReader:
    """The stored snapshot as a start-up source of the mirror."""

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store

    async def usable(self, stream: StreamState) -> snapshot.Image | None:
        """The stored snapshot, decoded, if it can help load this stream; else None."""
        try:
            stored = await self.store.stored()
            if stored is None:
                log.info("no ledger snapshot yet; reading every ledger key")
                return None
            if stored.stream_created != stream.created:
                log.warning(
                    "the ledger snapshot was taken of another ledger stream (created %s, this "
                    "one %s); ignored",
                    stored.stream_created,
                    stream.created,
                )
                SNAPSHOTS.labels(result="unusable").inc()
                return None
            if stream.last_seq - stored.seq > stream.messages:
                # Replaying more messages than there are keys costs more than reading them.
                log.info("the ledger snapshot is too old to help; reading every ledger key")
                return None
            data = await self.store.read()
            if data is None:
                return None
            image = snapshot.decode(data)
        except (SnapshotUnavailable, SnapshotError, BusError) as err:
            log.warning("cannot use the ledger snapshot (%s); reading every ledger key", err)
            SNAPSHOTS.labels(result="unusable").inc()
            return None
        if image.header.stream_created != stream.created:  # replaced since `stored`
            SNAPSHOTS.labels(result="unusable").inc()
            return None
        return image


class SnapshotWriter:
    """Writes the mirror's image to the store when one is due; a dry run never writes."""

    def __init__(self, mirror: Mirror, store: SnapshotStore, *, dry_run: bool) -> None:
        self.mirror = mirror
        self.store = store
        self.dry_run = dry_run
        self._orphans: dict[str, float] = {}  # unused snapshot chunk sets: first seen

    async def write(self) -> snapshot.Header:
        """Store an image of the mirror as it is now, at its stream sequence."""
        mirror = self.mirror
        # Copied in one step of the loop (the entries are immutable), encoded in a thread.
        labels, bindings = snapshot.of_view(mirror.view)
        data = await asyncio.to_thread(
            snapshot.encode,
            labels,
            bindings,
            seq=mirror.seq,
            stream_created=mirror.stream_created,
            replica=mirror.settings.pod_name,
            now=datetime.now(UTC),
        )
        header = snapshot.read_header(data)
        await self.store.write(data, header)
        SNAPSHOTS.labels(result="written").inc()
        log.info(
            "ledger snapshot written",
            extra={
                "seq": header.seq,
                "labels": header.labels,
                "bindings": header.bindings,
                "bytes": len(data),
            },
        )
        return header

    async def _purge_orphans(self) -> None:
        """Purge chunks no snapshot uses once they have been unused for ORPHAN_AGE (a write
        in progress takes seconds)."""
        now = time.monotonic()
        seen = self._orphans
        self._orphans = {nuid: seen.get(nuid, now) for nuid in await self.store.orphans()}
        for nuid, since in sorted(self._orphans.items()):
            if now - since >= ORPHAN_AGE:
                await self.store.purge(nuid)
                del self._orphans[nuid]
                log.info("purged the chunks of an abandoned snapshot", extra={"nuid": nuid})

    async def maybe_write(self, min_age: float) -> bool:
        """Write a snapshot unless the stored one is current, or younger than `min_age`
        seconds (another replica keeps it fresh). Failures are logged and counted."""
        created = self.mirror.stream_created
        if self.dry_run or not created:
            return False
        try:
            await self._purge_orphans()
            stored = await self.store.stored()
            if stored is not None and stored.stream_created == created:
                if stored.seq >= self.mirror.seq:
                    return False
                at = stored.written_at
                age = (datetime.now(UTC) - at).total_seconds() if at else None
                if age is not None and age < min_age:
                    return False
            await self.write()
            return True
        except (SnapshotError, BusError) as err:
            log.warning("cannot write a ledger snapshot (%s); the next try is scheduled", err)
            SNAPSHOTS.labels(result="failed").inc()
            return False

    async def keep_current(self, stop: asyncio.Event, interval: float) -> None:
        """Keep the stored snapshot near the ledger's end until `stop`."""
        if self.mirror.snapshot_due:
            # Replicas started together (an upgrade) would all write at once; spread them so
            # that the first one's snapshot is seen by the others.
            await sleep_or_stop(stop, random.uniform(0, min(10.0, interval / 2)))
            if not stop.is_set():
                await self.maybe_write(min(60.0, interval / 2))
        await periodic(stop, interval, lambda: self.maybe_write(interval / 2), 0.2)
