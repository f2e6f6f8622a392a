"""Every stream, KV bucket and object store Cedar creates: name, subjects, retention, limits.

The one place they are configured, for the services, the operator commands, the benches
and the tests. Names and subjects are the contract in `cedar.proto.subjects`; this module
adds how NATS keeps them. No I/O: `cedar.runtime.bus` creates what is described here.
docs/architecture.md has the table of who writes and who reads each one.
"""

from __future__ import annotations

from datetime import timedelta

from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    StorageType,
    StreamConfig,
    StreamSource,
)

from cedar.proto import subjects
from cedar.runtime.settings import CommonSettings

# Two watcher replicas publish the same change within milliseconds of each other; the
# window only has to cover that and a reconnect's republish.
DUPLICATE_WINDOW = timedelta(minutes=2)
# `cedar replay --to` output is kept a day, so a dry-run consumer can start afterwards.
REPLAY_RETENTION = timedelta(hours=24)


def workloads_stream(settings: CommonSettings) -> StreamConfig:
    return StreamConfig(
        name=subjects.STREAM_WORKLOADS,
        description="Desired image sets: the last message per workload (or its deletion marker).",
        subjects=[f"{subjects.WORKLOADS_PREFIX}.>"],
        max_msgs_per_subject=1,
        allow_msg_ttl=True,  # deletion markers and prepull entries expire; live workloads never
        allow_direct=True,
        allow_rollup_hdrs=True,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW.total_seconds(),
        storage=StorageType.FILE,
        num_replicas=settings.nats_replicas,
    )


def namespaces_stream(settings: CommonSettings) -> StreamConfig:
    return StreamConfig(
        name=subjects.STREAM_NAMESPACES,
        description="Namespace lifecycle: the last event per namespace.",
        subjects=[f"{subjects.NAMESPACES_PREFIX}.>"],
        max_msgs_per_subject=1,
        allow_msg_ttl=True,
        allow_direct=True,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW.total_seconds(),
        storage=StorageType.FILE,
        num_replicas=settings.nats_replicas,
    )


def history_stream(settings: CommonSettings) -> StreamConfig:
    return StreamConfig(
        name=subjects.STREAM_HISTORY,
        description="Every change, audit record and puller decision, for `cedar replay`.",
        subjects=[f"{subjects.AUDIT_PREFIX}.>", f"{subjects.DECISIONS_PREFIX}.>"],
        sources=[
            StreamSource(name=subjects.STREAM_WORKLOADS),
            StreamSource(name=subjects.STREAM_NAMESPACES),
        ],
        max_age=settings.history_retention.total_seconds(),
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=settings.nats_replicas,
    )


def replay_stream(settings: CommonSettings) -> StreamConfig:
    """Where `cedar replay --to` puts messages."""
    return StreamConfig(
        name=subjects.STREAM_REPLAY,
        description="Messages re-published by `cedar replay --to` for dry-run consumers.",
        subjects=[f"{subjects.REPLAY_PREFIX}.>"],
        max_age=REPLAY_RETENTION.total_seconds(),
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=settings.nats_replicas,
    )


def service_streams(settings: CommonSettings) -> list[StreamConfig]:
    """The streams the services share, in the order they must be created (history
    sources the other two)."""
    return [workloads_stream(settings), namespaces_stream(settings), history_stream(settings)]


def _kv(settings: CommonSettings, bucket: str) -> KeyValueConfig:
    return KeyValueConfig(
        bucket=bucket, history=1, storage=StorageType.FILE, replicas=settings.nats_replicas
    )


def node_status_bucket(settings: CommonSettings) -> KeyValueConfig:
    """What each node has: one key per node and image, written by that node's puller."""
    return _kv(settings, subjects.KV_NODE_STATUS)


def puller_state_bucket(settings: CommonSettings) -> KeyValueConfig:
    """Each puller's own bookkeeping (last use of images, for prune), kept across restarts."""
    return _kv(settings, subjects.KV_PULLER_STATE)


def mcs_ledger_bucket(settings: CommonSettings) -> KeyValueConfig:
    """The allocator's ledger: one key per label and per namespace, claimed by create."""
    return _kv(settings, subjects.KV_MCS_LEDGER)


def mcs_snapshots_bucket(settings: CommonSettings) -> ObjectStoreConfig:
    return ObjectStoreConfig(
        bucket=subjects.OBJ_MCS_SNAPSHOTS,
        description=(
            "Snapshots of the MCS ledger, for fast start-up; the ledger bucket is the truth."
        ),
        storage=StorageType.FILE,
        replicas=settings.nats_replicas,
    )


def kv_stream(bucket: str) -> str:
    """The stream behind a KV bucket."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str = "") -> str:
    """The subject of a key in a KV bucket; with no key, the prefix of all of them."""
    return f"$KV.{bucket}.{key}"


def object_stream(bucket: str) -> str:
    """The stream behind an object store bucket."""
    return f"OBJ_{bucket}"


def object_chunk_subject(bucket: str, nuid: str) -> str:
    """The subject an object's chunks are published on."""
    return f"$O.{bucket}.C.{nuid}"
