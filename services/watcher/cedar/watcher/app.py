"""The watcher service: one informer per enabled kind, one publisher, shared state.
I/O: wires the Kubernetes client (cedar.runtime.kube) and the bus's NATS connection to the
informers and the publisher, and tunes the process's garbage collector.

Readiness (`/readyz`): NATS connected and the first full list of every enabled kind done
(a kind the service account may not list counts as done once reported).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

from cedar.runtime import topology
from cedar.runtime.kube import KubeClient, load_config
from cedar.runtime.service import Runtime
from cedar.watcher.informer import Informer, health_check_name
from cedar.watcher.outbox import Outbox
from cedar.watcher.publisher import Publisher
from cedar.watcher.settings import WatcherSettings
from cedar.watcher.watch_state import WatchState

log = logging.getLogger("cedar.watcher")

FLUSH_GRACE_SECONDS = 10.0
# Fewer young-generation collections; with the long-lived state frozen (below), the full
# collections that scanned it all (~25% of the CPU at thousands of events per second) stop.
GC_THRESHOLDS = (5_000, 20, 20)
# Process-wide, so only the `cedar watcher` command turns it on (not tests running in-process).
TUNE_GC = False
GC_PAUSE_MAX_SECONDS = 300.0


async def main(rt: Runtime[WatcherSettings]) -> None:
    settings = rt.settings
    kinds = settings.kinds
    for kind in kinds:
        rt.health.require(health_check_name(kind))
    config = load_config(settings.kubeconfig)
    if TUNE_GC:
        gc.set_threshold(*GC_THRESHOLDS)
        gc.freeze()  # modules, settings, clients: alive for the whole run
        # The initial lists build the long-lived state; collections meanwhile would scan it
        # again and again for nothing. Back on once every kind is synced (or after a while,
        # if one never is).
        gc.disable()
        asyncio.get_running_loop().call_later(GC_PAUSE_MAX_SECONDS, gc.enable)
    await rt.bus.ensure(streams=topology.service_streams(settings))
    outbox = Outbox()
    publisher = Publisher(
        rt.bus,
        outbox,
        max_inflight=settings.publish_max_inflight,
        ack_timeout=settings.publish_ack_timeout,
    )
    seeded = await publisher.seed(kinds, settings.watch_namespace)
    log.info(
        "watching %s",
        ", ".join(kinds),
        extra={
            "stored_subjects": seeded,
            "namespace": settings.watch_namespace,
            "previous_revisions": settings.watch_previous_revisions,
        },
    )
    state = WatchState(
        outbox,
        previous_revisions=settings.watch_previous_revisions,
        marker_ttl=settings.history_retention.total_seconds(),
        max_body=settings.max_message_bytes,
    )
    client = KubeClient(config, timeout=60.0)
    pending_kinds = set(kinds)

    def synced(kind: str) -> None:
        pending_kinds.discard(kind)
        if not pending_kinds and TUNE_GC:
            # The known objects and the outbox now live as long as the process.
            gc.collect()
            gc.freeze()
            gc.enable()

    tasks = [asyncio.create_task(publisher.run(), name="watcher-publisher")]
    for kind in kinds:
        informer = Informer(
            kind,
            client,
            state,
            publisher.notify,
            rt.health,
            namespace=settings.watch_namespace,
            page_size=settings.watch_page_size,
            watch_timeout=settings.watch_timeout_seconds,
            on_synced=synced,
        )
        tasks.append(asyncio.create_task(informer.run(), name=f"informer-{kind}"))
    stopper = asyncio.create_task(rt.stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = None if task is stopper else task.exception()
            if exc is not None:
                raise exc
    finally:
        stopper.cancel()
        for task in tasks[1:]:
            task.cancel()
        for task in tasks[1:]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if rt.bus.connected and not await publisher.flush(FLUSH_GRACE_SECONDS):
            log.warning("stopping with %d changes unpublished", len(outbox))
        tasks[0].cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await tasks[0]
        await client.close()
