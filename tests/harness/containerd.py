"""containerd fixtures: a private containerd (CRI plugin on) per session, fresh ones on demand,
and `hold_image`, which makes an image "in use" the way a pod does (RunPodSandbox in the
node's network namespace, then CreateContainer, with runc)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from cedar.puller.cri import api_pb2 as pb
from cedar.puller.cri.runtime_service_pb2_grpc import RuntimeServiceStub
from cedar.sandbox.containerd import Containerd
from cedar.sandbox.registry import Registry
from tests.harness.nats_server import start_or_fail

__all__ = ["containerd", "containerd_factory", "cri_endpoint", "fresh_containerd", "hold_image"]


def _short_base() -> Path:
    # pytest's tmp_path is too long for the unix sockets.
    return Path(tempfile.mkdtemp(prefix="cedar-", dir="/tmp"))


def _dispose(daemon: Containerd, keep_log_in: Path | None) -> None:
    daemon.stop()
    if keep_log_in is not None and daemon.log_path.exists():
        shutil.copy(daemon.log_path, keep_log_in / "containerd.log")
    shutil.rmtree(daemon.base_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def containerd(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry, auth_registry: Registry
) -> Iterator[Containerd]:
    """The session's containerd, which reaches the session's registries. Tests share its image
    store: use unique image names, or `fresh_containerd` for an empty store or a stop."""
    daemon = Containerd(_short_base(), registries=[registry.host, auth_registry.host])
    try:
        start_or_fail(daemon)
        yield daemon
    finally:
        _dispose(daemon, tmp_path_factory.mktemp("containerd-log"))


@pytest.fixture
def cri_endpoint(containerd: Containerd) -> str:
    """CEDAR_CRI_ENDPOINT of the session's containerd."""
    return containerd.endpoint


@pytest.fixture
def containerd_factory(
    tmp_path: Path, registry: Registry, auth_registry: Registry
) -> Iterator[Callable[[], Containerd]]:
    """Start more containerds; all are stopped after the test."""
    daemons: list[Containerd] = []

    def start() -> Containerd:
        daemon = Containerd(_short_base(), registries=[registry.host, auth_registry.host])
        daemons.append(daemon)
        return start_or_fail(daemon)

    try:
        yield start
    finally:
        for i, daemon in enumerate(daemons):
            log_dir = tmp_path / f"containerd-{i}"
            log_dir.mkdir(exist_ok=True)
            _dispose(daemon, log_dir)


@pytest.fixture
def fresh_containerd(containerd_factory: Callable[[], Containerd]) -> Containerd:
    """A containerd of this test's own, with an empty image store."""
    return containerd_factory()


@contextlib.asynccontextmanager
async def hold_image(endpoint: str, image: str, log_dir: Path) -> AsyncIterator[str]:
    """A created (not started) container of `image` in a running pod sandbox; yields its id.

    The sandbox shares the node's network namespace (NamespaceOption.network = NODE), as a
    hostNetwork pod does, so no CNI is needed; runc runs its pause process. Both are removed
    on the way out.
    """
    name = f"hold-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=name, namespace="cedar-test"),
        log_directory=str(log_dir),
        linux=pb.LinuxPodSandboxConfig(
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.NODE)
            )
        ),
    )
    async with aio.insecure_channel(endpoint) as channel:
        runtime = RuntimeServiceStub(channel)
        sandbox = await runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60)
        try:
            created = await runtime.CreateContainer(
                pb.CreateContainerRequest(
                    pod_sandbox_id=sandbox.pod_sandbox_id,
                    sandbox_config=config,
                    config=pb.ContainerConfig(
                        metadata=pb.ContainerMetadata(name="app"),
                        image=pb.ImageSpec(image=image),
                        log_path="app.log",
                    ),
                ),
                timeout=60,
            )
            try:
                yield created.container_id
            finally:
                with contextlib.suppress(grpc.RpcError):
                    await runtime.RemoveContainer(
                        pb.RemoveContainerRequest(container_id=created.container_id), timeout=30
                    )
        finally:
            with contextlib.suppress(grpc.RpcError):
                request = pb.StopPodSandboxRequest(pod_sandbox_id=sandbox.pod_sandbox_id)
                await runtime.StopPodSandbox(request, timeout=30)
                await runtime.RemovePodSandbox(
                    pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox.pod_sandbox_id), timeout=30
                )
