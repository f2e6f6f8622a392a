"""The puller against real NATS, real registries and a real engine: each test runs twice,
once driving a Docker engine and once a containerd through the CRI (the `engine` parameter).

Most tests run the puller in this process (so they can look at its bookkeeping, e.g. the
largest number of pulls in flight); the crash test runs `cedar puller` as a subprocess and
SIGKILLs it mid-pull. What differs per engine (how to list the node's images, hold one in a
container, evict one as kubelet's image GC does) is in `Node` below; the tests do not.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StreamConfig
from prometheus_client import REGISTRY

from cedar.proto import subjects
from cedar.proto.imageref import normalize
from cedar.proto.models import (
    ContainerImage,
    NodeImageStatus,
    NodeSelectorRequirement,
    NodeSelectorTerm,
    PodScheduling,
    PullerDecision,
    Toleration,
    WorkloadImageSet,
)
from cedar.puller import metrics
from cedar.puller.app import Puller, assemble
from cedar.puller.cri_engine import CriImageEngine
from cedar.puller.docker_engine import DockerImageEngine
from cedar.puller.engine import ImageEngine
from cedar.puller.settings import PullerSettings
from cedar.runtime.bus import Bus
from cedar.runtime.health import Health
from cedar.runtime.topology import node_status_bucket, service_streams
from cedar.sandbox.containerd import Containerd
from cedar.sandbox.dockerd import DockerEngine
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import kill_pid
from cedar.sandbox.registry import Registry
from tests.harness.containerd import hold_image
from tests.harness.registry import ImageMaker
from tests.harness.waiting import eventually

pytestmark = pytest.mark.integration

SMALL = 256 * 1024
ENGINES = ("docker", "cri")


@dataclass
class Node:
    """The node's engine as the tests see it: a private dockerd, or a private containerd."""

    daemon: DockerEngine | Containerd

    @property
    def kind(self) -> str:
        return "cri" if isinstance(self.daemon, Containerd) else "docker"

    def settings(self) -> dict[str, Any]:
        """The puller's settings that point it at this engine."""
        if isinstance(self.daemon, Containerd):
            return {"runtime": "cri", "cri_endpoint": self.daemon.endpoint}
        return {"runtime": "docker", "docker_host": self.daemon.host}

    def env(self) -> dict[str, str]:
        """The same, as the environment of a `cedar puller` process."""
        if isinstance(self.daemon, Containerd):
            return {
                **os.environ,
                "CEDAR_RUNTIME": "cri",
                "CEDAR_CRI_ENDPOINT": self.daemon.endpoint,
            }
        return {**self.daemon.env(), "CEDAR_RUNTIME": "docker"}

    def client(self) -> ImageEngine:
        if isinstance(self.daemon, Containerd):
            return CriImageEngine(self.daemon.endpoint, node="test")
        return DockerImageEngine(self.daemon.host)

    def reach(self, registry: Registry) -> None:
        """Let the engine pull from a registry a test started (containerd: a hosts.toml)."""
        if isinstance(self.daemon, Containerd):
            self.daemon.add_registry(registry.host)

    def data_root(self) -> str | None:
        """CEDAR_DOCKER_ROOT for the disk guard; on CRI the runtime's ImageFsInfo says it."""
        return None if isinstance(self.daemon, Containerd) else str(self.daemon.base_dir)

    async def evict(self, ref: str) -> None:
        """What kubelet's image GC does under disk pressure, through the same engine."""
        if isinstance(self.daemon, Containerd):
            await asyncio.to_thread(self.daemon.ctr, "images", "rm", ref)
        else:
            await asyncio.to_thread(self.daemon.docker, "rmi", ref)

    @contextlib.asynccontextmanager
    async def container_using(self, ref: str, name: str, logs: Path) -> AsyncIterator[None]:
        """A created, not started, container of `ref`: the image is in use."""
        if isinstance(self.daemon, Containerd):
            async with hold_image(self.daemon.endpoint, ref, logs):
                yield
            return
        await asyncio.to_thread(self.daemon.docker, "create", "--name", name, ref)
        try:
            yield
        finally:
            await asyncio.to_thread(self.daemon.docker, "rm", "-f", name, check=False)


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Which engine the test's node runs: "docker" or "cri" (containerd)."""
    return str(request.param)


@pytest.fixture
def node(engine: str, request: pytest.FixtureRequest) -> Node:
    """The session's engine of that kind (shared image store: tests use unique names)."""
    return Node(request.getfixturevalue("containerd" if engine == "cri" else "docker_engine"))


@pytest.fixture
def fresh_node(engine: str, request: pytest.FixtureRequest) -> Node:
    """An engine of that kind of this test's own, with an empty image store."""
    fixture = "fresh_containerd" if engine == "cri" else "fresh_docker_engine"
    return Node(request.getfixturevalue(fixture))


def workload(
    name: str,
    *images: str,
    scheduling: PodScheduling | None = None,
    deleted: bool = False,
    invalid: dict[str, str] | None = None,
) -> WorkloadImageSet:
    containers = [
        ContainerImage(container=f"c{i}", image=img, reference=normalize(img))
        for i, img in enumerate(images)
    ]
    for raw, why in (invalid or {}).items():
        containers.append(ContainerImage(container="bad", image=raw, error=why))
    return WorkloadImageSet(
        kind="Deployment",
        namespace="tenant",
        name=name,
        uid=f"uid-{name}",
        containers=tuple(containers),
        scheduling=scheduling or PodScheduling(),
        replicas=0,
        observed_at=datetime.now(UTC),
        deleted=deleted,
    )


def event_to_pull_count() -> float:
    value = REGISTRY.get_sample_value("cedar_puller_event_to_pull_seconds_count")
    return value or 0.0


@dataclass
class Running:
    puller: Puller
    bus: Bus
    stop: asyncio.Event
    task: asyncio.Task[None]

    def state(self, ref: str) -> str | None:
        record = self.puller.reconciler.records.get(normalize(ref))
        return record.state if record else None

    def record(self, ref: str) -> Any:
        return self.puller.reconciler.records.get(normalize(ref))

    async def halt(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)
        await self.bus.close()


@dataclass
class World:
    nats_url: str
    engine: Node
    bus: Bus
    running: list[Running] = field(default_factory=list)

    async def publish(self, wis: WorkloadImageSet) -> None:
        await self.bus.js.publish(
            subjects.workload_subject(wis.kind, wis.namespace, wis.name),
            wis.model_dump_json().encode(),
        )

    def settings(self, **overrides: Any) -> PullerSettings:
        values: dict[str, Any] = {
            "node_name": f"node-{uuid.uuid4().hex[:6]}",
            "nats_url": self.nats_url,
            **self.engine.settings(),
            "node_from_api": False,
            "registry_probe_ttl": "1s",
            "backoff_base": "0.2s",
            "backoff_max": "2s",
            "resync_interval": "1s",
        }
        values.update(overrides)
        return PullerSettings(**values)

    async def start(self, **overrides: Any) -> Running:
        settings = self.settings(**overrides)
        health = Health()
        bus = Bus(settings, "test-puller", health)
        assert await bus.connect()
        stop = asyncio.Event()
        puller = await asyncio.wait_for(assemble(settings, bus, health, stop), 30)
        assert puller is not None
        task = asyncio.create_task(puller.run(stop))
        running = Running(puller, bus, stop, task)
        self.running.append(running)
        await eventually(lambda: puller.feed.synced.is_set() or task.done(), 30, "puller synced")
        if task.done():
            task.result()
        return running

    async def local_images(self) -> dict[str, str | None]:
        """Normalised tag reference -> digest of what the engine has now."""
        client = self.engine.client()
        try:
            found: dict[str, str | None] = {}
            for image in await client.images():
                digest = image.repo_digests[0].split("@", 1)[1] if image.repo_digests else None
                for tag in image.repo_tags:
                    found[normalize(tag)] = digest
            return found
        finally:
            await client.close()

    async def has(self, ref: str) -> bool:
        return normalize(ref) in await self.local_images()


@pytest.fixture
async def world(nats_url: str, node: Node) -> AsyncIterator[World]:
    settings = PullerSettings(node_name="test", nats_url=nats_url)
    bus = Bus(settings, "test-publisher", Health())
    assert await bus.connect()
    await bus.ensure(
        streams=service_streams(settings),
        buckets=[node_status_bucket(settings)],
    )
    w = World(nats_url, node, bus)
    try:
        yield w
    finally:
        for running in w.running:
            if not running.task.done():
                await running.halt()
        await bus.close()


async def test_pulls_concurrently_within_the_limit(world: World, make_images: ImageMaker) -> None:
    refs = await make_images.make(6, SMALL)
    running = await world.start(max_concurrent_pulls=2)
    observed_before = event_to_pull_count()
    # Different priorities: the image most workloads want goes first.
    await world.publish(workload("many-a", *refs))
    await world.publish(workload("many-b", refs[5]))
    await world.publish(workload("many-c", refs[5]))
    await eventually(
        lambda: all(running.state(r) == "present" for r in refs), 60, "all six present"
    )
    assert running.puller.pulls.max_in_flight == 2
    local = await world.local_images()
    assert all(normalize(r) in local for r in refs)
    # Three workloads name refs[5]: one pull, still.
    assert running.puller.pulls.attempts == 6
    # Each pull was caused by a live event: its delay since the watcher saw it is measured.
    assert event_to_pull_count() - observed_before == 6
    # Status is in KV for `cedar status`.
    kv = await world.bus.js.key_value(subjects.KV_NODE_STATUS)
    node = running.puller.settings.node

    async def status_present() -> bool:
        entry = await kv.get(subjects.node_status_key(node, normalize(refs[5])))
        status = NodeImageStatus.model_validate_json(entry.value or b"")
        return status.state == "present" and status.digest is not None

    await eventually(status_present, 10, "status in KV")


async def test_private_registry_with_and_without_credentials(
    world: World, make_images: ImageMaker, auth_registry: Registry, tmp_path: Path
) -> None:
    refs = await make_images.make(2, SMALL, registry=auth_registry)
    user, password = auth_registry.credentials or ("", "")

    # Without credentials: unauthorized, recorded, and not retried in a hot loop.
    anonymous = await world.start(permanent_retry="1h")
    await world.publish(workload("private-anon", refs[0]))
    await eventually(lambda: anonymous.state(refs[0]) == "failed", 30, "unauthorized")
    assert anonymous.record(refs[0]).reason == "unauthorized"
    await asyncio.sleep(3)  # a window in which a hot loop would make many attempts
    assert anonymous.puller.pulls.attempts == 1
    await anonymous.halt()

    auth_file = tmp_path / "dockerconfig.json"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    auth_file.write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    authed = await world.start(registry_auth_file=str(auth_file))
    await world.publish(workload("private-auth", refs[1]))
    await eventually(lambda: authed.state(refs[1]) == "present", 30, "pulled with credentials")
    assert await world.has(refs[1])


async def test_registry_outage_and_recovery(
    world: World, make_images: ImageMaker, fresh_registry: Registry
) -> None:
    refs = await make_images.make(5, SMALL, registry=fresh_registry)
    world.engine.reach(fresh_registry)
    running = await world.start()
    await world.publish(workload("outage-first", refs[0]))
    await eventually(lambda: running.state(refs[0]) == "present", 30, "first pulled")

    await asyncio.to_thread(fresh_registry.stop)
    await world.publish(workload("outage-rest", *refs[1:]))
    probe = running.puller.probe
    await eventually(lambda: probe.known_down(fresh_registry.host), 30, "breaker open")
    attempts_during_outage = running.puller.pulls.attempts
    await asyncio.sleep(3)
    # Behind the open breaker the waiting pulls do not even start: no error storm.
    assert running.puller.pulls.attempts - attempts_during_outage <= 1
    assert not any(running.state(r) == "present" for r in refs[1:])

    await asyncio.to_thread(fresh_registry.start)
    await eventually(lambda: all(running.state(r) == "present" for r in refs), 60, "pulls resumed")
    # At most two attempts per image over the whole outage: one failed, one that worked.
    assert running.puller.pulls.attempts <= 1 + 2 * len(refs[1:])


async def test_refresh_pulls_a_repushed_tag(world: World, make_images: ImageMaker) -> None:
    (ref,) = await make_images.make(1, SMALL)
    running = await world.start(refresh_interval="2s", refresh_jitter=0.0)
    await world.publish(workload("refresh", ref))
    await eventually(lambda: running.state(ref) == "present", 30, "pulled")
    first = (await world.local_images())[normalize(ref)]
    assert first is not None
    new_digest = await make_images.push_new_content(ref, size_bytes=SMALL)
    assert new_digest != first

    async def refreshed() -> bool:
        return (await world.local_images()).get(normalize(ref)) == new_digest

    await eventually(refreshed, 30, "new digest pulled")
    # The record follows at the next reconcile after the pull.
    await eventually(lambda: running.record(ref).digest == new_digest, 10, "digest recorded")


async def test_node_matching_and_label_change(
    world: World, make_images: ImageMaker, kube_api: KubeAPI, tmp_path: Path
) -> None:
    refs = await make_images.make(5, SMALL)
    node_name = f"node-{uuid.uuid4().hex[:6]}"
    node: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node_name,
            "labels": {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "pool": "a"},
        },
        "spec": {
            "taints": [
                {"key": "dedicated", "value": "tenants", "effect": "NoSchedule"},
                # A node still becoming Ready is exactly the one to warm.
                {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"},
            ]
        },
    }
    kube_api.create(node)
    tolerate = (Toleration(key="dedicated", operator="Equal", value="tenants"),)

    def sched(**kw: Any) -> PodScheduling:
        return PodScheduling(tolerations=tolerate, **kw)

    def arch(value: str) -> tuple[NodeSelectorTerm, ...]:
        req = NodeSelectorRequirement(key="kubernetes.io/arch", operator="In", values=(value,))
        return (NodeSelectorTerm(match_expressions=(req,)),)

    await world.publish(workload("pool-a", refs[0], scheduling=sched(node_selector={"pool": "a"})))
    await world.publish(workload("pool-b", refs[1], scheduling=sched(node_selector={"pool": "b"})))
    await world.publish(
        workload("arm", refs[2], scheduling=sched(required_node_affinity=arch("arm64")))
    )
    await world.publish(
        workload("amd", refs[3], scheduling=sched(required_node_affinity=arch("amd64")))
    )
    await world.publish(workload("untolerated", refs[4]))

    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    running = await world.start(node_name=node_name, node_from_api=True, kubeconfig=str(kubeconfig))
    desired = running.puller.desired
    assert desired is not None
    await eventually(
        lambda: all(running.state(r) == "present" for r in (refs[0], refs[3])), 30, "matching"
    )
    assert set(desired.images()) == {normalize(refs[0]), normalize(refs[3])}
    assert not await world.has(refs[1]) and not await world.has(refs[2])

    # The node moves to pool b and loses its taint: pool-b and untolerated become desired.
    kube_api.patch(
        "nodes",
        None,
        node_name,
        {"metadata": {"labels": {"pool": "b"}}, "spec": {"taints": None}},
    )
    await eventually(
        lambda: all(running.state(r) == "present" for r in (refs[1], refs[4])), 30, "after change"
    )
    assert set(desired.images()) == {normalize(refs[i]) for i in (1, 3, 4)}
    assert not await world.has(refs[2])

    # pool-a no longer fits: the skip and its reason are recorded for `cedar replay`.
    async def pool_a_skipped() -> bool:
        return any(
            d.action == "skip"
            and d.workloads == ("Deployment/tenant/pool-a",)
            and "nodeSelector pool=a" in d.reason
            for d in await decisions(world.bus, node_name)
        )

    await eventually(pool_a_skipped, 10, "skip decision recorded")


async def decisions(bus: Bus, node: str) -> list[PullerDecision]:
    sub = await bus.js.subscribe(
        subjects.decisions_subject(node), stream=subjects.STREAM_HISTORY, ordered_consumer=True
    )
    found: list[PullerDecision] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=0.5)
            found.append(PullerDecision.model_validate_json(msg.data))
    except NatsTimeoutError:
        return found
    finally:
        await sub.unsubscribe()


async def test_prune_only_in_scope_and_never_a_used_image(
    world: World, make_images: ImageMaker, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    scoped = await make_images.make(2, SMALL, prefix=f"cedar-prune-{tag}/img")
    outside = await make_images.make(1, SMALL, prefix=f"cedar-keep-{tag}/img")
    labelled = await make_images.make(1, SMALL, prefix=f"cedar-lab-{tag}/img", labels={"team": tag})
    host = scoped[0].split("/", 1)[0]
    running = await world.start(
        prune_repositories=f"{host}/cedar-prune-{tag}/",
        prune_label=f"team={tag}",
        prune_after="2s",
        prune_interval="1s",
    )
    everything = [*scoped, *outside, *labelled]
    await world.publish(workload("prune", *everything))
    await eventually(
        lambda: all(running.state(r) == "present" for r in everything), 30, "all pulled"
    )
    # A container created (not started) from one in-scope image.
    container = f"cedar-prune-{tag}"
    async with world.engine.container_using(scoped[1], container, tmp_path / "pods"):
        await world.publish(workload("prune", deleted=True))

        async def pruned() -> bool:
            local = await world.local_images()
            return normalize(scoped[0]) not in local and normalize(labelled[0]) not in local

        await eventually(pruned, 30, "in-scope images pruned")
        await asyncio.sleep(2.5)  # more prune rounds: still nothing else goes
        local = await world.local_images()
        assert normalize(outside[0]) in local  # out of scope: never touched
        assert normalize(scoped[1]) in local  # a created container uses it


async def test_invalid_and_missing_references(world: World, make_images: ImageMaker) -> None:
    (real,) = await make_images.make(1, SMALL)
    host = real.split("/", 1)[0]
    missing = f"{host}/cedar-test/does-not-exist-{uuid.uuid4().hex[:6]}:v1"
    running = await world.start(permanent_retry="1h")
    await world.publish(
        workload("mixed", real, missing, invalid={"Not A Valid/Ref!": "contains whitespace"})
    )
    await eventually(lambda: running.state(real) == "present", 30, "valid one pulled")
    await eventually(lambda: running.state(missing) == "failed", 30, "missing failed")
    assert running.record(missing).reason == "not_found"
    bad = running.puller.reconciler.records["Not A Valid/Ref!"]
    await eventually(lambda: bad.state == "failed", 10, "invalid reported")
    assert bad.reason == "invalid_reference"
    attempts = running.puller.pulls.attempts
    await asyncio.sleep(3)
    assert running.puller.pulls.attempts == attempts == 2  # one each, no retry loop
    # Failed images count as "warm" only because they can never be pulled.
    assert running.puller.reconciler.warm.is_set()


async def test_killed_mid_pull_and_restarted(
    world: World, make_images: ImageMaker, fresh_node: Node, tmp_path: Path
) -> None:
    refs = await make_images.make(4, 24 * 1024 * 1024)
    node = f"node-{uuid.uuid4().hex[:6]}"
    await world.publish(workload("crash", *refs))
    env = {
        **fresh_node.env(),
        "CEDAR_NODE_NAME": node,
        "CEDAR_NATS_URL": world.nats_url,
        "CEDAR_NODE_FROM_API": "false",
        "CEDAR_METRICS_PORT": "0",
        "CEDAR_MAX_CONCURRENT_PULLS": "2",
        "CEDAR_RESYNC_INTERVAL": "1s",
    }
    cmd = [sys.executable, "-m", "cedar.cli", "puller"]

    def start(log: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))

    first_log = tmp_path / "first.log"
    proc = start(first_log)
    try:
        await eventually(
            lambda: '"action":"pull"' in first_log.read_text(errors="replace"), 60, "pull started"
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            kill_pid(proc.pid)

    engine_world = World(world.nats_url, fresh_node, world.bus)
    local = await engine_world.local_images()
    assert not all(normalize(r) in local for r in refs)  # killed with work left to do

    second_log = tmp_path / "second.log"
    proc = start(second_log)
    try:

        async def all_present() -> bool:
            local = await engine_world.local_images()
            return all(normalize(r) in local for r in refs)

        await eventually(all_present, 90, "all images after restart")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            kill_pid(proc.pid)


async def test_evicted_image_is_counted_and_pulled_again(
    world: World, make_images: ImageMaker
) -> None:
    (ref,) = await make_images.make(1, SMALL)
    running = await world.start()
    await world.publish(workload("evict", ref))
    await eventually(lambda: running.state(ref) == "present", 30, "pulled")
    before = metrics.EVICTED._value.get()
    # What kubelet's image GC does under disk pressure.
    await world.engine.evict(ref)
    await eventually(lambda: running.record(ref).evictions == 1, 30, "eviction seen")
    assert metrics.EVICTED._value.get() == before + 1
    await eventually(world_has(world, ref), 30, "pulled again")


def world_has(world: World, ref: str) -> Callable[[], Awaitable[bool]]:
    return lambda: world.has(ref)


async def test_dry_run_from_subject_never_touches_the_engine(world: World) -> None:
    subject = f"cedar.replay.t{uuid.uuid4().hex[:8]}"
    # As `cedar replay --to` does: a stream keeps the re-published messages, so a puller
    # started afterwards still sees them; decisions and other records are mixed in.
    await world.bus.js.add_stream(
        StreamConfig(name=f"TEST_{subject.rsplit('.', 1)[1]}", subjects=[f"{subject}.>"])
    )
    image = "127.0.0.1:1/cedar-test/dry:v1"
    wis = workload("dry", image)
    await world.bus.js.publish(
        f"{subject}.1",
        b'{"not": "a workload"}',
        headers={"Cedar-Original-Subject": "cedar.decisions.node-1"},
    )
    await world.bus.js.publish(
        f"{subject}.2",
        wis.model_dump_json().encode(),
        headers={
            "Cedar-Original-Subject": subjects.workload_subject("Deployment", "tenant", "dry")
        },
    )
    running = await world.start(
        dry_run=True,
        from_subject=f"{subject}.>",
        # Any engine call would fail.
        docker_host="unix:///nonexistent/docker.sock",
        cri_endpoint="unix:///nonexistent/containerd.sock",
    )
    status = running.puller.status

    def decided() -> bool:
        return any(d.action == "pulled" and d.image == normalize(image) for d in status.decisions)

    await eventually(decided, 10, "dry-run decisions")
    assert all(d.dry_run for d in status.decisions)
    assert [d.action for d in status.decisions][:2] == ["pull", "pulled"]
    # Live messages on a plain subject work too.
    other = "127.0.0.1:1/cedar-test/dry-live:v1"
    await world.bus.nc.publish(f"{subject}.3", workload("live", other).model_dump_json().encode())
    await eventually(
        lambda: any(d.image == normalize(other) for d in status.decisions), 10, "live message"
    )


async def test_follows_the_stream_across_a_nats_restart(
    fresh_nats: NatsServer, node: Node, make_images: ImageMaker
) -> None:
    refs = await make_images.make(2, SMALL)
    settings = PullerSettings(node_name="publisher", nats_url=fresh_nats.url)
    bus = Bus(settings, "test-publisher", Health())
    assert await bus.connect()
    await bus.ensure(streams=service_streams(settings))
    world = World(fresh_nats.url, node, bus)
    running = await world.start()
    try:
        await world.publish(workload("before", refs[0]))
        await eventually(lambda: running.state(refs[0]) == "present", 30, "before restart")
        await asyncio.to_thread(fresh_nats.restart)
        await eventually(lambda: bus.connected and running.bus.connected, 30, "reconnected")
        await world.publish(workload("after", refs[1]))
        await eventually(lambda: running.state(refs[1]) == "present", 60, "after restart")
    finally:
        await running.halt()
        await bus.close()


async def test_low_disk_holds_pulls_until_space_is_back(
    world: World, make_images: ImageMaker
) -> None:
    (ref,) = await make_images.make(1, SMALL)
    # A guard above the real free space makes the disk "full" without filling it.
    running = await world.start(
        docker_root=world.engine.data_root(), min_free_bytes=2**62, resync_interval="0.5s"
    )
    await world.publish(workload("disk", ref))
    await eventually(lambda: running.puller.disk.low, 10, "guard tripped")
    await eventually(lambda: getattr(running.record(ref), "reason", None) == "low_disk", 10)
    assert running.state(ref) == "missing"
    assert running.puller.pulls.attempts == 0
    assert REGISTRY.get_sample_value("cedar_puller_disk_low") == 1
    assert not await world.has(ref)

    running.puller.disk.min_free_bytes = 0  # space freed
    await eventually(lambda: running.state(ref) == "present", 30, "pulled once space is back")
    assert REGISTRY.get_sample_value("cedar_puller_disk_low") == 0
