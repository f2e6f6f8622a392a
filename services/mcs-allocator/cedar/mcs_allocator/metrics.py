"""The allocator's metrics. Names are public interface (dashboards, alerts).

docs/mcs-allocator.md lists them. Prometheus collectors in the process's default registry,
served by cedar.runtime.http; no I/O here.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LABELS = Gauge("cedar_mcs_labels", "MCS labels by state (allocated, quarantined, free).", ["state"])
ALLOCATIONS = Counter(
    "cedar_mcs_allocations",
    "Allocation decisions by result (allocated, adopted, exhausted, conflict).",
    ["result"],
)
TAMPER = Counter(
    "cedar_mcs_tamper", "Namespace annotations found changed or removed, and restored."
)
CONFLICTS = Gauge(
    "cedar_mcs_conflicts", "Labels claimed by more than one namespace (found by repair)."
)
PATCH_FAILURES = Counter(
    "cedar_mcs_patch_failures", "Failed PATCHes of a namespace annotation (retried)."
)
SNAPSHOTS = Counter(
    "cedar_mcs_snapshots",
    "Ledger snapshots by result (written, loaded, unusable, failed).",
    ["result"],
)
LEDGER_LOAD_SECONDS = Gauge(
    "cedar_mcs_ledger_load_seconds",
    "How long the last start-up load of the ledger mirror took (snapshot or full read).",
)

# -- making the level bind: the webhook, the watchdog, NFS volumes --------------------------

ADMISSIONS = Counter(
    "cedar_mcs_admissions",
    "Pod admission reviews answered by the webhook, by result (mutated, admitted, denied, "
    "error, invalid) and rule (podlevel.RULES, or out-of-scope, windows, ...).",
    ["result", "rule"],
)
ADMISSION_SECONDS = Histogram(
    "cedar_mcs_admission_seconds",
    "Time to answer one AdmissionReview, from the request read to the response written.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
WEBHOOK_CERT_RELOADS = Counter(
    "cedar_mcs_webhook_cert_reloads",
    "Reloads of the webhook's TLS certificate by result (loaded, failed).",
    ["result"],
)
POD_MISMATCHES = Gauge(
    "cedar_mcs_pod_mismatches",
    "Pods in labelled namespaces that run at another level than their namespace's.",
)
PODS_WATCHED = Gauge(
    "cedar_mcs_pods_watched", "Pods the watchdog keeps (outside excluded namespaces)."
)
VOLUME_CONTEXTS = Counter(
    "cedar_mcs_volume_contexts",
    "NFS PersistentVolumes given the mount context of their claim's namespace, by result "
    "(set, failed).",
    ["result"],
)
VOLUME_CONFLICTS = Gauge(
    "cedar_mcs_volume_conflicts",
    "NFS PersistentVolumes whose mount context names another level than their claim's "
    "namespace (reported, never changed).",
)
BAD_EVENTS = Counter(
    "cedar_mcs_bad_events",
    "Messages on the namespace events that are not a NamespaceEvent v1 (refused, logged).",
)
