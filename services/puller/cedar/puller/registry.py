"""Is a registry answering? A `/v2/` probe with a short cache and a per-registry breaker.

Any HTTP answer below 500 counts as up (401 is a registry asking for credentials). While a
registry is down its breaker is open: pulls from it are not started at all, and the probe
is retried with a growing interval capped at the cache TTL, so that pulls resume by
themselves shortly after it comes back, without one timeout per image meanwhile.
I/O: HTTP GET of registries' `/v2/` through aiohttp, and the cedar_puller_registry_up gauge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import aiohttp

from cedar.puller.metrics import REGISTRY_UP

log = logging.getLogger("cedar.puller.registry")

ALWAYS_INSECURE = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class _State:
    up: bool | None = None
    checked_at: float = 0.0
    failures: int = 0
    retry_at: float = 0.0
    reason: str = ""


def probe_url(api_host: str, insecure_hosts: Collection[str] = ()) -> str:
    host = api_host.rsplit(":", 1)[0] if not api_host.endswith("]") else api_host
    if host in ALWAYS_INSECURE or api_host in insecure_hosts or host in insecure_hosts:
        return f"http://{api_host}/v2/"
    return f"https://{api_host}/v2/"


class RegistryProbe:
    def __init__(
        self,
        *,
        ttl: float,
        timeout: float,
        insecure_hosts: Collection[str] = (),
        clock: Callable[[], float] = time.monotonic,
        min_retry: float = 0.5,
    ) -> None:
        self.ttl = ttl
        self.timeout = timeout
        self.insecure_hosts = tuple(insecure_hosts)
        self.clock = clock
        self.min_retry = min_retry
        self._states: dict[str, _State] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None
        self.probes = 0  # for tests: how many /v2/ requests were made

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def open_breakers(self) -> set[str]:
        """Registries known down whose next probe is not due yet: do not start their pulls."""
        now = self.clock()
        return {r for r, s in self._states.items() if s.up is False and s.retry_at > now}

    def known_down(self, registry: str) -> bool:
        state = self._states.get(registry)
        return state is not None and state.up is False

    def next_retry(self) -> float | None:
        times = [s.retry_at for s in self._states.values() if s.up is False]
        return min(times) if times else None

    def mark_down(self, registry: str, reason: str) -> None:
        """A pull found the registry unreachable: open the breaker without waiting for a probe."""
        self._record(registry, False, reason)

    async def is_up(self, registry: str, api_host: str) -> bool:
        state = self._states.get(registry)
        now = self.clock()
        if state is not None and state.up is not None:
            if state.up and now - state.checked_at < self.ttl:
                return True
            if not state.up and now < state.retry_at:
                return False
        lock = self._locks.setdefault(registry, asyncio.Lock())
        async with lock:
            # Another task may have probed while this one waited.
            state = self._states.get(registry)
            if state is not None and state.checked_at > now:
                return bool(state.up)
            up, reason = await self._probe(api_host)
            self._record(registry, up, reason)
            return up

    def _record(self, registry: str, up: bool, reason: str) -> None:
        state = self._states.setdefault(registry, _State())
        was = state.up
        now = self.clock()
        state.up, state.checked_at, state.reason = up, now, reason
        if up:
            state.failures = 0
            state.retry_at = 0.0
        else:
            state.failures += 1
            state.retry_at = now + min(self.ttl, self.min_retry * 2.0 ** (state.failures - 1))
        REGISTRY_UP.labels(registry=registry).set(1 if up else 0)
        if was is not up:
            if up:
                log.info("registry is up", extra={"registry": registry})
            else:
                log.warning(
                    "registry is down; its pulls wait",
                    extra={"registry": registry, "reason": reason},
                )

    async def _probe(self, api_host: str) -> tuple[bool, str]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        self.probes += 1
        url = probe_url(api_host, self.insecure_hosts)
        try:
            async with self._session.get(
                url,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as resp:
                if resp.status < 500:
                    return True, ""
                return False, f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            return False, err.__class__.__name__
