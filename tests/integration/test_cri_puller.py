"""What only a CRI node has: the runtime's socket going away and coming back, the choice of
runtime from the Node object, the runtime's identity in the metrics, the disk guard on the
image filesystem ImageFsInfo names. Real NATS, a real containerd, real registries."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from prometheus_client import REGISTRY

from cedar.proto import subjects
from cedar.proto.imageref import normalize, parse
from cedar.puller.app import Puller, assemble
from cedar.puller.cri import api_pb2 as pb
from cedar.puller.cri.runtime_service_pb2_grpc import RuntimeServiceStub
from cedar.puller.cri_engine import CriImageEngine
from cedar.puller.errors import EngineError
from cedar.puller.runtime_choice import CONTAINERD_SOCKET
from cedar.puller.settings import PullerSettings
from cedar.runtime.bus import Bus
from cedar.runtime.health import Health
from cedar.runtime.topology import node_status_bucket, service_streams
from cedar.sandbox.containerd import Containerd
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.registry import Registry
from tests.harness.registry import ImageMaker
from tests.harness.waiting import eventually
from tests.integration.test_puller_service import workload

pytestmark = pytest.mark.integration

SMALL = 128 * 1024


@dataclass
class Started:
    puller: Puller
    health: Health
    bus: Bus
    stop: asyncio.Event
    task: asyncio.Task[None]

    def state(self, ref: str) -> str | None:
        record = self.puller.reconciler.records.get(normalize(ref))
        return record.state if record else None


@dataclass
class Cluster:
    nats_url: str
    bus: Bus
    started: list[Started]

    async def publish(self, *images: str, name: str) -> None:
        wis = workload(name, *images)
        subject = subjects.workload_subject(wis.kind, wis.namespace, wis.name)
        await self.bus.js.publish(subject, wis.model_dump_json().encode())

    async def start(self, **settings: Any) -> Started:
        values: dict[str, Any] = {
            "node_name": f"node-{uuid.uuid4().hex[:6]}",
            "nats_url": self.nats_url,
            "node_from_api": False,
            "registry_probe_ttl": "1s",
            "backoff_base": "0.2s",
            "backoff_max": "2s",
            "resync_interval": "0.5s",
            **settings,
        }
        config = PullerSettings(**values)
        health = Health()
        bus = Bus(config, "test-puller", health)
        assert await bus.connect()
        stop = asyncio.Event()
        puller = await asyncio.wait_for(assemble(config, bus, health, stop), 30)
        assert puller is not None
        started = Started(puller, health, bus, stop, asyncio.create_task(puller.run(stop)))
        self.started.append(started)
        await eventually(puller.feed.synced.is_set, 30, "puller synced")
        return started


@pytest.fixture
async def cluster(nats_url: str) -> AsyncIterator[Cluster]:
    settings = PullerSettings(node_name="publisher", nats_url=nats_url)
    bus = Bus(settings, "test-publisher", Health())
    assert await bus.connect()
    await bus.ensure(streams=service_streams(settings), buckets=[node_status_bucket(settings)])
    c = Cluster(nats_url, bus, [])
    try:
        yield c
    finally:
        for s in c.started:
            s.stop.set()
            await asyncio.wait_for(s.task, 30)
            await s.bus.close()
        await bus.close()


def engine_reason(started: Started) -> str:
    reasons = started.health.report()["reasons"]
    assert isinstance(reasons, dict)
    return str(reasons.get("engine", ""))


async def test_the_socket_removed_and_restored(
    cluster: Cluster,
    fresh_containerd: Containerd,
    make_images: ImageMaker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = await make_images.make(2, SMALL)
    running = await cluster.start(runtime="cri", cri_endpoint=fresh_containerd.endpoint)
    await cluster.publish(first, name="sock-first")
    await eventually(lambda: running.state(first) == "present", 30, "first pulled")
    assert running.health.ready

    caplog.set_level(logging.WARNING, logger="cedar.puller")
    await asyncio.to_thread(fresh_containerd.stop)
    fresh_containerd.socket_path.unlink(missing_ok=True)
    await eventually(lambda: not running.health.ready, 30, "not ready without the socket")
    reason = engine_reason(running)
    assert f"no CRI socket at {fresh_containerd.socket_path}" in reason, reason
    assert any(
        "engine unavailable" in r.getMessage() and "no CRI socket" in str(r.__dict__.get("error"))
        for r in caplog.records
    )
    # Work arriving meanwhile waits; nothing is marked failed for the runtime's absence.
    await cluster.publish(second, name="sock-second")
    await asyncio.sleep(1.5)  # several reconcile attempts while the socket is gone
    assert running.state(second) != "failed"

    await asyncio.to_thread(fresh_containerd.start)
    await eventually(lambda: running.health.ready, 30, "ready again once the socket is back")
    await eventually(lambda: running.state(second) == "present", 30, "pulled after the return")
    assert second in await asyncio.to_thread(fresh_containerd.images)


async def test_runtime_identity_and_the_image_filesystem_guard(
    cluster: Cluster, containerd: Containerd, make_images: ImageMaker
) -> None:
    (ref,) = await make_images.make(1, SMALL)
    running = await cluster.start(runtime="cri", cri_endpoint=containerd.endpoint)
    assert running.puller.runtime is not None
    assert (running.puller.runtime.api, running.puller.runtime.endpoint) == (
        "cri",
        containerd.endpoint,
    )
    async with aio.insecure_channel(containerd.endpoint) as channel:
        version = await RuntimeServiceStub(channel).Version(pb.VersionRequest(version="v1"))

    def exported() -> float | None:
        labels = {"runtime": version.runtime_name, "version": version.runtime_version}
        return REGISTRY.get_sample_value("cedar_puller_runtime_info", labels)

    await eventually(lambda: exported() == 1, 10, "cedar_puller_runtime_info")
    await cluster.publish(ref, name="fs-guard")
    await eventually(lambda: running.state(ref) == "present", 30, "pulled")
    # No CEDAR_DOCKER_ROOT: the guard measured the filesystem ImageFsInfo names.
    assert running.puller.disk.measured == str(containerd.snapshots)
    assert REGISTRY.get_sample_value("cedar_puller_disk_free_bytes")


async def test_auto_reads_the_runtime_from_the_node(
    cluster: Cluster, kube_api: KubeAPI, tmp_path: Path
) -> None:
    name = f"node-{uuid.uuid4().hex[:6]}"
    kube_api.create(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux"}},
            "status": {"nodeInfo": {"containerRuntimeVersion": "containerd://1.6.20"}},
        }
    )
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    running = await cluster.start(
        node_name=name, node_from_api=True, kubeconfig=str(kubeconfig), runtime="auto"
    )
    choice = running.puller.runtime
    assert choice is not None
    assert (choice.api, choice.endpoint) == ("cri", f"unix://{CONTAINERD_SOCKET}")
    assert "containerd://1.6.20" in choice.why
    if not await asyncio.to_thread(Path(CONTAINERD_SOCKET).exists):
        # This machine runs no system containerd: /readyz says exactly what is missing.
        await eventually(lambda: "no CRI socket" in engine_reason(running), 30, "readyz reason")
        assert CONTAINERD_SOCKET in engine_reason(running)
        assert not running.health.ready


async def test_real_containerd_failures_map_to_reasons(
    containerd: Containerd,
    registry: Registry,
    auth_registry: Registry,
    fresh_registry: Registry,
    make_images: ImageMaker,
) -> None:
    """The important mappings, from what containerd 1.6 really answers."""
    (private,) = await make_images.make(1, SMALL, registry=auth_registry)
    (gone,) = await make_images.make(1, SMALL, registry=fresh_registry)
    containerd.add_registry(fresh_registry.host)
    await asyncio.to_thread(fresh_registry.stop)
    engine = CriImageEngine(containerd.endpoint, node="test")
    cases = {
        f"{registry.host}/cedar-test/no-such-{uuid.uuid4().hex[:6]}:v1": "not_found",
        private: "unauthorized",  # htpasswd registry, no credentials
        gone: "registry_down",  # the registry is stopped: connection refused
    }
    try:
        for ref, reason in cases.items():
            with pytest.raises(EngineError) as caught:
                await engine.pull(parse(ref), None, 30)
            assert caught.value.reason == reason, caught.value.message
        user, password = auth_registry.credentials or ("", "")
        digest = await engine.pull(parse(private), {"username": user, "password": password}, 30)
        assert digest is not None and digest.startswith("sha256:")
    finally:
        await engine.close()
