"""The CRI image engine: the node's container runtime (containerd, CRI-O) over gRPC.

I/O: the runtime's CRI socket (CEDAR_CRI_ENDPOINT) through grpc.aio, and only these calls of
runtime.v1 (kubernetes/cri-api pkg/apis/runtime/v1/api.proto): ImageService PullImage,
ListImages, ImageStatus, RemoveImage and ImageFsInfo; RuntimeService Version and
ListContainers (which images containers use; how many run). The images it pulls land in
the store the kubelet reads (containerd's `k8s.io` namespace, CRI-O's containers/storage),
which is the point: on a CRI node the Docker engine's store is one the kubelet never looks
at.

Every failure is an `EngineError` with the reason the rest of the puller acts on, from the
gRPC status code where it says enough (DEADLINE_EXCEEDED: timeout, NOT_FOUND: not_found,
UNAUTHENTICATED and PERMISSION_DENIED: unauthorized, UNAVAILABLE and CANCELLED:
engine_error) and from the runtime's message otherwise (containerd and CRI-O report a
registry's 401, a refused connection or a full disk as UNKNOWN with the registry client's
text): the same classes as the Docker engine's messages, engine.classify.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc
from grpc import aio

from cedar.proto.imageref import ImageReference, InvalidReference, parse
from cedar.puller.cri import api_pb2 as pb
from cedar.puller.cri.image_service_pb2_grpc import ImageServiceStub
from cedar.puller.cri.runtime_service_pb2_grpc import RuntimeServiceStub
from cedar.puller.engine import ImageFs, RuntimeVersion, classify
from cedar.puller.errors import EngineError
from cedar.puller.prune import LocalImage
from cedar.puller.runtime_choice import socket_path

if TYPE_CHECKING:  # the asyncio flavours exist only in the generated .pyi
    from cedar.puller.cri.image_service_pb2_grpc import ImageServiceAsyncStub
    from cedar.puller.cri.runtime_service_pb2_grpc import RuntimeServiceAsyncStub

log = logging.getLogger("cedar.puller.cri")

CRI_API_VERSION = "v1"
# kubelet allows 16 MiB; a node with thousands of images needs more for ListImages.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Reconnect quickly once a runtime (or its socket) is back, not after gRPC's 2-minute cap.
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

_BY_CODE: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.UNAUTHENTICATED: "unauthorized",
    grpc.StatusCode.PERMISSION_DENIED: "unauthorized",
    grpc.StatusCode.UNAVAILABLE: "engine_error",
    grpc.StatusCode.CANCELLED: "engine_error",
    grpc.StatusCode.UNIMPLEMENTED: "engine_error",
}


def pull_failure_reason(code: grpc.StatusCode, message: str, image: str = "") -> str:
    """The puller's reason for a failed PullImage: by status code, else by the message.

    The image's own name is blanked out of the message first, so that a repository called
    `forbidden-app` or `eof-tools` does not read as an error class.
    """
    reason = _BY_CODE.get(code)
    if reason is not None:
        return reason
    text = message.replace(image, "<image>") if image else message
    return classify(text)


def cri_auth(auth: Mapping[str, str] | None) -> pb.AuthConfig | None:
    """The CRI AuthConfig of the credentials the puller hands every engine (engine_auth()).

    server_address stays empty: the credentials were chosen for this image's registry, and
    containerd drops credentials whose server_address does not parse as a URL with that
    host (`127.0.0.1:5000` does not: it has no scheme).
    """
    if not auth:
        return None
    return pb.AuthConfig(
        username=auth.get("username", ""),
        password=auth.get("password", ""),
        identity_token=auth.get("identitytoken", ""),
    )


def labels_from_info(info: Mapping[str, str]) -> dict[str, str]:
    """An image's config labels from a verbose ImageStatus: CRI-O puts them under `labels`,
    containerd only in `imageSpec.config.Labels` (both send the OCI config as imageSpec)."""
    try:
        data = json.loads(info.get("info", "") or "{}")
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    labels = data.get("labels")
    if not isinstance(labels, dict):
        spec = data.get("imageSpec") or {}
        config = spec.get("config") if isinstance(spec, dict) else None
        labels = config.get("Labels") if isinstance(config, dict) else None
    if not isinstance(labels, dict):
        return {}
    return {str(k): str(v) for k, v in labels.items()}


def _normalised(name: str) -> str:
    """`nginx:1` as `docker.io/library/nginx:1` (what ListImages says); ids stay as they are."""
    try:
        return str(parse(name))
    except InvalidReference:
        return name


class CriImageEngine:
    """The `ImageEngine` that drives a CRI runtime. One channel, opened on first use."""

    def __init__(
        self,
        endpoint: str,
        *,
        node: str,
        call_timeout: float = 30.0,
        want_labels: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.node = node
        self.call_timeout = call_timeout
        # Labels cost one verbose ImageStatus per image (cached by id, which is immutable):
        # asked for only when the prune scope names a label.
        self.want_labels = want_labels
        self._labels: dict[str, dict[str, str]] = {}
        self._channel: aio.Channel | None = None
        self._images: ImageServiceAsyncStub | None = None
        self._runtime: RuntimeServiceAsyncStub | None = None

    # --- plumbing -----------------------------------------------------------------------

    def _stubs(self) -> tuple[ImageServiceAsyncStub, RuntimeServiceAsyncStub]:
        if self._channel is None:
            self._channel = aio.insecure_channel(self.endpoint, options=_CHANNEL_OPTIONS)
            self._images = ImageServiceStub(self._channel)
            self._runtime = RuntimeServiceStub(self._channel)
        assert self._images is not None and self._runtime is not None
        return self._images, self._runtime

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    def unreachable(self, err: aio.AioRpcError, what: str) -> EngineError:
        """An error of a call that is not a pull: the runtime is away or refused; say which."""
        path = socket_path(self.endpoint)
        code = err.code()
        if code == grpc.StatusCode.UNAVAILABLE and path is not None and not os.path.exists(path):
            message = (
                f"cannot {what}: no CRI socket at {path} (is the runtime running on this node, "
                "and its socket mounted into the puller? CEDAR_CRI_ENDPOINT names it)"
            )
        elif code == grpc.StatusCode.UNAVAILABLE:
            message = (
                f"cannot {what}: nothing answers the CRI at {self.endpoint} (the socket is "
                f"there; is the runtime hung or restarting?): {err.details()}"
            )
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            message = (
                f"cannot {what}: the CRI runtime at {self.endpoint} did not answer within "
                f"{self.call_timeout:.0f}s"
            )
        elif code == grpc.StatusCode.UNIMPLEMENTED:
            message = (
                f"cannot {what}: the runtime at {self.endpoint} does not serve CRI "
                f"runtime.{CRI_API_VERSION} ({err.details()})"
            )
        else:
            message = f"cannot {what}: CRI {code.name} from {self.endpoint}: {err.details()}"
        return EngineError("engine_error", message)

    # --- the ImageEngine protocol -------------------------------------------------------

    async def version(self) -> RuntimeVersion:
        _, runtime = self._stubs()
        try:
            answer = await runtime.Version(
                pb.VersionRequest(version=CRI_API_VERSION), timeout=self.call_timeout
            )
        except aio.AioRpcError as err:
            raise self.unreachable(err, "ask the runtime its version") from err
        return RuntimeVersion(
            answer.runtime_name, answer.runtime_version, answer.runtime_api_version
        )

    def _sandbox(self) -> pb.PodSandboxConfig:
        # Some runtimes pull in a pod's context (runtime handler, namespace options); the
        # puller's is a pod of its own name that never runs.
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(
                name="cedar-puller", namespace="cedar-system", uid=f"cedar-puller-{self.node}"
            ),
            linux=pb.LinuxPodSandboxConfig(
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(network=pb.NODE)
                )
            ),
        )

    async def pull(
        self, ref: ImageReference, auth: Mapping[str, str] | None, limit: float
    ) -> str | None:
        """Pull `ref`; return its manifest digest (ImageStatus's repo digest for its name)."""
        images, _ = self._stubs()
        request = pb.PullImageRequest(
            image=pb.ImageSpec(image=ref.pull_ref),
            auth=cri_auth(auth),
            sandbox_config=self._sandbox(),
        )
        try:
            answer = await images.PullImage(request, timeout=limit)
        except aio.AioRpcError as err:
            message = err.details() or err.code().name
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise EngineError("timeout", f"pull did not finish within {limit:.0f}s") from err
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                raise self.unreachable(err, f"pull {ref}") from err
            reason = pull_failure_reason(err.code(), message, ref.pull_ref)
            raise EngineError(reason, message) from err
        if ref.digest is not None:
            return ref.digest
        return await self._digest_of(answer.image_ref or ref.pull_ref, ref)

    async def _digest_of(self, image: str, ref: ImageReference) -> str | None:
        images, _ = self._stubs()
        try:
            status = await images.ImageStatus(
                pb.ImageStatusRequest(image=pb.ImageSpec(image=image)), timeout=self.call_timeout
            )
        except aio.AioRpcError as err:
            # The pull worked; the next listing finds the digest.
            log.info(
                "pulled, but cannot read its digest",
                extra={"image": str(ref), "error": err.details()},
            )
            return None
        for text in status.image.repo_digests:
            try:
                found = parse(text)
            except InvalidReference:
                continue
            if found.name == ref.name and found.digest:
                return found.digest
        return None

    async def images(self) -> list[LocalImage]:
        images, _ = self._stubs()
        try:
            listed = await images.ListImages(pb.ListImagesRequest(), timeout=self.call_timeout)
        except aio.AioRpcError as err:
            raise self.unreachable(err, "list images") from err
        if self.want_labels:
            await self._load_labels([i.id for i in listed.images])
        return [
            LocalImage(
                id=i.id,
                repo_tags=tuple(i.repo_tags),
                repo_digests=tuple(i.repo_digests),
                labels=self._labels.get(i.id, {}),
            )
            for i in listed.images
        ]

    async def _load_labels(self, ids: list[str]) -> None:
        present = set(ids)
        self._labels = {k: v for k, v in self._labels.items() if k in present}
        images, _ = self._stubs()
        for image_id in ids:
            if image_id in self._labels:
                continue
            try:
                status = await images.ImageStatus(
                    pb.ImageStatusRequest(image=pb.ImageSpec(image=image_id), verbose=True),
                    timeout=self.call_timeout,
                )
            except aio.AioRpcError as err:
                raise self.unreachable(err, "read an image's labels") from err
            self._labels[image_id] = labels_from_info(status.info)

    async def _containers(self, only: pb.ContainerFilter | None = None) -> list[pb.Container]:
        _, runtime = self._stubs()
        try:
            # Without a filter: every container, created, running, exited or unknown.
            listed = await runtime.ListContainers(
                pb.ListContainersRequest(filter=only), timeout=self.call_timeout
            )
        except aio.AioRpcError as err:
            raise self.unreachable(err, "list containers") from err
        return list(listed.containers)

    async def used_image_ids(self) -> set[str]:
        """Ids of the images any container uses, in any state.

        A container names its image by id (containerd's image_ref), by a repo digest
        (CRI-O's), or by what its pod spec said (image.image): each is mapped to the id of
        the image it names in the current listing.
        """
        names: set[str] = set()
        for container in await self._containers():
            for name in (container.image_ref, container.image_id, container.image.image):
                if name:
                    names.update((name, _normalised(name)))
        used: set[str] = set()
        for image in await self.images():
            if image.id in names or names & image.references():
                used.add(image.id)
        return used

    async def running_containers(self) -> int:
        """Containers in state CONTAINER_RUNNING. The runtime filters the listing (less to
        send on a node with many exited containers); the state is checked here as well."""
        running = pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))
        listed = await self._containers(running)
        return sum(1 for c in listed if c.state == pb.CONTAINER_RUNNING)

    async def remove(self, image: LocalImage) -> None:
        """Remove an image by id, never one a container uses.

        A CRI runtime removes what it is told (the kubelet checks containers itself), so the
        containers are listed again right before the removal.
        """
        if image.id in await self.used_image_ids():
            raise EngineError("engine_error", f"image {image.id} is used by a container")
        images, _ = self._stubs()
        try:
            await images.RemoveImage(
                pb.RemoveImageRequest(image=pb.ImageSpec(image=image.id)), timeout=self.call_timeout
            )
        except aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return
            raise self.unreachable(err, f"remove image {image.id}") from err
        self._labels.pop(image.id, None)

    async def image_fs(self) -> ImageFs | None:
        """The runtime's image filesystem (ImageFsInfo), for the disk guard."""
        images, _ = self._stubs()
        try:
            info = await images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=self.call_timeout)
        except aio.AioRpcError as err:
            raise self.unreachable(err, "read the image filesystem's usage") from err
        for fs in info.image_filesystems:
            if fs.fs_id.mountpoint:
                return ImageFs(fs.fs_id.mountpoint, int(fs.used_bytes.value))
        return None
