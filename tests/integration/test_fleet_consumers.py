"""The streams every puller follows set their own consumer limit, so a fleet of more than
1,000 nodes needs nothing in nats.conf.

nats-server 2.15 gives a stream that sets no `max_consumers` the account's
`default_max_consumers` (1,000 unless configured); the 1,001st puller would be refused
(`maximum consumers limit reached`, 10026 — seen by bench/bench_fanout.py's first run).
Here a server with a default of 5 stands in for a fleet of more than a thousand nodes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.errors import BadRequestError

from cedar.proto import subjects
from cedar.runtime import topology
from cedar.runtime.bus import ensure_stream, ensure_streams
from cedar.runtime.settings import CommonSettings
from cedar.sandbox.nats import NatsServer

DEFAULT_LIMIT = 5


class LimitedServer(NatsServer):
    def command(self) -> list[str]:
        config = self.store_dir.parent / "limits.conf"
        config.write_text(
            f"jetstream {{\n  limits {{\n    default_max_consumers: {DEFAULT_LIMIT}\n  }}\n}}\n"
        )
        return [*super().command(), "-c", str(config)]


@pytest.fixture
def limited_nats(tmp_path: Path) -> Iterator[LimitedServer]:
    server = LimitedServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _open(js: nats.js.JetStreamContext, stream: str, count: int) -> None:
    for _ in range(count):
        await js.add_consumer(
            stream,
            ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=30.0,
            ),
        )


async def test_more_pullers_than_the_servers_default_limit(limited_nats: LimitedServer) -> None:
    settings = CommonSettings()
    nc = await nats.connect(limited_nats.url)
    try:
        js = nc.jetstream()
        # The server's default does apply to a stream without a limit of its own...
        await ensure_stream(js, StreamConfig(name="PLAIN", subjects=["plain.>"]))
        await _open(js, "PLAIN", DEFAULT_LIMIT)
        with pytest.raises(BadRequestError) as refused:
            await _open(js, "PLAIN", 1)
        assert refused.value.err_code == 10026
        # ...but not to the streams every puller follows.
        await ensure_streams(
            js, [*topology.service_streams(settings), topology.fleet_leases_stream(settings)]
        )
        for stream in (subjects.STREAM_WORKLOADS, topology.kv_stream(subjects.KV_FLEET_LEASES)):
            await _open(js, stream, 3 * DEFAULT_LIMIT)
            assert (await js.stream_info(stream)).state.consumer_count == 3 * DEFAULT_LIMIT
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def test_a_workloads_stream_of_an_earlier_cedar_gets_the_limit(
    limited_nats: LimitedServer,
) -> None:
    settings = CommonSettings()
    nc = await nats.connect(limited_nats.url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, topology.history_stream(settings))
        unlimited = topology.workloads_stream(settings)
        unlimited.max_consumers = None
        await js.add_stream(unlimited)
        await _open(js, subjects.STREAM_WORKLOADS, DEFAULT_LIMIT)
        with pytest.raises(BadRequestError):
            await _open(js, subjects.STREAM_WORKLOADS, 1)
        await ensure_streams(js, topology.service_streams(settings))  # the watcher's start
        await _open(js, subjects.STREAM_WORKLOADS, DEFAULT_LIMIT)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
