"""Publishing the outbox's pending changes to JetStream, and reading back what is stored.
I/O: the CEDAR_HISTORY stream (which takes the watcher's subjects) and CEDAR_WORKLOADS and
CEDAR_NAMESPACES (sourced from it) through the bus's NATS connection; nats-py's errors are
turned into `BusError` here (`bus_errors`) and go no further.

Publishes are pipelined (`publish_async`, up to `max_inflight` awaiting their ack) because
a round trip per message would cap the watcher at a few thousand messages per second.
Every message carries a `Nats-Msg-Id` derived from its content, so a retry after a lost
ack, or the same change published by a second watcher replica, is de-duplicated by the
server. A publish whose ack never came is "uncertain": before it is retried, the subject's
last stored message is read back, so a change stored just before an outage is not stored
a second time even after the duplicate window has passed.

While NATS is away nothing is sent; the outbox keeps coalescing changes per subject, and
everything pending goes out once the connection is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import replace
from functools import partial
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg
from nats.js.errors import NotFoundError

from cedar.proto import subjects
from cedar.runtime.backoff import Backoff
from cedar.runtime.bus import Bus, bus_errors
from cedar.runtime.errors import BusError, BusUnavailable
from cedar.runtime.sourcing import wait_for_copies
from cedar.watcher import metrics
from cedar.watcher.messages import (
    DELETED_DIGEST,
    HEADER_DIGEST,
    HEADER_MSG_ID,
    HEADER_UID,
    NAMESPACE,
    Outgoing,
)
from cedar.watcher.outbox import Outbox, StoredRecord

log = logging.getLogger("cedar.watcher.publisher")

HEADER_TTL = "Nats-TTL"  # per-message TTL (NATS 2.11+), seconds

_STORED = metrics.PUBLISHES.labels(result="stored")
_DUPLICATE = metrics.PUBLISHES.labels(result="duplicate")
_ERROR = metrics.PUBLISHES.labels(result="error")


def _salt(msg_id: str, seq: str) -> str:
    return hashlib.blake2b(f"{msg_id}:{seq}".encode(), digest_size=16).hexdigest()


def seed_filters(kinds: tuple[str, ...], namespace: str | None) -> list[tuple[str, str, str]]:
    """(kind, stream, filter subject) whose stored state this watcher is responsible for."""
    result: list[tuple[str, str, str]] = []
    for kind in kinds:
        if kind == NAMESPACE:
            tail = subjects.token(namespace) if namespace else ">"
            result.append(
                (kind, subjects.STREAM_NAMESPACES, f"{subjects.NAMESPACES_PREFIX}.{tail}")
            )
        else:
            tail = f"{subjects.token(namespace)}.>" if namespace else ">"
            result.append(
                (kind, subjects.STREAM_WORKLOADS, f"{subjects.WORKLOADS_PREFIX}.{kind}.{tail}")
            )
    return result


class AckPipe:
    """Pipelined JetStream publishes: one reply subscription, a sequence number per message.

    `js.publish_async` would do the same, but draws random bytes for every message (a
    system call each, a visible cost at thousands of messages per second) and has no
    ack deadline of its own. A future fails with `BusError` when JetStream refused the
    message (surely not stored), with `BusUnavailable` when the reply says nothing of it
    (no stream answered, or the reply is unreadable).
    """

    def __init__(self) -> None:
        self._nc: NatsClient | None = None
        self._prefix = ""
        self._seq = 0
        self._futures: dict[str, asyncio.Future[bool]] = {}

    async def publish(
        self, nc: NatsClient, subject: str, body: bytes, headers: dict[str, str]
    ) -> tuple[str, asyncio.Future[bool]]:
        """Send; the future resolves to `duplicate` once JetStream acknowledges."""
        if self._nc is not nc:
            with bus_errors("subscribe to publish acks"):
                self._prefix = nc.new_inbox() + "."
                await nc.subscribe(self._prefix + "*", cb=self._on_reply)
            self._nc = nc
            self._futures.clear()
        self._seq += 1
        token = str(self._seq)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._futures[token] = future
        try:
            with bus_errors(f"publish to {subject}"):
                await nc.publish(subject, body, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._futures.pop(token, None)
            raise
        return token, future

    def forget(self, token: str) -> None:
        self._futures.pop(token, None)

    async def _on_reply(self, msg: Msg) -> None:
        future = self._futures.pop(msg.subject[len(self._prefix) :], None)
        if future is None or future.done():
            return
        if not msg.data:  # a status message: no stream took it (503 no responders)
            future.set_exception(BusUnavailable("publish: no stream took the message"))
            return
        try:
            resp: dict[str, Any] = json.loads(msg.data)
        except ValueError as err:
            future.set_exception(BusUnavailable(f"publish: unreadable ack ({err})"))
            return
        if "error" in resp:
            error: dict[str, Any] = resp["error"]  # code, err_code, description
            future.set_exception(
                BusError(
                    f"publish: JetStream refused it ({error.get('code')} "
                    f"{error.get('err_code')}: {error.get('description')})"
                )
            )
        else:
            future.set_result(bool(resp.get("duplicate")))


class Publisher:
    """Takes the outbox's pending changes, publishes them, and reports each result back."""

    def __init__(
        self,
        bus: Bus,
        outbox: Outbox,
        *,
        max_inflight: int = 4000,
        ack_timeout: float = 5.0,
        seed_wait: float = 30.0,
    ) -> None:
        self.bus = bus
        self.outbox = outbox
        self.max_inflight = max_inflight
        self.ack_timeout = ack_timeout
        self.seed_wait = seed_wait  # at most, for the sourced streams to catch up
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._deadlines: dict[str, tuple[float, str, asyncio.Future[bool]]] = {}
        self._acks = AckPipe()
        self._backoff = Backoff(base=0.1, cap=5.0)
        self._failures = 0
        # Acked as duplicates: stored by another replica, or hidden by an older identical
        # message (A -> B -> A within the duplicate window); `_check_duplicates` tells which.
        self._duplicates: list[Outgoing] = []

    def notify(self) -> None:
        """New changes were offered to the outbox."""
        self._wake.set()

    # ------------------------------------------------------------ seeding

    async def seed(self, kinds: tuple[str, ...], namespace: str | None) -> int:
        """Read back the last stored message of every subject this watcher owns (headers
        only), so that unchanged workloads are not republished after a restart and those
        deleted while no watcher ran get their deletion markers. Retried while NATS is away."""
        backoff = Backoff(base=0.2, cap=5.0)
        while True:
            try:
                count = 0
                for stream in {stream for _, stream, _ in seed_filters(kinds, namespace)}:
                    await self._caught_up(stream)
                for kind, stream, flt in seed_filters(kinds, namespace):
                    with bus_errors(f"read the stored state of {flt}"):
                        count += await self._seed_one(kind, stream, flt)
                return count
            except BusError as err:
                delay = backoff.next_delay()
                log.warning("cannot read the stored state yet (%r); retrying in %.1fs", err, delay)
                await asyncio.sleep(delay)
                await self.bus.connected_event.wait()

    async def _caught_up(self, stream: str) -> None:
        """Wait (a bounded time) until `stream` has copied everything from CEDAR_HISTORY:
        what this watcher's predecessor stored just before it stopped may not be there yet.
        Reading too early is safe, only wasteful: an unchanged workload read as missing is
        published again, and the history's duplicate window drops it."""
        with bus_errors(f"read the sourcing state of {stream}"):
            await wait_for_copies(self.bus.js, stream, within=self.seed_wait)

    async def _seed_one(self, kind: str, stream: str, flt: str) -> int:
        js = self.bus.js
        sub = await js.pull_subscribe(
            flt,
            stream=stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                ack_policy=AckPolicy.NONE,
                headers_only=True,
                filter_subject=flt,
                inactive_threshold=60.0,
                mem_storage=True,
            ),
        )
        count = 0
        try:
            remaining = (await sub.consumer_info()).num_pending or 0
            while remaining > 0:
                msgs = await sub.fetch(min(remaining, 1000), timeout=5)
                for msg in msgs:
                    headers = msg.headers or {}
                    digest = headers.get(HEADER_DIGEST, "")
                    self.outbox.seed(
                        msg.subject,
                        StoredRecord(
                            kind=kind,
                            uid=headers.get(HEADER_UID, ""),
                            digest=digest,
                            deleted=digest == DELETED_DIGEST,
                        ),
                    )
                    count += 1
                    remaining = msg.metadata.num_pending or 0
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return count

    # ------------------------------------------------------------ publishing

    async def run(self) -> None:
        """Publish forever; cancel to stop (after `flush`)."""
        loop = asyncio.get_running_loop()
        next_sweep = 0.0
        while True:
            now = loop.time()
            if now >= next_sweep:  # not per batch: it walks everything in flight
                self._sweep(now)
                self._update_gauge()
                next_sweep = now + 0.2
            if not self.bus.connected:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.bus.connected_event.wait(), 1.0)
                continue
            if self._duplicates:
                await self._check_duplicates()
            room = self.max_inflight - len(self.outbox.inflight)
            batch = self.outbox.take(room) if room > 0 else []
            if not batch:
                if not self.outbox:
                    self._idle.set()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)
                continue
            self._idle.clear()
            await self._send(batch, loop)
            if self._failures:
                await asyncio.sleep(self._backoff.next_delay())
            else:
                # Let acks and new events in between batches.
                await asyncio.sleep(0)

    async def _send(self, batch: list[Outgoing], loop: asyncio.AbstractEventLoop) -> None:
        nc = self.bus.nc
        for index, out in enumerate(batch):
            if out.subject in self.outbox.uncertain:
                try:
                    if await self._already_stored(out):
                        self.outbox.ack(out)
                        _DUPLICATE.inc()
                        continue
                except BusError:
                    self._give_back(batch[index:])
                    return
            headers = out.headers
            if out.ttl is not None:
                headers[HEADER_TTL] = str(int(out.ttl))
            try:
                token, future = await self._acks.publish(nc, out.subject, out.body, headers)
            except (BusError, OSError) as err:
                log.debug("publish failed: %r", err)
                self._give_back(batch[index:])
                return
            self._deadlines[out.subject] = (loop.time() + self.ack_timeout, token, future)
            future.add_done_callback(partial(self._done, out))

    def _give_back(self, outs: list[Outgoing]) -> None:
        self._failures += 1
        for out in reversed(outs):
            self.outbox.fail(out, uncertain=True)
            _ERROR.inc()

    async def _last_stored(self, subject: str) -> RawStreamMsg | None:
        """The subject's last stored message; None if it has none."""
        with bus_errors(f"read the last message of {subject}"):
            try:
                # The history takes the writes; the last-value streams may lag behind it.
                return await self.bus.js.get_last_msg(subjects.STREAM_HISTORY, subject)
            except NotFoundError:
                return None

    async def _already_stored(self, out: Outgoing) -> bool:
        msg = await self._last_stored(out.subject)
        return bool(
            msg is not None and msg.headers and msg.headers.get(HEADER_MSG_ID) == out.msg_id
        )

    def _done(self, out: Outgoing, future: asyncio.Future[bool]) -> None:
        entry = self._deadlines.get(out.subject)
        if entry is not None and entry[2] is future:
            del self._deadlines[out.subject]
            self._acks.forget(entry[1])
        if future.cancelled():
            self.outbox.fail(out, uncertain=True)  # timed out: maybe stored, maybe not
            self._failures += 1
            _ERROR.inc()
        elif (err := future.exception()) is not None:
            # Refused by JetStream: surely not stored. Anything else: maybe stored.
            uncertain = not isinstance(err, BusError) or isinstance(err, BusUnavailable)
            self.outbox.fail(out, uncertain=uncertain)
            self._failures += 1
            _ERROR.inc()
            if self._failures in (1, 10, 100) or self._failures % 1000 == 0:
                log.warning(
                    "JetStream refused %s (%r); retrying",
                    out.identity,
                    err,
                    extra={"subject": out.subject, "failures": self._failures},
                )
        else:
            if future.result():
                self._duplicates.append(out)  # stays in flight until checked
                self._wake.set()
                return
            self.outbox.ack(out)
            _STORED.inc()
            if out.seen:
                metrics.EVENT_TO_STORED.observe(max(time.time() - out.seen, 0.0))
            if self._failures:
                self._failures = 0
                self._backoff.reset()
        self._wake.set()

    async def _check_duplicates(self) -> None:
        """A duplicate ack means a message with this Msg-Id was stored within the window. If
        the subject's last message is not it, the change was hidden (the same content was
        stored, replaced, and is wanted again): publish it again under an id salted with the
        sequence of the message it replaces, which every replica computes alike."""
        outs, self._duplicates = self._duplicates, []
        for index, out in enumerate(outs):
            try:
                msg = await self._last_stored(out.subject)
            except BusError:
                self._duplicates.extend(outs[index:])
                return
            if msg is not None and msg.headers and msg.headers.get(HEADER_MSG_ID) == out.msg_id:
                self.outbox.ack(out)
                _DUPLICATE.inc()
                continue
            seq = "" if msg is None else str(msg.seq)
            salted = replace(out, msg_id=_salt(out.msg_id, seq))
            self.outbox.fail(out, uncertain=False)
            self.outbox.resubmit(out, salted)

    def _sweep(self, now: float) -> None:
        expired = [f for deadline, _, f in self._deadlines.values() if deadline <= now]
        for future in expired:
            future.cancel()

    def _update_gauge(self) -> None:
        metrics.PENDING_PUBLISHES.set(len(self.outbox))

    async def flush(self, grace: float) -> bool:
        """Wait until nothing is pending or in flight (True), or `grace` seconds pass (False)."""
        deadline = asyncio.get_running_loop().time() + grace
        while self.outbox:
            self._wake.set()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), min(remaining, 0.2))
        return True
