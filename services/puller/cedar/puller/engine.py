"""The image engines' contract, the classes of their failures, and the dry-run engine.

`ImageEngine` is what the puller needs of an engine: docker_engine.py implements it for the
Docker engine API, cri_engine.py for CRI runtimes (containerd, CRI-O); app.py imports only
the one it drives (a CRI puller never loads aiodocker, a Docker puller never loads grpc).
`DryRunEngine` touches nothing; this module does no I/O.

Every failure of an engine is an `EngineError` with one reason the rest of the puller (and
the operator) acts on: not_found, unauthorized, timeout, invalid_reference, engine_error,
low_disk, or registry_down (the registry could not be reached at all; it opens the breaker).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from cedar.proto.imageref import ImageReference
from cedar.puller.prune import LocalImage

# Checked in order: the first class whose pattern occurs in the engine's message wins.
_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("low_disk", ("no space left on device", "disk quota exceeded")),
    (
        "unauthorized",
        (
            "unauthorized",
            "authentication required",
            "no basic auth credentials",
            "denied",
            "forbidden",
            "incorrect username or password",
        ),
    ),
    (
        "invalid_reference",
        ("invalid reference format", "invalid repository name", "invalid tag format"),
    ),
    ("not_found", ("manifest unknown", "not found", "does not exist", "name unknown")),
    (
        "timeout",
        (
            "timeout",
            "timed out",
            "deadline exceeded",
            "tls handshake timeout",
        ),
    ),
    (
        "registry_down",
        (
            "connection refused",
            "no route to host",
            "no such host",
            "connection reset by peer",
            "server misbehaving",
            "network is unreachable",
            "eof",
            "bad gateway",
            "service unavailable",
        ),
    ),
)


def classify(message: str) -> str:
    text = message.lower()
    for reason, patterns in _CLASSES:
        if any(p in text for p in patterns):
            return reason
    return "engine_error"


@dataclass(frozen=True)
class RuntimeVersion:
    """Who the engine is: its own name (docker, containerd, cri-o) and version."""

    name: str
    version: str
    api: str = ""


@dataclass(frozen=True)
class ImageFs:
    """Where an engine keeps its images (a host path) and how many bytes they use."""

    mountpoint: str
    used_bytes: int


class ImageEngine(Protocol):
    """What the puller needs from an engine; the dry-run engine implements it too."""

    async def version(self) -> RuntimeVersion: ...

    async def image_fs(self) -> ImageFs | None:
        """The image filesystem, where the engine can say (the CRI's ImageFsInfo)."""
        ...

    async def pull(
        self, ref: ImageReference, auth: Mapping[str, str] | None, limit: float
    ) -> str | None: ...

    async def images(self) -> list[LocalImage]: ...

    async def used_image_ids(self) -> set[str]: ...

    async def running_containers(self) -> int:
        """How many containers run on the node now (created, exited or paused ones do not
        count): the node's load, in the order of fleet lease requests (pacing.py)."""
        ...

    async def remove(self, image: LocalImage) -> None: ...

    async def close(self) -> None: ...


class DryRunEngine:
    """Touches no engine: starts empty and pretends every pull and removal succeeds."""

    def __init__(self) -> None:
        self._present: dict[str, LocalImage] = {}

    async def version(self) -> RuntimeVersion:
        return RuntimeVersion("dry-run", "")

    async def image_fs(self) -> ImageFs | None:
        return None

    async def pull(
        self, ref: ImageReference, auth: Mapping[str, str] | None, limit: float
    ) -> str | None:
        name = str(ref)
        tags = () if ref.is_digest else (name,)
        digests = (f"{ref.name}@{ref.digest}",) if ref.digest else ()
        self._present[name] = LocalImage(id=f"dry-run:{name}", repo_tags=tags, repo_digests=digests)
        return ref.digest

    async def images(self) -> list[LocalImage]:
        return list(self._present.values())

    async def used_image_ids(self) -> set[str]:
        return set()

    async def running_containers(self) -> int:
        return 0

    async def remove(self, image: LocalImage) -> None:
        self._present = {k: v for k, v in self._present.items() if v.id != image.id}

    async def close(self) -> None:
        return None
