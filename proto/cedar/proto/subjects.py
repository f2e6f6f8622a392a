"""NATS stream, subject, KV bucket and consumer names: the one place they are spelled.

Subjects carry identities as tokens. Kubernetes names may contain dots, which NATS uses as
the token separator; `token()` maps them to underscores, which Kubernetes names never
contain, so the mapping is one-to-one.
"""

from __future__ import annotations

import hashlib

# Desired state: one message per workload, the last one per subject kept forever (a
# workload's current image set, or its deletion marker).
STREAM_WORKLOADS = "CEDAR_WORKLOADS"
WORKLOADS_PREFIX = "cedar.workloads"
# Namespace lifecycle for the allocator; last message per namespace kept.
STREAM_NAMESPACES = "CEDAR_NAMESPACES"
NAMESPACES_PREFIX = "cedar.namespaces"
# Every change, for `cedar replay`: sources the two streams above and also takes the
# allocator's audit trail and the pullers' decisions directly. Bounded by age.
STREAM_HISTORY = "CEDAR_HISTORY"
AUDIT_PREFIX = "cedar.audit"
DECISIONS_PREFIX = "cedar.decisions"
# `cedar replay --to` re-publishes history under cedar.replay.> into its own stream; each
# message carries where it came from, so dry-run consumers can tell kinds apart.
REPLAY_PREFIX = "cedar.replay"
STREAM_REPLAY = "CEDAR_REPLAY"
ORIGINAL_SUBJECT_HEADER = "Cedar-Original-Subject"
ORIGINAL_SEQ_HEADER = "Cedar-Original-Seq"
ORIGINAL_TIME_HEADER = "Cedar-Original-Time"

KV_NODE_STATUS = "cedar-node-status"
KV_PULLER_STATE = "cedar-puller-state"
KV_MCS_LEDGER = "cedar-mcs-ledger"
# Fleet-wide registry pacing (CEDAR_REGISTRY_FLEET_PULLS): a lease per pull in progress
# (`lease.<registry key>.<slot>`) and a request per pull waiting for one
# (`wait.<registry key>.<token hash>`), each with a per-key TTL its holder renews.
KV_FLEET_LEASES = "cedar-fleet-leases"
# Object store bucket with the allocator's ledger snapshot (one object, MCS_SNAPSHOT_OBJECT):
# a compact image of the ledger at a stream sequence, so a replica starts without reading
# every key. Only ever a shortcut: the ledger bucket stays the truth.
OBJ_MCS_SNAPSHOTS = "cedar-mcs-snapshots"
MCS_SNAPSHOT_OBJECT = "ledger"

ALLOCATOR_DURABLE = "mcs-allocator"

# Kubernetes kinds whose image sets travel on cedar.workloads; `cedar prepull` adds
# entries of its own kind, PREPULL_KIND.
KUBERNETES_WORKLOAD_KINDS = (
    "Deployment",
    "ReplicaSet",
    "DaemonSet",
    "StatefulSet",
    "Job",
    "CronJob",
)
PREPULL_KIND = "Prepull"


def token(name: str) -> str:
    """A Kubernetes name or namespace as one NATS subject token."""
    return name.replace(".", "_")


def untoken(tok: str) -> str:
    return tok.replace("_", ".")


def workload_subject(kind: str, namespace: str, name: str) -> str:
    return f"{WORKLOADS_PREFIX}.{kind}.{token(namespace or '_cluster')}.{token(name)}"


def namespace_subject(name: str) -> str:
    return f"{NAMESPACES_PREFIX}.{token(name)}"


def decisions_subject(node: str) -> str:
    return f"{DECISIONS_PREFIX}.{token(node)}"


def audit_subject(action: str) -> str:
    return f"{AUDIT_PREFIX}.mcs.{action}"


def image_key(image: str) -> str:
    """A stable KV key token for an image reference (references contain '/', ':', '@')."""
    return hashlib.sha256(image.encode()).hexdigest()[:24]


def node_status_key(node: str, image: str) -> str:
    return f"{token(node)}.{image_key(image)}"
