"""`/debug/tasks` of the shared runtime's HTTP server: asyncio tasks by name and coroutine,
open file descriptors and resident memory, in this process and in a service subprocess.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cedar.runtime.health import Health
from cedar.runtime.http import HttpServer, open_fds, rss_bytes, task_group
from cedar.sandbox.procs import free_port, kill_pid
from tests.harness.waiting import eventually

MiB = 1024 * 1024


async def _parked(release: asyncio.Event) -> None:
    await release.wait()


@pytest.fixture
async def debug() -> AsyncIterator[Any]:
    server = HttpServer(Health(), "127.0.0.1", 0)
    await server.start()
    # One keep-alive connection for every request: its descriptors are in every sample.
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def get() -> dict[str, Any]:
            async with session.get(f"http://127.0.0.1:{server.port}/debug/tasks") as resp:
                assert resp.status == 200
                assert resp.content_type == "application/json"
                body: dict[str, Any] = await resp.json()
                return body

        yield get
    await server.stop()


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("Task-12", "Task"),
        ("informer-Deployment", "informer-Deployment"),
        ("pull 127.0.0.1:5000/tenant/secret-app:v1", "pull"),
        ("watcher-main", "watcher-main"),
        ("", "-"),
    ],
)
def test_task_names_are_grouped_without_their_data(name: str, group: str) -> None:
    assert task_group(name) == group


async def test_counts_the_loops_tasks_by_name_and_coroutine(debug: Any) -> None:
    before = await debug()
    assert before["pid"] == os.getpid()
    release = asyncio.Event()
    parked = [asyncio.create_task(_parked(release), name=f"probe-{i}") for i in range(7)] + [
        asyncio.create_task(_parked(release), name="pull 127.0.0.1:1/tenant/app:v9")
    ]
    await asyncio.sleep(0)
    during = await debug()
    assert during["tasks"] == before["tasks"] + 8
    assert during["by_name"]["probe"] == before["by_name"].get("probe", 0) + 7
    assert during["by_name"]["pull"] == before["by_name"].get("pull", 0) + 1
    assert during["by_coroutine"][_parked.__qualname__] == 8
    assert sum(during["by_name"].values()) == during["tasks"]
    assert sum(during["by_coroutine"].values()) == during["tasks"]
    assert "tenant/app" not in json.dumps(during)  # a task's data never leaves the process

    release.set()
    await asyncio.gather(*parked)
    after = await debug()
    assert after["tasks"] == before["tasks"]
    assert _parked.__qualname__ not in after["by_coroutine"]


async def _fds_when_settled(debug: Any, expected: int | None = None) -> int:
    """The endpoint's descriptor count once it agrees with our own reading (and `expected`).

    Other threads of the test process (the resolver pool, subprocess pipes of earlier
    fixtures, sockets the collector closes) open and close descriptors on their own, so a
    single sample may be off by one; a wrong count never settles and fails the test.
    """

    async def agree() -> int | None:
        gc.collect()
        served = (await debug())["open_fds"]
        if served != open_fds() or (expected is not None and served != expected):
            return None
        return int(served)

    settled: int = await eventually(agree, within=10, what=f"open_fds to settle at {expected}")
    return settled


async def test_counts_open_descriptors_and_resident_memory(debug: Any) -> None:
    before = await debug()
    base = await _fds_when_settled(debug)
    pipes = [os.pipe() for _ in range(20)]
    try:
        await _fds_when_settled(debug, base + 40)
    finally:
        for read_end, write_end in pipes:
            os.close(read_end)
            os.close(write_end)
    await _fds_when_settled(debug, base)

    ballast = bytearray(os.urandom(1024)) * (64 * 1024)  # 64 MiB, every page written
    grown = await debug()
    assert grown["rss_bytes"] >= before["rss_bytes"] + 60 * MiB
    assert len(ballast) == 64 * MiB
    del ballast


def test_proc_readers_say_none_without_proc(tmp_path: Path) -> None:
    assert open_fds(tmp_path / "no-such-process") is None
    assert rss_bytes(tmp_path / "no-such-process") is None
    own = rss_bytes()
    assert own is not None and own > 10 * MiB


async def test_a_service_answers_for_its_own_process(nats_url: str, tmp_path: Path) -> None:
    """Through `serve()`: the service's main task is counted, and the process's descriptors
    and memory are the ones /proc/<pid> shows from outside."""
    port = free_port()
    env = os.environ | {"CEDAR_NATS_URL": nats_url, "CEDAR_METRICS_PORT": str(port)}
    demo = Path(__file__).with_name("demo_service.py")
    log = (tmp_path / "demo.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(demo),
        str(tmp_path / "journal"),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def report() -> dict[str, Any] | None:
        assert proc.returncode is None, (tmp_path / "demo.log").read_text()
        try:
            url = f"http://127.0.0.1:{port}/debug/tasks"
            with urllib.request.urlopen(url, timeout=5) as resp:
                body: dict[str, Any] = json.loads(resp.read())
        except OSError:
            return None
        return body if body["by_name"].get("demo-main") == 1 else None

    try:
        body = await eventually(
            lambda: asyncio.to_thread(report), 30, "the demo service's /debug/tasks"
        )
        assert body["pid"] == proc.pid
        outside_fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert abs(body["open_fds"] - outside_fds) <= 2
        outside_rss = rss_bytes(Path(f"/proc/{proc.pid}"))
        assert outside_rss is not None
        assert abs(body["rss_bytes"] - outside_rss) <= outside_rss // 10
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        log.close()
        if proc.returncode is None:
            kill_pid(proc.pid)
            await proc.wait()
