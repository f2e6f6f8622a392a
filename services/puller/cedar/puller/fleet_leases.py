"""Fleet-wide registry pacing, carried out: the leases in NATS KV `cedar-fleet-leases`.

I/O: the lease bucket through the bus's NATS connection (an ordered consumer of its stream
for the view, JetStream publishes for the writes), and the pacing metrics. What may be
granted is decided by `cedar.puller.pacing` (pure): this module keeps a view of the
bucket, writes requests and leases, renews and releases them.

How (pacing.py's docstring has why a KV bucket with per-key TTL):

- A pull from a paced registry first writes its **request** `wait.<registry>.<token>` with
  a per-message TTL (`Nats-TTL`, the lease TTL), refreshed while it waits, and written
  again when the node's load (its running containers, part of the order) has changed;
  each write carries the image's current `want` (the share of the node's workloads that
  use it, also part of the order).
  Every puller follows the bucket (last message per key, then every change), so each one
  sees the same leases and requests and computes the same order (`pacing.decide`).
- When `decide` grants slot N, the puller **creates** `lease.<registry>.<N>`: creation
  fails if the key exists, so two pullers never hold one slot and at most `budget` leases
  exist per registry, whatever the views say. It then removes its request. A slot whose
  lease lapses (TTL) during the creation is claimed again at once: the waiters of a dead
  holder claim it at its `expires_at`, just before the server drops it.
- A held lease is **renewed** every third of the TTL by a write conditional on the revision
  it read (`Nats-Expected-Last-Subject-Sequence`): a lease that lapsed and was taken by
  another puller is never overwritten (the pull goes on; `cedar_puller_fleet_leases_lost`).
  It is **released** by a purge conditional on that revision, whose marker carries the TTL
  too, so the bucket holds nothing that does not expire.
- A crashed holder stops renewing: its lease is gone one TTL after its last renewal, and
  waiters, who know its `expires_at`, try the slot then.
- NATS unreachable (not connected, or a write that fails) means the node's own bound
  (`CEDAR_MAX_CONCURRENT_PULLS`) only, never a wait: the pull goes on at once
  (`pacing.without_store`), and for a few seconds after a failure the store is not asked.
- A stored value that is not a lease or a request (another version, a hand-written key) is
  logged once per key and counted (`cedar_puller_fleet_lease_bad_entries`); an unreadable
  lease still occupies its slot (creation would fail on it) until it is removed or the
  bucket's max age passes, so it never makes a waiter try that slot in a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from cedar.proto import subjects
from cedar.proto.imageref import canonical_registry
from cedar.puller import metrics
from cedar.puller.lease_codec import (
    decode_lease,
    decode_request,
    encode_lease,
    encode_request,
    lease_key,
    registry_key,
    request_key,
)
from cedar.puller.pacing import (
    FleetBudget,
    FleetPullsError,
    Grant,
    Lease,
    PullPriority,
    Request,
    decide,
    live,
    next_look,
    renew_due,
    share_of,
    without_store,
)
from cedar.runtime.bus import Bus, BusError, bus_errors, kv_deleted
from cedar.runtime.topology import FLEET_LEASES_MAX_AGE, kv_stream, kv_subject

log = logging.getLogger("cedar.puller.fleet")

# JetStream's "wrong last sequence" (the conditional write lost the race).
_WRONG_LAST_SEQUENCE = (10071, 10164)
# After a failed write the store is not asked again for this long: pulls go on at once.
_STORE_DOWN_FOR = 10.0
# Creates of a slot that lapsed between create's write and its look, before giving it up.
_CLAIM_TRIES = 3
# How long a start waits for the view to be read before deciding on what it has.
_VIEW_PATIENCE = 3.0
_IDLE_HEARTBEAT = 2.0


@dataclass
class Held:
    """One pull's right to go: a lease (with the revision to renew it by), or the reason it
    goes without one (registry not paced, store unavailable)."""

    registry: str
    token: str
    lease: Lease | None
    revision: int
    reason: str


class LeaseStore:
    """The leases of this node's pulls, kept in the fleet's lease bucket."""

    def __init__(
        self,
        *,
        bus: Bus,
        kv: KeyValue,
        budget: FleetBudget,
        holder: str,
        ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl < 1.0:
            raise FleetPullsError(f"the lease TTL must be at least 1s, not {ttl}")
        self.bus = bus
        self.kv = kv
        self.budget = budget
        self.holder = holder
        self.ttl = float(math.ceil(ttl))  # Nats-TTL is whole seconds
        self.clock = clock
        self._view: dict[str, tuple[Lease | Request, int]] = {}  # key -> (entry, revision)
        self._bad: set[str] = set()
        # unreadable lease keys: key -> (registry key, slot, until): they hold their slot
        self._bad_slots: dict[str, tuple[str, int, float]] = {}
        self._waiters: set[asyncio.Event] = set()  # one per waiting acquire: woken by news
        self._loaded = asyncio.Event()
        self._subscription: Subscription | None = None
        self._held: dict[str, Held] = {}  # token -> held lease
        self._down_until = 0.0  # monotonic
        self._renewer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._tokens = itertools.count(1)
        self._warned_down = False

    # --- life -----------------------------------------------------------------------

    def paced(self, registry: str) -> bool:
        return self.budget.limit_for(registry) is not None

    def new_token(self, image: str) -> str:
        return f"{self.holder}/{image}/{self.clock():.6f}/{next(self._tokens)}"

    async def start(self) -> None:
        """Follow the bucket; a failure leaves the store unavailable until it succeeds."""
        self._renewer = asyncio.create_task(self._renew_loop(), name="fleet-lease-renewals")
        await self._follow()

    async def _follow(self) -> bool:
        if self._subscription is not None:
            return True
        try:
            with bus_errors("follow the fleet lease bucket"):
                sub = await self.bus.js.subscribe(
                    kv_subject(subjects.KV_FLEET_LEASES, ">"),
                    stream=kv_stream(subjects.KV_FLEET_LEASES),
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                    idle_heartbeat=_IDLE_HEARTBEAT,
                    cb=self._on_message,
                )
                self._subscription = sub
                info = await sub.consumer_info()
            if not info.num_pending and not sub.delivered:
                self._loaded.set()
        except BusError as err:
            self._store_failed("follow the lease bucket", err)
            return False
        return True

    async def close(self) -> None:
        tasks = [t for t in (self._renewer, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for held in list(self._held.values()):
            await self.release(held)
        if self._subscription is not None:
            with contextlib.suppress(BusError), bus_errors("stop following the lease bucket"):
                await self._subscription.unsubscribe()
            self._subscription = None

    # --- the view -------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        key = msg.subject.removeprefix(kv_subject(subjects.KV_FLEET_LEASES))
        self._bad_slots.pop(key, None)
        if kv_deleted(msg.headers):
            self._view.pop(key, None)
        else:
            try:
                entry: Lease | Request = (
                    decode_lease(msg.data) if key.startswith("lease.") else decode_request(msg.data)
                )
            except FleetPullsError as err:
                self._view.pop(key, None)
                self._hold_bad_slot(key)
                metrics.FLEET_BAD_ENTRIES.inc()
                if key not in self._bad:
                    self._bad.add(key)
                    log.warning(
                        "ignoring an entry of the lease bucket that is not a lease or request",
                        extra={"key": key, "error": str(err)},
                    )
            else:
                self._view[key] = (entry, msg.metadata.sequence.stream)
        with contextlib.suppress(Exception):  # a message without JetStream metadata
            if msg.metadata.num_pending == 0:
                self._loaded.set()
        for waiter in self._waiters:
            waiter.set()

    def _hold_bad_slot(self, key: str) -> None:
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "lease" and parts[2].isdigit():
            until = self.clock() + FLEET_LEASES_MAX_AGE.total_seconds()
            self._bad_slots[key] = (parts[1], int(parts[2]), until)

    def _occupied(self, host: str, now: float) -> list[Lease]:
        """Placeholders for the unreadable lease keys of `host`: their slots are taken."""
        mine = registry_key(host)
        return [
            Lease(host, slot, "<unreadable>", key, PullPriority.COLD, now, until)
            for key, (rk, slot, until) in self._bad_slots.items()
            if rk == mine and until > now
        ]

    def _seen(self, now: float) -> tuple[list[Lease], list[Request]]:
        leases: list[Lease] = []
        requests: list[Request] = []
        stale = []
        for key, (entry, _) in self._view.items():
            if entry.expires_at <= now - self.ttl:
                stale.append(key)  # lapsed without a message (TTL): forget it
            elif isinstance(entry, Lease):
                leases.append(entry)
            else:
                requests.append(entry)
        for key in stale:
            del self._view[key]
        return leases, requests

    def snapshot(self, registry: str) -> tuple[list[Lease], list[Request]]:
        """The live leases and requests of `registry` as this puller sees them."""
        host = canonical_registry(registry)
        now = self.clock()
        leases, requests = self._seen(now)
        return (
            [x for x in live(leases, now) if x.registry == host],
            [x for x in live(requests, now) if x.registry == host],
        )

    # --- acquire and release --------------------------------------------------------

    def _available(self) -> bool:
        return self.bus.connected and time.monotonic() >= self._down_until

    def _store_failed(self, what: str, err: BusError) -> None:
        self._down_until = time.monotonic() + _STORE_DOWN_FOR
        metrics.FLEET_STORE_ERRORS.inc()
        if not self._warned_down:
            self._warned_down = True
            log.warning(
                "fleet lease store unavailable: pulls go on within this node's bound only",
                extra={"doing": what, "error": str(err)},
            )

    def _store_back(self) -> None:
        """A lease was granted: if the store had failed, say so once it works again, so
        that the next failure is logged too."""
        if self._warned_down:
            self._warned_down = False
            log.info("fleet lease store available again: pulls are paced fleet-wide")

    def _fallback(self, request: Request) -> Held:
        grant = without_store(request)
        metrics.FLEET_GRANTS.labels(result="unavailable").inc()
        return Held(request.registry, request.token, None, 0, grant.reason)

    async def acquire(
        self,
        registry: str,
        token: str,
        priority: PullPriority,
        *,
        load: Callable[[], Awaitable[int]] | None = None,
        want: Callable[[], float] | None = None,
    ) -> Held:
        """Wait for a lease of `registry` (at once when it is not paced or the store is
        unavailable). `load` gives the node's running containers, read when the request is
        written and at each look while it waits; `want` the share of the node's workloads
        that use the image, read at each write (so it costs no write of its own).
        Cancelling withdraws the request."""
        host = canonical_registry(registry)
        limit = self.budget.limit_for(host)
        if limit is None:
            return Held(host, token, None, 0, "registry not paced")
        now = self.clock()
        request = Request(host, self.holder, token, priority, now, now + self.ttl)
        if not self._available() or not await self._follow():
            return self._fallback(request)
        if not self._loaded.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._loaded.wait(), _VIEW_PATIENCE)
        leases, requests = self._seen(now)
        request = replace(
            request,
            share=share_of(self.holder, host, leases, requests, now),
            load=await load() if load is not None else 0,
            want=want() if want is not None else 0.0,
        )
        gauge = metrics.FLEET_WAITING.labels(registry=host)
        gauge.inc()
        news = asyncio.Event()
        self._waiters.add(news)
        started = time.monotonic()
        written = False
        try:
            await self._write_request(request)
            written = True
            while True:
                if not self._available():
                    return self._fallback(request)
                current = await load() if load is not None else request.load
                now = self.clock()
                # Refreshed as renew_due says, and at once when the node's load changed.
                if renew_due(request, now, self.ttl) or current != request.load:
                    request = replace(
                        request,
                        expires_at=now + self.ttl,
                        load=current,
                        want=want() if want is not None else request.want,
                    )
                    await self._write_request(request)
                news.clear()
                leases, requests = self._seen(now)
                leases += self._occupied(host, now)
                decision = decide(request, limit=limit, leases=leases, waiting=requests, now=now)
                if isinstance(decision, Grant):
                    assert decision.slot is not None
                    held = await self._claim(request, decision.slot, limit)
                    if held is not None:
                        metrics.FLEET_WAIT.labels(priority=priority.name.lower()).observe(
                            time.monotonic() - started
                        )
                        metrics.FLEET_GRANTS.labels(result="lease").inc()
                        self._store_back()
                        return held
                    nap = 0.2  # lost the slot to another puller: look again shortly
                else:
                    nap = next_look(request, leases, requests, now, ttl=self.ttl)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(news.wait(), nap)
        except BusError as err:
            self._store_failed("wait for a lease", err)
            return self._fallback(request)
        finally:
            self._waiters.discard(news)
            gauge.dec()
            if written:
                self._spawn(self._remove(request_key(host, token), None))

    async def _claim(self, request: Request, slot: int, limit: int) -> Held | None:
        now = self.clock()
        lease = Lease(
            request.registry,
            slot,
            self.holder,
            request.token,
            request.priority,
            now,
            now + self.ttl,
        )
        key = lease_key(request.registry, slot)
        revision = await self._create(key, encode_lease(lease))
        if revision is None:
            return None
        held = Held(request.registry, request.token, lease, revision, f"slot {slot} of {limit}")
        self._held[request.token] = held
        self._view[key] = (lease, revision)
        metrics.FLEET_LEASES_HELD.labels(registry=request.registry).inc()
        return held

    async def _create(self, key: str, data: bytes) -> int | None:
        """Create `key` (with the TTL); its revision, or None when another puller has it.

        nats-py's create writes on condition that the key has no message and, if it has
        one, looks at it to tell a delete marker (written over) from a live value. A lease
        that lapses by its TTL between the two, as a dead holder's does just when its
        waiters claim it, makes the look raise KeyNotFoundError: the slot is free now, so
        the create is tried again at once (not taken for an unavailable store)."""
        with bus_errors(f"claim {key}"):
            for _ in range(_CLAIM_TRIES):
                try:
                    return await self.kv.create(key, data, msg_ttl=self.ttl)
                except KeyWrongLastSequenceError:
                    return None  # taken: the slot is another puller's
                except KeyNotFoundError:
                    log.debug("a lease lapsed while it was claimed; again", extra={"key": key})
        return None  # lapsed and retaken each time: look again like any lost slot

    async def release(self, held: Held) -> None:
        """Give the lease back (a purge conditional on its revision; a lease that was lost
        is left to its new holder). Never raises: an unreachable store lets it lapse."""
        if held.lease is None or self._held.pop(held.token, None) is None:
            return
        metrics.FLEET_LEASES_HELD.labels(registry=held.registry).dec()
        key = lease_key(held.registry, held.lease.slot)
        await self._remove(key, held.revision)
        if self._view.get(key, (None, 0))[1] == held.revision:
            del self._view[key]

    def withdrawn(self) -> None:
        metrics.FLEET_WITHDRAWN.inc()

    # --- writes ---------------------------------------------------------------------

    async def _publish(self, key: str, data: bytes, headers: dict[str, str]) -> int | None:
        """A write with the TTL; None when its condition on the last revision failed."""
        subject = kv_subject(subjects.KV_FLEET_LEASES, key)
        with bus_errors(f"write {key}"):
            try:
                ack = await self.bus.js.publish(
                    subject, data, headers=headers or None, msg_ttl=self.ttl
                )
            except APIError as err:
                if err.err_code in _WRONG_LAST_SEQUENCE:
                    return None
                raise
        return int(ack.seq)

    async def _write_request(self, request: Request) -> None:
        await self._publish(
            request_key(request.registry, request.token), encode_request(request), {}
        )

    async def _remove(self, key: str, revision: int | None) -> None:
        headers = {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}
        if revision is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(revision)
        try:
            await self._publish(key, b"", headers)
        except BusError as err:
            log.debug("could not remove a lease bucket key", extra={"key": key, "error": str(err)})

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _renew_loop(self) -> None:
        tick = max(0.2, min(1.0, self.ttl / 6.0))
        while True:
            await asyncio.sleep(tick)
            for held in list(self._held.values()):
                lease = held.lease
                assert lease is not None
                now = self.clock()
                if not renew_due(lease, now, self.ttl) or not self.bus.connected:
                    continue
                fresh = replace(lease, expires_at=now + self.ttl)
                key = lease_key(held.registry, lease.slot)
                headers = {"Nats-Expected-Last-Subject-Sequence": str(held.revision)}
                try:
                    revision = await self._publish(key, encode_lease(fresh), headers)
                except BusError as err:
                    log.debug("lease renewal failed; retrying", extra={"error": str(err)})
                    continue
                if held.token not in self._held:
                    if revision is not None:  # released while this renewal was on its way:
                        await self._remove(key, revision)  # its purge missed this revision
                    continue
                if revision is None:
                    del self._held[held.token]
                    metrics.FLEET_LEASES_HELD.labels(registry=held.registry).dec()
                    metrics.FLEET_LEASES_LOST.inc()
                    log.warning(
                        "a lease lapsed before it was renewed (NATS unreachable for a TTL?); "
                        "the pull goes on",
                        extra={"registry": held.registry, "slot": lease.slot},
                    )
                    continue
                held.lease, held.revision = fresh, revision
                self._view[key] = (fresh, revision)
