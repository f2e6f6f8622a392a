"""The shared runtime against a real NATS server: streams, reconnects, HTTP, shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from nats.js.api import StreamConfig

from cedar.proto import subjects
from cedar.runtime.bus import (
    Bus,
    ensure_stream,
)
from cedar.runtime.health import Health
from cedar.runtime.http import HttpServer
from cedar.runtime.settings import CommonSettings
from cedar.runtime.sourcing import sources_caught_up
from cedar.runtime.topology import history_stream, node_status_bucket, service_streams
from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import free_port
from tests.harness.waiting import eventually


async def test_streams_and_buckets_are_created_idempotently(fresh_nats: NatsServer) -> None:
    settings = CommonSettings(nats_url=fresh_nats.url)
    bus = Bus(settings, "test", Health())
    assert await bus.connect()
    streams = service_streams(settings)
    buckets = [node_status_bucket(settings)]
    for _ in range(2):  # a second service starting does not fail or change anything
        kvs = await bus.ensure(streams, buckets)
    await kvs[subjects.KV_NODE_STATUS].put("n1.abc", b"{}")

    subject = subjects.workload_subject("Deployment", "t", "web")
    ack = await bus.js.publish(subject, b"{}")
    assert ack.stream == subjects.STREAM_HISTORY  # the history takes the changes...

    # ...and CEDAR_WORKLOADS, sourcing it, gets the same message.
    assert await sources_caught_up(bus.js, subjects.STREAM_WORKLOADS, within=10)
    copied = await bus.js.get_last_msg(subjects.STREAM_WORKLOADS, subject)
    assert copied.data == b"{}"

    # A changed configuration is applied to the existing stream.
    changed = history_stream(CommonSettings(nats_url=fresh_nats.url, history_retention=3600))
    await ensure_stream(bus.js, changed)
    info = await bus.js.stream_info(subjects.STREAM_HISTORY)
    assert info.config.max_age == 3600
    await bus.close()


async def test_deduplication_by_message_id(nats_url: str) -> None:
    settings = CommonSettings(nats_url=nats_url)
    bus = Bus(settings, "test", Health())
    await bus.connect()
    await ensure_stream(
        bus.js, StreamConfig(name="DEDUP_T", subjects=["dedup.t.>"], duplicate_window=60)
    )
    first = await bus.js.publish("dedup.t.a", b"x", headers={"Nats-Msg-Id": "same"})
    second = await bus.js.publish("dedup.t.a", b"x", headers={"Nats-Msg-Id": "same"})
    assert not first.duplicate
    assert second.duplicate
    await bus.js.delete_stream("DEDUP_T")
    await bus.close()


async def test_connect_waits_for_nats_and_survives_an_outage(fresh_nats: NatsServer) -> None:
    fresh_nats.stop()
    health = Health()
    bus = Bus(CommonSettings(nats_url=fresh_nats.url), "test", health)
    connecting = asyncio.create_task(bus.connect())
    await asyncio.sleep(1.0)
    assert not connecting.done()  # still retrying, not crashed
    assert not health.ready
    await asyncio.to_thread(fresh_nats.start)
    assert await asyncio.wait_for(connecting, 30)
    assert health.ready

    await asyncio.to_thread(fresh_nats.stop)
    await eventually(lambda: not health.ready, what="not ready")
    await asyncio.to_thread(fresh_nats.start)
    await eventually(lambda: health.ready, 30, "ready again")
    await bus.close()


async def test_http_serves_metrics_health_and_readiness() -> None:
    health = Health("nats")
    server = HttpServer(health, "127.0.0.1", 0)
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/healthz") as resp:
            assert resp.status == 200
        async with session.get(f"{base}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["checks"] == {"nats": False}
        health.set("nats", True)
        async with session.get(f"{base}/readyz") as resp:
            assert resp.status == 200
        async with session.get(f"{base}/metrics") as resp:
            text = await resp.text()
            assert "cedar_nats_connected" in text
            assert resp.headers["Content-Type"].startswith("text/plain")
    await server.stop()


def test_sigterm_finishes_in_flight_work_and_exits_zero(nats_url: str, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    port = free_port()
    env = os.environ | {"CEDAR_NATS_URL": nats_url, "CEDAR_METRICS_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("demo_service.py")), str(journal)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (journal.exists() and "start 1" in journal.read_text()):
            assert time.monotonic() < deadline, "demo service did not start"
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    lines = journal.read_text().split()
    # Every unit that started also finished: nothing was cut off mid-way.
    assert lines.count("start") == lines.count("done")
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert {entry["service"] for entry in logs} == {"demo"}
    assert any("shutting down" in entry["msg"] for entry in logs)


@pytest.mark.parametrize("args", [["--help"], ["watcher", "--help"], ["status", "--help"]])
def test_cli_help(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cedar.cli", *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "usage: cedar" in result.stdout
