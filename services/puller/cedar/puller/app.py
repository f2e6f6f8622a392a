"""The puller: desired images from NATS, reconciled against this node's Docker engine.

One loop, level-triggered: every workload event, node change, finished pull or timer marks
the state dirty, and a reconcile compares the desired set with what the engine has, starts
pulls (at most CEDAR_MAX_CONCURRENT_PULLS, most-wanted first), refreshes tags that are due,
records what stopped being desired (for the prune), and publishes status. Nothing depends
on having seen every event: after a restart the desired set is rebuilt from the stream
and the engine is simply listed again.

Sources of workloads are pluggable so that `--from-subject` (events re-published by
`cedar replay`) can feed a dry-run puller; the engine is pluggable so that `--dry-run`
never touches Docker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from cedar.proto import subjects
from cedar.proto.imageref import parse
from cedar.proto.models import WorkloadImageSet
from cedar.puller import metrics
from cedar.puller.credentials import CredentialStore
from cedar.puller.desired import Change, DesiredSet
from cedar.puller.engine import DockerEngine, DryRunEngine, EngineError, ImageEngine
from cedar.puller.node import NodeSource
from cedar.puller.plan import (
    PERMANENT_REASONS,
    ImageRecord,
    Policy,
    observe_present,
    on_evicted,
    on_pull_failed,
    on_pull_started,
    on_pull_succeeded,
    parse_image,
    plan,
)
from cedar.puller.prune import LocalImage, Scope, decide, is_desired
from cedar.puller.registry import RegistryProbe
from cedar.puller.scheduling import NodeInfo
from cedar.puller.settings import PullerSettings
from cedar.puller.status import StatusPublisher, export_metrics
from cedar.runtime import topology
from cedar.runtime.bus import (
    TRANSIENT_ERRORS,
    Bus,
)
from cedar.runtime.health import Health
from cedar.runtime.service import Runtime

log = logging.getLogger("cedar.puller")

_NATS_ERRORS = (*TRANSIENT_ERRORS, NatsError)


def _present_index(images: list[LocalImage]) -> dict[str, tuple[str, str | None]]:
    """Normalised reference -> (image id, manifest digest) for everything in the engine."""
    index: dict[str, tuple[str, str | None]] = {}
    for image in images:
        digests: dict[str, str] = {}
        for text in image.repo_digests:
            ref = parse_image(text)
            if ref is not None and ref.digest is not None:
                digests[ref.name] = ref.digest
                index[f"{ref.name}@{ref.digest}"] = (image.id, ref.digest)
        for text in image.repo_tags:
            ref = parse_image(text)
            if ref is not None:
                index[str(ref)] = (image.id, digests.get(ref.name))
    return index


def _lookup(index: dict[str, tuple[str, str | None]], image: str) -> tuple[str, str | None] | None:
    ref = parse_image(image)
    if ref is None:
        return None
    if ref.digest is not None:
        return index.get(f"{ref.name}@{ref.digest}")
    return index.get(str(ref))


class Puller:
    def __init__(
        self,
        settings: PullerSettings,
        bus: Bus | None,
        health: Health,
        *,
        engine: ImageEngine | None = None,
    ) -> None:
        self.settings = settings
        self.node_name = settings.node
        self.bus = bus
        self.health = health
        self.dry_run = settings.dry_run
        self.engine: ImageEngine = engine or (
            DryRunEngine() if settings.dry_run else DockerEngine(settings.docker_host)
        )
        self.policy = Policy(
            refresh_interval=settings.refresh_interval.total_seconds(),
            refresh_jitter=settings.refresh_jitter,
            backoff_base=settings.backoff_base.total_seconds(),
            backoff_max=settings.backoff_max.total_seconds(),
            permanent_retry=settings.permanent_retry.total_seconds(),
            node=self.node_name,
        )
        self.scope = Scope.from_settings(settings.prune_label, settings.prune_prefixes)
        self.probe = RegistryProbe(
            ttl=settings.registry_probe_ttl.total_seconds(),
            timeout=settings.registry_probe_timeout.total_seconds(),
            insecure_hosts=settings.insecure_hosts,
        )
        self.credentials = CredentialStore(settings.registry_auth_file)
        self.desired: DesiredSet | None = None
        self.records: dict[str, ImageRecord] = {}
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self.max_in_flight = 0  # observed, for tests and the benchmark
        self.pull_attempts = 0
        self.rng = random.Random()
        self.dirty = asyncio.Event()
        self.synced = asyncio.Event()  # the initial pass over the stream is done
        self.warm = asyncio.Event()
        self.started = time.monotonic()
        self.status: StatusPublisher = StatusPublisher(self.node_name, None, None)
        self.state_kv: KeyValue | None = None
        self.undesired_since: dict[str, float] = {}
        self.prune_due = 0.0
        self.disk_low = False
        self._pending: list[WorkloadImageSet] = []
        self._subscription: Subscription | None = None
        self._last_seq = 0
        self._skips: dict[str, tuple[frozenset[str], str]] = {}
        for check in ("engine", "node", "desired"):
            health.require(check)

    # --- workloads in ---------------------------------------------------------------------

    def _apply(self, wis: WorkloadImageSet) -> None:
        if self.desired is None:
            self._pending.append(wis)  # the node is not known yet
            return
        self._note_change(self.desired.apply(wis, datetime.now(UTC)))

    def _note_change(self, change: Change) -> None:
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

    async def _on_message(self, msg: Msg) -> None:
        original = (msg.headers or {}).get(subjects.ORIGINAL_SUBJECT_HEADER)
        if original is not None and not original.startswith(subjects.WORKLOADS_PREFIX + "."):
            return  # a replay carries decisions and namespace events too
        try:
            wis = WorkloadImageSet.model_validate_json(msg.data)
        except ValidationError as err:
            log.warning(
                "ignoring a message that is not a WorkloadImageSet v1",
                extra={"subject": msg.subject, "errors": err.error_count()},
            )
            wis = None
        if wis is not None:
            self._apply(wis)
        if not self.synced.is_set():
            pending = 0
            with contextlib.suppress(Exception):
                pending = msg.metadata.num_pending
                if msg.metadata.sequence.stream >= self._last_seq:
                    pending = 0
            if pending == 0:
                self._initial_pass_done()

    def _initial_pass_done(self) -> None:
        if not self.synced.is_set():
            count = self.desired.workload_count if self.desired else len(self._pending)
            log.info("desired state loaded from NATS", extra={"workloads": count})
            self.synced.set()
            self.health.set("desired", True)
            self.dirty.set()

    async def _subscribe(self) -> None:
        assert self.bus is not None
        if self.settings.from_subject:
            subject = self.settings.from_subject
            try:
                # `cedar replay --to` keeps what it re-publishes in a stream, so a puller
                # started after the replay still sees every message from the start.
                self._subscription = await self.bus.js.subscribe(
                    subject,
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.ALL,
                    idle_heartbeat=2.0,
                    cb=self._on_message,
                )
            except NotFoundError:
                self._subscription = await self.bus.nc.subscribe(subject, cb=self._on_message)
            log.info("taking workloads from a subject", extra={"subject": subject})
            self._initial_pass_done()
            return
        info = await self.bus.js.stream_info(subjects.STREAM_WORKLOADS)
        self._last_seq = info.state.last_seq
        self._subscription = await self.bus.js.subscribe(
            f"{subjects.WORKLOADS_PREFIX}.>",
            stream=subjects.STREAM_WORKLOADS,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            # Two missed heartbeats make the ordered consumer re-create itself (after a NATS
            # restart, say); 2 s keeps that gap near 4 s at a negligible message rate.
            idle_heartbeat=2.0,
            cb=self._on_message,
        )
        if info.state.messages == 0:
            self._initial_pass_done()

    # --- node -------------------------------------------------------------------------------

    def _on_node(self, node: NodeInfo) -> None:
        self.health.set("node", True)
        if self.desired is None:
            self.desired = DesiredSet(node)
            pending, self._pending = self._pending, []
            self._note_change(self.desired.load(pending, datetime.now(UTC)))
        else:
            self._note_change(self.desired.set_node(node))
        self.dirty.set()

    # --- setup ------------------------------------------------------------------------------

    async def _setup_nats(self) -> None:
        if self.bus is None:
            return
        settings = self.settings
        # The watcher owns the streams; the puller only makes sure they exist.
        await self.bus.ensure(
            streams=[
                *topology.service_streams(settings),
            ],
            update=False,
        )
        buckets = await self.bus.ensure(
            buckets=[
                topology.node_status_bucket(settings),
                topology.puller_state_bucket(settings),
            ],
        )
        self.state_kv = buckets[subjects.KV_PULLER_STATE]
        self.status = StatusPublisher(
            self.node_name, self.bus.js, buckets[subjects.KV_NODE_STATUS], dry_run=self.dry_run
        )
        if not self.dry_run:
            await self._load_prune_state()

    def _state_key(self, image_id: str) -> str:
        return f"{subjects.token(self.node_name)}.{subjects.image_key(image_id)}"

    async def _load_prune_state(self) -> None:
        kv = self.state_kv
        if kv is None:
            return
        watcher = await kv.watch(f"{subjects.token(self.node_name)}.>", ignore_deletes=True)
        try:
            async for entry in watcher:
                if entry is None:
                    break
                try:
                    data = json.loads(entry.value or b"{}")
                    self.undesired_since[str(data["id"])] = float(data["since"])
                except (ValueError, KeyError, TypeError):
                    continue
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        log.info("prune bookkeeping loaded", extra={"tracked": len(self.undesired_since)})

    # --- main loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        node_source = NodeSource(self.settings, self._on_node)
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._setup_nats()
            _, rv = await node_source.initial(stop)
            if stop.is_set():
                return
            if node_source.from_api:
                tasks.append(asyncio.create_task(node_source.follow(stop, rv), name="node-watch"))
            if self.bus is not None:
                await self._subscribe()
            else:
                self._initial_pass_done()
            await self._loop(stop)
        finally:
            await self._shutdown(tasks)
            await node_source.close()

    async def _loop(self, stop: asyncio.Event) -> None:
        resync = self.settings.resync_interval.total_seconds()
        while not stop.is_set():
            wakeup: float | None = None
            if self.synced.is_set() and self.desired is not None:
                self.dirty.clear()
                try:
                    wakeup = await self.reconcile()
                except EngineError as err:
                    self.health.set("engine", False, err.message)
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

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        if self._subscription is not None:
            with contextlib.suppress(*_NATS_ERRORS):
                await self._subscription.unsubscribe()
        for task in tasks:
            task.cancel()
        # In-flight pulls are handed back: the engine abandons a pull whose client went
        # away, and the next puller's reconcile starts it again.
        pulls = list(self.in_flight.values())
        for task in pulls:
            task.cancel()
        await asyncio.gather(*tasks, *pulls, return_exceptions=True)
        await self.probe.close()
        await self.engine.close()

    # --- reconcile --------------------------------------------------------------------------

    def _check_disk(self) -> bool:
        root = self.settings.docker_root
        if not root:
            return False
        try:
            st = os.statvfs(root)
        except OSError as err:
            log.debug("cannot stat the engine's data root: %s", err)
            return False
        free = st.f_bavail * st.f_frsize
        metrics.DISK_FREE.set(free)
        low = free < self.settings.min_free_bytes
        if low != self.disk_low:
            if low:
                log.warning(
                    "free disk below the guard; new pulls wait",
                    extra={"free_bytes": free, "min_free_bytes": self.settings.min_free_bytes},
                )
            else:
                log.info("free disk above the guard again; pulls resume")
        self.disk_low = low
        metrics.DISK_LOW.set(1 if low else 0)
        return low

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
        assert desired is not None
        now = time.monotonic()
        wall = time.time()
        self._note_change(desired.expire(datetime.now(UTC)))
        self.dirty.clear()
        await self._record_skips()

        listed_at = time.monotonic()
        local = await self.engine.images()
        self.health.set("engine", True)
        index = _present_index(local)
        disk_low = self._check_disk()

        present: dict[str, str | None] = {}
        for image in desired.images():
            record = self.records.setdefault(image, ImageRecord(image))
            ref = parse_image(image)
            found = _lookup(index, image)
            if found is not None:
                present[image] = found[1]
                observe_present(
                    record, self.policy, found[1], now, by_digest=bool(ref and ref.is_digest)
                )
            elif (
                image not in self.in_flight
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

        # Images nobody wants any more: forget their bookkeeping and status.
        for image in [i for i in self.records if i not in desired and i not in self.in_flight]:
            del self.records[image]
            await self.status.forget_image(image)

        result = plan(
            desired.images(),
            desired.priority,
            present,
            self.in_flight,
            self.records,
            now=now,
            slots=self.settings.max_concurrent_pulls - len(self.in_flight),
            registry_down=self.probe.open_breakers(),
            disk_low=disk_low,
        )
        for image, why in result.invalid:
            record = self.records[image]
            if record.reason != "invalid_reference":
                record.state, record.reason, record.error = "failed", "invalid_reference", why
                metrics.FAILURES.labels(reason="invalid_reference").inc()
                await self.status.decision(
                    image, "failed", "invalid_reference", workloads=desired.workloads_of(image)
                )
        for image, kind in result.pulls:
            self._start_pull(image, kind)

        # A snapshot: pulls finishing while a status write awaits add records.
        for record in list(self.records.values()):
            await self.status.publish_image(record, desired.workloads_of(record.image))
        export_metrics(self.records.values(), len(desired))
        self._check_warm()
        await self._track_and_prune(local, wall)

        candidates = [result.next_wakeup, self.probe.next_retry()]
        expiry = desired.next_expiry()
        if expiry is not None:
            candidates.append(now + max(0.0, expiry.timestamp() - wall))
        if not self.scope.empty:
            candidates.append(now + max(0.0, self.prune_due - wall))
        times = [t for t in candidates if t is not None]
        return min(times) if times else None

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

    # --- pulls ------------------------------------------------------------------------------

    def _start_pull(self, image: str, kind: str) -> None:
        record = self.records[image]
        on_pull_started(record)
        task = asyncio.create_task(self._pull(image, kind, record), name=f"pull {image}")
        self.in_flight[image] = task
        self.max_in_flight = max(self.max_in_flight, len(self.in_flight))

    async def _pull(self, image: str, kind: str, record: ImageRecord) -> None:
        ref = parse(image)
        was_present = kind == "refresh"
        workloads = self.desired.workloads_of(image) if self.desired else ()
        try:
            if not self.dry_run and not await self.probe.is_up(ref.registry, ref.api_host):
                # Not a failure of this image: it waits behind the registry's breaker.
                record.state = "present" if was_present else "missing"
                record.reason = None if was_present else "registry_down"
                return
            if record.wanted_at is not None and kind == "pull":
                metrics.EVENT_TO_PULL.observe(max(0.0, time.time() - record.wanted_at))
            record.wanted_at = None
            await self.status.decision(image, kind, "", workloads=workloads)
            credential = self.credentials.for_registry(ref.registry)
            self.pull_attempts += 1
            started = time.monotonic()
            try:
                digest = await self.engine.pull(
                    ref,
                    credential.engine_auth() if credential else None,
                    self.settings.pull_timeout.total_seconds(),
                )
            except EngineError as err:
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
            metrics.PULL_DURATION.observe(time.monotonic() - started)
            metrics.PULLS.labels(result="success").inc()
            previous = record.digest
            on_pull_succeeded(
                record, self.policy, digest, time.monotonic(), by_digest=ref.is_digest
            )
            reason = ""
            if kind == "refresh":
                reason = "new digest" if digest and digest != previous else "unchanged"
            await self.status.decision(image, "pulled", reason, workloads=workloads, digest=digest)
        finally:
            self.in_flight.pop(image, None)
            self.dirty.set()

    # --- prune ------------------------------------------------------------------------------

    async def _track_and_prune(self, local: list[LocalImage], wall: float) -> None:
        if self.scope.empty or self.desired is None or not self.synced.is_set():
            return
        desired = set(self.desired.images()) | set(self.in_flight)
        prune_now = wall >= self.prune_due
        used: set[str] = set()
        if prune_now:
            used = await self.engine.used_image_ids()
        decision = decide(
            local,
            desired,
            self.undesired_since,
            used,
            scope=self.scope,
            now=wall,
            prune_after=self.settings.prune_after.total_seconds() if prune_now else float("inf"),
        )
        for image_id, since in decision.track.items():
            self.undesired_since[image_id] = since
            await self._put_state(image_id, since)
        for image_id in decision.forget:
            self.undesired_since.pop(image_id, None)
            await self._delete_state(image_id)
        if not prune_now:
            return
        self.prune_due = wall + self.settings.prune_interval.total_seconds()
        for image in decision.remove:
            name = image.repo_tags[0] if image.repo_tags else image.id
            if is_desired(image, set(self.desired.images())):
                continue  # wanted again by an event that arrived during this pass
            try:
                await self.engine.remove(image)
            except EngineError as err:
                # The engine refuses to remove an image a container uses: keep it.
                log.info("not pruned", extra={"image": name, "reason": err.message})
                continue
            metrics.PRUNED.inc()
            self.undesired_since.pop(image.id, None)
            await self._delete_state(image.id)
            await self.status.decision(name, "prune", f"undesired for {self.settings.prune_after}")

    async def _put_state(self, image_id: str, since: float) -> None:
        if self.state_kv is None or self.dry_run:
            return
        body = json.dumps({"id": image_id, "since": since}).encode()
        with contextlib.suppress(*_NATS_ERRORS):
            await self.state_kv.put(self._state_key(image_id), body)

    async def _delete_state(self, image_id: str) -> None:
        if self.state_kv is None or self.dry_run:
            return
        with contextlib.suppress(*_NATS_ERRORS):
            await self.state_kv.delete(self._state_key(image_id))


async def main(runtime: Runtime[PullerSettings]) -> None:
    """`cedar.runtime.service` entry point."""
    puller = Puller(runtime.settings, runtime.bus, runtime.health)
    await puller.run(runtime.stop)
