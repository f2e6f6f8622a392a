"""The pulls in flight: one task per image, behind the registry's breaker, with credentials.

I/O: the image engine (pull), the registry probe (`/v2/`, registry.py), the credentials
file (credentials.py), the fleet's lease store (fleet_leases.py: a pull from a registry
with a fleet budget waits for a lease, still holding its local slot) and
`pull`/`pulled`/`failed` decisions (status.py); the pull metrics. How each outcome moves
the image's record is decided by plan.py. A pull waiting for a lease can be withdrawn
(`withdraw`): its record goes back to what it was, nothing is counted as failed. A lease
request carries the node's load, the containers the engine says run (`NodeLoad`: one
listing at most every few seconds, shared by the pulls waiting then, none while nothing
waits) and the image's `want`, the share of the node's workloads that use it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Protocol

from cedar.proto.imageref import ImageReference, parse
from cedar.puller import metrics
from cedar.puller.credentials import CredentialStore
from cedar.puller.desired import DesiredSet
from cedar.puller.engine import ImageEngine
from cedar.puller.errors import EngineError
from cedar.puller.fleet_leases import Held, LeaseStore
from cedar.puller.pacing import PullPriority, priority_of
from cedar.puller.plan import (
    ImageRecord,
    Policy,
    PullKind,
    on_pull_failed,
    on_pull_started,
    on_pull_succeeded,
)
from cedar.puller.registry import RegistryProbe
from cedar.puller.status import StatusPublisher

log = logging.getLogger("cedar.puller")

# How old the node's load may be when a lease request is written or refreshed.
LOAD_MAX_AGE = 5.0


class RunningContainers(Protocol):
    """The part of an `ImageEngine` that `NodeLoad` uses."""

    async def running_containers(self) -> int: ...


class NodeLoad:
    """The containers running on the node, as the engine lists them, at most `max_age`
    seconds old. Pulls waiting for a fleet lease ask it when they write their request
    and while they wait: one listing serves them all. A listing that fails keeps the last
    count (the order of the fleet's requests is not worth failing or delaying a pull)."""

    def __init__(
        self,
        engine: RunningContainers,
        *,
        max_age: float = LOAD_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.max_age = max_age
        self.clock = clock
        self.count = 0
        self._read_at: float | None = None
        self._lock = asyncio.Lock()  # two waiters, one listing
        self._warned = False

    def _fresh(self) -> bool:
        return self._read_at is not None and self.clock() - self._read_at < self.max_age

    async def current(self) -> int:
        if self._fresh():
            return self.count
        async with self._lock:
            if self._fresh():
                return self.count  # listed by the waiter that held the lock
            try:
                self.count = await self.engine.running_containers()
                self._warned = False
            except EngineError as err:
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "cannot count the node's running containers; lease requests keep "
                        "the last count",
                        extra={"count": self.count, "error": err.message},
                    )
            self._read_at = self.clock()
        return self.count


class Pulls:
    def __init__(
        self,
        *,
        engine: ImageEngine,
        probe: RegistryProbe,
        credentials: CredentialStore,
        status: StatusPublisher,
        desired: DesiredSet,
        policy: Policy,
        rng: random.Random,
        pull_timeout: float,
        dry_run: bool,
        dirty: asyncio.Event,
        leases: LeaseStore | None = None,
        warming: Callable[[], bool] = lambda: False,
    ) -> None:
        self.engine = engine
        self.probe = probe
        self.credentials = credentials
        self.status = status
        self.desired = desired
        self.policy = policy
        self.rng = rng
        self.pull_timeout = pull_timeout
        self.dry_run = dry_run
        self.dirty = dirty  # set when a pull ends, so that the next reconcile sees it
        self.leases = leases  # None: no fleet budget (or a dry run)
        self.warming = warming  # the node's warm-up gate is closed: its pulls come first
        self.load = NodeLoad(engine)  # sent with lease requests: least loaded nodes first
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self.waiting: dict[str, PullPriority] = {}  # in flight, waiting for a fleet lease
        self.max_in_flight = 0  # observed, for tests and the benchmark
        self.engine_pulls = 0  # engine pulls running now (not waiting for a lease)
        self.max_engine_pulls = 0
        self.attempts = 0

    def start(self, record: ImageRecord, kind: PullKind) -> None:
        image = record.image
        on_pull_started(record)
        task = asyncio.create_task(self._pull(image, kind, record), name=f"pull {image}")
        self.in_flight[image] = task
        self.max_in_flight = max(self.max_in_flight, len(self.in_flight))

    def withdraw(self, image: str) -> None:
        """Give up a pull that is waiting for a fleet lease (its slot goes to a more
        urgent pull); it starts again when the plan chooses it."""
        task = self.in_flight.get(image)
        if task is not None and image in self.waiting:
            self.waiting.pop(image, None)
            task.cancel()
            if self.leases is not None:
                self.leases.withdrawn()

    async def cancel(self) -> None:
        """Hand the pulls in flight back: the engine abandons a pull whose client went away,
        and the next puller's reconcile starts it again."""
        pulls = list(self.in_flight.values())
        for task in pulls:
            task.cancel()
        await asyncio.gather(*pulls, return_exceptions=True)

    async def _pull(self, image: str, kind: PullKind, record: ImageRecord) -> None:
        ref = parse(image)
        was_present = kind == "refresh"
        workloads = self.desired.workloads_of(image)
        try:
            if not self.dry_run and not await self.probe.is_up(ref.registry, ref.api_host):
                # Not a failure of this image: it waits behind the registry's breaker.
                record.state = "present" if was_present else "missing"
                record.reason = None if was_present else "registry_down"
                return
            held = await self._lease(image, kind, ref.registry, record, was_present)
            if held is None:
                return
            try:
                await self._pull_held(ref, kind, record, workloads)
            finally:
                if self.leases is not None:
                    await self.leases.release(held)
        finally:
            self.waiting.pop(image, None)
            self.in_flight.pop(image, None)
            self.dirty.set()

    async def _lease(
        self, image: str, kind: PullKind, registry: str, record: ImageRecord, was_present: bool
    ) -> Held | None:
        """Wait for a fleet lease when the registry is paced; None when withdrawn."""
        if self.leases is None or self.dry_run or not self.leases.paced(registry):
            return Held(registry, "", None, 0, "not paced")
        priority = priority_of(kind, node_warming=self.warming())
        self.waiting[image] = priority
        try:
            token = self.leases.new_token(image)
            return await self.leases.acquire(
                registry,
                token,
                priority,
                load=self.load.current,
                want=lambda: self.desired.want(image),
            )
        except asyncio.CancelledError:
            if image in self.waiting:
                raise  # not a withdrawal: the puller stops
            record.state = "present" if was_present else "missing"
            return None
        finally:
            self.waiting.pop(image, None)

    async def _pull_held(
        self, ref: ImageReference, kind: PullKind, record: ImageRecord, workloads: tuple[str, ...]
    ) -> None:
        """The engine pull, its lease (if any) held."""
        image, was_present = record.image, kind == "refresh"
        if record.wanted_at is not None and kind == "pull":
            metrics.EVENT_TO_PULL.observe(max(0.0, time.time() - record.wanted_at))
        record.wanted_at = None
        await self.status.decision(image, kind, "", workloads=workloads)
        credential = self.credentials.for_registry(ref.registry)
        self.attempts += 1
        started = time.monotonic()
        self.engine_pulls += 1
        self.max_engine_pulls = max(self.max_engine_pulls, self.engine_pulls)
        try:
            digest = await self.engine.pull(
                ref, credential.engine_auth() if credential else None, self.pull_timeout
            )
        except EngineError as err:
            self.engine_pulls -= 1
            if err.reason == "registry_down":
                self.probe.mark_down(ref.registry, err.message)
            metrics.PULLS.labels(result=err.reason).inc()
            metrics.FAILURES.labels(reason=err.reason).inc()
            on_pull_failed(
                record,
                self.policy,
                reason=err.reason,
                error=err.message,
                now=time.monotonic(),
                rng=self.rng,
                present=was_present,
            )
            await self.status.decision(image, "failed", err.reason, workloads=workloads)
            return
        except BaseException:
            self.engine_pulls -= 1
            raise
        self.engine_pulls -= 1
        metrics.PULL_DURATION.observe(time.monotonic() - started)
        metrics.PULLS.labels(result="success").inc()
        previous = record.digest
        on_pull_succeeded(record, self.policy, digest, time.monotonic(), by_digest=ref.is_digest)
        reason = ""
        if kind == "refresh":
            reason = "new digest" if digest and digest != previous else "unchanged"
        await self.status.decision(image, "pulled", reason, workloads=workloads, digest=digest)
