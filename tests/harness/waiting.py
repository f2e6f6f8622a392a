"""Waiting for a condition in integration tests: poll with a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import pytest


async def eventually(
    probe: Callable[[], Any | Awaitable[Any]],
    within: float = 15.0,
    what: str = "condition",
    *,
    ignore: tuple[type[BaseException], ...] = (),
    details: Callable[[], str] | None = None,
    interval: float = 0.05,
) -> Any:
    """Poll `probe` (sync or async) until it returns something truthy, and return that.

    Exceptions of the `ignore` types count as "not yet". After `within` seconds the test
    fails, naming `what`, the last value seen and, if given, `details()` (e.g. a log tail).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: Any = None
    while True:
        try:
            last = probe()
            if inspect.isawaitable(last):
                last = await last
        except ignore:
            last = None
        if last:
            return last
        if loop.time() > deadline:
            extra = f"\n{details()[-4000:]}" if details is not None else ""
            pytest.fail(f"gave up after {within}s waiting for {what} (last value {last!r}){extra}")
        await asyncio.sleep(interval)
