"""Waiting that a stop cuts short, and work repeated on a jittered schedule.

Touches nothing itself: the work it repeats does its own I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

from cedar.runtime.errors import BusError, KubeError

log = logging.getLogger("cedar.mcs_allocator")


async def sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)


async def periodic(
    stop: asyncio.Event, interval: float, fn: Callable[[], Awaitable[object]], jitter: float
) -> None:
    """Run `fn` every `interval` seconds (± `jitter`/2 of it) until `stop`; a NATS or API
    failure is logged and the next run goes ahead as scheduled."""
    while not stop.is_set():
        await sleep_or_stop(stop, interval * (1 + jitter * (random.random() - 0.5)))
        if stop.is_set():
            return
        try:
            await fn()
        except (KubeError, BusError) as err:
            log.warning("periodic task failed (%s); next run as scheduled", err)
