"""NATS fixtures: one JetStream server for the session, and private ones for outage tests."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import nats
import pytest

from cedar.sandbox.errors import BinaryNotFoundError, ServerStartError
from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import ManagedProcess

__all__ = ["fresh_nats", "nats_server", "nats_url", "start_or_fail"]

P = TypeVar("P", bound=ManagedProcess)


def start_or_fail(server: P) -> P:
    """Start a sandbox server; a missing binary or a failed start fails the test (no skip).

    The servers are part of what is tested: a machine without them must go red, and
    `make test` is what installs them.
    """
    try:
        server.start()
    except BinaryNotFoundError as exc:
        pytest.fail(f"{exc}", pytrace=False)
    except ServerStartError as exc:
        pytest.fail(f"{exc}", pytrace=False)
    return server


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """The session's JetStream server. Do not stop it in a test: use `fresh_nats`."""
    server = start_or_fail(NatsServer(tmp_path_factory.mktemp("nats") / "store"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """URL of the session's server, emptied of every stream and KV bucket first.

    Cedar's stream names are fixed, so tests sharing one server would otherwise see each
    other's messages.
    """
    if not nats_server.is_running:
        start_or_fail(nats_server)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _delete_all_streams(nats_server.url)).result(timeout=30)
    return nats_server.url


async def _delete_all_streams(url: str) -> None:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=3)
    try:
        js = nc.jetstream()
        for name in await js.streams_info():
            if name.config.name:
                await js.delete_stream(name.config.name)
    finally:
        await nc.close()


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of this test's own, free to stop and restart (outage tests)."""
    server = start_or_fail(NatsServer(tmp_path / "nats-store"))
    try:
        yield server
    finally:
        server.stop()
