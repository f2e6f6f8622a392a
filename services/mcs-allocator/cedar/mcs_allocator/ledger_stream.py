"""The ledger bucket's stream `KV_cedar-mcs-ledger`, read directly: whole, after a sequence,
or followed as it grows.

Reading the stream is much faster than nats-py's KV watcher at start-up ("last per subject"
sends each key's current value once; the watcher costs ~4x more per entry).

I/O: JetStream through nats-py and cedar.runtime.bus; its errors leave as `BusError` or
`BusUnavailable` (`cedar.runtime.bus.bus_errors`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from cedar.proto import subjects
from cedar.runtime import topology
from cedar.runtime.bus import bus_errors, kv_deleted, read_to_end, reply_seq

LEDGER_STREAM = topology.kv_stream(subjects.KV_MCS_LEDGER)
LEDGER_PREFIX = topology.kv_subject(subjects.KV_MCS_LEDGER)

# One message of the stream: its key, its value (None: deleted), its stream sequence.
Change = tuple[str, bytes | None, int]


@dataclass(frozen=True)
class StreamState:
    created: str  # the stream's identity across deletion and re-creation (sequences restart)
    last_seq: int
    messages: int


class Following:
    """A subscription that applies the ledger's changes as they come; `close` ends it."""

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()


class LedgerStream:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js

    async def state(self) -> StreamState:
        with bus_errors("read the ledger stream's state"):
            info = await self.js.stream_info(LEDGER_STREAM)
        return StreamState(
            created=info.created.isoformat() if info.created else "",
            last_seq=int(info.state.last_seq or 0),
            messages=int(info.state.messages or 0),
        )

    async def current(self) -> Iterator[Change]:
        """Every key's last message, once each."""
        with bus_errors("read the ledger"):
            msgs = await read_to_end(
                self.js,
                LEDGER_STREAM,
                LEDGER_PREFIX + ">",
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            )
        return map(_change, msgs)

    async def after(self, seq: int) -> list[Change]:
        """Every message after stream sequence `seq`, in order."""
        with bus_errors("replay the ledger"):
            msgs = await read_to_end(self.js, LEDGER_STREAM, LEDGER_PREFIX + ">", start_seq=seq + 1)
        return [_change(msg) for msg in msgs]

    async def follow(
        self, start_seq: int, apply: Callable[[str, bytes | None, int], None]
    ) -> Following:
        """Call `apply` with each message from stream sequence `start_seq` on, as it comes."""

        async def on_msg(msg: Msg) -> None:
            apply(*_change(msg))

        with bus_errors("watch the ledger"):
            sub = await self.js.subscribe(
                LEDGER_PREFIX + ">",
                stream=LEDGER_STREAM,
                cb=on_msg,
                ordered_consumer=True,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=start_seq,
                ),
                pending_msgs_limit=0,
                pending_bytes_limit=0,
            )
        return Following(sub)


def _change(msg: Msg) -> Change:
    value = None if kv_deleted(msg.headers) or not msg.data else msg.data
    return msg.subject[len(LEDGER_PREFIX) :], value, reply_seq(msg.reply)
