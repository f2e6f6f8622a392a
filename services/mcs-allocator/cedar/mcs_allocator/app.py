"""The allocator service: namespace events in, levels out, the ledger in between.

Each replica mirrors the whole ledger in memory (a KV watch) for its choices, takes
namespace events from the shared durable consumer `mcs-allocator` (so each event goes to
one replica), and writes only through compare-and-set on the ledger. An event is acked
only once the namespace's annotation is written (or nothing was to be done); a transient
failure naks it with a delay, so it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamInfo
from nats.js.kv import KeyValue
from pydantic import ValidationError

from cedar.mcs_allocator import allocator as A
from cedar.mcs_allocator import snapshot
from cedar.mcs_allocator.audit import Audit
from cedar.mcs_allocator.kubeio import (
    REASON_CONFLICT,
    REASON_EXHAUSTED,
    REASON_TAMPERED,
    NamespaceIO,
)
from cedar.mcs_allocator.ledger import (
    LABEL_PREFIX,
    NS_PREFIX,
    LabelEntry,
    Ledger,
    LedgerView,
    NsEntry,
    label_key,
    ns_key,
)
from cedar.mcs_allocator.levels import Level
from cedar.mcs_allocator.metrics import (
    ALLOCATIONS,
    CONFLICTS,
    LABELS,
    LEDGER_LOAD_SECONDS,
    SNAPSHOTS,
    TAMPER,
)
from cedar.mcs_allocator.settings import AllocatorSettings
from cedar.mcs_allocator.snapshot import SnapshotError
from cedar.mcs_allocator.snapshot_store import SnapshotStore, SnapshotUnavailable
from cedar.proto import subjects
from cedar.proto.models import NamespaceEvent
from cedar.runtime import topology
from cedar.runtime.backoff import Backoff
from cedar.runtime.bus import (
    TRANSIENT_ERRORS,
    kv_deleted,
    read_to_end,
    reply_seq,
)
from cedar.runtime.kube import KubeClient, KubeError, load_config
from cedar.runtime.service import Runtime

log = logging.getLogger("cedar.mcs_allocator")

MAX_ATTEMPTS = 8
RETRY_DELAY = 1.0
EXHAUSTED_RETRY_MAX = 5.0
COMPONENT = "cedar-mcs-allocator"
# Replaying at least this many ledger messages after the snapshot at start-up makes a new
# snapshot due at once.
SNAPSHOT_TAIL = 10_000
# Snapshot chunks no snapshot uses are purged after this long (a lost write race's leftovers).
ORPHAN_AGE = 300.0


class ConfigurationRefused(RuntimeError):
    """The settings cannot hold what the ledger already holds."""


class LostRace(Exception):
    """A CAS write or a conditional PATCH lost: read again and decide anew."""

    def __init__(self, keys: tuple[str, ...] = (), refetch: bool = False) -> None:
        super().__init__(", ".join(keys) or "namespace changed")
        self.keys = keys
        self.refetch = refetch


@dataclass
class RepairReport:
    namespaces: int = 0
    in_scope: int = 0
    released: int = 0
    conflicts: int = 0
    retry: int = 0


def _now() -> datetime:
    return datetime.now(UTC)


LEDGER_STREAM = topology.kv_stream(subjects.KV_MCS_LEDGER)
LEDGER_PREFIX = topology.kv_subject(subjects.KV_MCS_LEDGER)


class Allocator:
    def __init__(
        self,
        settings: AllocatorSettings,
        *,
        kv: KeyValue | None,
        kube: NamespaceIO | None,
        audit: Audit,
        dry_run: bool = False,
        js: JetStreamContext | None = None,
        snapshots: SnapshotStore | None = None,
    ) -> None:
        self.settings = settings
        self.kv = kv
        # The ledger's stream is read directly (much faster than the KV watcher at start).
        self.js = js
        self.ledger = Ledger(kv) if kv is not None else None
        self.kube = kube
        self.audit = audit
        self.dry_run = dry_run
        self.replica = settings.pod_name
        self.quarantine = settings.mcs_quarantine.total_seconds()
        self.policy = A.Policy(
            scope=settings.scope(),
            annotations=settings.annotations,
            categories=settings.mcs_categories,
            per_label=settings.mcs_categories_per_label,
        )
        self.view = LedgerView.build(
            settings.mcs_categories, settings.mcs_categories_per_label, self.quarantine, []
        )
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}
        self._exhaust_reported: set[str] = set()
        self._conflict_reported: set[tuple[str, Level]] = set()
        self.seq = 0  # the ledger stream's sequence the mirror has reached
        self.snapshots = snapshots
        self.stream_created = ""
        self.snapshot_due = False
        self._orphans: dict[str, float] = {}  # unused snapshot chunk sets: first seen
        self.loaded_from = ""  # "snapshot" or "ledger", once loaded
        self.replayed = 0  # ledger messages replayed after the snapshot

    # -- ledger mirror ---------------------------------------------------------------

    def _js(self) -> JetStreamContext:
        if self.js is None:
            raise RuntimeError("the allocator needs a JetStream context to read its ledger")
        return self.js

    async def load(self) -> None:
        """Build the mirror (and the pool): from the snapshot and the ledger stream after
        it, or, with no usable snapshot, from every key of the ledger."""
        if self.kv is None:
            return
        started = time.perf_counter()
        info = await self._js().stream_info(LEDGER_STREAM)
        self.stream_created = _created(info)
        keys = int(info.state.messages or 0)
        # Half a million new objects, none in a cycle: the cyclic GC would only walk them
        # over and over (see LedgerView.build).
        collecting = gc.isenabled()
        gc.disable()
        try:
            loaded = await self._from_snapshot(int(info.state.last_seq or 0), keys)
            if loaded is None:
                source, tail = "ledger", 0
                self.view = self._assemble_checked(await self._read_all(info))
            else:
                source, tail = "snapshot", loaded
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
                **self.view.counts(_now()),
            },
        )

    def _assemble_checked(self, entries: list[tuple[str, bytes, int]]) -> LedgerView:
        view = LedgerView.build(
            self.settings.mcs_categories,
            self.settings.mcs_categories_per_label,
            self.quarantine,
            entries,
        )
        self._refuse_misfits(view)
        return view

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

    async def _from_snapshot(self, last: int, keys: int) -> int | None:
        """The mirror from the stored snapshot plus the ledger stream after it; the number
        of stream messages replayed, or None when there is no usable snapshot."""
        if self.snapshots is None or not keys:
            return None
        try:
            stored = await self.snapshots.stored()
            if stored is None:
                log.info("no ledger snapshot yet; reading every ledger key")
                return None
            if stored.stream_created != self.stream_created:
                log.warning(
                    "the ledger snapshot was taken of another ledger stream (created %s, this "
                    "one %s); ignored",
                    stored.stream_created,
                    self.stream_created,
                )
                SNAPSHOTS.labels(result="unusable").inc()
                return None
            if last - stored.seq > keys:
                # Replaying more messages than there are keys costs more than reading them.
                log.info("the ledger snapshot is too old to help; reading every ledger key")
                return None
            data = await self.snapshots.read()
            if data is None:
                return None
            header, labels, bindings = snapshot.decode(data)
        except (SnapshotUnavailable, SnapshotError, NatsError) as err:
            log.warning("cannot use the ledger snapshot (%s); reading every ledger key", err)
            SNAPSHOTS.labels(result="unusable").inc()
            return None
        if header.stream_created != self.stream_created:  # replaced since `stored`
            SNAPSHOTS.labels(result="unusable").inc()
            return None
        view = LedgerView.assemble(
            self.settings.mcs_categories,
            self.settings.mcs_categories_per_label,
            self.quarantine,
            labels,
            bindings,
        )
        del labels, bindings, data
        msgs = await read_to_end(
            self._js(), LEDGER_STREAM, LEDGER_PREFIX + ">", start_seq=header.seq + 1
        )
        seq = header.seq
        for msg in msgs:
            key, value, seq = _ledger_change(msg)
            view.apply(key, value, seq)
        self._refuse_misfits(view)
        self.view, self.seq = view, seq
        SNAPSHOTS.labels(result="loaded").inc()
        return len(msgs)

    async def _read_all(self, info: StreamInfo) -> list[tuple[str, bytes, int]]:
        """Every key's last value (deleted keys left out), read from the bucket's stream.

        "Last per subject" sends each key's current value once; nats-py's KV watcher costs
        ~4x more per entry. The stream sequence reached is kept in `self.seq`, where
        `follow` resumes, so nothing written meanwhile is missed.
        """
        last = int(info.state.last_seq or 0)
        self.seq = last
        if not info.state.messages:
            return []
        msgs = await read_to_end(
            self._js(),
            LEDGER_STREAM,
            LEDGER_PREFIX + ">",
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        )
        entries: list[tuple[str, bytes, int]] = []
        seq = last
        for msg in msgs:
            key, value, sseq = _ledger_change(msg)
            seq = max(seq, sseq)
            if value is not None:
                entries.append((key, value, sseq))
        self.seq = seq
        return entries

    async def write_snapshot(self) -> snapshot.Header:
        """Store an image of the mirror as it is now, at `self.seq`."""
        assert self.snapshots is not None
        # Copied in one step of the loop (the entries are immutable), encoded in a thread.
        labels, bindings = snapshot.of_view(self.view)
        data = await asyncio.to_thread(
            snapshot.encode,
            labels,
            bindings,
            seq=self.seq,
            stream_created=self.stream_created,
            replica=self.replica,
            now=_now(),
        )
        header = snapshot.read_header(data)
        await self.snapshots.write(data, header)
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
        assert self.snapshots is not None
        now = time.monotonic()
        seen = self._orphans
        self._orphans = {nuid: seen.get(nuid, now) for nuid in await self.snapshots.orphans()}
        for nuid, since in sorted(self._orphans.items()):
            if now - since >= ORPHAN_AGE:
                await self.snapshots.purge(nuid)
                del self._orphans[nuid]
                log.info("purged the chunks of an abandoned snapshot", extra={"nuid": nuid})

    async def maybe_snapshot(self, min_age: float) -> bool:
        """Write a snapshot unless the stored one is current, or younger than `min_age`
        seconds (another replica keeps it fresh). Failures are logged and counted."""
        if self.snapshots is None or self.dry_run or not self.stream_created:
            return False
        try:
            await self._purge_orphans()
            stored = await self.snapshots.stored()
            if stored is not None and stored.stream_created == self.stream_created:
                if stored.seq >= self.seq:
                    return False
                age = (_now() - stored.written_at).total_seconds() if stored.written_at else None
                if age is not None and age < min_age:
                    return False
            await self.write_snapshot()
            return True
        except (SnapshotError, *TRANSIENT_ERRORS, NatsError) as err:
            log.warning("cannot write a ledger snapshot (%s); the next try is scheduled", err)
            SNAPSHOTS.labels(result="failed").inc()
            return False

    async def follow(self, stop: asyncio.Event, reconnects: Callable[[], int]) -> None:
        """Keep the mirror current from the sequence the load reached; start a new
        consumer there after a reconnect (the server's ephemeral one may be gone) — the
        revisions make replays harmless."""
        assert self.kv is not None
        backoff = Backoff(base=0.2, cap=5.0)

        async def apply(msg: Msg) -> None:
            key, value, sseq = _ledger_change(msg)
            self.view.apply(key, value, sseq)
            self.seq = max(self.seq, sseq)

        while not stop.is_set():
            seen = reconnects()
            try:
                sub = await self._js().subscribe(
                    LEDGER_PREFIX + ">",
                    stream=LEDGER_STREAM,
                    cb=apply,
                    ordered_consumer=True,
                    config=ConsumerConfig(
                        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                        opt_start_seq=self.seq + 1,
                    ),
                    pending_msgs_limit=0,
                    pending_bytes_limit=0,
                )
            except (*TRANSIENT_ERRORS, NatsError) as err:
                log.warning("cannot watch the ledger (%s); retrying", err)
                await _sleep_or_stop(stop, backoff.next_delay())
                continue
            backoff.reset()
            try:
                while not stop.is_set() and reconnects() == seen:
                    await _sleep_or_stop(stop, 1.0)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def refresh(self, keys: tuple[str, ...]) -> None:
        if self.ledger is None:
            return
        for key in keys:
            value, revision = await self.ledger.get(key)
            if value is None:
                if key.startswith(LABEL_PREFIX) or key.startswith(NS_PREFIX):
                    self.view.apply(key, None, revision if revision else 1 << 62)
            else:
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
        for state, count in self.view.counts(_now()).items():
            LABELS.labels(state=state).set(count)

    # -- one namespace ---------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def handle(self, obj: A.NsObject, *, fresh: bool = False) -> float | None:
        """Bring one namespace and the ledger into agreement.

        Returns None when done, or a delay after which the event should be tried again.
        """
        name = obj.name
        self._lock_users[name] = self._lock_users.get(name, 0) + 1
        try:
            async with self._lock(name):
                return await self._handle(obj, fresh)
        finally:
            self._lock_users[name] -= 1
            if not self._lock_users[name]:
                del self._lock_users[name]
                self._locks.pop(name, None)

    async def _handle(self, obj: A.NsObject, fresh: bool) -> float | None:
        checked = False
        for _ in range(MAX_ATTEMPTS):
            actions = A.decide(obj, self.view, self.policy)
            if self.dry_run:
                log.info(
                    "dry run: would %s",
                    ", ".join(_describe(a) for a in actions),
                    extra={"namespace": obj.name, "uid": obj.uid, "dry_run": True},
                )
                return None
            if not fresh and A.needs_fresh(obj, actions):
                obj = await self._fetch(obj)
                fresh = True
                continue
            if not checked and A.needs_ledger_check(actions):
                await self.refresh_uid(obj.uid)
                checked = True
                continue
            try:
                return await self._execute(obj, actions)
            except LostRace as race:
                await self.refresh(race.keys)
                await self.refresh_uid(obj.uid)
                checked = True
                if race.refetch:
                    obj = await self._fetch(obj)
        log.warning(
            "namespace %s: still racing after %d attempts; retrying later",
            obj.name,
            MAX_ATTEMPTS,
            extra={"namespace": obj.name},
        )
        return RETRY_DELAY

    async def _fetch(self, obj: A.NsObject) -> A.NsObject:
        assert self.kube is not None
        got = await self.kube.get(obj.name)
        if got is None:
            return obj.gone()
        return got

    async def _execute(self, obj: A.NsObject, actions: list[A.Action]) -> float | None:
        for action in actions:
            if isinstance(action, A.Noop):
                if action.reason == "existing":
                    self._exhaust_reported.discard(obj.uid)
            elif isinstance(action, A.Release):
                await self._release(action)
            elif isinstance(action, A.Drop):
                await self._drop(action)
            elif isinstance(action, A.Unbind):
                await self._unbind(action.uid)
            elif isinstance(action, A.Bind):
                await self._bind(obj, action.level, written=False)
            elif isinstance(action, A.Allocate):
                delay = await self._allocate(obj, action)
                if delay is not None:
                    return delay
            elif isinstance(action, A.Write):
                await self._restore(obj, action)
            elif isinstance(action, A.MarkWritten):
                await self._mark_written(obj.uid)
            elif isinstance(action, A.Adopt):
                await self._adopt(obj, action.level)
            elif isinstance(action, A.Conflict):
                await self._conflict(obj, action)
        return None

    async def _release(self, action: A.Release) -> None:
        assert self.ledger is not None
        entry = self.view.labels.get(action.level)
        if entry is None or entry.state != "allocated" or entry.uid != action.uid:
            return
        new = LabelEntry(
            action.level, "quarantined", entry.namespace, entry.uid, _now(), self.replica
        )
        done = await self.ledger.change(new, entry.revision)
        if done is None:
            raise LostRace((label_key(action.level),))
        self.view.set_label(done)
        bound = self.view.ns.get(action.uid)
        if bound is not None:
            await self.ledger.delete(ns_key(action.uid), last=bound.revision)
            self.view.drop_ns(action.uid, bound.revision)
        log.info(
            "released %s from %s (quarantined)",
            action.level,
            action.name,
            extra={"namespace": action.name, "uid": action.uid, "mcs_level": str(action.level)},
        )
        await self.audit.record("release", action.name, action.uid, str(action.level))

    async def _drop(self, action: A.Drop) -> None:
        assert self.ledger is not None
        entry = self.view.labels.get(action.level)
        if entry is None or entry.uid != action.uid or entry.state != "allocated":
            return
        if not await self.ledger.delete(label_key(action.level), last=entry.revision):
            raise LostRace((label_key(action.level),))
        self.view.drop_label(action.level, entry.revision + 1)

    async def _unbind(self, uid: str) -> None:
        assert self.ledger is not None
        bound = self.view.ns.get(uid)
        if bound is None:
            return
        if not await self.ledger.delete(ns_key(uid), last=bound.revision):
            raise LostRace((ns_key(uid),))
        self.view.drop_ns(uid, bound.revision + 1)

    async def _bind(self, obj: A.NsObject, level: Level, *, written: bool) -> NsEntry:
        assert self.ledger is not None
        bound = await self.ledger.bind(NsEntry(obj.uid, obj.name, level, written, _now()))
        if bound is None:
            raise LostRace((ns_key(obj.uid), label_key(level)))
        self.view.set_ns(bound)
        return bound

    async def _mark_written(self, uid: str) -> None:
        assert self.ledger is not None
        bound = self.view.ns.get(uid)
        if bound is None or bound.written:
            return
        done = await self.ledger.mark_written(bound)
        if done is None:
            raise LostRace((ns_key(uid),))
        self.view.set_ns(done)

    async def _write(self, obj: A.NsObject, level: Level) -> None:
        assert self.kube is not None
        from cedar.runtime.kube import Conflict, NotFound

        try:
            await self.kube.write_level(obj, {a: str(level) for a in self.policy.annotations})
        except (Conflict, NotFound) as err:
            raise LostRace(refetch=True) from err

    async def _claim(self, obj: A.NsObject) -> tuple[LabelEntry, bool] | None:
        """Claim a free label for `obj` in the ledger; None when none is free."""
        assert self.ledger is not None
        pool = self.view.pool
        for _ in range(64):
            index = pool.choose(_now().timestamp(), self.quarantine)
            if index is None:
                return None
            level = pool.unrank(index)
            new = LabelEntry(level, "allocated", obj.name, obj.uid, _now(), self.replica)
            existing = self.view.labels.get(level)
            if existing is None:
                done = await self.ledger.claim(new)
            elif existing.state == "quarantined" and (
                (_now() - existing.at).total_seconds() >= self.quarantine
            ):
                done = await self.ledger.change(new, existing.revision)
            else:
                continue  # the pool lagged the mirror; it has it marked taken now
            if done is not None:
                self.view.set_label(done)
                return done, existing is not None
            await self.refresh((label_key(level),))
        raise LostRace()

    async def _allocate(self, obj: A.NsObject, action: A.Allocate) -> float | None:
        assert self.ledger is not None
        claimed = await self._claim(obj)
        if claimed is None:
            return await self._exhausted(obj)
        entry, reused = claimed
        level = entry.level
        try:
            bound = await self._bind(obj, level, written=False)
        except LostRace:
            # Another replica bound this namespace meanwhile. If to this very label (it
            # saw our claim), the label is in use: keep it; otherwise give it back.
            await self.refresh((ns_key(obj.uid),))
            other = self.view.ns.get(obj.uid)
            if (other is None or other.level != level) and await self.ledger.delete(
                label_key(level), last=entry.revision
            ):
                self.view.drop_label(level, entry.revision + 1)
            raise
        await self._write(obj, level)
        done = await self.ledger.mark_written(bound)
        if done is not None:
            self.view.set_ns(done)
        self._exhaust_reported.discard(obj.uid)
        ALLOCATIONS.labels(result="allocated").inc()
        log.info(
            "allocated %s to %s",
            level,
            obj.name,
            extra={
                "namespace": obj.name,
                "uid": obj.uid,
                "mcs_level": str(level),
                "reused": reused,
                "replaced": action.previous,
            },
        )
        if reused:
            await self.audit.record("free", obj.name, obj.uid, str(level))
        await self.audit.record("claim", obj.name, obj.uid, str(level), action.previous)
        return None

    async def _exhausted(self, obj: A.NsObject) -> float:
        end = self.view.pool.next_quarantine_end(self.quarantine)
        delay = EXHAUSTED_RETRY_MAX
        if end is not None:
            delay = min(EXHAUSTED_RETRY_MAX, max(0.2, end - _now().timestamp() + 0.05))
        if obj.uid not in self._exhaust_reported:
            self._exhaust_reported.add(obj.uid)
            ALLOCATIONS.labels(result="exhausted").inc()
            message = (
                f"no free MCS level: all {self.view.pool.total} labels of "
                f"CEDAR_MCS_CATEGORIES={self.settings.mcs_categories} are allocated or "
                "quarantined; the namespace will be labelled as soon as one frees up"
            )
            log.error(message, extra={"namespace": obj.name, "uid": obj.uid})
            assert self.kube is not None
            await self.kube.warn(obj, REASON_EXHAUSTED, message)
            await self.audit.record("exhausted", obj.name, obj.uid)
        return delay

    async def _restore(self, obj: A.NsObject, action: A.Write) -> None:
        await self._write(obj, action.level)
        if action.tamper:
            TAMPER.inc()
            found = "removed" if action.previous is None else repr(action.previous)
            log.warning(
                "namespace %s: level annotation tampered with (%s); restored %s",
                obj.name,
                found,
                action.level,
                extra={
                    "namespace": obj.name,
                    "uid": obj.uid,
                    "old": action.previous,
                    "new": str(action.level),
                },
            )
            assert self.kube is not None
            await self.kube.warn(
                obj,
                REASON_TAMPERED,
                f"annotation {self.policy.annotations[0]} was {found}; restored to "
                f"{action.level}, the level this namespace holds",
            )
            await self.audit.record("tamper", obj.name, obj.uid, str(action.level), action.previous)
        await self._mark_written(obj.uid)

    async def _adopt(self, obj: A.NsObject, level: Level) -> None:
        assert self.ledger is not None
        done = await self.ledger.claim(
            LabelEntry(level, "allocated", obj.name, obj.uid, _now(), self.replica)
        )
        if done is None:
            raise LostRace((label_key(level), ns_key(obj.uid)))
        self.view.set_label(done)
        await self._bind(obj, level, written=True)
        if any(obj.annotations.get(a) != str(level) for a in self.policy.annotations):
            await self._write(obj, level)  # canonical spelling, openshift mirror
        ALLOCATIONS.labels(result="adopted").inc()
        log.info(
            "adopted %s already on %s",
            level,
            obj.name,
            extra={"namespace": obj.name, "uid": obj.uid, "mcs_level": str(level)},
        )
        await self.audit.record("adopt", obj.name, obj.uid, str(level))

    async def _conflict(self, obj: A.NsObject, action: A.Conflict) -> None:
        key = (obj.uid, action.level)
        if key in self._conflict_reported:
            return
        self._conflict_reported.add(key)
        ALLOCATIONS.labels(result="conflict").inc()
        message = (
            f"annotation claims {action.level}, which the ledger gives to namespace "
            f"{action.owner_name} (uid {action.owner_uid}, {action.owner_state}); left as it "
            "is — an operator must decide (changing a tenant's level cuts it off from its data)"
        )
        log.error("namespace %s: %s", obj.name, message, extra={"namespace": obj.name})
        assert self.kube is not None
        await self.kube.warn(obj, REASON_CONFLICT, message)
        await self.audit.record("conflict", obj.name, obj.uid, str(action.level))

    # -- repair ----------------------------------------------------------------------

    async def repair(self, concurrency: int = 16) -> RepairReport:
        """Reconcile every namespace (a direct list) with the ledger."""
        assert self.kube is not None
        report = RepairReport()
        objs = [obj async for obj in self.kube.list_all()]
        report.namespaces = len(objs)
        report.in_scope = sum(1 for o in objs if self.policy.scope.includes(o.name, o.labels))
        live = {o.uid for o in objs}
        sem = asyncio.Semaphore(concurrency)

        async def one(obj: A.NsObject, fresh: bool) -> None:
            async with sem:
                try:
                    if await self.handle(obj, fresh=fresh) is not None:
                        report.retry += 1
                except (KubeError, *TRANSIENT_ERRORS, NatsError) as err:
                    report.retry += 1
                    log.warning("repair of %s failed: %s", obj.name, err)

        await asyncio.gather(*(one(o, True) for o in objs))
        # A ledger entry whose uid was not listed may belong to a namespace created since
        # the list began: `handle` reads it by name before releasing anything.
        orphans = [e for e in self.view.allocated() if e.uid not in live]
        for entry in orphans:
            got = await self.kube.get(entry.namespace)
            if got is None or got.uid != entry.uid:
                gone = A.NsObject(entry.namespace, entry.uid, deleted=True)
                await one(gone, True)
                report.released += 1
        found = A.conflicts(objs, self.policy)
        CONFLICTS.set(len(found))
        report.conflicts = len(found)
        for level, claimants in found.items():
            owner = self.view.labels.get(level)
            names = sorted(o.name for o in claimants)
            log.error(
                "label %s is claimed by %d namespaces: %s (ledger owner: %s); not reassigned",
                level,
                len(claimants),
                ", ".join(names),
                owner.namespace if owner else "none",
                extra={"mcs_level": str(level), "namespaces": names},
            )
            for obj in claimants:
                if owner is not None and obj.uid == owner.uid:
                    continue
                key = (obj.uid, level)
                if key not in self._conflict_reported:
                    self._conflict_reported.add(key)
                    await self.audit.record("conflict", obj.name, obj.uid, str(level))
        self.update_metrics()
        log.info("repair done", extra={"report": report.__dict__})
        return report


def _created(info: StreamInfo) -> str:
    """The stream's identity across deletion and re-creation (sequences start over)."""
    return info.created.isoformat() if info.created else ""


def _ledger_change(msg: Msg) -> tuple[str, bytes | None, int]:
    """A message of the ledger's stream: its key, its value (None: deleted), its sequence."""
    value = None if kv_deleted(msg.headers) or not msg.data else msg.data
    return msg.subject[len(LEDGER_PREFIX) :], value, reply_seq(msg.reply)


def _describe(action: A.Action) -> str:
    return type(action).__name__.lower() + (
        f"({getattr(action, 'level', '')})" if getattr(action, "level", None) else ""
    )


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)


# -- the service -------------------------------------------------------------------------


async def _consume(rt: Runtime[AllocatorSettings], alloc: Allocator) -> None:
    """The shared durable consumer: ack after the work is done, nak with delay if not."""
    settings = rt.settings
    js = rt.bus.js
    tasks: set[asyncio.Task[None]] = set()

    async def process(msg: Msg) -> None:
        try:
            try:
                event = NamespaceEvent.model_validate_json(msg.data)
            except ValidationError as err:
                log.error("undecodable namespace event on %s: %s", msg.subject, err)
                await msg.term()
                return
            try:
                delay = await alloc.handle(A.NsObject.from_event(event))
            except (KubeError, *TRANSIENT_ERRORS, NatsError) as err:
                log.warning("namespace %s: %s; will retry", event.name, err)
                delay = RETRY_DELAY
            if delay is None:
                await msg.ack()
            else:
                await msg.nak(delay=delay)
        except (*TRANSIENT_ERRORS, NatsError) as err:
            log.debug("cannot ack (%s); the event will be redelivered", err)

    backoff = Backoff(base=0.2, cap=5.0)
    behind = True
    sub: JetStreamContext.PullSubscription | None = None
    while not rt.stop.is_set():
        room = settings.mcs_max_in_flight - len(tasks)
        if room <= 0:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            continue
        try:
            if sub is None:
                sub = await js.pull_subscribe(
                    f"{subjects.NAMESPACES_PREFIX}.>",
                    durable=subjects.ALLOCATOR_DURABLE,
                    stream=subjects.STREAM_NAMESPACES,
                    config=ConsumerConfig(
                        durable_name=subjects.ALLOCATOR_DURABLE,
                        ack_policy=AckPolicy.EXPLICIT,
                        deliver_policy=DeliverPolicy.ALL,
                        ack_wait=60,
                        max_ack_pending=4096,
                        max_deliver=-1,
                    ),
                )
            # A batch long-poll waits for the whole batch (or the timeout) once the stream is
            # drained, which would hold a lone event back; ask for one until we are behind.
            want = room if behind else 1
            msgs = await sub.fetch(batch=want, timeout=0.02 if behind else 1.0)
            behind = len(msgs) >= want
            backoff.reset()
        except NatsTimeoutError:
            behind = False
            continue
        except (*TRANSIENT_ERRORS, NatsError) as err:
            log.warning("cannot fetch namespace events (%s); retrying", err)
            if backoff.attempts > 3 and sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                sub = None
            await _sleep_or_stop(rt.stop, backoff.next_delay())
            continue
        for msg in msgs:
            task = asyncio.create_task(process(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    # Finish what is in flight; anything unfinished is redelivered after ack_wait.
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    if sub is not None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _from_subject(rt: Runtime[AllocatorSettings], alloc: Allocator, subject: str) -> None:
    """Decisions for events published to `subject` (e.g. `cedar replay`), not the stream."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        await queue.put(msg.data)

    sub = await rt.bus.nc.subscribe(subject, cb=on_msg)
    log.info("taking namespace events from %s", subject)
    try:
        while not rt.stop.is_set():
            try:
                data = await asyncio.wait_for(queue.get(), 1.0)
            except TimeoutError:
                continue
            try:
                event = NamespaceEvent.model_validate_json(data)
            except ValidationError as err:
                log.warning("not a namespace event on %s: %s", subject, err)
                continue
            await alloc.handle(A.NsObject.from_event(event))
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _periodic(
    stop: asyncio.Event, interval: float, fn: Callable[[], Awaitable[object]], jitter: float
) -> None:
    while not stop.is_set():
        await _sleep_or_stop(stop, interval * (1 + jitter * (random.random() - 0.5)))
        if stop.is_set():
            return
        try:
            await fn()
        except (KubeError, *TRANSIENT_ERRORS, NatsError) as err:
            log.warning("periodic task failed (%s); next run as scheduled", err)


async def main(rt: Runtime[AllocatorSettings]) -> None:
    settings = rt.settings
    dry_run = settings.dry_run
    rt.health.require("ledger")
    # The watcher owns the streams; the allocator only makes sure they exist.
    await rt.bus.ensure(
        streams=[topology.namespaces_stream(settings), topology.history_stream(settings)],
        update=False,
    )
    kvs = await rt.bus.ensure(buckets=[topology.mcs_ledger_bucket(settings)])
    kv = kvs[subjects.KV_MCS_LEDGER]
    client = None if dry_run else KubeClient(load_config(settings.kubeconfig))
    kube = NamespaceIO(client, COMPONENT, settings.pod_name) if client is not None else None
    audit = Audit(rt.bus, settings.pod_name, dry_run=dry_run)
    snapshots = None
    if settings.mcs_snapshot_interval.total_seconds() > 0:
        store = await rt.bus.ensure_object_store(topology.mcs_snapshots_bucket(settings))
        snapshots = SnapshotStore(store, rt.bus.js)
    alloc = Allocator(
        settings,
        kv=kv,
        kube=kube,
        audit=audit,
        dry_run=dry_run,
        js=rt.bus.js,
        snapshots=snapshots,
    )
    try:
        backoff = Backoff(base=0.5, cap=10.0)
        while True:
            try:
                await alloc.load()
                break
            except (*TRANSIENT_ERRORS, NatsError) as err:
                log.warning("cannot load the ledger (%s); retrying", err)
                await _sleep_or_stop(rt.stop, backoff.next_delay())
                if rt.stop.is_set():
                    return
        rt.health.set("ledger", True)
        alloc.update_metrics()

        def reconnects() -> int:
            return int(rt.bus.nc.stats.get("reconnects", 0))

        tasks = [
            asyncio.create_task(alloc.follow(rt.stop, reconnects), name="ledger-follow"),
            asyncio.create_task(
                _periodic(rt.stop, 2.0, _async(alloc.update_metrics), 0.0), name="metrics"
            ),
        ]
        if snapshots is not None and not dry_run:
            tasks.append(asyncio.create_task(_snapshots(rt, alloc), name="snapshots"))
        if settings.from_subject:
            tasks.append(asyncio.create_task(_from_subject(rt, alloc, settings.from_subject)))
        else:
            if not dry_run:
                tasks.append(asyncio.create_task(_first_repair(rt, alloc), name="repair"))
            tasks.append(asyncio.create_task(_consume(rt, alloc), name="consume"))
        try:
            await rt.stop.wait()
        finally:
            for task in tasks:
                if task.get_name() != "consume":
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if client is not None:
            await client.close()


async def _first_repair(rt: Runtime[AllocatorSettings], alloc: Allocator) -> None:
    interval = rt.settings.mcs_resync_interval.total_seconds()
    try:
        await alloc.repair()
    except (KubeError, *TRANSIENT_ERRORS, NatsError) as err:
        log.warning("start-up repair failed (%s); next run in %.0fs", err, interval)
    await _periodic(rt.stop, interval, alloc.repair, 0.2)


async def _snapshots(rt: Runtime[AllocatorSettings], alloc: Allocator) -> None:
    """Keep the stored snapshot near the ledger's end. Every replica checks on its own
    jittered schedule and writes only if the stored one is stale and older than half an
    interval, so replicas rarely duplicate the work."""
    interval = rt.settings.mcs_snapshot_interval.total_seconds()
    if alloc.snapshot_due:
        # Replicas started together (an upgrade) would all write at once; spread them so
        # that the first one's snapshot is seen by the others.
        await _sleep_or_stop(rt.stop, random.uniform(0, min(10.0, interval / 2)))
        if not rt.stop.is_set():
            await alloc.maybe_snapshot(min(60.0, interval / 2))
    await _periodic(rt.stop, interval, lambda: alloc.maybe_snapshot(interval / 2), 0.2)


def _async(fn: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        fn()

    return run
