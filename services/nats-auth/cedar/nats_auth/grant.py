"""Pure: what a puller authenticated for one node may publish and subscribe on NATS.

The same rights as the static `puller` user of deploy/nats/accounts.conf, except that every
subject that writes a node's state names this node only:

- status keys `$KV.cedar-node-status.<node>.>` (keys `<node token>.<image hash>`,
  cedar.proto.subjects.node_status_key), prune clocks `$KV.cedar-puller-state.<node>.>`
  (`<node token>.<image-id key>`, cedar.puller.prune_state), decisions
  `cedar.decisions.<node>` (cedar.proto.subjects.decisions_subject);
- and no `$JS.API.STREAM.UPDATE` of the two buckets: the puller never updates them
  (cedar.runtime.bus.ensure_kv only creates), and a new configuration (a tiny max age, say)
  would wipe every node's keys at once.

Reading stays as it is (any node's status, the desired state): reads speak for nobody.
`<node>` is the node's name as one subject token (dots become underscores, as everywhere in
Cedar); a name that is not a Kubernetes node name is refused before it gets here. No I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cedar.proto import subjects

# The puller's own inbox (cedar.runtime.bus.Bus.inbox_prefix of cedar-puller-<pod>).
PULLER_INBOX = "_INBOX.cedar-puller"

# A Kubernetes node name: a DNS-1123 subdomain (k8s.io/apimachinery validation
# IsDNS1123Subdomain: lower-case alphanumerics, '-' and '.', at most 253 characters).
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

# What every puller may publish whatever its node: JetStream's API on the streams and
# buckets it reads or creates (the static user's list, deploy/nats/accounts.conf).
_SHARED_PUBLISH = (
    "$JS.API.INFO",
    "$JS.API.STREAM.NAMES",
    # Shared streams: create if missing, never update (the watcher owns them).
    f"$JS.API.STREAM.INFO.{subjects.STREAM_WORKLOADS}",
    f"$JS.API.STREAM.CREATE.{subjects.STREAM_WORKLOADS}",
    f"$JS.API.STREAM.INFO.{subjects.STREAM_NAMESPACES}",
    f"$JS.API.STREAM.CREATE.{subjects.STREAM_NAMESPACES}",
    f"$JS.API.STREAM.INFO.{subjects.STREAM_HISTORY}",
    f"$JS.API.STREAM.CREATE.{subjects.STREAM_HISTORY}",
    # Desired state, read with ordered consumers.
    f"$JS.API.CONSUMER.CREATE.{subjects.STREAM_WORKLOADS}",
    f"$JS.API.CONSUMER.CREATE.{subjects.STREAM_WORKLOADS}.>",
    f"$JS.API.CONSUMER.DELETE.{subjects.STREAM_WORKLOADS}.>",
    f"$JS.API.CONSUMER.INFO.{subjects.STREAM_WORKLOADS}.>",
    f"$JS.FC.{subjects.STREAM_WORKLOADS}.>",
)


def _bucket_api(bucket: str) -> tuple[str, ...]:
    """JetStream's API on one KV bucket (the stream KV_<bucket>), without STREAM.UPDATE."""
    stream = f"KV_{bucket}"
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def is_node_name(name: object) -> bool:
    """Whether `name` is a name Kubernetes accepts for a Node."""
    return isinstance(name, str) and len(name) <= 253 and bool(_SUBDOMAIN.fullmatch(name))


def node_writes(node: str) -> tuple[str, ...]:
    """The subjects through which a puller speaks for `node`, and only for it."""
    tok = subjects.token(node)
    return (
        f"$KV.{subjects.KV_NODE_STATUS}.{tok}.>",
        f"$KV.{subjects.KV_PULLER_STATE}.{tok}.>",
        subjects.decisions_subject(node),
    )


def puller_permissions(node: str) -> Permissions:
    """The rights of the puller of `node` (a valid node name: see `is_node_name`)."""
    if not is_node_name(node):
        raise ValueError(f"not a Kubernetes node name: {node!r}")
    publish = (
        *node_writes(node),
        *_SHARED_PUBLISH,
        *_bucket_api(subjects.KV_NODE_STATUS),
        *_bucket_api(subjects.KV_PULLER_STATE),
        # Fleet pacing's leases are per registry and slot, not per node: every puller's.
        f"$KV.{subjects.KV_FLEET_LEASES}.>",
        *_bucket_api(subjects.KV_FLEET_LEASES),
    )
    return Permissions(publish=publish, subscribe=(f"{PULLER_INBOX}.>",))
