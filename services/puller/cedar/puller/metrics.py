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
