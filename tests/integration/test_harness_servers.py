"""The harness's real servers really work: NATS JetStream, the Docker engine, registries."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiodocker
import aiohttp
import nats
import pytest
from aiodocker.exceptions import DockerError

from cedar.sandbox.dockerd import DockerEngine, docker_engine_reachable
from cedar.sandbox.errors import SandboxError, ServerStartError
from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import pid_alive
from cedar.sandbox.registry import Registry
from tests.harness.registry import AUTH_PASSWORD, AUTH_USER, ImageMaker

pytestmark = pytest.mark.integration


@pytest.fixture
async def docker(docker_engine: DockerEngine) -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker(url=docker_engine.host)
    try:
        yield client
    finally:
        await client.close()


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def _repo_digests(docker: aiodocker.Docker, ref: str) -> list[str]:
    info = await docker.images.inspect(ref)
    digests: list[str] = info["RepoDigests"]
    return digests


# --- NATS ------------------------------------------------------------------------------


async def test_jetstream_publish_is_stored(nats_url: str) -> None:
    stream, subject = _unique("HARNESS_"), _unique("harness.")
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[subject])
        ack = await js.publish(subject, b"stored")
        msg = await js.get_msg(stream, ack.seq)
        assert msg.data == b"stored"
        assert msg.subject == subject
        await js.delete_stream(stream)
    finally:
        await nc.close()


async def test_jetstream_data_survives_restart(fresh_nats: NatsServer) -> None:
    url, old_pid = fresh_nats.url, fresh_nats.pid
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="OUTAGE", subjects=["outage.>"])
        ack = await js.publish("outage.one", b"before restart")
    finally:
        await nc.close()

    await fresh_nats.astop()
    assert not fresh_nats.is_running
    assert old_pid is not None and not pid_alive(old_pid)
    await fresh_nats.astart()
    assert fresh_nats.is_running and fresh_nats.url == url

    nc = await nats.connect(url)
    try:
        msg = await nc.jetstream().get_msg("OUTAGE", ack.seq)
        assert msg.data == b"before restart"
    finally:
        await nc.close()


def test_failed_start_reports_log_tail(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = NatsServer(tmp_path / "store", port=busy.getsockname()[1])
        with pytest.raises(ServerStartError, match="address already in use") as failed:
            server.start()
    assert not server.is_running
    assert isinstance(failed.value, SandboxError) and isinstance(failed.value, RuntimeError)


# --- Docker engine ---------------------------------------------------------------------


async def test_engine_answers_ping_and_version(
    docker_engine: DockerEngine, docker: aiodocker.Docker
) -> None:
    assert docker_engine_reachable(docker_engine.host)
    async with docker._query("_ping") as resp:
        assert (await resp.text()).strip() == "OK"
    version = await docker.version()
    assert version["ApiVersion"]
    assert docker_engine.env()["DOCKER_HOST"] == docker_engine.host


def test_unreachable_engine_is_reported(tmp_path: Path) -> None:
    assert not docker_engine_reachable(f"unix://{tmp_path}/nothing.sock")


def test_engines_are_independent_and_stop_their_containerd(
    docker_engine_factory: Callable[[], DockerEngine],
) -> None:
    first, second = docker_engine_factory(), docker_engine_factory()
    assert first.host != second.host
    assert docker_engine_reachable(first.host) and docker_engine_reachable(second.host)

    # dockerd starts containerd in a session of its own: stop must still end it.
    containerd_pid = int((first.exec_root / "containerd" / "containerd.pid").read_text())
    dockerd_pid = first.pid
    assert dockerd_pid is not None and pid_alive(containerd_pid)
    first.stop()
    assert not pid_alive(dockerd_pid) and not pid_alive(containerd_pid)
    assert not docker_engine_reachable(first.host)
    assert docker_engine_reachable(second.host)


# --- registry + engine -----------------------------------------------------------------


async def test_pull_from_registry_and_create(
    docker: aiodocker.Docker, make_images: ImageMaker
) -> None:
    [ref] = await make_images.make(labels={"cedar.io/test": "pulled image"})
    with pytest.raises(DockerError):
        await docker.images.inspect(ref)  # make_images removed the local copy

    await docker.images.pull(ref)
    info = await docker.images.inspect(ref)
    assert info["Config"]["Labels"] == {"cedar.io/test": "pulled image"}
    assert info["RepoDigests"]

    # A created, never started container: what must keep an image from being pruned.
    container = await docker.containers.create(config={"Image": ref})
    try:
        state = (await container.show())["State"]
        assert state["Status"] == "created"
        with pytest.raises(DockerError) as in_use:
            await docker.images.delete(ref)
        assert in_use.value.status == 409
    finally:
        await container.delete(force=True)


async def test_auth_registry_rejects_anonymous_pull(
    auth_registry: Registry, docker: aiodocker.Docker, make_images: ImageMaker
) -> None:
    assert auth_registry.credentials == (AUTH_USER, AUTH_PASSWORD)
    async with aiohttp.ClientSession() as http, http.get(f"{auth_registry.url}/v2/") as resp:
        assert resp.status == 401

    [ref] = await make_images.make(registry=auth_registry)
    with pytest.raises(DockerError) as err:
        await docker.images.pull(ref)
    assert any(
        word in str(err.value).lower() for word in ("unauthorized", "no basic auth credentials")
    )

    await docker.images.pull(ref, auth={"username": AUTH_USER, "password": AUTH_PASSWORD})
    assert await _repo_digests(docker, ref)


async def test_registry_restart_keeps_images(
    fresh_registry: Registry, docker: aiodocker.Docker, make_images: ImageMaker
) -> None:
    [ref] = await make_images.make(registry=fresh_registry)
    host = fresh_registry.host

    await fresh_registry.astop()
    assert not fresh_registry.is_running
    with pytest.raises(DockerError):
        await docker.images.pull(ref)

    await fresh_registry.astart()
    assert fresh_registry.host == host
    await docker.images.pull(ref)
    assert await _repo_digests(docker, ref)


async def test_push_new_content_changes_digest(
    docker: aiodocker.Docker, make_images: ImageMaker
) -> None:
    [ref] = await make_images.make()
    await docker.images.pull(ref)
    [before] = await _repo_digests(docker, ref)

    new_digest = await make_images.push_new_content(ref)
    assert not before.endswith(new_digest)
    await docker.images.pull(ref)
    assert any(d.endswith(new_digest) for d in await _repo_digests(docker, ref))


async def test_several_images_are_distinct(
    docker: aiodocker.Docker, make_images: ImageMaker
) -> None:
    refs = await make_images.make(count=3, size_bytes=128 * 1024, tag="v7")
    assert len(set(refs)) == 3
    assert all(r.endswith(":v7") for r in refs)
    ids = set()
    for ref in refs:
        await docker.images.pull(ref)
        ids.add((await docker.images.inspect(ref))["Id"])
    assert len(ids) == 3
