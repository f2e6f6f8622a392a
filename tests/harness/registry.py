"""Registry fixtures (an open one, one with htpasswd auth, private ones for outage tests)
and `make_images`, which pushes real images through the session's Docker engine."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from cedar.sandbox import images
from cedar.sandbox.dockerd import DockerEngine
from cedar.sandbox.registry import Registry
from tests.harness.nats_server import start_or_fail

__all__ = [
    "AUTH_PASSWORD",
    "AUTH_USER",
    "ImageMaker",
    "auth_registry",
    "fresh_registry",
    "make_images",
    "registry",
]

AUTH_USER = "cedar"
AUTH_PASSWORD = "cedar-secret"

_calls = itertools.count()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The session's open registry. Do not stop it in a test: use `fresh_registry`."""
    server = start_or_fail(Registry(tmp_path_factory.mktemp("registry")))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry that wants basic auth; `.credentials` is (AUTH_USER, AUTH_PASSWORD)."""
    server = start_or_fail(
        Registry(tmp_path_factory.mktemp("auth-registry"), htpasswd={AUTH_USER: AUTH_PASSWORD})
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_registry(tmp_path: Path) -> Iterator[Registry]:
    """An open registry of this test's own, free to stop and restart (outage tests)."""
    server = start_or_fail(Registry(tmp_path / "registry"))
    try:
        yield server
    finally:
        server.stop()


class ImageMaker:
    """Pushes images with the session's builder engine. Call it (blocking) or await `.make(...)`.

    Each call gets its own repository prefix unless one is given, so tests sharing the
    session registry never see each other's images.
    """

    def __init__(self, engine: DockerEngine, request: pytest.FixtureRequest) -> None:
        self.engine = engine
        self._request = request
        self._by_host: dict[str, Registry] = {}

    def _target(self, registry: Registry | None) -> Registry:
        if registry is None:
            registry = self._request.getfixturevalue("registry")
            assert isinstance(registry, Registry)
        self._by_host[registry.host] = registry
        return registry

    def __call__(
        self,
        count: int = 1,
        size_bytes: int = 64 * 1024,
        *,
        registry: Registry | None = None,
        prefix: str | None = None,
        tag: str = "v1",
        labels: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        keep_local: bool = False,
    ) -> list[str]:
        """References of `count` new images; auth defaults to the registry's credentials."""
        return images.make_images(
            self.engine,
            self._target(registry),
            count,
            size_bytes,
            prefix=prefix if prefix is not None else f"cedar-test/t{next(_calls)}/img",
            tag=tag,
            labels=labels,
            auth=auth,
            keep_local=keep_local,
        )

    async def make(
        self,
        count: int = 1,
        size_bytes: int = 64 * 1024,
        **options: Any,
    ) -> list[str]:
        """Like calling it (same options), without blocking the event loop."""
        return await asyncio.to_thread(self, count, size_bytes, **options)

    async def push_new_content(
        self,
        ref: str,
        *,
        registry: Registry | None = None,
        size_bytes: int = 64 * 1024,
        auth: tuple[str, str] | None = None,
    ) -> str:
        """Re-push `ref`'s tag with new content; return the new digest.

        The registry defaults to the one this maker pushed `ref` to (for its credentials).
        """
        if registry is None:
            registry = self._by_host.get(ref.split("/", 1)[0])
        return await images.apush_new_content(
            self.engine, self._target(registry), ref, size_bytes, auth=auth
        )


@pytest.fixture
def make_images(builder_engine: DockerEngine, request: pytest.FixtureRequest) -> ImageMaker:
    return ImageMaker(builder_engine, request)
