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
# A stream also drops a *sourced* message whose Nats-Msg-Id it saw within its window. The
# last-value streams must copy every message of the history, even two with one id (stored
# more than DUPLICATE_WINDOW apart, copied in one burst after a lag), so theirs is the
# smallest NATS accepts.
SOURCED_DUPLICATE_WINDOW = timedelta(milliseconds=100)
# `cedar replay --to` output is kept a day, so a dry-run consumer can start afterwards.
REPLAY_RETENTION = timedelta(hours=24)


# Every puller follows CEDAR_WORKLOADS (and the lease bucket) with a consumer of its own.
# NATS 2.15 gives a stream that sets no limit a default of 1,000 consumers
# (`default_max_consumers`), which a fleet of a thousand nodes would hit; these streams set
# their own limit instead.
FLEET_MAX_CONSUMERS = 100_000


def history_stream(settings: CommonSettings) -> StreamConfig:
    """Every change the watcher publishes, every audit record and puller decision, for
    `cedar replay`: the stream that takes those subjects, so a change is in the history
    the moment it is acknowledged. The last-value streams below are sourced from it (a
    lag there delays a change, never loses it: docs/reliability.md, finding 3)."""
    return StreamConfig(
        name=subjects.STREAM_HISTORY,
        description="Every change, audit record and puller decision, for `cedar replay`.",
        subjects=[
            f"{subjects.WORKLOADS_PREFIX}.>",
            f"{subjects.NAMESPACES_PREFIX}.>",
            f"{subjects.AUDIT_PREFIX}.>",
            f"{subjects.DECISIONS_PREFIX}.>",
        ],
        max_age=settings.history_retention.total_seconds(),
        allow_msg_ttl=True,  # prepull entries and deletion markers carry their own TTL
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW.total_seconds(),
        storage=StorageType.FILE,
        num_replicas=settings.nats_replicas,
    )


def workloads_stream(settings: CommonSettings) -> StreamConfig:
    """Desired image sets: CEDAR_HISTORY's workload messages, the last one per subject."""
    return StreamConfig(
        name=subjects.STREAM_WORKLOADS,
        description="Desired image sets: the last message per workload (or its deletion marker).",
        sources=[
            StreamSource(
                name=subjects.STREAM_HISTORY, filter_subject=f"{subjects.WORKLOADS_PREFIX}.>"
            )
        ],
        max_msgs_per_subject=1,
        max_consumers=FLEET_MAX_CONSUMERS,
        allow_msg_ttl=True,  # deletion markers and prepull entries expire; live workloads never
        allow_direct=True,
        discard=DiscardPolicy.OLD,
        duplicate_window=SOURCED_DUPLICATE_WINDOW.total_seconds(),
        storage=StorageType.FILE,
        num_replicas=settings.nats_replicas,
    )


def namespaces_stream(settings: CommonSettings) -> StreamConfig:
    """Namespace lifecycle: CEDAR_HISTORY's namespace messages, the last one per subject."""
    return StreamConfig(
        name=subjects.STREAM_NAMESPACES,
        description="Namespace lifecycle: the last event per namespace.",
        sources=[
            StreamSource(
                name=subjects.STREAM_HISTORY, filter_subject=f"{subjects.NAMESPACES_PREFIX}.>"
            )
        ],
        max_msgs_per_subject=1,
        allow_msg_ttl=True,
        allow_direct=True,
        discard=DiscardPolicy.OLD,
        duplicate_window=SOURCED_DUPLICATE_WINDOW.total_seconds(),
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
    """The streams the services share, in the order they must be created (the other two
    source the history)."""
    return [history_stream(settings), workloads_stream(settings), namespaces_stream(settings)]


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


# A lease bucket key nobody has written for this long is removed whatever its own TTL: a
# backstop only (leases and requests carry a TTL of seconds, and so do their removals).
FLEET_LEASES_MAX_AGE = timedelta(hours=1)


def fleet_leases_stream(settings: CommonSettings) -> StreamConfig:
    """KV bucket cedar-fleet-leases, for fleet-wide registry pacing: pullers' leases and
    waiting requests, each key written with a per-message TTL (`Nats-TTL`) that its holder
    renews, so that a crashed holder's lease lapses by itself; claimed by create
    (compare-and-set), renewed and released with the revision read.

    Given as the stream behind the bucket (`KV_<bucket>`), laid out as nats-py's
    `create_key_value` lays out a bucket (subjects `$KV.<bucket>.>`, one message per key,
    rollups, per-message TTL, discard new, no message deletes), because that call cannot
    set a consumer limit (see FLEET_MAX_CONSUMERS); `js.key_value()` opens it."""
    return StreamConfig(
        name=kv_stream(subjects.KV_FLEET_LEASES),
        description="Registry pull leases and requests (CEDAR_REGISTRY_FLEET_PULLS).",
        subjects=[kv_subject(subjects.KV_FLEET_LEASES, ">")],
        max_msgs_per_subject=1,
        max_msgs=-1,
        max_age=FLEET_LEASES_MAX_AGE.total_seconds(),
        max_consumers=FLEET_MAX_CONSUMERS,
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
        deny_delete=True,
        discard=DiscardPolicy.NEW,
        duplicate_window=DUPLICATE_WINDOW.total_seconds(),
        storage=StorageType.FILE,
        num_replicas=settings.nats_replicas,
    )


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
