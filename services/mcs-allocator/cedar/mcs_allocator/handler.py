"""Bringing one namespace and the ledger into agreement: the decision's actions executed.

`NamespaceHandler` decides (`cedar.mcs_allocator.decide`), executes the actions with
compare-and-set writes on the ledger and conditional PATCHes of the namespace, and when one
loses a race reads the keys involved again and decides anew. `DryRunHandler` only logs what
it would do. One namespace name is handled at a time.

I/O only through its collaborators: the ledger bucket (`LedgerStore`), the mirror
(`Mirror`), the Kubernetes API (`NamespaceIO`) and the audit trail (`Audit`). Their
failures arrive as `BusError` and `KubeError`.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Protocol

from cedar.mcs_allocator import decide as D
from cedar.mcs_allocator.audit import Audit
from cedar.mcs_allocator.errors import LostRace
from cedar.mcs_allocator.kubeio import (
    REASON_CONFLICT,
    REASON_EXHAUSTED,
    REASON_TAMPERED,
    NamespaceIO,
)
from cedar.mcs_allocator.ledger_store import LedgerStore
from cedar.mcs_allocator.metrics import ALLOCATIONS, TAMPER
from cedar.mcs_allocator.mirror import Mirror
from cedar.proto.ledger import LabelEntry, NsEntry, label_key, ns_key
from cedar.proto.levels import Level
from cedar.runtime.errors import Conflict, NotFound

log = logging.getLogger("cedar.mcs_allocator")

MAX_ATTEMPTS = 8
RETRY_DELAY = 1.0
EXHAUSTED_RETRY_MAX = 5.0


def _now() -> datetime:
    return datetime.now(UTC)


class Handler(Protocol):
    async def handle(self, obj: D.NsObject, *, fresh: bool = False) -> float | None:
        """Returns None when done, or a delay after which the event should be tried again."""


class DryRunHandler:
    """Logs each decision it would take; writes nothing (no API calls, no ledger writes)."""

    def __init__(self, mirror: Mirror, policy: D.Policy) -> None:
        self.mirror = mirror
        self.policy = policy

    async def handle(self, obj: D.NsObject, *, fresh: bool = False) -> float | None:
        actions = D.decide(obj, self.mirror.view, self.policy)
        log.info(
            "dry run: would %s",
            ", ".join(_describe(a) for a in actions),
            extra={"namespace": obj.name, "uid": obj.uid, "dry_run": True},
        )
        return None


class NamespaceHandler:
    def __init__(
        self,
        mirror: Mirror,
        ledger: LedgerStore,
        kube: NamespaceIO,
        audit: Audit,
        policy: D.Policy,
    ) -> None:
        self.mirror = mirror
        self.ledger = ledger
        self.kube = kube
        self.audit = audit
        self.policy = policy
        self.replica = mirror.settings.pod_name
        self.quarantine = mirror.quarantine
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}
        self._exhaust_reported: set[str] = set()
        self._conflict_reported: set[tuple[str, Level]] = set()

    def first_report(self, uid: str, level: Level) -> bool:
        """Whether this namespace's conflict over `level` is reported for the first time
        (each is reported once per replica)."""
        key = (uid, level)
        if key in self._conflict_reported:
            return False
        self._conflict_reported.add(key)
        return True

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def handle(self, obj: D.NsObject, *, fresh: bool = False) -> float | None:
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

    async def _handle(self, obj: D.NsObject, fresh: bool) -> float | None:
        checked = False
        for _ in range(MAX_ATTEMPTS):
            actions = D.decide(obj, self.mirror.view, self.policy)
            if not fresh and D.needs_fresh(obj, actions):
                obj = await self._fetch(obj)
                fresh = True
                continue
            if not checked and D.needs_ledger_check(actions):
                await self.mirror.refresh_uid(obj.uid)
                checked = True
                continue
            try:
                return await self._execute(obj, actions)
            except LostRace as race:
                await self.mirror.refresh(race.keys)
                await self.mirror.refresh_uid(obj.uid)
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

    async def _fetch(self, obj: D.NsObject) -> D.NsObject:
        got = await self.kube.get(obj.name)
        if got is None:
            return obj.gone()
        return got

    async def _execute(self, obj: D.NsObject, actions: list[D.Action]) -> float | None:
        for action in actions:
            if isinstance(action, D.Noop):
                if action.reason == "existing":
                    self._exhaust_reported.discard(obj.uid)
            elif isinstance(action, D.Release):
                await self._release(action)
            elif isinstance(action, D.Drop):
                await self._drop(action)
            elif isinstance(action, D.Unbind):
                await self._unbind(action.uid)
            elif isinstance(action, D.Bind):
                await self._bind(obj, action.level, written=False)
            elif isinstance(action, D.Allocate):
                delay = await self._allocate(obj, action)
                if delay is not None:
                    return delay
            elif isinstance(action, D.Write):
                await self._restore(obj, action)
            elif isinstance(action, D.MarkWritten):
                await self._mark_written(obj.uid)
            elif isinstance(action, D.Adopt):
                await self._adopt(obj, action.level)
            elif isinstance(action, D.LevelConflict):
                await self._conflict(obj, action)
        return None

    # -- ledger writes ---------------------------------------------------------------

    async def _release(self, action: D.Release) -> None:
        view = self.mirror.view
        entry = view.labels.get(action.level)
        if entry is None or entry.state != "allocated" or entry.uid != action.uid:
            return
        new = LabelEntry(
            action.level, "quarantined", entry.namespace, entry.uid, _now(), self.replica
        )
        done = await self.ledger.change(new, entry.revision)
        if done is None:
            raise LostRace((label_key(action.level),))
        view.set_label(done)
        bound = view.ns.get(action.uid)
        if bound is not None:
            await self.ledger.delete(ns_key(action.uid), last=bound.revision)
            view.drop_ns(action.uid, bound.revision)
        log.info(
            "released %s from %s (quarantined)",
            action.level,
            action.name,
            extra={"namespace": action.name, "uid": action.uid, "mcs_level": str(action.level)},
        )
        await self.audit.record("release", action.name, action.uid, str(action.level))

    async def _drop(self, action: D.Drop) -> None:
        entry = self.mirror.view.labels.get(action.level)
        if entry is None or entry.uid != action.uid or entry.state != "allocated":
            return
        if not await self.ledger.delete(label_key(action.level), last=entry.revision):
            raise LostRace((label_key(action.level),))
        self.mirror.view.drop_label(action.level, entry.revision + 1)

    async def _unbind(self, uid: str) -> None:
        bound = self.mirror.view.ns.get(uid)
        if bound is None:
            return
        if not await self.ledger.delete(ns_key(uid), last=bound.revision):
            raise LostRace((ns_key(uid),))
        self.mirror.view.drop_ns(uid, bound.revision + 1)

    async def _bind(self, obj: D.NsObject, level: Level, *, written: bool) -> NsEntry:
        bound = await self.ledger.bind(NsEntry(obj.uid, obj.name, level, written, _now()))
        if bound is None:
            raise LostRace((ns_key(obj.uid), label_key(level)))
        self.mirror.view.set_ns(bound)
        return bound

    async def _mark_written(self, uid: str) -> None:
        bound = self.mirror.view.ns.get(uid)
        if bound is None or bound.written:
            return
        done = await self.ledger.mark_written(bound)
        if done is None:
            raise LostRace((ns_key(uid),))
        self.mirror.view.set_ns(done)

    async def _write(self, obj: D.NsObject, level: Level) -> None:
        try:
            await self.kube.write_level(obj, {a: str(level) for a in self.policy.annotations})
        except (Conflict, NotFound) as err:
            raise LostRace(refetch=True) from err

    async def _claim(self, obj: D.NsObject) -> tuple[LabelEntry, bool] | None:
        """Claim a free label for `obj` in the ledger; None when none is free."""
        view = self.mirror.view
        pool = view.pool
        for _ in range(64):
            index = pool.choose(_now().timestamp(), self.quarantine)
            if index is None:
                return None
            level = pool.unrank(index)
            new = LabelEntry(level, "allocated", obj.name, obj.uid, _now(), self.replica)
            existing = view.labels.get(level)
            if existing is None:
                done = await self.ledger.claim(new)
            elif existing.state == "quarantined" and (
                (_now() - existing.at).total_seconds() >= self.quarantine
            ):
                done = await self.ledger.change(new, existing.revision)
            else:
                continue  # the pool lagged the mirror; it has it marked taken now
            if done is not None:
                view.set_label(done)
                return done, existing is not None
            await self.mirror.refresh((label_key(level),))
        raise LostRace()

    # -- outcomes --------------------------------------------------------------------

    async def _allocate(self, obj: D.NsObject, action: D.Allocate) -> float | None:
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
            await self.mirror.refresh((ns_key(obj.uid),))
            other = self.mirror.view.ns.get(obj.uid)
            if (other is None or other.level != level) and await self.ledger.delete(
                label_key(level), last=entry.revision
            ):
                self.mirror.view.drop_label(level, entry.revision + 1)
            raise
        await self._write(obj, level)
        done = await self.ledger.mark_written(bound)
        if done is not None:
            self.mirror.view.set_ns(done)
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

    async def _exhausted(self, obj: D.NsObject) -> float:
        pool = self.mirror.view.pool
        end = pool.next_quarantine_end(self.quarantine)
        delay = EXHAUSTED_RETRY_MAX
        if end is not None:
            delay = min(EXHAUSTED_RETRY_MAX, max(0.2, end - _now().timestamp() + 0.05))
        if obj.uid not in self._exhaust_reported:
            self._exhaust_reported.add(obj.uid)
            ALLOCATIONS.labels(result="exhausted").inc()
            message = (
                f"no free MCS level: all {pool.total} labels of "
                f"CEDAR_MCS_CATEGORIES={self.policy.categories} are allocated or "
                "quarantined; the namespace will be labelled as soon as one frees up"
            )
            log.error(message, extra={"namespace": obj.name, "uid": obj.uid})
            await self.kube.warn(obj, REASON_EXHAUSTED, message)
            await self.audit.record("exhausted", obj.name, obj.uid)
        return delay

    async def _restore(self, obj: D.NsObject, action: D.Write) -> None:
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
            await self.kube.warn(
                obj,
                REASON_TAMPERED,
                f"annotation {self.policy.annotations[0]} was {found}; restored to "
                f"{action.level}, the level this namespace holds",
            )
            await self.audit.record("tamper", obj.name, obj.uid, str(action.level), action.previous)
        await self._mark_written(obj.uid)

    async def _adopt(self, obj: D.NsObject, level: Level) -> None:
        done = await self.ledger.claim(
            LabelEntry(level, "allocated", obj.name, obj.uid, _now(), self.replica)
        )
        if done is None:
            raise LostRace((label_key(level), ns_key(obj.uid)))
        self.mirror.view.set_label(done)
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

    async def _conflict(self, obj: D.NsObject, action: D.LevelConflict) -> None:
        if not self.first_report(obj.uid, action.level):
            return
        ALLOCATIONS.labels(result="conflict").inc()
        message = (
            f"annotation claims {action.level}, which the ledger gives to namespace "
            f"{action.owner_name} (uid {action.owner_uid}, {action.owner_state}); left as it "
            "is — an operator must decide (changing a tenant's level cuts it off from its data)"
        )
        log.error("namespace %s: %s", obj.name, message, extra={"namespace": obj.name})
        await self.kube.warn(obj, REASON_CONFLICT, message)
        await self.audit.record("conflict", obj.name, obj.uid, str(action.level))


def _describe(action: D.Action) -> str:
    return type(action).__name__.lower() + (
        f"({getattr(action, 'level', '')})" if getattr(action, "level", None) else ""
    )
