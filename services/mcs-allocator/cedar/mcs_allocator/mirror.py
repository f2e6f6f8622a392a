"""This replica's ledger mirror, kept current: loaded at start (from the ledger snapshot and
the stream after it, or from every key), then followed, and read again key by key on demand.

The mirror is only used to choose; every write is a compare-and-set on the bucket, so a
lagging mirror costs a retry, never a duplicate.

I/O only through its collaborators: the ledger's stream (`LedgerStream`), the ledger bucket
(`LedgerStore`) and a snapshot source (`cedar.mcs_allocator.snapshot_keeper.SnapshotReader`,
or `NoSnapshots`). Their failures arrive as `BusError`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from cedar.mcs_allocator.errors import ConfigurationRefused
from cedar.mcs_allocator.ledger_store import LedgerStore
from cedar.mcs_allocator.ledger_stream import LedgerStream, StreamState
from cedar.mcs_allocator.ledger_view import LedgerView
from cedar.mcs_allocator.metrics import LABELS, LEDGER_LOAD_SECONDS, SNAPSHOTS
from cedar.mcs_allocator.schedule import sleep_or_stop
from cedar.mcs_allocator.settings import AllocatorSettings
from cedar.mcs_allocator.snapshot import Image
from cedar.proto.ledger import label_key, ns_key
from cedar.runtime.backoff import Backoff
from cedar.runtime.errors import BusError

log = logging.getLogger("cedar.mcs_allocator")

# Replaying at least this many ledger messages after the snapshot at start-up makes a new
# snapshot due at once.
SNAPSHOT_TAIL = 10_000
# A key read back as never written is newer than anything the mirror holds of it.
_NEWEST = 1 << 62


class SnapshotSource(Protocol):
    async def usable(self, stream: StreamState) -> Image | None:
        """The stored snapshot, decoded, if it can help load this stream; else None."""


class NoSnapshots:
    """Snapshots are off (CEDAR_MCS_SNAPSHOT_INTERVAL=0): every start reads every key."""

    async def usable(self, stream: StreamState) -> None:
        return None


class Mirror:
    def __init__(
        self,
        settings: AllocatorSettings,
        stream: LedgerStream,
        store: LedgerStore,
        snapshots: SnapshotSource,
    ) -> None:
        self.settings = settings
        self.stream = stream
        self.store = store
        self.snapshots = snapshots
        self.quarantine = settings.mcs_quarantine.total_seconds()
        self.view = LedgerView.build(
            settings.mcs_categories, settings.mcs_categories_per_label, self.quarantine, []
        )
        self.seq = 0  # the ledger stream's sequence the mirror has reached
        self.stream_created = ""
        self.snapshot_due = False
        self.loaded_from = ""  # "snapshot" or "ledger", once loaded
        self.replayed = 0  # ledger messages replayed after the snapshot

    # -- load ------------------------------------------------------------------------

    async def load(self) -> None:
        """Build the mirror (and the pool): from the snapshot and the ledger stream after
        it, or, with no usable snapshot, from every key of the ledger."""
        started = time.perf_counter()
        state = await self.stream.state()
        self.stream_created = state.created
        keys = state.messages
        # Half a million new objects, none in a cycle: the cyclic GC would only walk them
        # over and over (see LedgerView.build).
        collecting = gc.isenabled()
        gc.disable()
        try:
            replayed = await self._from_snapshot(state) if keys else None
            if replayed is None:
                source, tail = "ledger", 0
                view = LedgerView.build(
                    self.settings.mcs_categories,
                    self.settings.mcs_categories_per_label,
                    self.quarantine,
                    await self._read_all(state),
                )
                self._refuse_misfits(view)
                self.view = view
            else:
                source, tail = "snapshot", replayed
        finally:
            if collecting:
                gc.enable()
        # The mirror lives as long as the process: keep the cyclic GC from walking its
        # million objects in every later full collection.
        gc.freeze()
        took = time.perf_counter() - started
        LEDGER_LOAD_SECONDS.set(took)
        self.loaded_from, self.replayed = source, tail
        # Next start should not read every key again, nor a long tail.
        self.snapshot_due = keys > 0 and (source == "ledger" or tail >= SNAPSHOT_TAIL)
        log.info(
            "ledger loaded from the %s in %.2fs",
            source,
            took,
            extra={
                "labels": len(self.view.labels),
                "bindings": len(self.view.ns),
                "seq": self.seq,
                "replayed": tail,
                **self.view.counts(datetime.now(UTC)),
            },
        )

    def _refuse_misfits(self, view: LedgerView) -> None:
        if view.misfits:
            sample = ", ".join(str(e.level) for e in view.misfits[:5])
            raise ConfigurationRefused(
                f"the ledger holds {len(view.misfits)} label(s) that "
                f"CEDAR_MCS_CATEGORIES={self.settings.mcs_categories} and "
                f"CEDAR_MCS_CATEGORIES_PER_LABEL={self.settings.mcs_categories_per_label} "
                f"cannot express (e.g. {sample}); refusing to start rather than hand out "
                "duplicates — restore the settings the ledger was written with"
            )

    async def _from_snapshot(self, state: StreamState) -> int | None:
        """The mirror from the stored snapshot plus the ledger stream after it; the number
        of stream messages replayed, or None when there is no usable snapshot."""
        image = await self.snapshots.usable(state)
        if image is None:
            return None
        header, labels, bindings = image
        view = LedgerView.assemble(
            self.settings.mcs_categories,
            self.settings.mcs_categories_per_label,
            self.quarantine,
            labels,
            bindings,
        )
        del image, labels, bindings
        changes = await self.stream.after(header.seq)
        for key, value, seq in changes:
            view.apply(key, value, seq)
        self._refuse_misfits(view)
        self.view = view
        self.seq = changes[-1][2] if changes else header.seq
        SNAPSHOTS.labels(result="loaded").inc()
        return len(changes)

    async def _read_all(self, state: StreamState) -> list[tuple[str, bytes, int]]:
        """Every key's last value (deleted keys left out). The stream sequence reached is
        kept in `self.seq`, where `follow` resumes, so nothing written meanwhile is missed.
        """
        self.seq = state.last_seq
        if not state.messages:
            return []
        entries: list[tuple[str, bytes, int]] = []
        seq = state.last_seq
        for key, value, sseq in await self.stream.current():
            seq = max(seq, sseq)
            if value is not None:
                entries.append((key, value, sseq))
        self.seq = seq
        return entries

    # -- keeping current -------------------------------------------------------------

    async def follow(self, stop: asyncio.Event, reconnects: Callable[[], int]) -> None:
        """Keep the mirror current from the sequence the load reached; start a new
        consumer there after a reconnect (the server's ephemeral one may be gone) — the
        revisions make replays harmless."""
        backoff = Backoff(base=0.2, cap=5.0)

        def apply(key: str, value: bytes | None, seq: int) -> None:
            self.view.apply(key, value, seq)
            self.seq = max(self.seq, seq)

        while not stop.is_set():
            seen = reconnects()
            try:
                following = await self.stream.follow(self.seq + 1, apply)
            except BusError as err:
                log.warning("cannot watch the ledger (%s); retrying", err)
                await sleep_or_stop(stop, backoff.next_delay())
                continue
            backoff.reset()
            try:
                while not stop.is_set() and reconnects() == seen:
                    await sleep_or_stop(stop, 1.0)
            finally:
                await following.close()

    async def refresh(self, keys: tuple[str, ...]) -> None:
        """Read these keys from the bucket itself into the mirror."""
        for key in keys:
            value, revision = await self.store.get(key)
            if value is None and not revision:
                revision = _NEWEST
            self.view.apply(key, value, revision)

    async def refresh_uid(self, uid: str) -> None:
        """Read one namespace's keys from the bucket: its binding, then every label the
        mirror or the binding says it holds (in that order, so they agree)."""
        await self.refresh((ns_key(uid),))
        levels = self.view.labels_of(uid)
        bound = self.view.ns.get(uid)
        if bound is not None:
            levels.add(bound.level)
        await self.refresh(tuple(label_key(level) for level in sorted(levels)))

    def update_metrics(self) -> None:
        for state, count in self.view.counts(datetime.now(UTC)).items():
            LABELS.labels(state=state).set(count)
