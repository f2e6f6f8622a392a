"""What the puller tells others: per-image status in KV, decisions on the bus, metrics.

I/O: KV cedar-node-status and the subject cedar.decisions.<node>, through
cedar.runtime.bus (nats-py's errors arrive as BusError); the cedar_puller_images gauges.
Status entries (`cedar-node-status`, key `node_status_key(node, image)`) are written only
when an image's state, digest or reason changes, so a steady node costs no KV writes.
Publishing never blocks the puller on NATS: a failed write is retried at the next reconcile,
and while the connection is down nothing is sent at all (a JetStream publish would wait for
its acknowledgement's timeout, seconds per write, holding up reconciles and pulls).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from cedar.proto import subjects
from cedar.proto.models import NodeImageStatus, PullerDecision
from cedar.puller.metrics import IMAGES
from cedar.puller.plan import ImageRecord
from cedar.runtime.bus import BusError, bus_errors

log = logging.getLogger("cedar.puller.status")
decisions_log = logging.getLogger("cedar.puller.decisions")

_PUBLISH_ERRORS = (BusError, RuntimeError)


def now_utc() -> datetime:
    return datetime.now(UTC)


class StatusPublisher:
    def __init__(
        self,
        node: str,
        js: JetStreamContext,
        kv: KeyValue,
        *,
        dry_run: bool = False,
        connected: Callable[[], bool] = lambda: True,
    ) -> None:
        self.node = node
        self.js = js
        self.kv = kv
        self.dry_run = dry_run
        self.connected = connected  # False while NATS is away: writes wait for the next pass
        self._published: dict[str, tuple[str, str | None, str | None]] = {}
        self.decisions: list[PullerDecision] = []  # kept only in dry-run, for inspection

    async def publish_image(self, record: ImageRecord, workloads: tuple[str, ...]) -> None:
        if self.dry_run:
            return
        fingerprint = (record.state, record.digest, record.reason)
        if self._published.get(record.image) == fingerprint or not self.connected():
            return
        status = NodeImageStatus(
            node=self.node,
            image=record.image,
            state=record.state,
            digest=record.digest,
            reason=record.reason,
            error=record.error,
            workloads=workloads,
            updated_at=now_utc(),
        )
        try:
            with bus_errors("write image status"):
                await self.kv.put(
                    subjects.node_status_key(self.node, record.image),
                    status.model_dump_json().encode(),
                )
        except _PUBLISH_ERRORS as err:
            log.debug("cannot write image status yet: %s", err)
            return
        self._published[record.image] = fingerprint

    async def forget_image(self, image: str) -> bool:
        """Delete the image's status key; False when it is not done (retry later)."""
        if self.dry_run:
            return True
        if not self.connected():
            return False
        try:
            with bus_errors("delete image status"):
                await self.kv.delete(subjects.node_status_key(self.node, image))
        except _PUBLISH_ERRORS as err:
            log.debug("cannot delete image status yet: %s", err)
            return False
        self._published.pop(image, None)
        return True

    async def stored_images(self) -> set[str] | None:
        """The images this node has a status key for in KV now, an earlier run's included
        (None when NATS cannot say)."""
        if self.dry_run:
            return set()
        if not self.connected():
            return None
        found: set[str] = set()
        try:
            with bus_errors("list this node's image status"):
                watcher = await self.kv.watch(f"{subjects.token(self.node)}.>", ignore_deletes=True)
                try:
                    async for entry in watcher:
                        if entry is None:
                            break
                        try:
                            found.add(NodeImageStatus.model_validate_json(entry.value or b"").image)
                        except ValueError:
                            log.warning("unreadable image status in KV", extra={"key": entry.key})
                finally:
                    await watcher.stop()  # type: ignore[no-untyped-call]
        except _PUBLISH_ERRORS as err:
            log.debug("cannot list this node's image status yet: %s", err)
            return None
        return found

    async def decision(
        self,
        image: str,
        action: str,
        reason: str = "",
        *,
        workloads: tuple[str, ...] = (),
        digest: str | None = None,
    ) -> None:
        record = PullerDecision(
            node=self.node,
            image=image,
            action=action,  # type: ignore[arg-type]
            reason=reason,
            workloads=workloads,
            digest=digest,
            dry_run=self.dry_run,
            at=now_utc(),
        )
        level = logging.INFO if action != "failed" else logging.WARNING
        decisions_log.log(
            level,
            "%s%s %s",
            "would " if self.dry_run else "",
            action,
            image,
            extra={"action": action, "image": image, "reason": reason, "digest": digest},
        )
        if self.dry_run:
            self.decisions.append(record)
        if not self.connected():
            return  # logged above; the history misses it, as it would a failed publish
        try:
            with bus_errors("publish a decision"):
                await self.js.publish(
                    subjects.decisions_subject(self.node), record.model_dump_json().encode()
                )
        except _PUBLISH_ERRORS as err:
            log.debug("cannot publish decision: %s", err)


def export_metrics(records: Iterable[ImageRecord], desired_count: int) -> dict[str, int]:
    counts = Counter(r.state for r in records)
    values = {
        "desired": desired_count,
        "present": counts["present"],
        "missing": counts["missing"],
        "pulling": counts["pulling"],
        "failed": counts["failed"],
    }
    for state, value in values.items():
        IMAGES.labels(state=state).set(value)
    return values
