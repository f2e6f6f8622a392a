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
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_ops_support import REPO_ROOT
from tests.harness import cedar_up


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
    with cedar_up.short_state_dir("cedar-kc-") as path:  # the private dockerd's sockets
        yield path


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
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "CEDAR_NATS_URL")}
    env["DOCKER_HOST"] = f"unix://{state_dir}/no-such.sock"
    async with cedar_up.sandbox_up(state_dir, env) as (proc, out_path):
        labelled = r"team-alpha\s+s0:c\d+,c\d+"
        text = await cedar_up.wait_for_output(
            proc, out_path, lambda t: re.search(labelled, t), 240, f"{labelled!r} never appeared"
        )
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
