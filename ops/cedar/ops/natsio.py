"""NATS access for the operator commands: connect once (fail fast), read a stream or bucket.

The services reconnect forever; a command run by a person should instead say at once that
NATS is unreachable and where it looked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from cedar.ops.errors import OpsError
from cedar.runtime.bus import kv_deleted
from cedar.runtime.settings import CommonSettings
from cedar.runtime.topology import kv_stream, kv_subject

# A stream read ends at the last message that existed when it started; this bounds the
# wait when that message vanished meanwhile (TTL, max_age) and never arrives.
IDLE_TIMEOUT = 5.0
# Ephemeral consumers of a finished read are removed by the server after this long.
INACTIVE_THRESHOLD = 5.0


# The operator commands' replies arrive under a prefix of their own: deploy/nats/accounts.conf
# lets the `ops` user subscribe to it and to no other service's.
OPS_INBOX_PREFIX = "_INBOX.cedar-ops"


async def connect(settings: CommonSettings, name: str, wait: float = 5.0) -> NatsClient:
    password = settings.nats_password
    try:
        return await asyncio.wait_for(
            nats.connect(
                servers=settings.nats_servers,
                name=name,
                inbox_prefix=OPS_INBOX_PREFIX,
                user=settings.nats_user,
                password=password.get_secret_value() if password else None,
                connect_timeout=2,
                allow_reconnect=False,
                max_reconnect_attempts=0,
            ),
            wait,
        )
    except (NatsError, OSError, TimeoutError) as err:
        raise OpsError(
            f"cannot reach NATS at {settings.nats_url} ({err.__class__.__name__}: {err}); "
            "set CEDAR_NATS_URL or --nats-url"
        ) from err


async def close(nc: NatsClient) -> None:
    with contextlib.suppress(NatsError, TimeoutError):
        await nc.drain()


@dataclass(frozen=True)
class StreamMsg:
    seq: int
    stored_at: datetime
    subject: str
    data: bytes
    headers: dict[str, str]


async def read_stream(
    js: JetStreamContext,
    stream: str,
    *,
    start_time: datetime | None = None,
    subject: str = ">",
    last_per_subject: bool = False,
    idle_timeout: float = IDLE_TIMEOUT,
) -> AsyncIterator[StreamMsg]:
    """The stream's messages in order, from `start_time` (or the start) to its current end.

    An ordered consumer: ephemeral, in memory, no acks, resumed by the client after a gap,
    and dropped by the server soon after the read, so a read leaves nothing behind. The end
    is told by each message's own pending count (not by a consumer-info call, which races
    with the first deliveries).
    """
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        return
    state = info.state
    if state.messages == 0 or state.last_seq == 0:
        return
    last_ts = getattr(state, "last_ts", None)
    if start_time is not None and isinstance(last_ts, datetime) and last_ts < start_time:
        return
    if last_per_subject:
        policy = DeliverPolicy.LAST_PER_SUBJECT
    elif start_time is not None:
        policy = DeliverPolicy.BY_START_TIME
    else:
        policy = DeliverPolicy.ALL
    config = ConsumerConfig(
        deliver_policy=policy,
        opt_start_time=start_time if policy == DeliverPolicy.BY_START_TIME else None,
    )
    sub = await js.subscribe(
        subject,
        stream=stream,
        ordered_consumer=True,
        config=config,
        inactive_threshold=INACTIVE_THRESHOLD,
    )
    try:
        while True:
            try:
                msg: Msg = await sub.next_msg(timeout=idle_timeout)
            except (NatsTimeoutError, TimeoutError):
                return
            meta = msg.metadata
            yield StreamMsg(
                seq=meta.sequence.stream,
                stored_at=meta.timestamp,
                subject=msg.subject,
                data=msg.data,
                headers=dict(msg.headers or {}),
            )
            if meta.sequence.stream >= state.last_seq or meta.num_pending == 0:
                return
    finally:
        with contextlib.suppress(NatsError, TimeoutError):
            await sub.unsubscribe()


async def read_bucket(js: JetStreamContext, bucket: str) -> dict[str, bytes]:
    """Every live key of a KV bucket with its value ({} when the bucket does not exist)."""
    prefix = kv_subject(bucket)
    values: dict[str, bytes] = {}
    async for msg in bucket_stream(js, bucket):
        key = msg.subject[len(prefix) :]
        if kv_deleted(msg.headers):
            values.pop(key, None)
        else:
            values[key] = msg.data
    return values


def bucket_stream(js: JetStreamContext, bucket: str) -> AsyncIterator[StreamMsg]:
    """The latest message of each key of a KV bucket (its stream is KV_<bucket>)."""
    return read_stream(
        js, kv_stream(bucket), subject=kv_subject(bucket, ">"), last_per_subject=True
    )
