"""The engine's data root fills up during pulls: a private dockerd whose data root is a small
tmpfs (mounted here, unmounted in a `finally`), and a real `cedar puller` driving it.

1. Free space below CEDAR_MIN_FREE_BYTES (a filler file): the guard holds new pulls, every
   missing image says `low_disk`, `cedar_puller_disk_low` is 1, nothing is pulled.
2. The filler goes: pulls resume by themselves and every image arrives.
3. An image larger than what is left: the engine runs out of space mid-pull; the failure
   is classified `low_disk`, the puller and the engine stay up.
4. The filesystem grows (remount): that pull is retried and succeeds.

Throughout, an image outside the prune scope that nobody wants stays, while one inside
the scope that nobody wants is pruned (so the prune did run).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest

from cedar.ops import natsio
from cedar.proto import subjects
from cedar.proto.imageref import normalize
from cedar.proto.models import ContainerImage, NodeImageStatus, WorkloadImageSet
from cedar.runtime import topology
from cedar.runtime.bus import ensure_stream
from cedar.runtime.settings import CommonSettings
from cedar.sandbox import images
from cedar.sandbox.dockerd import DockerEngine
from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import free_port
from cedar.sandbox.registry import Registry
from tests.chaos.fleet import ServiceProc, clean_environment
from tests.harness.nats_server import start_or_fail

NODE = "node-disk"
MIB = 1 << 20
TMPFS = 160 * MIB
MIN_FREE = 24 * MIB


def _mount(path: Path, size: int, *, remount: bool = False) -> None:
    options = f"size={size},mode=0700" + (",remount" if remount else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass
class Disk:
    root: Path
    engine: DockerEngine
    nats: NatsServer
    registry: Registry
    puller: ServiceProc
    filler: Path


@pytest.fixture
async def disk(tmp_path: Path, registry: Registry) -> AsyncIterator[Disk]:
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (make test runs as root)", pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="cedar-df-", dir="/tmp"))
    root = base / "data-root"
    root.mkdir()
    mounted = False
    engine = DockerEngine(base / "engine", data_root=root)
    server = NatsServer(tmp_path / "nats")
    puller: ServiceProc | None = None
    try:
        _mount(root, TMPFS)
        mounted = True
        start_or_fail(engine)
        start_or_fail(server)
        env = {
            **clean_environment(),
            "CEDAR_NATS_URL": server.url,
            "CEDAR_NODE_NAME": NODE,
            "CEDAR_NODE_FROM_API": "false",
            "DOCKER_HOST": engine.host,
            "CEDAR_DOCKER_ROOT": str(root),
            "CEDAR_MIN_FREE_BYTES": str(MIN_FREE),
            "CEDAR_RESYNC_INTERVAL": "1s",
            "CEDAR_REGISTRY_PROBE_TTL": "1s",
            "CEDAR_BACKOFF_BASE": "0.5s",
            "CEDAR_BACKOFF_MAX": "2s",
            "CEDAR_MAX_CONCURRENT_PULLS": "1",
            "CEDAR_PRUNE_REPOSITORIES": f"{registry.host}/chaos-disk-scope/",
            "CEDAR_PRUNE_AFTER": "1s",
            "CEDAR_PRUNE_INTERVAL": "1s",
        }
        port = free_port()
        puller = ServiceProc(
            "puller",
            ["puller"],
            {**env, "CEDAR_METRICS_PORT": str(port)},
            tmp_path / "puller.log",
            port,
        )
        yield Disk(root, engine, server, registry, puller, root / "filler")
    finally:
        if puller is not None:
            puller.terminate()
            shutil.copy(puller.log_path, tmp_path / "puller-kept.log")
        server.stop()
        engine.stop()
        if mounted:
            await asyncio.to_thread(subprocess.run, ["umount", "-l", str(root)], check=False)
        shutil.rmtree(base, ignore_errors=True)


async def _statuses(url: str) -> dict[str, NodeImageStatus]:
    nc = await nats.connect(url)
    try:
        values = await natsio.read_bucket(nc.jetstream(), subjects.KV_NODE_STATUS)
    finally:
        await nc.close()
    found = {}
    for raw in values.values():
        status = NodeImageStatus.model_validate_json(raw)
        found[status.image] = status
    return found


async def _eventually(probe: object, within: float, what: str, puller: ServiceProc) -> object:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = probe()  # type: ignore[operator]
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert puller.alive, f"the puller died\n{puller.log_tail(40)}"
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}\n{puller.log_tail(40)}")
        await asyncio.sleep(0.25)


def _local(engine: DockerEngine) -> set[str]:
    out = engine.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    return {normalize(ref) for ref in out if not ref.endswith(":<none>")}


async def test_a_full_data_root_holds_pulls_with_low_disk_and_they_resume(
    disk: Disk, builder_engine: DockerEngine
) -> None:
    push = images.amake_images
    small = await push(builder_engine, disk.registry, 3, 8 * MIB, prefix="chaos-disk/want")
    (big,) = await push(builder_engine, disk.registry, 1, 100 * MIB, prefix="chaos-disk/big")
    (keep,) = await push(builder_engine, disk.registry, 1, 1 * MIB, prefix="chaos-disk-keep/img")
    (scoped,) = await push(builder_engine, disk.registry, 1, 1 * MIB, prefix="chaos-disk-scope/img")
    # Already on the node, wanted by nobody: one outside the prune scope, one inside.
    for ref in (keep, scoped):
        await asyncio.to_thread(disk.engine.docker, "pull", ref)

    nc = await nats.connect(disk.nats.url)
    js = nc.jetstream()
    for config in topology.service_streams(CommonSettings()):
        await ensure_stream(js, config)

    async def want(*refs: str) -> None:
        wis = WorkloadImageSet(
            kind="Deployment",
            namespace="t",
            name="app",
            uid="uid-app",
            containers=tuple(
                ContainerImage(container=f"c{i}", image=r, reference=normalize(r))
                for i, r in enumerate(refs)
            ),
            observed_at=datetime.now(UTC),
        )
        subject = subjects.workload_subject("Deployment", "t", "app")
        await js.publish(subject, wis.model_dump_json().encode())

    try:
        # 1. Below the guard before anything is pulled.
        filler_size = _free(disk.root) - MIN_FREE // 2
        with disk.filler.open("wb") as f:
            f.truncate(0)
            for _ in range(filler_size // MIB):
                f.write(bytes(MIB))
        assert _free(disk.root) < MIN_FREE
        await want(*small)
        disk.puller.start()
        wanted = {normalize(r) for r in small}

        async def held() -> bool:
            found = await _statuses(disk.nats.url)
            return all(
                found.get(i) is not None
                and found[i].state == "missing"
                and found[i].reason == "low_disk"
                for i in wanted
            )

        await _eventually(held, 30, "every image held with low_disk", disk.puller)
        assert disk.puller.metric("cedar_puller_disk_low") == 1
        assert not wanted & _local(disk.engine)

        # 2. Space is freed: the pulls resume by themselves.
        disk.filler.unlink()

        async def present(refs: set[str]) -> bool:
            found = await _statuses(disk.nats.url)
            return all(found.get(i) is not None and found[i].state == "present" for i in refs)

        await _eventually(lambda: present(wanted), 60, "every image pulled", disk.puller)
        assert disk.puller.metric("cedar_puller_disk_low") == 0

        # 3. Larger than what is left: the engine runs out of space mid-pull.
        assert _free(disk.root) > MIN_FREE
        await want(*small, big)
        big_ref = normalize(big)

        async def failed_low_disk() -> bool:
            status = (await _statuses(disk.nats.url)).get(big_ref)
            return (
                status is not None
                and status.state in ("failed", "missing")
                and (status.reason == "low_disk")
            )

        await _eventually(failed_low_disk, 90, "the big pull failing with low_disk", disk.puller)
        failures = disk.puller.metric('cedar_puller_failures_total{reason="low_disk"}')
        assert disk.engine.is_running and disk.puller.alive

        # 4. The filesystem grows: the failed pull is retried and succeeds.
        _mount(disk.root, TMPFS * 3, remount=True)
        await _eventually(lambda: present(wanted | {big_ref}), 90, "the big image", disk.puller)

        local = _local(disk.engine)
        assert normalize(keep) in local, "an image outside the prune scope was removed"
        assert normalize(scoped) not in local, "the prune never ran"
        assert disk.puller.unexpected_exits == [] and disk.puller.starts == 1
        log = disk.puller.log_text()
        assert "Traceback" not in log
        assert json.dumps("low_disk") in log
        print(f"\nlow_disk failures counted: {failures}")
    finally:
        await nc.close()
