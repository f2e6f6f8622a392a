"""A list-and-watch cache of one kind of Kubernetes object, keeping only what a caller needs.

`Reflector` lists (paginated), then watches from the list's resourceVersion; on `410 Gone`
or a broken stream it lists again and reports what changed in the gap, so the cache always
ends up equal to the API. Failures back off with jitter, never sooner than the server's
Retry-After; a first 410 lists again at once, 410 after 410 with nothing in between backs
off; a watch that sent nothing for the client's idle timeout is renewed from where it was.
Each object is reduced by the caller's `keep` function to the few fields it needs (or
dropped: None), so a cache of 10,000 pods holds 10,000 small tuples, not 10,000 pod
manifests. Changes are reported to `on_change(key, old, new)` synchronously, in the order
they arrive.

I/O: the Kubernetes API through cedar.runtime.kube (errors arrive as `KubeError`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from cedar.mcs_allocator.schedule import sleep_or_stop
from cedar.runtime.backoff import Backoff, after
from cedar.runtime.kube import JSON, Gone, KubeClient, KubeError, Stalled, Unavailable

log = logging.getLogger("cedar.mcs_allocator.kubewatch")

T = TypeVar("T")

WATCH_TIMEOUT = 300


def object_key(obj: JSON) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace")
    name = str(meta.get("name", ""))
    return f"{namespace}/{name}" if namespace else name


class Reflector(Generic[T]):
    def __init__(
        self,
        client: KubeClient,
        path: str,
        keep: Callable[[JSON], T | None],
        *,
        what: str,
        on_change: Callable[[str, T | None, T | None], None] | None = None,
        params: dict[str, str] | None = None,
        watch_timeout: int = WATCH_TIMEOUT,
    ) -> None:
        self.client = client
        self.path = path
        self.keep = keep
        self.what = what
        self.on_change = on_change
        self.params = dict(params or {})
        self.watch_timeout = watch_timeout
        self.items: dict[str, T] = {}
        self.synced = asyncio.Event()
        self.relists = 0

    def put(self, key: str, new: T | None) -> None:
        """Store (None: drop) one entry, reporting the change; a no-op when equal."""
        old = self.items.get(key)
        if new is None:
            if key not in self.items:
                return
            del self.items[key]
        else:
            if old == new:
                return
            self.items[key] = new
        if self.on_change is not None:
            self.on_change(key, old, new)

    async def _list(self) -> str:
        seen: dict[str, T] = {}
        rv = ""
        async for page, list_rv in self.client.list_pages(self.path, params=self.params):
            rv = list_rv
            for obj in page:
                kept = self.keep(obj)
                if kept is not None:
                    seen[object_key(obj)] = kept
        for key in [k for k in self.items if k not in seen]:
            self.put(key, None)
        for key, kept in seen.items():
            self.put(key, kept)
        self.relists += 1
        self.synced.set()
        return rv

    async def run(self, stop: asyncio.Event) -> None:
        """List and watch until `stop`; API failures are logged and retried with backoff."""
        backoff = Backoff(base=0.2, cap=10.0)
        expired = Backoff(base=2.0, cap=30.0, floor=0.5)
        expired_in_a_row = 0
        while not stop.is_set():
            delivered = False  # whether a watch since the last list sent anything
            try:
                rv = await self._list()
                backoff.reset()
                while not stop.is_set():
                    try:
                        async for event in self.client.watch(
                            self.path, rv, timeout_seconds=self.watch_timeout, params=self.params
                        ):
                            delivered = True
                            rv = self._apply(event, rv)
                            if stop.is_set():
                                return
                    except Stalled as err:
                        log.warning("%s: %s; watching again from %s", self.what, err, rv)
                    if delivered:
                        expired_in_a_row = 0
                        expired.reset()
            except Gone:
                if delivered:
                    expired_in_a_row = 0
                    expired.reset()
                expired_in_a_row += 1
                delay = expired.next_delay() if expired_in_a_row > 1 else 0.0
                log.info("%s: watch expired (410); listing again in %.1fs", self.what, delay)
                await sleep_or_stop(stop, delay)
            except KubeError as err:
                retry_after = err.retry_after if isinstance(err, Unavailable) else None
                delay = after(backoff.next_delay(), retry_after)
                log.warning("%s: list/watch failed (%s); retrying in %.1fs", self.what, err, delay)
                await sleep_or_stop(stop, delay)

    def _apply(self, event: JSON, rv: str) -> str:
        """Apply one watch event; the resourceVersion to resume from."""
        obj = event.get("object") or {}
        kind = event.get("type")
        rv = str((obj.get("metadata") or {}).get("resourceVersion", rv))
        if kind in ("ADDED", "MODIFIED"):
            self.put(object_key(obj), self.keep(obj))
        elif kind == "DELETED":
            self.put(object_key(obj), None)
        return rv
