"""The first thing a user does with a running sandbox: change a workload with kubectl and
watch it warm. `cedar up --sandbox`, then the real kubectl creates a namespace and a
scaled-to-zero Deployment; the level and the pulled image appear in `cedar status`;
`kubectl set image` to a new tag pulls that tag too.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cedar.sandbox.procs import kill_pid
from tests.e2e.test_ops_support import REPO_ROOT


def _kubectl() -> str | None:
    found = shutil.which("kubectl")
    tools = Path(REPO_ROOT) / ".venv-tools" / "bin" / "kubectl"
    return found or (str(tools) if tools.exists() else None)


KUBECTL = _kubectl()
pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed (make test installs it)"
)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # The private dockerd's unix sockets live under it: keep the path short.
    path = Path(tempfile.mkdtemp(prefix="cedar-kc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


async def _wait_for(
    out: Path, pattern: str, proc: asyncio.subprocess.Process, within: float
) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        text = _read(out)
        if re.search(pattern, text):
            return text
        assert proc.returncode is None, text
        await asyncio.sleep(0.3)
    raise AssertionError(f"{pattern!r} never appeared:\n{_read(out)}")


async def _eventually_in_status(
    env: dict[str, str], args: list[str], pattern: str, within: float
) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    text = ""
    while loop.time() < deadline:
        status = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "cedar.cli", "status", *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        text = status.stdout + status.stderr
        if re.search(pattern, text):
            return text
        await asyncio.sleep(0.5)
    raise AssertionError(f"`cedar status` never showed {pattern!r}:\n{text}")


async def test_kubectl_changes_a_workload_and_the_sandbox_warms_it(state_dir: Path) -> None:
    assert KUBECTL is not None
    out_path = state_dir / "up.out"
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "CEDAR_NATS_URL")}
    env["DOCKER_HOST"] = f"unix://{state_dir}/no-such.sock"
    with out_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "cedar.cli", "up", "--sandbox", "--interval", "0.5"),
            *("--state-dir", str(state_dir)),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
        )
    try:
        text = await _wait_for(out_path, r"team-alpha\s+s0:c\d+,c\d+", proc, 240)
        kubeconfig = re.search(r"export KUBECONFIG=(\S+)", text)
        registry = re.search(r"registry (127\.0\.0\.1:\d+)", text)
        nats_url = re.search(r"CEDAR_NATS_URL=(\S+) cedar status", text)
        assert kubeconfig and registry and nats_url, text
        kube_env = {**os.environ, "KUBECONFIG": kubeconfig.group(1)}
        status_env = {**os.environ, "CEDAR_NATS_URL": nats_url.group(1)}

        def kubectl(*args: str) -> str:
            done = subprocess.run(
                [KUBECTL, *args], env=kube_env, capture_output=True, text=True, check=False
            )
            assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
            return done.stdout

        # A new tenant with an idle Deployment of an image no workload wanted here before
        # (the examples' trainer is GPU-only).
        kubectl("create", "namespace", "team-delta")
        kubectl("label", "namespace", "team-delta", "cedar.io/tenant=true")
        image = f"{registry.group(1)}/tenants/trainer:v1"
        kubectl(
            "create", "deployment", "shop", "-n", "team-delta", f"--image={image}", "--replicas=0"
        )
        assert "shop" in kubectl("get", "deployments", "-n", "team-delta")
        await _eventually_in_status(status_env, ["--namespaces"], r"team-delta\s+s0:c\d+,c\d+", 60)
        await _eventually_in_status(
            status_env, ["--node", "sandbox-node-1"], r"/tenants/trainer:v1\s+present", 60
        )

        # A new tag: pulled as soon as the Deployment names it.
        new_image = f"{registry.group(1)}/tenants/web:v2"
        kubectl("set", "image", "deployment/shop", "-n", "team-delta", f"trainer={new_image}")
        await _eventually_in_status(
            status_env, ["--node", "sandbox-node-1"], r"/tenants/web:v2\s+present", 60
        )

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 90) == 0
    finally:
        if proc.returncode is None:
            kill_pid(proc.pid)
            await proc.wait()
