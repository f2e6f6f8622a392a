"""The CRI engine against a real gRPC server in this process: every status code and message it
maps to a reason, the unreachable and silent runtime, digests, labels, images in use."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from cedar.proto.imageref import parse
from cedar.puller.cri import api_pb2 as pb
from cedar.puller.cri import image_service_pb2_grpc as image_grpc
from cedar.puller.cri import runtime_service_pb2_grpc as runtime_grpc
from cedar.puller.cri_engine import CriImageEngine, cri_auth, labels_from_info
from cedar.puller.errors import EngineError
from cedar.puller.prune import LocalImage

DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64
IMAGE_ID = "sha256:" + "c" * 64


@dataclass
class Behaviour:
    """What the fake runtime does; tests change it between calls."""

    pull_error: tuple[grpc.StatusCode, str] | None = None
    pull_delay: float = 0.0
    images: list[pb.Image] = field(default_factory=list)
    containers: list[pb.Container] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    pulls: list[pb.PullImageRequest] = field(default_factory=list)


class FakeImages(image_grpc.ImageServiceServicer):
    def __init__(self, b: Behaviour) -> None:
        self.b = b

    async def PullImage(self, request: Any, context: Any) -> pb.PullImageResponse:
        self.b.pulls.append(request)
        await asyncio.sleep(self.b.pull_delay)
        if self.b.pull_error is not None:
            await context.abort(*self.b.pull_error)
        return pb.PullImageResponse(image_ref=IMAGE_ID)

    async def ImageStatus(self, request: Any, context: Any) -> pb.ImageStatusResponse:
        for image in self.b.images:
            if request.image.image in (image.id, *image.repo_tags, *image.repo_digests):
                info = self.b.info if request.verbose else {}
                return pb.ImageStatusResponse(image=image, info=info)
        return pb.ImageStatusResponse()

    async def ListImages(self, request: Any, context: Any) -> pb.ListImagesResponse:
        return pb.ListImagesResponse(images=self.b.images)

    async def RemoveImage(self, request: Any, context: Any) -> pb.RemoveImageResponse:
        self.b.removed.append(request.image.image)
        if not any(i.id == request.image.image for i in self.b.images):
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such image")
        self.b.images = [i for i in self.b.images if i.id != request.image.image]
        return pb.RemoveImageResponse()

    async def ImageFsInfo(self, request: Any, context: Any) -> pb.ImageFsInfoResponse:
        usage = pb.FilesystemUsage(
            fs_id=pb.FilesystemIdentifier(mountpoint="/var/lib/containerd/snapshots"),
            used_bytes=pb.UInt64Value(value=1234),
        )
        return pb.ImageFsInfoResponse(image_filesystems=[usage])


class FakeRuntime(runtime_grpc.RuntimeServiceServicer):
    def __init__(self, b: Behaviour) -> None:
        self.b = b

    async def Version(self, request: Any, context: Any) -> pb.VersionResponse:
        return pb.VersionResponse(
            version="0.1.0",
            runtime_name="cri-o",
            runtime_version="1.30.2",
            runtime_api_version="v1",
        )

    async def ListContainers(self, request: Any, context: Any) -> pb.ListContainersResponse:
        return pb.ListContainersResponse(containers=self.b.containers)


@dataclass
class Fake:
    behaviour: Behaviour
    engine: CriImageEngine
    socket: Path
    server: aio.Server


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    folder = Path(tempfile.mkdtemp(prefix="cedar-cri-", dir="/tmp"))
    path = folder / "cri.sock"
    behaviour = Behaviour()
    server = aio.server()
    image_grpc.add_ImageServiceServicer_to_server(FakeImages(behaviour), server)
    runtime_grpc.add_RuntimeServiceServicer_to_server(FakeRuntime(behaviour), server)
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    engine = CriImageEngine(f"unix://{path}", node="node-1", call_timeout=5.0, want_labels=True)
    try:
        yield Fake(behaviour, engine, path, server)
    finally:
        await engine.close()
        await server.stop(None)
        shutil.rmtree(folder, ignore_errors=True)


async def pull_reason(
    fake: Fake, ref: str = "127.0.0.1:5000/team/app:v1", limit: float = 5.0
) -> str:
    with pytest.raises(EngineError) as caught:
        await fake.engine.pull(parse(ref), None, limit)
    return caught.value.reason


@pytest.mark.parametrize(
    ("code", "message", "reason"),
    [
        (grpc.StatusCode.NOT_FOUND, "failed to resolve reference: not found", "not_found"),
        (grpc.StatusCode.UNAUTHENTICATED, "no credentials", "unauthorized"),
        (grpc.StatusCode.PERMISSION_DENIED, "denied", "unauthorized"),
        (grpc.StatusCode.CANCELLED, "context canceled", "engine_error"),
        (grpc.StatusCode.UNIMPLEMENTED, "unknown service runtime.v1.ImageService", "engine_error"),
        # containerd 1.6: a registry's 401, a refused connection, a bad reference (UNKNOWN).
        (
            grpc.StatusCode.UNKNOWN,
            'failed to pull and unpack image "127.0.0.1:5000/team/app:v1": failed to resolve '
            "reference: pulling from host 127.0.0.1:5000 failed with status code [manifests v1]: "
            "401 Unauthorized",
            "unauthorized",
        ),
        (
            grpc.StatusCode.UNKNOWN,
            'failed to do request: Head "http://127.0.0.1:5000/v2/team/app/manifests/v1": dial '
            "tcp 127.0.0.1:5000: connect: connection refused",
            "registry_down",
        ),
        (
            grpc.StatusCode.UNKNOWN,
            'failed to parse image reference "Not Valid": invalid reference format',
            "invalid_reference",
        ),
        (grpc.StatusCode.UNKNOWN, "write /var/lib/x: no space left on device", "low_disk"),
        (grpc.StatusCode.UNKNOWN, "read tcp 127.0.0.1:5000: i/o timeout", "timeout"),
        (grpc.StatusCode.INTERNAL, "unexpected EOF", "registry_down"),
        (grpc.StatusCode.UNKNOWN, "something odd happened", "engine_error"),
        # CRI-O names the missing manifest; its code is UNKNOWN too.
        (grpc.StatusCode.UNKNOWN, "reading manifest v1: manifest unknown", "not_found"),
    ],
)
async def test_pull_failures_map_to_reasons(
    fake: Fake, code: grpc.StatusCode, message: str, reason: str
) -> None:
    fake.behaviour.pull_error = (code, message)
    assert await pull_reason(fake) == reason


async def test_the_images_own_name_does_not_decide_the_reason(fake: Fake) -> None:
    ref = "127.0.0.1:5000/forbidden-app/eof-tools:v1"
    fake.behaviour.pull_error = (
        grpc.StatusCode.UNKNOWN,
        f'failed to pull and unpack image "{ref}": unexpected status 500 Internal Server Error',
    )
    assert await pull_reason(fake, ref) == "engine_error"


async def test_a_pull_past_its_limit_is_a_timeout(fake: Fake) -> None:
    fake.behaviour.pull_delay = 2.0
    with pytest.raises(EngineError) as caught:
        await fake.engine.pull(parse("127.0.0.1:5000/team/app:v1"), None, 0.3)
    assert caught.value.reason == "timeout"
    assert "within" in caught.value.message


async def test_a_pull_returns_the_manifest_digest_and_sends_credentials(fake: Fake) -> None:
    fake.behaviour.images = [
        pb.Image(
            id=IMAGE_ID,
            repo_tags=["127.0.0.1:5000/team/app:v1"],
            repo_digests=[f"127.0.0.1:5000/other@{OTHER}", f"127.0.0.1:5000/team/app@{DIGEST}"],
        )
    ]
    auth = {"username": "u", "password": "p"}
    digest = await fake.engine.pull(parse("127.0.0.1:5000/team/app:v1"), auth, 5.0)
    assert digest == DIGEST
    (request,) = fake.behaviour.pulls
    assert request.image.image == "127.0.0.1:5000/team/app:v1"
    assert request.auth.username == "u" and request.auth.password == "p"
    assert request.auth.server_address == ""  # containerd would drop it: no URL scheme
    # A minimal pod config goes with it, in the node's network namespace.
    assert request.sandbox_config.metadata.name == "cedar-puller"
    assert request.sandbox_config.linux.security_context.namespace_options.network == pb.NODE
    by_digest = await fake.engine.pull(parse(f"127.0.0.1:5000/team/app@{OTHER}"), None, 5.0)
    assert by_digest == OTHER


def test_credentials_become_an_auth_config() -> None:
    token = cri_auth({"identitytoken": "t0k"})
    assert token is not None
    assert token.identity_token == "t0k" and not token.username
    assert cri_auth(None) is None
    assert cri_auth({}) is None


async def test_listing_reads_labels_once_per_image(fake: Fake) -> None:
    fake.behaviour.images = [pb.Image(id=IMAGE_ID, repo_tags=["127.0.0.1:5000/a:v1"])]
    spec = {"imageSpec": {"config": {"Labels": {"team": "blue"}}}}
    fake.behaviour.info = {"info": json.dumps(spec)}
    (image,) = await fake.engine.images()
    assert image == LocalImage(IMAGE_ID, ("127.0.0.1:5000/a:v1",), (), {"team": "blue"})
    fake.behaviour.info = {}
    (again,) = await fake.engine.images()
    assert again.labels == {"team": "blue"}  # cached: an image id never changes its config


def test_labels_from_either_runtimes_info() -> None:
    containerd = {"info": json.dumps({"imageSpec": {"config": {"Labels": {"a": "1"}}}})}
    crio = {"info": json.dumps({"labels": {"b": "2"}, "imageSpec": {"config": {}}})}
    assert labels_from_info(containerd) == {"a": "1"}
    assert labels_from_info(crio) == {"b": "2"}
    assert labels_from_info({"info": "not json"}) == {}
    assert labels_from_info({}) == {}


async def test_images_in_use_by_id_digest_or_name(fake: Fake) -> None:
    fake.behaviour.images = [
        pb.Image(id="sha256:1", repo_tags=["r/a:v1"]),
        pb.Image(id="sha256:2", repo_digests=[f"r/b@{DIGEST}"]),
        pb.Image(id="sha256:3", repo_tags=["r/c:v1"]),
        pb.Image(id="sha256:4", repo_tags=["r/d:v1"]),
    ]
    fake.behaviour.containers = [
        pb.Container(id="c1", image_ref="sha256:1", state=pb.CONTAINER_EXITED),
        pb.Container(id="c2", image_ref=f"r/b@{DIGEST}", state=pb.CONTAINER_CREATED),
        pb.Container(id="c3", image=pb.ImageSpec(image="r/c:v1"), state=pb.CONTAINER_RUNNING),
    ]
    assert await fake.engine.used_image_ids() == {"sha256:1", "sha256:2", "sha256:3"}
    with pytest.raises(EngineError, match="used by a container"):
        await fake.engine.remove(LocalImage("sha256:1", ("r/a:v1",)))
    await fake.engine.remove(LocalImage("sha256:4", ("r/d:v1",)))
    assert fake.behaviour.removed == ["sha256:4"]
    await fake.engine.remove(LocalImage("sha256:4", ("r/d:v1",)))  # gone already: fine


async def test_version_and_image_filesystem(fake: Fake) -> None:
    version = await fake.engine.version()
    assert (version.name, version.version, version.api) == ("cri-o", "1.30.2", "v1")
    fs = await fake.engine.image_fs()
    assert fs is not None
    assert (fs.mountpoint, fs.used_bytes) == ("/var/lib/containerd/snapshots", 1234)


async def test_a_missing_socket_says_so(fake: Fake) -> None:
    await fake.server.stop(None)
    fake.socket.unlink(missing_ok=True)
    with pytest.raises(EngineError) as caught:
        await fake.engine.images()
    assert caught.value.reason == "engine_error"
    assert f"no CRI socket at {fake.socket}" in caught.value.message
    with pytest.raises(EngineError) as pulled:
        await fake.engine.pull(parse("127.0.0.1:5000/team/app:v1"), None, 5.0)
    assert pulled.value.reason == "engine_error"


async def test_a_silent_socket_is_a_runtime_that_does_not_answer() -> None:
    folder = Path(tempfile.mkdtemp(prefix="cedar-cri-", dir="/tmp"))
    path = folder / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(8)  # accepts connections in the kernel, never says a word
        engine = CriImageEngine(f"unix://{path}", node="n", call_timeout=0.5)
        try:
            for call in _calls(engine):
                with pytest.raises(EngineError) as caught:
                    await call()
                text = caught.value.message
                assert "nothing answers the CRI" in text or "did not answer within" in text, text
        finally:
            await engine.close()
            shutil.rmtree(folder, ignore_errors=True)


def _calls(engine: CriImageEngine) -> list[Callable[[], Any]]:
    return [engine.images, engine.version, engine.used_image_ids, engine.image_fs]
