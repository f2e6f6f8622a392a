"""The puller's wiring: build its parts in order, run them, and stop them.

`assemble` makes sure the streams and buckets exist, loads the prune clocks, reads the
node, and builds the parts around one desired set; `Puller.run` follows the node and the
workloads and runs the reconcile loop until `stop`. I/O: only through the parts (and
`Bus.ensure`); the engine is chosen here (runtime_choice.py: the Docker engine or a CRI
runtime; the choice and why are logged), so that `--dry-run` never touches an engine.
With `CEDAR_REGISTRY_FLEET_PULLS` the lease bucket is created and followed
(fleet_leases.py); the warm-up gate (warm_gate.py) shares the Node's API client. A dry run
takes no leases and patches no Node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass

from cedar.proto import subjects
from cedar.proto.scheduling import NodeInfo
from cedar.puller.credentials import CredentialStore
from cedar.puller.desired import DesiredSet
from cedar.puller.disk import DiskGuard
from cedar.puller.engine import DryRunEngine, ImageEngine
from cedar.puller.feed import DesiredFeed
from cedar.puller.fleet_leases import LeaseStore
from cedar.puller.node import NodeSource
from cedar.puller.plan import Policy
from cedar.puller.prune import Scope
from cedar.puller.prune_state import PruneClocks
from cedar.puller.pruner import Pruner
from cedar.puller.pulls import Pulls
from cedar.puller.reconcile import Reconciler
from cedar.puller.registry import RegistryProbe
from cedar.puller.runtime_choice import RuntimeChoice, choose
from cedar.puller.settings import PullerSettings
from cedar.puller.status import StatusPublisher
from cedar.puller.warm_gate import WarmGate
from cedar.runtime import topology
from cedar.runtime.bus import Bus, bus_errors
from cedar.runtime.health import Health
from cedar.runtime.service import Runtime

READINESS_CHECKS = ("engine", "node", "desired")
log = logging.getLogger("cedar.puller")


def make_engine(
    settings: PullerSettings, node_runtime_version: str | None
) -> tuple[ImageEngine, RuntimeChoice | None]:
    """The engine to drive (none but the dry-run one with --dry-run), and the choice made."""
    if settings.dry_run:
        return DryRunEngine(), None
    choice = choose(
        settings.runtime,
        cri_endpoint_setting=settings.cri_endpoint,
        docker_host=settings.docker_host,
        docker_host_explicit=settings.docker_host_explicit,
        node_runtime_version=node_runtime_version,
        exists=os.path.exists,
    )
    log.info(
        "engine chosen",
        extra={"api": choice.api, "endpoint": choice.endpoint, "why": choice.why},
    )
    # Only the engine driven is imported: grpc and aiodocker each cost memory on every node.
    if choice.api == "cri":
        from cedar.puller.cri_engine import CriImageEngine

        engine: ImageEngine = CriImageEngine(
            choice.endpoint,
            node=settings.node,
            call_timeout=settings.cri_timeout.total_seconds(),
            want_labels=bool(settings.prune_label),
        )
    else:
        from cedar.puller.docker_engine import DockerImageEngine

        engine = DockerImageEngine(choice.endpoint)
    return engine, choice


@dataclass
class Puller:
    """The assembled parts (tests and the benchmark look inside them)."""

    settings: PullerSettings
    desired: DesiredSet
    feed: DesiredFeed
    reconciler: Reconciler
    pulls: Pulls
    probe: RegistryProbe
    disk: DiskGuard
    status: StatusPublisher
    engine: ImageEngine
    runtime: RuntimeChoice | None  # None in a dry run
    node_source: NodeSource
    node_version: str  # the Node's resourceVersion to watch from
    gate: WarmGate
    leases: LeaseStore | None  # None: no fleet budget, or a dry run

    def node_changed(self, node: NodeInfo) -> None:
        self.gate.node_changed(node)
        self.feed.node_changed(node)

    async def run(self, stop: asyncio.Event) -> None:
        tasks: list[asyncio.Task[None]] = []
        try:
            if self.leases is not None:
                await self.leases.start()
            if self.node_source.from_api:
                follow = self.node_source.follow(stop, self.node_version, self.node_changed)
                tasks.append(asyncio.create_task(follow, name="node-watch"))
            await self.feed.subscribe()
            await self.reconciler.run(stop)
        finally:
            await self.feed.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.pulls.cancel()
            await self.gate.close()
            if self.leases is not None:
                await self.leases.close()
            await self.probe.close()
            await self.engine.close()
            await self.node_source.close()


async def assemble(
    settings: PullerSettings, bus: Bus, health: Health, stop: asyncio.Event
) -> Puller | None:
    """The puller for this node, ready to run; None if `stop` came before the node was read."""
    started = time.monotonic()
    for check in READINESS_CHECKS:
        health.require(check)
    node_name = settings.node
    budget = settings.fleet_budget
    paced = budget.enabled and not settings.dry_run
    with bus_errors("set up the puller's streams and buckets"):
        # The watcher owns the streams; the puller only makes sure they exist.
        await bus.ensure(streams=topology.service_streams(settings), update=False)
        buckets = await bus.ensure(
            buckets=[
                topology.node_status_bucket(settings),
                topology.puller_state_bucket(settings),
            ],
        )
        if paced:  # the pullers own the lease bucket
            await bus.ensure(streams=[topology.fleet_leases_stream(settings)])
            buckets[subjects.KV_FLEET_LEASES] = await bus.js.key_value(subjects.KV_FLEET_LEASES)
    status = StatusPublisher(
        node_name,
        bus.js,
        buckets[subjects.KV_NODE_STATUS],
        dry_run=settings.dry_run,
        connected=lambda: bus.connected,
    )
    clocks = PruneClocks(node_name, buckets[subjects.KV_PULLER_STATE], dry_run=settings.dry_run)
    if not settings.dry_run:
        await clocks.load()

    node_source = NodeSource(settings)
    initial = await node_source.initial(stop)
    if initial is None:
        await node_source.close()
        return None
    node, node_version = initial
    health.set("node", True)
    desired = DesiredSet(node)

    engine, runtime = make_engine(settings, node_source.runtime_version)
    probe = RegistryProbe(
        ttl=settings.registry_probe_ttl.total_seconds(),
        timeout=settings.registry_probe_timeout.total_seconds(),
        insecure_hosts=settings.insecure_hosts,
    )
    policy = Policy(
        refresh_interval=settings.refresh_interval.total_seconds(),
        refresh_jitter=settings.refresh_jitter,
        backoff_base=settings.backoff_base.total_seconds(),
        backoff_max=settings.backoff_max.total_seconds(),
        permanent_retry=settings.permanent_retry.total_seconds(),
        node=node_name,
    )
    rng = random.Random()
    synced, dirty = asyncio.Event(), asyncio.Event()
    gate = WarmGate(
        node=node_name,
        client=None if settings.dry_run else node_source.client,
        timeout=settings.warm_timeout.total_seconds(),
        initial=node,
        on_done=dirty.set,
    )
    await gate.start()
    leases = None
    if paced:
        leases = LeaseStore(
            bus=bus,
            kv=buckets[subjects.KV_FLEET_LEASES],
            budget=budget,
            holder=node_name,
            ttl=settings.fleet_lease_ttl.total_seconds(),
        )
        log.info("fleet registry pacing on", extra={"budget": str(budget)})
    pulls = Pulls(
        engine=engine,
        probe=probe,
        credentials=CredentialStore(settings.registry_auth_file),
        status=status,
        desired=desired,
        policy=policy,
        rng=rng,
        pull_timeout=settings.pull_timeout.total_seconds(),
        dry_run=settings.dry_run,
        dirty=dirty,
        leases=leases,
        warming=lambda: gate.warming,
    )
    pruner = Pruner(
        scope=Scope.from_settings(settings.prune_label, settings.prune_prefixes),
        desired=desired,
        engine=engine,
        clocks=clocks,
        status=status,
        prune_after=settings.prune_after,
        prune_interval=settings.prune_interval,
    )
    disk = DiskGuard(settings.docker_root, settings.min_free_bytes, engine)
    reconciler = Reconciler(
        desired=desired,
        engine=engine,
        pulls=pulls,
        pruner=pruner,
        probe=probe,
        disk=disk,
        status=status,
        health=health,
        policy=policy,
        rng=rng,
        max_concurrent_pulls=settings.max_concurrent_pulls,
        resync_interval=settings.resync_interval.total_seconds(),
        synced=synced,
        dirty=dirty,
        started=started,
        gate=gate,
    )
    feed = DesiredFeed(
        bus=bus,
        desired=desired,
        health=health,
        on_change=reconciler.note_change,
        synced=synced,
        dirty=dirty,
        from_subject=settings.from_subject,
    )
    return Puller(
        settings=settings,
        desired=desired,
        feed=feed,
        reconciler=reconciler,
        pulls=pulls,
        probe=probe,
        disk=disk,
        status=status,
        engine=engine,
        runtime=runtime,
        node_source=node_source,
        node_version=node_version,
        gate=gate,
        leases=leases,
    )


async def main(runtime: Runtime[PullerSettings]) -> None:
    """`cedar.runtime.service` entry point."""
    puller = await assemble(runtime.settings, runtime.bus, runtime.health, runtime.stop)
    if puller is not None:
        await puller.run(runtime.stop)
