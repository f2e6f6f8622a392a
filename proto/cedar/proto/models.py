"""Message contracts between Cedar's services.

Every message carries `schema_version`; a consumer rejects versions it does not know
instead of guessing. Field names are snake_case JSON. Times are UTC, ISO 8601.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION: Literal[1] = 1

PullPolicy = Literal["Always", "IfNotPresent", "Never"]
ImageState = Literal["desired", "present", "missing", "pulling", "failed"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Contract(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeSelectorRequirement(Contract):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: tuple[str, ...] = ()


class NodeSelectorTerm(Contract):
    """One term of requiredDuringSchedulingIgnoredDuringExecution; terms are ORed."""

    match_expressions: tuple[NodeSelectorRequirement, ...] = ()
    match_fields: tuple[NodeSelectorRequirement, ...] = ()


class Toleration(Contract):
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class PodScheduling(Contract):
    """The parts of a pod template that decide which nodes its pods may run on."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    required_node_affinity: tuple[NodeSelectorTerm, ...] = ()
    tolerations: tuple[Toleration, ...] = ()


class ContainerImage(Contract):
    container: str
    init: bool = False
    image: str = Field(description="The image exactly as written in the pod template.")
    reference: str | None = Field(
        default=None, description="Normalised reference; None when the image is invalid."
    )
    error: str | None = Field(default=None, description="Why the reference is invalid.")
    pull_policy: PullPolicy | None = None


class OwnerRef(Contract):
    kind: str
    name: str
    uid: str


class WorkloadImageSet(Contract):
    """What one workload needs on the nodes it may run on, or its deletion marker."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: str = Field(description="Deployment, ReplicaSet, DaemonSet, StatefulSet, Job, ...")
    namespace: str
    name: str
    uid: str
    owner: OwnerRef | None = Field(
        default=None,
        description="The Deployment of a kept ReplicaSet revision, the CronJob of a Job.",
    )
    revision: int | None = None
    containers: tuple[ContainerImage, ...] = ()
    scheduling: PodScheduling = Field(default_factory=PodScheduling)
    replicas: int | None = Field(default=None, description="0 for scaled-to-zero workloads.")
    resource_version: str = ""
    generation: int | None = None
    observed_at: datetime = Field(description="When the watcher saw this change.")
    deleted: bool = False
    expires_at: datetime | None = Field(
        default=None, description="Set for time-limited desired images (cedar prepull --ttl)."
    )

    @property
    def identity(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"

    def references(self) -> set[str]:
        """The valid normalised references this workload wants."""
        return {c.reference for c in self.containers if c.reference is not None}


class NamespaceEvent(Contract):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    uid: str
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    phase: str | None = None
    resource_version: str = ""
    observed_at: datetime
    deleted: bool = False


class NodeImageStatus(Contract):
    """One image's state on one node, as its puller last reported it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    node: str
    image: str
    state: ImageState
    digest: str | None = None
    reason: str | None = Field(default=None, description="Failure class, e.g. not_found.")
    error: str | None = None
    workloads: tuple[str, ...] = Field(default=(), description="Kind/namespace/name wanting it.")
    updated_at: datetime


class PullerDecision(Contract):
    """A puller's decision about one image, recorded for `cedar replay`."""

    schema_version: Literal[1] = SCHEMA_VERSION
    node: str
    image: str
    action: Literal["pull", "pulled", "refresh", "skip", "failed", "prune", "evicted"]
    reason: str = ""
    workloads: tuple[str, ...] = ()
    digest: str | None = None
    dry_run: bool = False
    at: datetime


class McsAuditRecord(Contract):
    """One entry of the allocator's audit trail."""

    schema_version: Literal[1] = SCHEMA_VERSION
    action: Literal[
        "claim",
        "release",
        "free",
        "adopt",
        "tamper",
        "conflict",
        "exhausted",
        "pod-mismatch",
        "volume-context",
        "volume-conflict",
    ]
    namespace: str
    namespace_uid: str
    level: str | None = None
    previous: str | None = Field(
        default=None,
        description="Tamper: the value found. pod-mismatch: the level the pod runs at (none: "
        "one the runtime chose). volume-conflict: the context mount option found.",
    )
    object_kind: Literal["Pod", "PersistentVolume"] | None = Field(
        default=None, description="pod-mismatch, volume-*: the object the record is about."
    )
    object_name: str | None = None
    object_uid: str | None = None
    replica: str = Field(description="Which allocator replica acted (pod name).")
    dry_run: bool = False
    at: datetime


CONTRACTS: dict[str, type[Contract]] = {
    "workload-image-set": WorkloadImageSet,
    "namespace-event": NamespaceEvent,
    "node-image-status": NodeImageStatus,
    "puller-decision": PullerDecision,
    "mcs-audit-record": McsAuditRecord,
}
