"""The reconcile loop: compare the desired set with the engine, start pulls, publish status.

Level-triggered: every workload event, node change, finished pull or timer marks the state
dirty, and one pass lists the engine, starts pulls (at most CEDAR_MAX_CONCURRENT_PULLS,
most-wanted first, not while the disk guard holds), refreshes tags that are due, records
evictions and skips, runs the prune when due, and publishes status. Nothing depends on
having seen every event. I/O: the image engine (list), the disk guard, status and
decisions (status.py), the prune (pruner.py) and the pulls (pulls.py); the image metrics
and cedar_puller_runtime_info (the engine's name and version, read again after an outage).
While the engine does not answer, /readyz says why and the loop retries every few seconds.
With a fleet budget, pulls waiting for a lease keep their local slot; when every slot is
taken and a missing image has none, the node's own waiting refreshes give theirs up
(`pacing.to_withdraw`). Each pass asks the warm-up gate (warm_gate.py) whether the node's
`cedar.io/warming` taint may go.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import UTC, datetime

from cedar.puller import metrics
from cedar.puller.desired import Change, DesiredSet
from cedar.puller.disk import DiskGuard
from cedar.puller.engine import ImageEngine
from cedar.puller.errors import EngineError
from cedar.puller.pacing import priority_of, to_withdraw
from cedar.puller.plan import (
    PERMANENT_REASONS,
    ImageRecord,
    Plan,
    Policy,
    lookup,
    observe_present,
    on_evicted,
    parse_image,
    plan,
    present_index,
)
from cedar.puller.pruner import Pruner
from cedar.puller.pulls import Pulls
from cedar.puller.registry import RegistryProbe
from cedar.puller.status import StatusPublisher, export_metrics
from cedar.puller.warm_gate import WarmGate
from cedar.runtime.health import Health

log = logging.getLogger("cedar.puller")


class Reconciler:
    def __init__(
        self,
        *,
        desired: DesiredSet,
        engine: ImageEngine,
        pulls: Pulls,
        pruner: Pruner,
        probe: RegistryProbe,
        disk: DiskGuard,
        status: StatusPublisher,
        health: Health,
        policy: Policy,
        rng: random.Random,
        max_concurrent_pulls: int,
        resync_interval: float,
        synced: asyncio.Event,
        dirty: asyncio.Event,
        started: float,
        gate: WarmGate | None = None,
    ) -> None:
        self.desired = desired
        self.engine = engine
        self.pulls = pulls
        self.pruner = pruner
        self.probe = probe
        self.disk = disk
        self.status = status
        self.health = health
        self.policy = policy
        self.rng = rng
        self.max_concurrent_pulls = max_concurrent_pulls
        self.resync_interval = resync_interval
        self.synced = synced  # the initial pass over the workloads is done
        self.dirty = dirty
        self.records: dict[str, ImageRecord] = {}
        self.warm = asyncio.Event()
        self.started = started  # monotonic time the puller started, for "warm after"
        self.gate = gate
        self._skips: dict[str, tuple[frozenset[str], str]] = {}
        # Images whose status key must go but whose delete NATS has not taken yet.
        self._unforgotten: set[str] = set()
        self._swept = False  # this node's keys left by an earlier run are checked
        self._described = False  # the engine's version is read and exported

    def note_change(self, change: Change) -> None:
        """Take a change of the desired set into account at the next pass."""
        if change.skipped and self.synced.is_set():
            # Live changes only: the initial pass would re-record every skip on each start.
            self._skips.update(change.skipped)
            self.dirty.set()
        if not change:
            return
        for image, observed in change.added.items():
            record = self.records.setdefault(image, ImageRecord(image))
            if self.synced.is_set():
                # Only changes seen live measure event-to-pull; the initial pass is history.
                record.wanted_at = observed.timestamp()
        self.dirty.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile whenever something changed, and at least every resync interval."""
        resync = self.resync_interval
        while not stop.is_set():
            wakeup: float | None = None
            if self.synced.is_set():
                self.dirty.clear()
                try:
                    wakeup = await self.reconcile()
                except EngineError as err:
                    self.health.set("engine", False, err.message)
                    self._described = False
                    log.warning("engine unavailable; retrying", extra={"error": err.message})
                    wakeup = time.monotonic() + min(5.0, resync)
            timeout = resync
            if wakeup is not None:
                timeout = max(0.05, min(resync, wakeup - time.monotonic()))
            waiters = {
                asyncio.ensure_future(self.dirty.wait()),
                asyncio.ensure_future(stop.wait()),
            }
            try:
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def _record_skips(self) -> None:
        skips, self._skips = self._skips, {}
        for identity, (images, why) in skips.items():
            for image in sorted(images):
                await self.status.decision(
                    image, "skip", f"node mismatch: {why}", workloads=(identity,)
                )

    async def reconcile(self) -> float | None:
        """One pass; returns the monotonic time at which something becomes due, if any."""
        desired = self.desired
        in_flight = self.pulls.in_flight
        now = time.monotonic()
        wall = time.time()
        self.note_change(desired.expire(datetime.now(UTC)))
        self.dirty.clear()
        await self._record_skips()

        listed_at = time.monotonic()
        local = await self.engine.images()
        if not self._described:
            await self._describe()
        self.health.set("engine", True)
        index = present_index(local)
        disk_low = await self.disk.check()

        present: dict[str, str | None] = {}
        for image in desired.images():
            record = self.records.setdefault(image, ImageRecord(image))
            ref = parse_image(image)
            found = lookup(index, image)
            if found is not None:
                present[image] = found[1]
                observe_present(
                    record, self.policy, found[1], now, by_digest=bool(ref and ref.is_digest)
                )
            elif (
                image not in in_flight
                and ref is not None
                and record.settled_at < listed_at  # a pull that ended since is not in `local`
            ):
                if record.brought:
                    delay = on_evicted(record, self.policy, now, self.rng)
                    metrics.EVICTED.inc()
                    log.warning(
                        "an image this puller pulled disappeared (kubelet image GC?)",
                        extra={"image": image, "evictions": record.evictions, "retry_in": delay},
                    )
                    await self.status.decision(
                        image,
                        "evicted",
                        "disappeared from the engine",
                        workloads=desired.workloads_of(image),
                    )
                elif record.state == "present":
                    record.state = "missing"
                if disk_low and record.state == "missing":
                    record.reason = "low_disk"

        # Images nobody wants any more: forget their bookkeeping and status. Each delete
        # awaits NATS, and the desired set may change meanwhile: re-check every image.
        if not self._swept:
            await self._sweep_stored()
        for image in [i for i in self.records if i not in desired and i not in in_flight]:
            if image in desired or image in in_flight:
                continue  # wanted again while an earlier delete awaited NATS
            del self.records[image]
            self._unforgotten.add(image)
        for image in sorted(self._unforgotten):  # a set: sorted, so runs are repeatable
            if image in desired or image in self.records:
                self._unforgotten.discard(image)  # wanted again: its status is written anew
            elif await self.status.forget_image(image):
                self._unforgotten.discard(image)  # else retried at the next pass

        result = self._plan(present, now, disk_low)
        for image, why in result.invalid:
            record = self.records[image]
            if record.reason != "invalid_reference":
                record.state, record.reason, record.error = "failed", "invalid_reference", why
                metrics.FAILURES.labels(reason="invalid_reference").inc()
                await self.status.decision(
                    image, "failed", "invalid_reference", workloads=desired.workloads_of(image)
                )
        for image, kind in result.pulls:
            self.pulls.start(self.records[image], kind)

        # A snapshot: pulls finishing while a status write awaits add records.
        for record in list(self.records.values()):
            await self.status.publish_image(record, desired.workloads_of(record.image))
        export_metrics(self.records.values(), len(desired))
        self._check_warm()
        if self.gate is not None:
            unpullable = {
                r.image
                for r in self.records.values()
                if r.state == "failed" and r.reason in PERMANENT_REASONS
            }
            self.gate.check(
                loaded=self.synced.is_set(),
                desired=desired.images(),
                present=present,
                unpullable=unpullable,
            )
        if self.synced.is_set():
            await self.pruner.track_and_prune(local, in_flight, wall)

        candidates = [
            result.next_wakeup,
            self.probe.next_retry(),
            self.pruner.next_due(now, wall),
            self.gate.next_due() if self.gate is not None else None,
        ]
        expiry = desired.next_expiry()
        if expiry is not None:
            candidates.append(now + max(0.0, expiry.timestamp() - wall))
        times = [t for t in candidates if t is not None]
        return min(times) if times else None

    def _plan(self, present: dict[str, str | None], now: float, disk_low: bool) -> Plan:
        """`plan`, and the node's own waiting refreshes withdrawn when they hold every slot
        a missing image needs (pacing.to_withdraw: strictly lower priorities only)."""
        desired, in_flight = self.desired, self.pulls.in_flight

        def choose(slots: int) -> Plan:
            return plan(
                desired.images(),
                desired.priority,
                present,
                in_flight,
                self.records,
                now=now,
                slots=slots,
                registry_down=self.probe.open_breakers(),
                disk_low=disk_low,
            )

        slots = self.max_concurrent_pulls - len(in_flight)
        result = choose(slots)
        waiting = dict(self.pulls.waiting)
        if not waiting or len(result.pulls) < max(slots, 0):
            return result  # nothing waits for a lease, or a slot is left
        chosen = sum(1 for _, kind in result.pulls if kind == "pull")
        wide = choose(slots + len(waiting))
        blocked = sum(1 for _, kind in wide.pulls if kind == "pull") - chosen
        if blocked <= 0:
            return result
        mine = priority_of("pull", node_warming=self.gate is not None and self.gate.warming)
        withdrawn = to_withdraw(waiting, blocked=mine, count=blocked)
        if not withdrawn:
            return result
        for image in withdrawn:
            self.pulls.withdraw(image)
        log.info(
            "waiting refreshes give their slots to missing images",
            extra={"withdrawn": len(withdrawn), "blocked": blocked},
        )
        # The withdrawn pulls leave `in_flight` when their tasks end: not chosen again now.
        return choose(slots + len(withdrawn))

    async def _describe(self) -> None:
        version = await self.engine.version()
        metrics.RUNTIME_INFO.clear()
        metrics.RUNTIME_INFO.labels(runtime=version.name, version=version.version).set(1)
        log.info(
            "engine answers",
            extra={"runtime": version.name, "version": version.version, "api": version.api},
        )
        self._described = True

    async def _sweep_stored(self) -> None:
        """Once per start: the status keys an earlier run of this node left in KV for
        images nobody wants now (it died before it could delete them) go too."""
        stored = await self.status.stored_images()
        if stored is None:
            return  # NATS cannot say now: the next pass asks again
        self._swept = True
        for image in stored:
            if image not in self.desired and image not in self.records:
                self._unforgotten.add(image)

    def _check_warm(self) -> None:
        if self.warm.is_set() or not self.synced.is_set():
            return
        for record in self.records.values():
            if record.state == "present":
                continue
            if record.state == "failed" and record.reason in PERMANENT_REASONS:
                continue  # an image that cannot exist must not keep a node "cold" forever
            return
        seconds = time.monotonic() - self.started
        metrics.WARM_SECONDS.set(seconds)
        log.info("node is warm", extra={"seconds": round(seconds, 3), "images": len(self.records)})
        self.warm.set()
