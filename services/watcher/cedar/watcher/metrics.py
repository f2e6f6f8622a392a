"""The watcher's metrics, declared in prometheus_client's default registry; no other I/O.

Names are public interface (dashboards, alerts): see docs/watcher.md.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter(
    "cedar_watcher_events",
    "Watch and list events seen, by Kubernetes kind and event type.",
    ["kind", "type"],
)
WORKLOADS = Gauge("cedar_watcher_workloads", "Workloads currently known, by kind.", ["kind"])
PUBLISHES = Counter(
    "cedar_watcher_publishes",
    "Messages published to JetStream, by result (stored, duplicate, error).",
    ["result"],
)
RELISTS = Counter(
    "cedar_watcher_relists",
    "Full relists, by kind and reason (start, expired, stream_broken, error).",
    ["kind", "reason"],
)
LAST_SYNC = Gauge(
    "cedar_watcher_last_sync_timestamp_seconds",
    "Unix time of the last complete list or bookmark for a kind; age = time() - this.",
    ["kind"],
)
SYNCED = Gauge("cedar_watcher_synced", "1 once the kind's first full list is done.", ["kind"])
BAD_OBJECTS = Counter(
    "cedar_watcher_bad_objects",
    "Objects that could not be read in full, by kind and reason.",
    ["kind", "reason"],
)
PENDING_PUBLISHES = Gauge(
    "cedar_watcher_pending_publishes",
    "Changes waiting to be published (grows while NATS is unreachable).",
)
FORBIDDEN = Gauge(
    "cedar_watcher_forbidden",
    "1 while the service account may not list or watch the kind (reported once in the log).",
    ["kind"],
)
EVENT_TO_STORED = Histogram(
    "cedar_watcher_event_to_stored_seconds",
    "From the watcher seeing a change to JetStream acknowledging its message.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
