"""Wiring of the parts that make the level bind: the namespace cache, the admission webhook
(CEDAR_MCS_WEBHOOK_PORT), the pod watchdog (CEDAR_MCS_WATCHDOG) and the NFS volume keeper
(CEDAR_MCS_NFS_CONTEXT).

They need the Kubernetes API only (and NATS for audit records), so they start before the
ledger is loaded and keep serving while NATS is away: an admission webhook that stopped
answering whenever NATS did would stop every tenant pod from being created.

I/O: through the parts it starts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from cedar.mcs_allocator.audit import Audit
from cedar.mcs_allocator.nfs import VolumeRules
from cedar.mcs_allocator.nscache import NamespaceCache
from cedar.mcs_allocator.objectevents import EventRecorder
from cedar.mcs_allocator.podlevel import PodRules
from cedar.mcs_allocator.schedule import sleep_or_stop
from cedar.mcs_allocator.settings import AllocatorSettings
from cedar.mcs_allocator.volumes import VolumeKeeper
from cedar.mcs_allocator.watchdog import Watchdog
from cedar.mcs_allocator.webhook import CertFiles, Webhook
from cedar.runtime.health import Health
from cedar.runtime.kube import KubeClient

log = logging.getLogger("cedar.mcs_allocator")


@dataclass
class Binding:
    cache: NamespaceCache | None = None
    webhook: Webhook | None = None
    watchdog: Watchdog | None = None
    volumes: VolumeKeeper | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.webhook is not None:
            await self.webhook.stop()


def wanted(settings: AllocatorSettings) -> bool:
    return bool(settings.mcs_webhook_port or settings.mcs_watchdog or settings.mcs_nfs_context)


async def start(
    settings: AllocatorSettings,
    client: KubeClient,
    audit: Audit | None,
    health: Health,
    stop: asyncio.Event,
    *,
    component: str,
) -> Binding:
    """Start what the settings ask for. Raises OSError when the webhook cannot serve
    (its port, or no usable certificate)."""
    binding = Binding()
    if not wanted(settings):
        return binding
    cache = binding.cache = NamespaceCache(client, settings.scope(), settings.mcs_annotation)
    events = EventRecorder(client, component, settings.pod_name)
    if settings.mcs_webhook_port:
        health.require("webhook")
        certs = CertFiles(settings.mcs_webhook_cert, settings.mcs_webhook_key)
        webhook = binding.webhook = Webhook(
            cache, PodRules(allowed_types=settings.allowed_types), certs
        )
        await webhook.start(settings.mcs_webhook_host, settings.mcs_webhook_port)
        every = settings.mcs_webhook_reload.total_seconds()
        binding.tasks.append(
            asyncio.create_task(webhook.keep_cert_fresh(stop, every), name="webhook-cert")
        )
        binding.tasks.append(
            asyncio.create_task(_report_ready(webhook, health, stop), name="webhook-ready")
        )
    binding.tasks.append(asyncio.create_task(cache.run(stop), name="namespace-cache"))
    if settings.mcs_watchdog:
        watchdog = binding.watchdog = Watchdog(client, cache, events, audit, settings.excluded)
        binding.tasks.append(asyncio.create_task(watchdog.run(stop), name="watchdog"))
    if settings.mcs_nfs_context:
        rules = VolumeRules(settings.mcs_nfs_context_type, settings.nfs_csi_drivers)
        volumes = binding.volumes = VolumeKeeper(client, cache, events, audit, rules)
        binding.tasks.append(asyncio.create_task(volumes.run(stop), name="nfs-volumes"))
    return binding


async def _report_ready(webhook: Webhook, health: Health, stop: asyncio.Event) -> None:
    while not stop.is_set():
        health.set("webhook", webhook.ready, "" if webhook.ready else "not serving yet")
        await sleep_or_stop(stop, 1.0)
