"""An empty fetch of the allocator's durable consumer is "no events", whichever TimeoutError
nats-py raises for it (its own, or the builtin one, seen in the soak), never an outage."""

from __future__ import annotations

from typing import Any

import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from cedar.mcs_allocator.intake import _DurableEvents


class _Subscription:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def fetch(self, batch: int, timeout: float) -> Any:  # noqa: ASYNC109 - nats-py's signature
        raise self.error


@pytest.mark.parametrize("error", [NatsTimeoutError(), TimeoutError()])
async def test_an_empty_fetch_is_no_events(error: BaseException) -> None:
    events = _DurableEvents(js=None)  # type: ignore[arg-type]
    events.sub = _Subscription(error)  # type: ignore[assignment]
    assert await events.fetch(batch=10, wait=0.1) is None
