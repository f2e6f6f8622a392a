"""`sources_caught_up` against the states a source reports, in the order a real
nats-server 2.15 reported them (tests/chaos/test_history_sourcing.py runs it for real)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from nats.js import JetStreamContext

from cedar.runtime.sourcing import sources_caught_up

MS = 1_000_000  # `active` is in nanoseconds


def state(active: int, lag: int, error: Any = None) -> SimpleNamespace:
    return SimpleNamespace(sources=[SimpleNamespace(active=active, lag=lag, error=error)])


class Stream:
    """`stream_info` answers with `states` in turn, then the last one again."""

    def __init__(self, *states: SimpleNamespace) -> None:
        self.states = list(states)
        self.calls = 0

    async def stream_info(self, name: str) -> SimpleNamespace:
        self.calls += 1
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    @property
    def js(self) -> JetStreamContext:
        return cast(JetStreamContext, self)


async def test_lag_zero_counts_only_once_the_source_heard_from_its_origin_after_it() -> None:
    stream = Stream(
        state(-1, 0),  # its consumer does not run yet
        state(1 * MS, 0),  # just started, first batch not in: lag 0 all the same
        state(0, 1500),  # the first batch says how far behind it is
        state(5 * MS, 0),  # copied; seen once
        state(950 * MS, 0),  # nothing heard since: not proof
        state(0, 0),  # the idle heartbeat, after lag 0 was seen: caught up
    )
    assert await sources_caught_up(stream.js, "COPY", within=10, poll=0.01)
    assert stream.calls == 6


async def test_a_source_in_error_or_never_heard_from_again_is_not_caught_up() -> None:
    missing = Stream(state(-1, 0, error={"code": 404, "description": "stream not found"}))
    assert not await sources_caught_up(missing.js, "COPY", within=0.2, poll=0.01)
    silent = Stream(state(900 * MS, 0))
    assert not await sources_caught_up(silent.js, "COPY", within=0.2, poll=0.01)


async def test_a_stream_without_sources_has_caught_up_at_once() -> None:
    stream = Stream(SimpleNamespace(sources=None))
    assert await sources_caught_up(stream.js, "HISTORY", within=0)
    assert stream.calls == 1
