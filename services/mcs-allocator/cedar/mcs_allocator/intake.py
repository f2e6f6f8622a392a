"""Namespace events in: the shared durable consumer `mcs-allocator`, or a core NATS subject.

An event from the durable consumer is acked only once its namespace agrees with the ledger
(or nothing was to be done); a transient failure naks it with a delay, so it comes back.
Several events are handled at once (CEDAR_MCS_MAX_IN_FLIGHT); the handler takes one at a
time per namespace name.

I/O: the stream CEDAR_NAMESPACES and core NATS through nats-py and cedar.runtime.bus; its
errors are turned into `BusError` (`cedar.runtime.bus.bus_errors`) before they are caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from cedar.mcs_allocator.decide import NsObject
from cedar.mcs_allocator.handler import RETRY_DELAY, Handler
from cedar.mcs_allocator.metrics import BAD_EVENTS
from cedar.mcs_allocator.schedule import sleep_or_stop
from cedar.mcs_allocator.settings import AllocatorSettings
from cedar.proto import subjects
from cedar.proto.models import NamespaceEvent
from cedar.runtime.backoff import Backoff
from cedar.runtime.bus import bus_errors
from cedar.runtime.errors import BusError, KubeError
from cedar.runtime.service import Runtime

log = logging.getLogger("cedar.mcs_allocator")


class _DurableEvents:
    """The pull subscription to the shared durable consumer, made on first use."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.sub: JetStreamContext.PullSubscription | None = None

    async def fetch(self, batch: int, wait: float) -> list[Msg] | None:
        """Up to `batch` events; None when none came within `wait` seconds."""
        with bus_errors("fetch namespace events"):
            try:
                if self.sub is None:
                    self.sub = await self.js.pull_subscribe(
                        f"{subjects.NAMESPACES_PREFIX}.>",
                        durable=subjects.ALLOCATOR_DURABLE,
                        stream=subjects.STREAM_NAMESPACES,
                        config=ConsumerConfig(
                            durable_name=subjects.ALLOCATOR_DURABLE,
                            ack_policy=AckPolicy.EXPLICIT,
                            deliver_policy=DeliverPolicy.ALL,
                            ack_wait=60,
                            max_ack_pending=4096,
                            max_deliver=-1,
                        ),
                    )
                # An empty fetch is a timeout; nats-py raises its own TimeoutError or, now and
                # then, the builtin one (seen in the soak) — both mean "no events", not an outage.
                return await self.sub.fetch(batch=batch, timeout=wait)
            except TimeoutError:
                return None

    async def close(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None


async def consume(rt: Runtime[AllocatorSettings], handler: Handler) -> None:
    """The shared durable consumer: ack after the work is done, nak with delay if not."""
    settings = rt.settings
    tasks: set[asyncio.Task[None]] = set()

    async def process(msg: Msg) -> None:
        try:
            try:
                event = NamespaceEvent.model_validate_json(msg.data)
            except ValidationError as err:
                BAD_EVENTS.inc()
                log.error("undecodable namespace event on %s: %s", msg.subject, err)
                with bus_errors("refuse a namespace event"):
                    await msg.term()
                return
            try:
                delay = await handler.handle(NsObject.from_event(event))
            except (KubeError, BusError) as err:
                log.warning("namespace %s: %s; will retry", event.name, err)
                delay = RETRY_DELAY
            with bus_errors("acknowledge a namespace event"):
                if delay is None:
                    await msg.ack()
                else:
                    await msg.nak(delay=delay)
        except BusError as err:
            log.debug("cannot ack (%s); the event will be redelivered", err)

    backoff = Backoff(base=0.2, cap=5.0)
    behind = True
    events = _DurableEvents(rt.bus.js)
    while not rt.stop.is_set():
        room = settings.mcs_max_in_flight - len(tasks)
        if room <= 0:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            continue
        # A batch long-poll waits for the whole batch (or the timeout) once the stream is
        # drained, which would hold a lone event back; ask for one until we are behind.
        want = room if behind else 1
        try:
            msgs = await events.fetch(want, 0.02 if behind else 1.0)
        except BusError as err:
            log.warning("cannot fetch namespace events (%s); retrying", err)
            if backoff.attempts > 3:
                await events.close()
            await sleep_or_stop(rt.stop, backoff.next_delay())
            continue
        if msgs is None:
            behind = False
            continue
        behind = len(msgs) >= want
        backoff.reset()
        for msg in msgs:
            task = asyncio.create_task(process(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    # Finish what is in flight; anything unfinished is redelivered after ack_wait.
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    await events.close()


async def from_subject(rt: Runtime[AllocatorSettings], handler: Handler, subject: str) -> None:
    """Decisions for events published to `subject` (e.g. `cedar replay`), not the stream."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        await queue.put(msg.data)

    with bus_errors(f"subscribe to {subject}"):
        sub = await rt.bus.nc.subscribe(subject, cb=on_msg)
    log.info("taking namespace events from %s", subject)
    try:
        while not rt.stop.is_set():
            try:
                data = await asyncio.wait_for(queue.get(), 1.0)
            except TimeoutError:
                continue
            try:
                event = NamespaceEvent.model_validate_json(data)
            except ValidationError as err:
                BAD_EVENTS.inc()
                log.warning("not a namespace event on %s: %s", subject, err)
                continue
            await handler.handle(NsObject.from_event(event))
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
