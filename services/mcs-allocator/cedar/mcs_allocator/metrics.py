"""The allocator's metrics. Names are public interface (dashboards, alerts).

docs/mcs-allocator.md lists them. Prometheus collectors in the process's default registry,
served by cedar.runtime.http; no I/O here.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
