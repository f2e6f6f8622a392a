"""The puller's metrics. Names are public interface (dashboards, alerts): see docs/puller.md.

Touches only the process's Prometheus registry (served on /metrics by cedar.runtime).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PULL_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

PULLS = Counter(
    "cedar_puller_pulls",
    "Image pulls finished, by result (success, or the failure reason).",
    ["result"],
)
PULL_DURATION = Histogram(
    "cedar_puller_pull_duration_seconds", "Time one image pull took.", buckets=PULL_BUCKETS
)
EVENT_TO_PULL = Histogram(
    "cedar_puller_event_to_pull_seconds",
    "From the watcher observing a change to this puller starting the pull it caused.",
    buckets=LATENCY_BUCKETS,
)
IMAGES = Gauge(
    "cedar_puller_images",
    "Images on this node by state (desired, present, missing, pulling, failed).",
    ["state"],
)
PRUNED = Counter("cedar_puller_pruned", "Images removed by the prune.")
REGISTRY_UP = Gauge(
    "cedar_puller_registry_up", "1 when the registry's /v2/ answered, else 0.", ["registry"]
)
EVICTED = Counter(
    "cedar_puller_evicted",
    "Images this puller brought that disappeared from the engine (kubelet image GC).",
)
FAILURES = Counter(
    "cedar_puller_failures",
    "Pull failures by reason (not_found, unauthorized, timeout, invalid_reference, "
    "engine_error, low_disk, registry_down).",
    ["reason"],
)
WARM_SECONDS = Gauge(
    "cedar_puller_warm_seconds",
    "Seconds from puller start until every desired image was present (set once warm).",
)
DISK_FREE = Gauge("cedar_puller_disk_free_bytes", "Free bytes on the engine's data root.")
DISK_LOW = Gauge("cedar_puller_disk_low", "1 while free disk is below the guard and pulls wait.")
RUNTIME_INFO = Gauge(
    "cedar_puller_runtime_info",
    "1 for the engine this puller drives: its own name (docker, containerd, cri-o) and version.",
    ["runtime", "version"],
)

# --- fleet-wide registry pacing (fleet_leases.py) ------------------------------------------
WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
FLEET_LEASES_HELD = Gauge(
    "cedar_puller_fleet_leases_held",
    "Fleet registry leases this node holds now (pulls in progress from a paced registry).",
    ["registry"],
)
FLEET_WAITING = Gauge(
    "cedar_puller_fleet_lease_waiting",
    "This node's pulls waiting for a fleet registry lease.",
    ["registry"],
)
FLEET_WAIT = Histogram(
    "cedar_puller_fleet_lease_wait_seconds",
    "From asking for a fleet registry lease to holding it, by priority (cold, missing, refresh).",
    ["priority"],
    buckets=WAIT_BUCKETS,
)
FLEET_GRANTS = Counter(
    "cedar_puller_fleet_lease_grants",
    "Pulls from paced registries that went ahead: with a lease, or without one because the "
    "lease store was unavailable (the node's own bound only).",
    ["result"],
)
FLEET_LEASES_LOST = Counter(
    "cedar_puller_fleet_leases_lost",
    "Leases that lapsed before this node renewed them (NATS unreachable for a TTL).",
)
FLEET_WITHDRAWN = Counter(
    "cedar_puller_fleet_lease_withdrawn",
    "Waiting refreshes withdrawn so that this node's missing images could take their slot.",
)
FLEET_STORE_ERRORS = Counter(
    "cedar_puller_fleet_lease_store_errors",
    "Failed reads or writes of the fleet lease bucket (pulls then go on without a lease).",
)
FLEET_BAD_ENTRIES = Counter(
    "cedar_puller_fleet_lease_bad_entries",
    "Entries of the fleet lease bucket that are not a lease or request (ignored).",
)

# --- the warm-up gate (warm_gate.py) -------------------------------------------------------
WARMING = Gauge(
    "cedar_puller_warming",
    "1 while this node carries the cedar.io/warming taint and its puller has not lifted it.",
)
GATE_LIFTED = Counter(
    "cedar_puller_warm_gate_lifted",
    "Times this puller removed cedar.io/warming from its Node, by reason (warm, timeout).",
    ["reason"],
)
GATE_ERRORS = Counter(
    "cedar_puller_warm_gate_errors",
    "Failed removals of cedar.io/warming, by reason (forbidden, conflict, unavailable, error).",
    ["reason"],
)
BAD_MESSAGES = Counter(
    "cedar_puller_bad_messages",
    "Messages on the workloads feed that are not a WorkloadImageSet v1 (skipped, logged).",
)
