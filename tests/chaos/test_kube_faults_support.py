"""Shared parts of the Kubernetes API fault tests (no tests here): injecting each fault kind
into the simulated API, and reading what a client did during it from the API's request log.

A fault kind is one of `KINDS`. "crash" and "restart" take the server down (connections
reset, or watches ended cleanly) for `down` seconds and bring it back with the same state;
the others are the simulator's fault modes, narrowed to the clients under test, with the
open watches ended at the start so that they are opened again into the fault.

What a client did is counted in attempts (`attempts`): the requests its code made, not the
arrivals, which for a reset are two per attempt (aiohttp's re-send).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import pytest

from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.kubeapi_controls import Request, peak_rate

T = TypeVar("T")

KINDS = ("crash", "restart", "expire", "throttle", "fail", "reset", "stall")
# Each caller meets every kind in `make long-tests`; `make test` keeps its time budget with
# a share of them per caller, every kind met by at least one service.
MAKE_TEST_KINDS = {
    "watcher": ("crash", "expire", "stall"),
    "allocator": ("throttle", "fail", "reset"),
    "puller": ("restart", "throttle"),
}
FAULT_SECONDS = 3.0
# Attempts (`attempts`) the fault answered in any one second, per caller (a verb on one
# object or one collection). A hot loop would be tens or hundreds. A client's shared
# push-back (cedar.runtime.backoff.Pushback, as KubeClient makes it: Backoff(base=0.5,
# floor=0.5)) holds every request at least 0.25 s after a first failure, then 0.5 s, 1 s,
# 2 s, ... with one probe at a time: at most three attempts in a fault's first second (the
# one that failed first and two probes), one a second after; one more for a request that
# was already on its way when the fault began.
MAX_PER_CALLER_PER_SECOND = 4
# What the services under test get, so that a stall is seen within a test's budget: the
# simulated API sends bookmarks every BOOKMARK_INTERVAL, well inside the watch idle timeout
# (as the real API's ~60 s bookmarks are inside the 90 s default).
BOOKMARK_INTERVAL = 0.5
READ_TIMEOUT = 1.5
WATCH_IDLE_TIMEOUT = 2.5
ENV = {
    "CEDAR_KUBE_READ_TIMEOUT": str(READ_TIMEOUT),
    "CEDAR_KUBE_WATCH_IDLE_TIMEOUT": str(WATCH_IDLE_TIMEOUT),
}
RETRY_AFTER = 2
# Requests that reach the server this close together are one wave (sent before the client
# could have read the previous answer).
WAVE_GAP = 0.25
# aiohttp sends an idempotent request (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) once more,
# at once, when its connection drops before an answer (RFC 9112 9.3.1; aiohttp/client.py,
# ClientSession._request: `retry_persistent_connection`, IDEMPOTENT_METHODS, on
# ClientOSError or ServerDisconnectedError, on a fresh connection as on a pooled one). There
# is no public switch: only aiohttp's test client sets `_retry_connection`, kept private on
# purpose (aio-libs/aiohttp#9396). So a reset GET reaches the server twice, the second copy
# 0.5-13 ms after the first in these tests; a PATCH or a POST once. The verbs sent so:
RESENT_VERBS = frozenset({"get", "list", "watch", "update", "delete"})
# An arrival this soon after a reset one, from the same client for the same verb and object,
# is aiohttp's re-send: several times the re-send's delay, and below the push-back's
# shortest hold after a failure (0.25 s, see MAX_PER_CALLER_PER_SECOND), so that no attempt
# Cedar's code makes after it has seen the reset can be taken for one.
RESEND_GAP = 0.1


@dataclass
class Window:
    """A fault's span (time.monotonic) and what the client under test sent in it."""

    kind: str
    start: float
    end: float
    requests: list[Request]

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def peak(self) -> int:
        """The most requests in any one second."""
        return peak_rate(self.requests)

    @property
    def refused(self) -> list[Request]:
        """The requests the fault answered, as they arrived (aiohttp's re-sends too)."""
        return [r for r in self.requests if r.outcome == self.kind]

    @property
    def refused_attempts(self) -> list[Request]:
        """The client's attempts that the fault answered (`attempts`): the retries a hot
        loop would multiply."""
        return [r for r in attempts(self.requests) if r.outcome == self.kind]

    def peak_per_caller(self) -> dict[str, int]:
        """The most attempts the fault answered in any one second, per caller: a verb on
        one object (a handler's read or patch of one namespace) or on one collection (an
        informer's list or watch)."""
        by: dict[str, list[Request]] = {}
        for r in self.refused_attempts:
            target = "/".join(p for p in (r.namespace, r.name) if p)
            by.setdefault(f"{r.verb} {r.plural}{' ' + target if target else ''}", []).append(r)
        return {caller: peak_rate(rs) for caller, rs in by.items()}

    @property
    def rate(self) -> float:
        return len(self.requests) / self.seconds

    @property
    def refused_peak(self) -> int:
        """The most attempts the fault answered in any one second."""
        return peak_rate(self.refused_attempts)

    def summary(self) -> str:
        callers = ", ".join(f"{c}: {n}" for c, n in sorted(self.peak_per_caller().items()))
        return (
            f"{self.kind}: {len(self.requests)} requests in {self.seconds:.1f}s "
            f"({self.rate:.2f}/s, peak {self.peak}/s), {len(self.refused)} answered by the "
            f"fault (peak {peak_rate(self.refused)}/s) in {len(self.refused_attempts)} "
            f"attempts (peak {self.refused_peak}/s); attempts' peak per caller: "
            f"{callers or '-'}"
        )


def kinds_for(service: str) -> list[object]:
    """Every kind, those outside `make test`'s share for `service` marked long."""
    fast = MAKE_TEST_KINDS[service]
    return [k if k in fast else pytest.param(k, marks=pytest.mark.long) for k in KINDS]


def attempts(requests: Iterable[Request], gap: float = RESEND_GAP) -> list[Request]:
    """The requests without aiohttp's re-sends, oldest first: of a reset request whose verb
    is in RESENT_VERBS, the next arrival from the same client for the same verb and object,
    if it came within `gap` seconds, is the same attempt sent again and is left out (never
    itself taken as re-sent again: aiohttp re-sends once)."""
    kept: list[Request] = []
    reset_at: dict[tuple[str, str, str, str | None, str | None], float] = {}
    for request in sorted(requests, key=lambda r: r.at):
        key = (request.client, request.verb, request.plural, request.namespace, request.name)
        previous = reset_at.pop(key, None)
        if previous is not None and request.at - previous <= gap:
            continue
        kept.append(request)
        if request.outcome == "reset" and request.verb in RESENT_VERBS:
            reset_at[key] = request.at
    return kept


def waves(requests: Iterable[Request], gap: float = WAVE_GAP) -> list[list[Request]]:
    """Requests grouped into waves: arrivals less than `gap` seconds apart."""
    grouped: list[list[Request]] = []
    for request in sorted(requests, key=lambda r: r.at):
        if grouped and request.at - grouped[-1][-1].at < gap:
            grouped[-1].append(request)
        else:
            grouped.append([request])
    return grouped


def gaps_after_throttling(requests: Iterable[Request]) -> list[float]:
    """For each wave that was answered 429, the time until the client's next wave."""
    grouped = waves(requests)
    return [
        nxt[0].at - wave[-1].at
        for wave, nxt in itertools.pairwise(grouped)
        if any(r.outcome == "throttle" for r in wave)
    ]


def inject(api: KubeAPI, kind: str, clients: Iterable[str] | None) -> None:
    """Start fault `kind` (for "crash" and "restart": take the server down)."""
    if kind == "crash":
        api.stop(abrupt=True)
    elif kind == "restart":
        api.stop()
    else:
        options: dict[str, object] = {"clients": clients}
        if kind == "throttle":
            options["retry_after"] = RETRY_AFTER
        api.fault(kind, **options)  # type: ignore[arg-type]
        api.break_watches()  # the open ones end: they are opened again into the fault


def clear(api: KubeAPI, kind: str) -> None:
    if kind in ("crash", "restart"):
        api.start()
    else:
        api.clear_faults()


async def fault_window(
    api: KubeAPI,
    kind: str,
    client: str,
    seconds: float,
    during: Callable[[], Awaitable[None]] | None = None,
    *,
    narrow: bool = True,
) -> Window:
    """Inject `kind`, run `during` (changes to make while it lasts), keep it for `seconds`,
    clear it; what `client` sent meanwhile. `narrow`: the fault hits `client` only."""
    start = time.monotonic()
    await asyncio.to_thread(inject, api, kind, [client] if narrow else None)
    if during is not None:
        await during()
    await asyncio.sleep(max(0.0, start + seconds - time.monotonic()))
    end = time.monotonic()
    await asyncio.to_thread(clear, api, kind)
    return Window(kind, start, end, api.request_log(client=client, since=start, until=end))


async def settle(
    probe: Callable[[], Awaitable[bool]], within: float, what: str, why: Callable[[], str]
) -> float:
    """Poll `probe` until true; the seconds it took. Fails with `why()` after `within`."""
    start = time.monotonic()
    while not await probe():
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not within {within}s; {why()}")
        await asyncio.sleep(0.1)
    return time.monotonic() - start
