"""Pure: which objects are workloads of their own, and which Deployment revisions stay warm.
No I/O; imports only cedar.proto.

A ReplicaSet controlled by a Deployment is one of its revisions: the current one (highest
`deployment.kubernetes.io/revision`) and the newest N older ones are kept so that a
rollback starts from warm caches; older revisions are dropped. A Job controlled by a
CronJob belongs to the CronJob, whose job template already carries its images, so it is
not published on its own (a CronJob firing every minute would otherwise publish a workload
and a deletion marker every minute). Standalone ReplicaSets and Jobs, and those controlled
by anything else, are workloads of their own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cedar.proto.models import OwnerRef

Role = str
OWN = "own"  # a workload of its own
REVISION = "revision"  # a Deployment's revision: kept or dropped by `kept_revisions`
FOLDED = "folded"  # belongs to its owner, not published


def role_of(kind: str, controller: OwnerRef | None) -> Role:
    if controller is None:
        return OWN
    if kind == "ReplicaSet" and controller.kind == "Deployment":
        return REVISION
    if kind == "Job" and controller.kind == "CronJob":
        return FOLDED
    return OWN


@dataclass(frozen=True, slots=True)
class RevisionInfo:
    uid: str
    revision: int | None
    created: str  # metadata.creationTimestamp (RFC 3339 sorts as text)
    name: str


def _order(info: RevisionInfo) -> tuple[int, str, str]:
    return (info.revision if info.revision is not None else -1, info.created, info.name)


def kept_revisions(revisions: Iterable[RevisionInfo], previous: int) -> frozenset[str]:
    """UIDs of the current revision and the `previous` newest older ones.

    A ReplicaSet without a readable revision annotation sorts below every numbered one
    (then by creation time), so it is kept only when there is room.
    """
    ranked = sorted(revisions, key=_order, reverse=True)
    return frozenset(info.uid for info in ranked[: 1 + max(previous, 0)])
