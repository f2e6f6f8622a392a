"""The allocator service's wiring: namespace events in, levels out, the ledger in between.

Each replica mirrors the whole ledger in memory (`mirror`) for its choices, takes namespace
events from the shared durable consumer `mcs-allocator` (`intake`, so each event goes to one
replica), handles each namespace (`handler`, writing only through compare-and-set on the
ledger), repairs at start and every CEDAR_MCS_RESYNC_INTERVAL (`repair`), and keeps the
ledger snapshot current (`snapshot_keeper`). A dry run loads the ledger and logs each
decision, writing nothing. The parts that make the level bind on pods and volumes (the
admission webhook, the watchdog, NFS mount contexts: `binding`) start first, since they
need only the Kubernetes API.

I/O: makes the NATS streams and buckets it needs (through `cedar.runtime.service.Runtime`)
and the Kubernetes client; the parts it starts do the rest.
"""

from __future__ import annotations

import asyncio
import logging

from cedar.mcs_allocator import binding as pod_binding
from cedar.mcs_allocator.audit import Audit
from cedar.mcs_allocator.decide import Policy
from cedar.mcs_allocator.errors import WebhookUnavailable
from cedar.mcs_allocator.handler import DryRunHandler, Handler, NamespaceHandler
from cedar.mcs_allocator.intake import consume, from_subject
from cedar.mcs_allocator.kubeio import NamespaceIO
from cedar.mcs_allocator.ledger_store import LedgerStore
from cedar.mcs_allocator.ledger_stream import LedgerStream
from cedar.mcs_allocator.mirror import Mirror, NoSnapshots, SnapshotSource
from cedar.mcs_allocator.repair import Repair
from cedar.mcs_allocator.schedule import periodic, sleep_or_stop
from cedar.mcs_allocator.settings import AllocatorSettings
from cedar.mcs_allocator.snapshot_keeper import SnapshotReader, SnapshotWriter
from cedar.mcs_allocator.snapshot_store import SnapshotStore
from cedar.proto import subjects
from cedar.runtime import topology
from cedar.runtime.backoff import Backoff
from cedar.runtime.errors import BusError, KubeError
from cedar.runtime.kube import KubeClient, load_config
from cedar.runtime.service import Runtime

log = logging.getLogger("cedar.mcs_allocator")

COMPONENT = "cedar-mcs-allocator"


def policy_of(settings: AllocatorSettings) -> Policy:
    return Policy(
        scope=settings.scope(),
        annotations=settings.annotations,
        categories=settings.mcs_categories,
        per_label=settings.mcs_categories_per_label,
    )


async def main(rt: Runtime[AllocatorSettings]) -> None:
    settings = rt.settings
    dry_run = settings.dry_run
    client = None if dry_run else KubeClient(load_config(settings.kubeconfig))
    bound = pod_binding.Binding()
    try:
        if client is not None:
            bound = await _start_binding(rt, client)
        # The watcher owns the streams; the allocator only makes sure they exist.
        await rt.bus.ensure(
            streams=[topology.history_stream(settings), topology.namespaces_stream(settings)],
            update=False,
        )
        kvs = await rt.bus.ensure(buckets=[topology.mcs_ledger_bucket(settings)])
        ledger = LedgerStore(kvs[subjects.KV_MCS_LEDGER])
        interval = settings.mcs_snapshot_interval.total_seconds()
        store = None
        snapshots: SnapshotSource = NoSnapshots()
        if interval > 0:
            bucket = await rt.bus.ensure_object_store(topology.mcs_snapshots_bucket(settings))
            store = SnapshotStore(bucket, rt.bus.js)
            snapshots = SnapshotReader(store)
        mirror = Mirror(settings, LedgerStream(rt.bus.js), ledger, snapshots)
        policy = policy_of(settings)
        if not await _load(rt, mirror):
            return
        rt.health.set("ledger", True)
        mirror.update_metrics()

        def reconnects() -> int:
            return int(rt.bus.nc.stats.get("reconnects", 0))

        async def update_metrics() -> None:
            mirror.update_metrics()

        tasks = [
            asyncio.create_task(mirror.follow(rt.stop, reconnects), name="ledger-follow"),
            asyncio.create_task(periodic(rt.stop, 2.0, update_metrics, 0.0), name="metrics"),
        ]
        if store is not None:
            writer = SnapshotWriter(mirror, store, dry_run=dry_run)
            tasks.append(
                asyncio.create_task(writer.keep_current(rt.stop, interval), name="snapshots")
            )
        handler: Handler
        if client is None:  # a dry run
            handler = DryRunHandler(mirror, policy)
        else:
            kube = NamespaceIO(client, COMPONENT, settings.pod_name)
            audit = Audit(rt.bus.js, settings.pod_name)
            handler = live = NamespaceHandler(mirror, ledger, kube, audit, policy)
            if not settings.from_subject:
                repair = Repair(mirror, live, kube, audit, policy)
                tasks.append(asyncio.create_task(_repairs(rt, repair), name="repair"))
        if settings.from_subject:
            tasks.append(asyncio.create_task(from_subject(rt, handler, settings.from_subject)))
        else:
            tasks.append(asyncio.create_task(consume(rt, handler), name="consume"))
        try:
            await rt.stop.wait()
        finally:
            for task in tasks:
                if task.get_name() != "consume":
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await bound.stop()
        if client is not None:
            await client.close()


async def _start_binding(rt: Runtime[AllocatorSettings], client: KubeClient) -> pod_binding.Binding:
    settings = rt.settings
    try:
        return await pod_binding.start(
            settings,
            client,
            Audit(rt.bus.js, settings.pod_name),
            rt.health,
            rt.stop,
            component=COMPONENT,
        )
    except OSError as err:
        log.error(
            "cannot serve the admission webhook on port %s (%s); check CEDAR_MCS_WEBHOOK_PORT, "
            "CEDAR_MCS_WEBHOOK_CERT and CEDAR_MCS_WEBHOOK_KEY",
            settings.mcs_webhook_port,
            err,
        )
        raise WebhookUnavailable(f"admission webhook: {err}") from err


async def _load(rt: Runtime[AllocatorSettings], mirror: Mirror) -> bool:
    """Load the mirror, retrying while NATS is away; False if stopped first."""
    backoff = Backoff(base=0.5, cap=10.0)
    while True:
        try:
            await mirror.load()
            return True
        except BusError as err:
            log.warning("cannot load the ledger (%s); retrying", err)
            await sleep_or_stop(rt.stop, backoff.next_delay())
            if rt.stop.is_set():
                return False


async def _repairs(rt: Runtime[AllocatorSettings], repair: Repair) -> None:
    """Repair at start, then every CEDAR_MCS_RESYNC_INTERVAL (jittered)."""
    interval = rt.settings.mcs_resync_interval.total_seconds()
    try:
        await repair.run()
    except (KubeError, BusError) as err:
        log.warning("start-up repair failed (%s); next run in %.0fs", err, interval)
    await periodic(rt.stop, interval, repair.run, 0.2)
