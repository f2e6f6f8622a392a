"""This node's desired image set, maintained incrementally. Pure: no I/O.

Each workload contributes its images when its pods could run on this node. The set keeps,
per image, the workloads that want it, so one event costs O(images of that workload), not
a recomputation over every workload; only a change of the node's labels or taints
re-evaluates every workload. The number of workloads wanting an image is its priority:
a new node pulls what most workloads need first.

Images whose reference the watcher could not parse are kept under their raw text, so that
they are reported (failed, invalid_reference) instead of silently dropped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import datetime

from cedar.proto.models import PodScheduling, WorkloadImageSet
from cedar.proto.scheduling import NodeInfo, mismatch


@dataclass(slots=True)
class _Workload:
    scheduling: PodScheduling
    images: frozenset[str]
    observed_at: datetime
    expires_at: datetime | None


@dataclass
class Change:
    added: dict[str, datetime] = field(default_factory=dict)  # image -> when its cause was seen
    removed: set[str] = field(default_factory=set)
    # Workloads this node newly rules out: identity -> (their images, why). Recorded as
    # `skip` decisions so that replay can answer "why was this not pulled here?".
    skipped: dict[str, tuple[frozenset[str], str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)

    def merge(self, other: Change) -> None:
        self.skipped.update(other.skipped)
        for image in other.removed:
            self.added.pop(image, None)
        self.removed -= set(other.added)
        self.removed |= other.removed
        self.added.update(other.added)


def workload_images(wis: WorkloadImageSet) -> frozenset[str]:
    # Interned: thousands of workloads naming one image share one string.
    return frozenset(sys.intern(c.reference or c.image) for c in wis.containers)


class DesiredSet:
    def __init__(self, node: NodeInfo) -> None:
        self.node = node
        self._workloads: dict[str, _Workload] = {}
        self._contrib: dict[str, frozenset[str]] = {}
        self._wanted: dict[str, set[str]] = {}
        self._expiring: set[str] = set()

    # --- queries ------------------------------------------------------------------------

    def __contains__(self, image: object) -> bool:
        return image in self._wanted

    def __len__(self) -> int:
        return len(self._wanted)

    def images(self) -> list[str]:
        return list(self._wanted)

    def priority(self, image: str) -> int:
        return len(self._wanted.get(image, ()))

    def want(self, image: str) -> float:
        """The share (0 to 1) of the workloads that could run here that use `image`: the
        chance that this node's next launch needs it, if launches are alike across them."""
        admitted = len(self._contrib)
        return len(self._wanted.get(image, ())) / admitted if admitted else 0.0

    def workloads_of(self, image: str, limit: int = 20) -> tuple[str, ...]:
        return tuple(sorted(self._wanted.get(image, ()))[:limit])

    @property
    def workload_count(self) -> int:
        return len(self._workloads)

    # --- updates ------------------------------------------------------------------------

    def apply(self, wis: WorkloadImageSet, now: datetime) -> Change:
        """Take one workload's current state (or deletion marker) into account."""
        identity = wis.identity
        if wis.deleted or (wis.expires_at is not None and wis.expires_at <= now):
            self._workloads.pop(identity, None)
            self._expiring.discard(identity)
            return self._set_contribution(identity, frozenset(), wis.observed_at)
        workload = _Workload(
            scheduling=wis.scheduling,
            images=workload_images(wis),
            observed_at=wis.observed_at,
            expires_at=wis.expires_at,
        )
        previous = self._workloads.get(identity)
        self._workloads[identity] = workload
        if wis.expires_at is not None:
            self._expiring.add(identity)
        else:
            self._expiring.discard(identity)
        change = self._set_contribution(identity, self._evaluate(workload), wis.observed_at)
        unchanged = previous is not None and (
            previous.scheduling == workload.scheduling and previous.images == workload.images
        )
        if not unchanged:
            self._note_skip(change, identity, workload)
        return change

    def set_node(self, node: NodeInfo) -> Change:
        """The node's labels or taints changed: re-evaluate every workload."""
        change = Change()
        if node == self.node:
            return change
        self.node = node
        for identity, workload in self._workloads.items():
            was_admitted = identity in self._contrib or not workload.images
            change.merge(
                self._set_contribution(identity, self._evaluate(workload), workload.observed_at)
            )
            if was_admitted:
                self._note_skip(change, identity, workload)
        return change

    def expire(self, now: datetime) -> Change:
        """Drop time-limited entries (cedar prepull --ttl) that are past their expiry."""
        change = Change()
        for identity in list(self._expiring):
            workload = self._workloads[identity]
            if workload.expires_at is not None and workload.expires_at <= now:
                del self._workloads[identity]
                self._expiring.discard(identity)
                change.merge(self._set_contribution(identity, frozenset(), now))
        return change

    def next_expiry(self) -> datetime | None:
        times = [
            w.expires_at for i in self._expiring if (w := self._workloads[i]).expires_at is not None
        ]
        return min(times) if times else None

    def _evaluate(self, workload: _Workload) -> frozenset[str]:
        return workload.images if mismatch(workload.scheduling, self.node) is None else frozenset()

    def _note_skip(self, change: Change, identity: str, workload: _Workload) -> None:
        if not workload.images:
            return
        why = mismatch(workload.scheduling, self.node)
        if why is not None:
            change.skipped[identity] = (workload.images, why)

    def _set_contribution(
        self, identity: str, images: frozenset[str], observed_at: datetime
    ) -> Change:
        before = self._contrib.get(identity, frozenset())
        change = Change()
        if images == before:
            return change
        if images:
            self._contrib[identity] = images
        else:
            self._contrib.pop(identity, None)
        for image in before - images:
            wanting = self._wanted[image]
            wanting.discard(identity)
            if not wanting:
                del self._wanted[image]
                change.removed.add(image)
        for image in images - before:
            wanting_new = self._wanted.get(image)
            if wanting_new is None:
                self._wanted[image] = {identity}
                change.added[image] = observed_at
            else:
                wanting_new.add(identity)
        return change
