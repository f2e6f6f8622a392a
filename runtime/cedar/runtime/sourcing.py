"""The last-value streams sourced from CEDAR_HISTORY: waiting until they have caught up,
and moving a cluster from the older layout, in which the history sourced them.

CEDAR_HISTORY takes the watcher's subjects and keeps every message; CEDAR_WORKLOADS and
CEDAR_NAMESPACES copy them, one per subject. Before, the last-value streams took the
subjects and the history copied from them, so a change replaced before it was copied was
never in the history (docs/reliability.md, finding 3). I/O: NATS (JetStream API).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence

from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from cedar.proto import subjects

log = logging.getLogger("cedar.bus")

LAST_VALUE_STREAMS = (subjects.STREAM_WORKLOADS, subjects.STREAM_NAMESPACES)
# How long a move waits for the old history to copy what the last-value streams hold.
CATCH_UP_WAIT = 10.0


async def sources_caught_up(
    js: JetStreamContext, stream: str, *, within: float, poll: float = 0.1
) -> bool:
    """Wait until every source of `stream` runs and has copied all its origin holds (at
    most `within` seconds); whether it did. A stream without sources has.

    A source counts when it runs (`active`, the time since the source last heard from its
    origin, is -1 until its consumer runs, with `lag` 0 until then), reports no error and
    `lag` 0, and has heard from its origin since lag 0 was first seen: a consumer just
    (re)started reports lag 0 before its first batch arrives too (seen with 492 of 2,000
    messages copied, on a loaded machine). The next delivery, or the idle heartbeat the
    origin sends about every second, carries the real lag.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    zero_since: float | None = None
    while True:
        info = await js.stream_info(stream)
        now = loop.time()
        sources = info.sources or []
        if not sources:
            return True
        if all(
            s.error is None and s.active is not None and s.active >= 0 and not s.lag
            for s in sources
        ):
            if zero_since is None:
                zero_since = now
            elif all((s.active or 0) / 1e9 < now - zero_since for s in sources):
                return True
        else:
            zero_since = None
        if now >= deadline:
            return False
        await asyncio.sleep(poll)


async def wait_for_copies(js: JetStreamContext, stream: str, *, within: float) -> None:
    """`sources_caught_up`, saying so when it did not: the caller then reads `stream` as
    it is (what was stored in the history just before may be missing from it)."""
    if not await sources_caught_up(js, stream, within=within):
        log.warning(
            "%s has not caught up with %s after %.0fs; reading it as it is",
            stream,
            subjects.STREAM_HISTORY,
            within,
        )


async def move_to_history_first(js: JetStreamContext, configs: Sequence[StreamConfig]) -> bool:
    """If CEDAR_HISTORY still sources the last-value streams, turn the sourcing around
    (when `configs` holds all three streams); whether it did.

    In order: the history stops copying (after it caught up); the last-value streams give
    up their subjects and source the history from its next message on (so the messages it
    already holds, which they had, are not copied back); the caller's `ensure_stream` then
    gives the history its new subjects. Publishes in between find no stream and are
    retried by their publishers (the watcher, `cedar prepull`).
    """
    wanted = {c.name: c for c in configs}
    if not {subjects.STREAM_HISTORY, *LAST_VALUE_STREAMS} <= wanted.keys():
        return False
    try:
        history = (await js.stream_info(subjects.STREAM_HISTORY)).config
    except NotFoundError:
        return False
    if not any(s.name in LAST_VALUE_STREAMS for s in history.sources or []):
        return False
    log.warning(
        "moving the streams to the layout where %s takes the changes and %s source it",
        subjects.STREAM_HISTORY,
        ", ".join(LAST_VALUE_STREAMS),
    )
    if not await sources_caught_up(js, subjects.STREAM_HISTORY, within=CATCH_UP_WAIT):
        log.warning("%s had not caught up; moving anyway", subjects.STREAM_HISTORY)
    await js.update_stream(dataclasses.replace(history, sources=None))
    after = (await js.stream_info(subjects.STREAM_HISTORY)).state.last_seq
    for name in LAST_VALUE_STREAMS:
        config = wanted[name]
        sources = [dataclasses.replace(s, opt_start_seq=after + 1) for s in config.sources or []]
        await js.update_stream(dataclasses.replace(config, sources=sources))
    return True
