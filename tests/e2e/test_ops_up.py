"""`cedar up` end to end: real child processes, real NATS, Docker engine and registry."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from cedar.sandbox.dockerd import DockerEngine
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.procs import free_port, pid_alive
from tests.e2e.test_ops_support import cedar
from tests.harness import cedar_up
from tests.harness.registry import ImageMaker


@pytest.fixture
def short_state_dir() -> Iterator[Path]:
    with cedar_up.short_state_dir("cedar-up-") as path:  # the private dockerd's sockets
        yield path


def _pids_mentioning(fragment: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if fragment.encode() in (entry / "cmdline").read_bytes() and pid_alive(
                    int(entry.name)
                ):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def test_up_sandbox_pulls_labels_and_stops_everything_on_ctrl_c(
    short_state_dir: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "CEDAR_NATS_URL")}
    # No Docker engine and no NATS answer: cedar up starts its own of both.
    env["DOCKER_HOST"] = f"unix://{short_state_dir}/no-such.sock"
    async with cedar_up.sandbox_up(short_state_dir, env) as (proc, out_path):
        text = await cedar_up.wait_for_output(
            proc,
            out_path,
            lambda t: (
                re.search(r"sandbox-node-1\s+\S+/tenants/web:v1\s+present", t)
                and re.search(r"team-alpha\s+s0:c\d+,c\d+", t)
            ),
            240,
            "no image pulled and namespace labelled",
        )
        assert "simulated:\n    Kubernetes API http://127.0.0.1:" in text
        assert "(embedded nats-server, pid" in text
        assert "(private dockerd, pid" in text
        assert "http://127.0.0.1:" in text and "/metrics" in text
        # The GPU-only Deployment's image must not be pulled on this node.
        assert "tenants/trainer:v1  present" not in text
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        assert len(pids) == 6  # nats-server, registry, dockerd, watcher, puller, allocator
        assert all(pid_alive(p) for p in pids)

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 90) == 0
        text = out_path.read_text(errors="replace")
        assert "cedar up: stopped" in text
        assert [p for p in pids if pid_alive(p)] == []
        # containerd and its shims are dockerd's, started in sessions of their own: gone too.
        assert _pids_mentioning(str(short_state_dir)) == []


async def test_up_against_a_cluster_with_embedded_nats_exits_when_ready(
    kube_api: KubeAPI,
    kubeconfig: Path,
    docker_engine: DockerEngine,
    make_images: ImageMaker,
    short_state_dir: Path,
) -> None:
    (image,) = await make_images.make(1, 128 * 1024)
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tenant-1"}})
    kube_api.create(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "idle", "namespace": "tenant-1"},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": "idle"}},
                "template": {
                    "metadata": {"labels": {"app": "idle"}},
                    "spec": {"containers": [{"name": "app", "image": image}]},
                },
            },
        }
    )
    nats_port = free_port()  # nothing listens there: cedar up embeds a server on that port
    code, out, err = await cedar(
        "up",
        "--exit-when-ready",
        "--timeout",
        "120",
        "--interval",
        "0.5",
        "--state-dir",
        str(short_state_dir),
        env={
            "KUBECONFIG": str(kubeconfig),
            "DOCKER_HOST": docker_engine.host,
            "CEDAR_NATS_URL": f"nats://127.0.0.1:{nats_port}",
            "CEDAR_NODE_NAME": "laptop",
            "CEDAR_NODE_FROM_API": "false",
        },
        within=180,
    )
    assert code == 0, out + err
    assert f"NATS nats://127.0.0.1:{nats_port} (embedded nats-server" in out
    assert f"Docker engine {docker_engine.host} (already running; not managed by cedar up)" in out
    assert re.search(rf"laptop\s+{re.escape(image)}\s+present\s+-\s+Deployment/tenant-1/idle", out)
    assert re.search(r"tenant-1\s+s0:c\d+,c\d+", out)
    assert "cedar up: ready (warm and labelled); stopping" in out
    docker_engine.docker("image", "inspect", image)
    assert (short_state_dir / "nats").is_dir()  # embedded NATS data under the state dir
    assert (short_state_dir / "logs" / "puller.log").stat().st_size > 0
    assert _pids_mentioning(str(short_state_dir)) == []
