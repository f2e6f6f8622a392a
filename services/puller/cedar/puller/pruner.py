"""The prune pass: track in-scope images nobody wants, and remove those undesired too long.

I/O: the image engine (list the images containers use, remove an image without force),
the prune clocks in KV cedar-puller-state (prune_state.py) and `prune` decisions
(status.py). What may go is decided by the pure rules of prune.py.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import timedelta

from cedar.puller import metrics
from cedar.puller.desired import DesiredSet
from cedar.puller.engine import ImageEngine
from cedar.puller.errors import EngineError
from cedar.puller.prune import LocalImage, Scope, decide, is_desired
from cedar.puller.prune_state import PruneClocks
from cedar.puller.status import StatusPublisher

log = logging.getLogger("cedar.puller")


class Pruner:
    def __init__(
        self,
        *,
        scope: Scope,
        desired: DesiredSet,
        engine: ImageEngine,
        clocks: PruneClocks,
        status: StatusPublisher,
        prune_after: timedelta,
        prune_interval: timedelta,
    ) -> None:
        self.scope = scope
        self.desired = desired
        self.engine = engine
        self.clocks = clocks
        self.status = status
        self.prune_after = prune_after
        self.prune_interval = prune_interval
        self.due = 0.0  # wall time of the next prune: the first comes once the set is loaded

    def next_due(self, now: float, wall: float) -> float | None:
        """The monotonic time of the next prune, or None when nothing is ever pruned."""
        if self.scope.empty:
            return None
        return now + max(0.0, self.due - wall)

    async def track_and_prune(
        self, local: list[LocalImage], in_flight: Collection[str], wall: float
    ) -> None:
        """Update the clocks from the engine's listing `local`; prune if it is time."""
        if self.scope.empty:
            return
        desired = set(self.desired.images()) | set(in_flight)
        prune_now = wall >= self.due
        used: set[str] = set()
        if prune_now:
            used = await self.engine.used_image_ids()
        decision = decide(
            local,
            desired,
            self.clocks.since,
            used,
            scope=self.scope,
            now=wall,
            prune_after=self.prune_after.total_seconds() if prune_now else float("inf"),
        )
        for image_id, since in decision.track.items():
            await self.clocks.track(image_id, since)
        for image_id in decision.forget:
            await self.clocks.forget(image_id)
        if not prune_now:
            return
        self.due = wall + self.prune_interval.total_seconds()
        for image in decision.remove:
            name = image.repo_tags[0] if image.repo_tags else image.id
            if is_desired(image, set(self.desired.images())):
                continue  # wanted again by an event that arrived during this pass
            try:
                await self.engine.remove(image)
            except EngineError as err:
                # The engine refuses to remove an image a container uses: keep it.
                log.info("not pruned", extra={"image": name, "reason": err.message})
                continue
            metrics.PRUNED.inc()
            await self.clocks.forget(image.id)
            await self.status.decision(name, "prune", f"undesired for {self.prune_after}")
