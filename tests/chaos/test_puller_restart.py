"""A puller SIGKILLed, and an image stops being wanted on its node before it is back.

`cedar puller` as a real process, real NATS, the session's Docker engine. The restarted
puller rebuilds its desired set from the stream, but its status keys in KV
`cedar-node-status` are what `cedar status`, `cedar up` and `cedar prepull` read: a key
for an image the node no longer wants must go, even though the process that wrote it died.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest
from nats.js.errors import NotFoundError

from cedar.proto import subjects
from cedar.proto.imageref import normalize
from cedar.proto.models import ContainerImage, NodeImageStatus, WorkloadImageSet
from cedar.runtime import topology
from cedar.runtime.bus import ensure_stream
from cedar.runtime.settings import CommonSettings
from cedar.sandbox.dockerd import DockerEngine
from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import free_port
from tests.chaos.fleet import clean_environment
from tests.chaos.observe import read_bucket
from tests.harness.waiting import eventually

NODE = "node-restart"
# Nothing listens there: pulls wait behind the registry's breaker, statuses say "missing".
KEPT = normalize("127.0.0.1:1/chaos/kept:v1")
DROPPED = normalize("127.0.0.1:1/chaos/dropped:v1")


def wanting(*images: str) -> bytes:
    wis = WorkloadImageSet(
        kind="Deployment",
        namespace="t",
        name="web",
        uid="uid-web",
        containers=tuple(
            ContainerImage(container=f"c{i}", image=i_) for i, i_ in enumerate(images)
        ),
        observed_at=datetime.now(UTC),
    )
    return wis.model_dump_json().encode()


@pytest.fixture
def puller_cmd(
    fresh_nats: NatsServer, docker_engine: DockerEngine, tmp_path: Path
) -> Iterator[tuple[list[str], dict[str, str], Path]]:
    env = {
        **clean_environment(),
        "CEDAR_NATS_URL": fresh_nats.url,
        "CEDAR_NODE_NAME": NODE,
        "DOCKER_HOST": docker_engine.host,
        "CEDAR_NODE_FROM_API": "false",
        "CEDAR_RESYNC_INTERVAL": "1s",
        "CEDAR_METRICS_PORT": str(free_port()),
    }
    yield [sys.executable, "-m", "cedar.cli", "puller"], env, tmp_path / "puller.log"


async def statuses(url: str) -> dict[str, str]:
    nc = await nats.connect(url)
    try:
        values = await read_bucket(nc.jetstream(), subjects.KV_NODE_STATUS)
    except NotFoundError:  # the puller has not created its bucket yet
        return {}
    finally:
        await nc.close()
    found = {}
    for raw in values.values():
        status = NodeImageStatus.model_validate_json(raw)
        if status.node == NODE:
            found[status.image] = status.state
    return found


async def test_a_status_key_the_node_no_longer_wants_goes_after_a_crash(
    fresh_nats: NatsServer, puller_cmd: tuple[list[str], dict[str, str], Path]
) -> None:
    cmd, env, log_path = puller_cmd
    settings = CommonSettings()
    nc = await nats.connect(fresh_nats.url)
    js = nc.jetstream()
    for config in topology.service_streams(settings):
        await ensure_stream(js, config)
    subject = subjects.workload_subject("Deployment", "t", "web")
    await js.publish(subject, wanting(KEPT, DROPPED))

    def start() -> subprocess.Popen[bytes]:
        log = log_path.open("ab")
        try:
            return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    proc = start()
    try:
        await eventually(lambda: _has(fresh_nats.url, {KEPT, DROPPED}), 30, "both statuses written")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        await js.publish(subject, wanting(KEPT))  # the dropped image is wanted no more
        proc = start()
        await eventually(lambda: _has(fresh_nats.url, {KEPT}), 30, "kept status")
        await eventually(
            lambda: _lacks(fresh_nats.url, DROPPED),
            8,  # reconciles run every second
            "the dropped image's status removed",
            details=lambda: log_path.read_text(errors="replace"),
        )
    finally:
        await nc.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(25)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _has(url: str, images: set[str]) -> bool:
    return images <= set(await statuses(url))


async def _lacks(url: str, image: str) -> bool:
    await asyncio.sleep(0)
    return image not in await statuses(url)
