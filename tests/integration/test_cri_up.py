"""`cedar up --sandbox --runtime cri` end to end: a private containerd instead of dockerd, the
sample images pushed with ctr, the puller warming containerd's k8s.io store, and Ctrl-C
stopping everything, containerd's shims included."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cedar.sandbox.dockerd import _pids_mentioning
from cedar.sandbox.procs import kill_pid, pid_alive
from tests.e2e.test_ops_support import REPO_ROOT

pytestmark = pytest.mark.integration


@pytest.fixture
def short_state_dir() -> Iterator[Path]:
    # containerd's unix sockets live under it: keep the path short.
    path = Path(tempfile.mkdtemp(prefix="cedar-up-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_up_sandbox_on_containerd(short_state_dir: Path) -> None:
    out_path = short_state_dir / "up.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CEDAR_", "DOCKER_"))}
    # Nothing at the Docker socket either: the sandbox must not need one.
    env["DOCKER_HOST"] = f"unix://{short_state_dir}/no-such.sock"
    with out_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cedar.cli",
            "up",
            "--sandbox",
            "--runtime",
            "cri",
            "--interval",
            "0.5",
            "--state-dir",
            str(short_state_dir),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
        )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 180
        text = ""
        while loop.time() < deadline:
            text = await asyncio.to_thread(out_path.read_text, errors="replace")
            if re.search(r"sandbox-node-1\s+\S+/tenants/web:v1\s+present", text):
                break
            assert proc.returncode is None, text
            await asyncio.sleep(0.5)
        else:
            raise AssertionError(f"no image pulled through containerd:\n{text}")
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
    finally:
        if proc.returncode is None:
            kill_pid(proc.pid)
            await proc.wait()
