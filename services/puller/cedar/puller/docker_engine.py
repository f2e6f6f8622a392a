"""The node's Docker engine as an `ImageEngine`, through aiodocker.

I/O: the Docker engine API at DOCKER_HOST, and only these calls: version, pull, list images,
list containers (which images they use; how many run), remove an image without force.
Every failure is an `EngineError` whose reason comes from the engine's message
(engine.classify).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from typing import Any

import aiodocker
import aiohttp

from cedar.proto.imageref import ImageReference
from cedar.puller.engine import ImageFs, RuntimeVersion, classify
from cedar.puller.errors import EngineError
from cedar.puller.prune import LocalImage

_DIGEST = re.compile(r"Digest: (sha256:[0-9a-f]{64})")


def _local_image(raw: Mapping[str, Any]) -> LocalImage:
    return LocalImage(
        id=str(raw.get("Id", "")),
        repo_tags=tuple(t for t in raw.get("RepoTags") or () if t != "<none>:<none>"),
        repo_digests=tuple(d for d in raw.get("RepoDigests") or () if d != "<none>@<none>"),
        labels=dict(raw.get("Labels") or {}),
    )


class DockerImageEngine:
    """The `ImageEngine` that drives the node's Docker engine through aiodocker."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._docker: aiodocker.Docker | None = None

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self.host)
        return self._docker

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    async def version(self) -> RuntimeVersion:
        try:
            info = await self.docker.version()
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as err:
            raise EngineError(
                "engine_error", f"the Docker engine at {self.host} does not answer: {err!r}"
            ) from err
        return RuntimeVersion(
            "docker", str(info.get("Version", "")), str(info.get("ApiVersion", ""))
        )

    async def image_fs(self) -> ImageFs | None:
        return None  # the Docker engine's root is CEDAR_DOCKER_ROOT, mounted by the operator

    async def pull(
        self, ref: ImageReference, auth: Mapping[str, str] | None, limit: float
    ) -> str | None:
        """Pull `ref`; return the manifest digest the engine reports. Raises EngineError."""
        digest: str | None = ref.digest
        try:
            async with asyncio.timeout(limit):
                stream = self.docker.images.pull(
                    ref.pull_ref, auth=dict(auth) if auth else None, stream=True
                )
                async for item in stream:
                    status = str(item.get("status", ""))
                    match = _DIGEST.search(status)
                    if match:
                        digest = match.group(1)
        except TimeoutError as err:
            raise EngineError("timeout", f"pull did not finish within {limit:.0f}s") from err
        except aiodocker.DockerError as err:
            message = str(err.message)
            if err.status == 404 and "no such image" not in message.lower():
                raise EngineError("not_found", message) from err
            raise EngineError(classify(message), message) from err
        except (aiohttp.ClientError, OSError) as err:
            raise EngineError("engine_error", f"engine unreachable: {err!r}") from err
        return digest

    async def images(self) -> list[LocalImage]:
        try:
            raw = await self.docker.images.list()
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as err:
            raise EngineError("engine_error", f"cannot list images: {err!r}") from err
        return [_local_image(r) for r in raw]

    async def _containers(self, params: dict[str, str]) -> list[dict[str, Any]]:
        try:
            raw = await self.docker._query_json("containers/json", method="GET", params=params)
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as err:
            raise EngineError("engine_error", f"cannot list containers: {err!r}") from err
        return list(raw)

    async def used_image_ids(self) -> set[str]:
        """Images of every container, created, running or exited."""
        raw = await self._containers({"all": "true"})
        return {str(c.get("ImageID", "")) for c in raw if c.get("ImageID")}

    async def running_containers(self) -> int:
        """Containers in state `running` (`docker ps --filter status=running`)."""
        raw = await self._containers({"filters": json.dumps({"status": ["running"]})})
        # Counted here too: the filter is the engine's, the state is what is meant.
        return sum(1 for c in raw if c.get("State") == "running")

    async def remove(self, image: LocalImage) -> None:
        """Remove an image without force: the engine itself refuses if a container uses it."""
        try:
            # An image with several names must lose each name; the last removal deletes it.
            names = list(image.repo_tags) or [image.id]
            for name in names:
                await self.docker.images.delete(name, force=False)
        except aiodocker.DockerError as err:
            if err.status == 404:
                return
            raise EngineError(classify(str(err.message)), str(err.message)) from err
        except (aiohttp.ClientError, OSError) as err:
            raise EngineError("engine_error", f"cannot remove image: {err!r}") from err
