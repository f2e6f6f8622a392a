"""The prune clocks: when each in-scope image stopped being desired, kept across restarts.

I/O: this node's keys of KV cedar-puller-state (`<node token>.<image-id key>`, value
`{"id": ..., "since": unix-seconds}`), through cedar.runtime.bus. A failed write is
dropped (the clock is written again at the next change); in dry-run nothing is written.
"""

from __future__ import annotations

import contextlib
import json
import logging

from nats.js.kv import KeyValue

from cedar.proto import subjects
from cedar.runtime.bus import BusError, bus_errors

log = logging.getLogger("cedar.puller")


class PruneClocks:
    """Image id -> when it stopped being desired, in memory and in KV."""

    def __init__(self, node: str, kv: KeyValue, *, dry_run: bool) -> None:
        self.node = node
        self.kv = kv
        self.dry_run = dry_run
        self.since: dict[str, float] = {}

    def _key(self, image_id: str) -> str:
        return f"{subjects.token(self.node)}.{subjects.image_key(image_id)}"

    async def load(self) -> None:
        """Read this node's clocks back (after a restart)."""
        with bus_errors("load the prune bookkeeping"):
            watcher = await self.kv.watch(f"{subjects.token(self.node)}.>", ignore_deletes=True)
            try:
                async for entry in watcher:
                    if entry is None:
                        break
                    try:
                        data = json.loads(entry.value or b"{}")
                        self.since[str(data["id"])] = float(data["since"])
                    except (ValueError, KeyError, TypeError):
                        continue
            finally:
                await watcher.stop()  # type: ignore[no-untyped-call]
        log.info("prune bookkeeping loaded", extra={"tracked": len(self.since)})

    async def track(self, image_id: str, since: float) -> None:
        self.since[image_id] = since
        if self.dry_run:
            return
        body = json.dumps({"id": image_id, "since": since}).encode()
        with contextlib.suppress(BusError), bus_errors("write a prune clock"):
            await self.kv.put(self._key(image_id), body)

    async def forget(self, image_id: str) -> None:
        self.since.pop(image_id, None)
        if self.dry_run:
            return
        with contextlib.suppress(BusError), bus_errors("delete a prune clock"):
            await self.kv.delete(self._key(image_id))
