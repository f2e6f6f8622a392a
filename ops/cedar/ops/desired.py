"""The desired image set and the fleet's state, computed from what NATS holds. Pure."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from cedar.proto.models import NodeImageStatus, WorkloadImageSet

# The states a node reports, in the order the tables show them. "desired" means the node
# knows it wants the image and has not started on it: it is missing there.
STATES = ("present", "pulling", "missing", "failed")


def current_workloads(
    messages: Iterable[WorkloadImageSet], now: datetime
) -> dict[str, WorkloadImageSet]:
    """Last message per workload wins; deletion markers and expired prepulls drop out."""
    latest: dict[str, WorkloadImageSet] = {}
    for wis in messages:
        latest[wis.identity] = wis
    return {
        identity: wis
        for identity, wis in latest.items()
        if not wis.deleted and (wis.expires_at is None or wis.expires_at > now)
    }


def desired_images(workloads: Iterable[WorkloadImageSet]) -> dict[str, list[WorkloadImageSet]]:
    """Each valid reference, with the workloads that want it (sorted by identity)."""
    images: dict[str, list[WorkloadImageSet]] = {}
    for wis in sorted(workloads, key=lambda w: w.identity):
        for ref in sorted(wis.references()):
            images.setdefault(ref, []).append(wis)
    return images


def state_of(status: NodeImageStatus) -> str:
    return "missing" if status.state == "desired" else status.state


@dataclass
class ImageSummary:
    image: str
    workloads: tuple[str, ...]
    nodes: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in STATES})
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def reporting(self) -> int:
        return sum(len(v) for v in self.nodes.values())

    def as_json(self) -> dict[str, object]:
        return {
            "image": self.image,
            "workloads": list(self.workloads),
            "nodes": self.reporting,
            **{state: len(nodes) for state, nodes in self.nodes.items()},
            "nodes_by_state": {s: sorted(n) for s, n in self.nodes.items() if n},
            "failure_reasons": dict(self.reasons),
        }


def summarize(
    desired: dict[str, list[WorkloadImageSet]], statuses: Iterable[NodeImageStatus]
) -> list[ImageSummary]:
    """Per desired image: which reporting nodes have it in which state, and why they failed.

    A puller reports only the images its node should have, so the nodes reporting an image
    are the nodes eligible for it.
    """
    summaries = {
        image: ImageSummary(image, tuple(w.identity for w in wanted))
        for image, wanted in desired.items()
    }
    for status in statuses:
        summary = summaries.get(status.image)
        if summary is None:
            continue
        state = state_of(status)
        summary.nodes.setdefault(state, []).append(status.node)
        if state == "failed":
            summary.reasons[status.reason or "unknown"] += 1
    return [summaries[k] for k in sorted(summaries)]


def parse_statuses(values: Iterable[bytes]) -> tuple[list[NodeImageStatus], int]:
    """Decoded statuses, and how many values were not valid NodeImageStatus JSON."""
    good: list[NodeImageStatus] = []
    bad = 0
    for raw in values:
        try:
            good.append(NodeImageStatus.model_validate_json(raw))
        except ValueError:
            bad += 1
    return good, bad
