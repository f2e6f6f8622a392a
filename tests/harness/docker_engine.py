"""Docker engine fixtures: a private `dockerd` per session, and private ones on demand."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cedar.sandbox.dockerd import DockerEngine
from tests.harness.nats_server import start_or_fail

__all__ = ["docker_engine", "docker_engine_factory", "docker_host", "fresh_docker_engine"]


def _short_base() -> Path:
    # pytest's tmp_path is too long for the unix sockets under the exec root.
    return Path(tempfile.mkdtemp(prefix="cedar-", dir="/tmp"))


def _dispose(engine: DockerEngine, keep_log_in: Path | None) -> None:
    engine.stop()
    if keep_log_in is not None and engine.log_path.exists():
        shutil.copy(engine.log_path, keep_log_in / "dockerd.log")
    shutil.rmtree(engine.base_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    """The session's engine. Tests share its image cache: use unique image names, or
    `fresh_docker_engine` for a test that needs an empty cache or stops the engine."""
    engine = DockerEngine(_short_base())
    try:
        start_or_fail(engine)
        yield engine
    finally:
        _dispose(engine, tmp_path_factory.mktemp("dockerd-log"))


@pytest.fixture(scope="session")
def builder_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    """The engine that builds and pushes test images: never the one a puller drives, so
    that tagging or removing a build never looks like a change on a node."""
    engine = DockerEngine(_short_base())
    try:
        start_or_fail(engine)
        yield engine
    finally:
        _dispose(engine, tmp_path_factory.mktemp("builder-log"))


@pytest.fixture
def docker_host(docker_engine: DockerEngine) -> str:
    """DOCKER_HOST of the session's engine."""
    return docker_engine.host


@pytest.fixture
def docker_engine_factory(tmp_path: Path) -> Iterator[Callable[[], DockerEngine]]:
    """Start more engines (one per simulated node); all are stopped after the test."""
    engines: list[DockerEngine] = []

    def start() -> DockerEngine:
        engine = DockerEngine(_short_base())
        engines.append(engine)
        return start_or_fail(engine)

    try:
        yield start
    finally:
        for i, engine in enumerate(engines):
            log_dir = tmp_path / f"dockerd-{i}"
            log_dir.mkdir(exist_ok=True)
            _dispose(engine, log_dir)


@pytest.fixture
def fresh_docker_engine(
    docker_engine_factory: Callable[[], DockerEngine],
) -> DockerEngine:
    """An engine of this test's own, with an empty image cache."""
    return docker_engine_factory()
