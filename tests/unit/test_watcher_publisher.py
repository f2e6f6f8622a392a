"""The publisher's acks: nats-py's errors become BusError (refused: surely not stored) or
BusUnavailable (maybe stored), and the outbox is told which."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError

from cedar.proto.models import WorkloadImageSet
from cedar.runtime.bus import Bus
from cedar.runtime.errors import BusError, BusUnavailable
from cedar.watcher.messages import Outgoing, live_workload
from cedar.watcher.outbox import Outbox
from cedar.watcher.publisher import AckPipe, Publisher

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class FakeNats:
    """Just what AckPipe uses of a NATS client: an inbox, one subscription, publishes."""

    def __init__(self, publish_error: Exception | None = None) -> None:
        self.reply_cb: Callable[[Msg], Awaitable[None]] | None = None
        self.published: list[tuple[str, str]] = []  # (subject, reply)
        self.publish_error = publish_error

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb: Callable[[Msg], Awaitable[None]]) -> object:
        self.reply_cb = cb
        return object()

    async def publish(
        self, subject: str, body: bytes, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        if self.publish_error is not None:
            raise self.publish_error
        self.published.append((subject, reply))

    async def answer(self, data: bytes) -> None:
        assert self.reply_cb is not None
        _, reply = self.published[-1]
        await self.reply_cb(Msg(_client=cast(Any, self), subject=reply, data=data))


async def ack_with(data: bytes) -> asyncio.Future[bool]:
    nc = FakeNats()
    pipe = AckPipe()
    _, future = await pipe.publish(cast(NatsClient, nc), "cedar.workloads.X.t.w", b"{}", {})
    await nc.answer(data)
    return future


async def test_an_ack_says_whether_it_was_a_duplicate() -> None:
    assert (await ack_with(json.dumps({"stream": "S", "seq": 1}).encode())).result() is False
    duplicate = json.dumps({"stream": "S", "seq": 1, "duplicate": True}).encode()
    assert (await ack_with(duplicate)).result() is True


async def test_a_refusal_is_a_bus_error_not_unavailable() -> None:
    error = {"error": {"code": 400, "err_code": 10054, "description": "message too big"}}
    future = await ack_with(json.dumps(error).encode())
    err = future.exception()
    assert isinstance(err, BusError) and not isinstance(err, BusUnavailable)
    assert "message too big" in str(err)


@pytest.mark.parametrize("data", [b"", b"not json"])
async def test_no_stream_or_an_unreadable_ack_is_unavailable(data: bytes) -> None:
    future = await ack_with(data)
    assert isinstance(future.exception(), BusUnavailable)


async def test_a_failed_send_raises_bus_unavailable() -> None:
    nc = FakeNats(publish_error=ConnectionClosedError())
    with pytest.raises(BusUnavailable, match=r"publish to cedar\.workloads\.X\.t\.w"):
        await AckPipe().publish(cast(NatsClient, nc), "cedar.workloads.X.t.w", b"{}", {})


def outgoing() -> Outgoing:
    item = WorkloadImageSet(
        kind="Deployment", namespace="t", name="w", uid="u", resource_version="1", observed_at=NOW
    )
    return live_workload(item)


@pytest.mark.parametrize(
    ("error", "uncertain"),
    [(BusError("refused"), False), (BusUnavailable("no stream"), True)],
)
async def test_only_a_refusal_is_known_not_stored(error: Exception, uncertain: bool) -> None:
    outbox = Outbox()
    outbox.offer(outgoing())
    (out,) = outbox.take(1)
    publisher = Publisher(cast(Bus, None), outbox)
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    publisher._done(out, future)
    assert (out.subject in outbox.uncertain) is uncertain
    assert outbox.pending == {out.subject: out}  # back, to be retried
