"""`cedar up --sandbox --runtime cri` end to end: a private containerd instead of dockerd, the
sample images pushed with ctr, the puller warming containerd's k8s.io store, and Ctrl-C
stopping everything, containerd's shims included."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from cedar.sandbox.dockerd import _pids_mentioning
from cedar.sandbox.procs import pid_alive
from tests.harness import cedar_up

pytestmark = pytest.mark.integration


@pytest.fixture
def short_state_dir() -> Iterator[Path]:
    with cedar_up.short_state_dir("cedar-up-") as path:  # containerd's sockets live there
        yield path


async def test_up_sandbox_on_containerd(short_state_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CEDAR_", "DOCKER_"))}
    # Nothing at the Docker socket either: the sandbox must not need one.
    env["DOCKER_HOST"] = f"unix://{short_state_dir}/no-such.sock"
    async with cedar_up.sandbox_up(short_state_dir, env, "--runtime", "cri") as (proc, out_path):
        text = await cedar_up.wait_for_output(
            proc,
            out_path,
            lambda t: re.search(r"sandbox-node-1\s+\S+/tenants/web:v1\s+present", t),
            180,
            "no image pulled through containerd",
        )
        assert "(private containerd with the CRI plugin, pid" in text
        assert "dockerd" not in text
        endpoint = re.search(r"containerd (unix://\S+) \(private", text)
        assert endpoint is not None
        socket_path = endpoint.group(1).removeprefix("unix://")
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        assert len(pids) == 6  # nats-server, registry, containerd, watcher, puller, allocator
        assert all(pid_alive(p) for p in pids)

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 90) == 0
        text = await asyncio.to_thread(out_path.read_text, errors="replace")
        assert "cedar up: stopped" in text
        assert [p for p in pids if pid_alive(p)] == []
        assert _pids_mentioning(socket_path) == []
