"""Writes Cedar's Grafana dashboards (dashboards/*.json) from one definition.

Run `python deploy/grafana/generate_dashboards.py` after editing; the unit
tests fail when the committed JSON differs from what this script writes.
Dashboards are plain Grafana JSON (schemaVersion 39) with a Prometheus
datasource variable, so they import into any Grafana >= 10.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}
    if instant:
        t["instant"] = True
        t["range"] = False
    return t


def panel(
    title: str,
    kind: str,
    targets: list[dict[str, Any]],
    grid: tuple[int, int, int, int],
    *,
    unit: str = "short",
    description: str = "",
    stacked: bool = False,
    thresholds: list[tuple[float | None, str]] | None = None,
) -> dict[str, Any]:
    x, y, w, h = grid
    steps = [{"color": c, "value": v} for v, c in (thresholds or [(None, "green")])]
    custom: dict[str, Any] = {}
    if kind == "timeseries":
        custom = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if stacked else 0,
            "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
            "showPoints": "never",
        }
    p: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": custom,
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": [],
        },
        "options": {},
    }
    if kind == "timeseries":
        p["options"] = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif kind == "stat":
        p["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "auto",
        }
    elif kind == "table":
        p["options"] = {"showHeader": True}
        p["transformations"] = [{"id": "merge", "options": {}}]
    elif kind == "bargauge":
        p["options"] = {
            "orientation": "horizontal",
            "displayMode": "gradient",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        }
    return p


def variable(name: str, label: str, query: str, multi: bool = False) -> dict[str, Any]:
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DS,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "current": {},
        "options": [],
        "hide": 0,
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: list[dict[str, Any]],
    extra_vars: list[dict[str, Any]],
) -> dict[str, Any]:
    for i, p in enumerate(panels, start=1):
        p["id"] = i
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["cedar"],
        "timezone": "",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "links": [
            {
                "type": "dashboards",
                "tags": ["cedar"],
                "asDropdown": True,
                "title": "Cedar",
                "includeVars": False,
                "keepTime": True,
            }
        ],
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "type": "datasource",
                    "name": "datasource",
                    "label": "Data source",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                },
                *extra_vars,
            ]
        },
        "panels": panels,
    }


def q(p: float) -> str:
    return f"p{round(p * 100)}"


def fleet() -> dict[str, Any]:
    lat = [
        target(
            f"histogram_quantile({p}, sum by (le) "
            f"(rate(cedar_puller_event_to_pull_seconds_bucket[5m])))",
            q(p),
        )
        for p in (0.5, 0.9, 0.99)
    ]
    dur = [
        target(
            f"histogram_quantile({p}, sum by (le) "
            f"(rate(cedar_puller_pull_duration_seconds_bucket[5m])))",
            q(p),
        )
        for p in (0.5, 0.9, 0.99)
    ]
    panels = [
        panel(
            "Nodes with pullers",
            "stat",
            [target('count(cedar_puller_images{state="desired"})', instant=True)],
            (0, 0, 4, 4),
        ),
        panel(
            "Nodes fully warm",
            "stat",
            [
                target(
                    'count(max by (node) (cedar_puller_images{state="missing"}) == 0) or vector(0)',
                    instant=True,
                )
            ],
            (4, 0, 4, 4),
            description="Nodes where every desired image is present.",
        ),
        panel(
            "Images missing (all nodes)",
            "stat",
            [target('sum(cedar_puller_images{state="missing"}) or vector(0)', instant=True)],
            (8, 0, 4, 4),
            thresholds=[(None, "green"), (1, "orange")],
        ),
        panel(
            "Images failed (all nodes)",
            "stat",
            [target('sum(cedar_puller_images{state="failed"}) or vector(0)', instant=True)],
            (12, 0, 4, 4),
            thresholds=[(None, "green"), (1, "red")],
        ),
        panel(
            "Registries down",
            "stat",
            [
                target(
                    "count(max by (registry) (cedar_puller_registry_up) == 0) or vector(0)",
                    instant=True,
                )
            ],
            (16, 0, 4, 4),
            thresholds=[(None, "green"), (1, "red")],
        ),
        panel(
            "Nodes with low disk",
            "stat",
            [target("sum(cedar_puller_disk_low) or vector(0)", instant=True)],
            (20, 0, 4, 4),
            thresholds=[(None, "green"), (1, "orange")],
        ),
        panel(
            "Images desired vs present per node",
            "table",
            [
                target(
                    'max by (node) (cedar_puller_images{state="desired"})', "desired", instant=True
                ),
                target(
                    'max by (node) (cedar_puller_images{state="present"})', "present", instant=True
                ),
                target(
                    'max by (node) (cedar_puller_images{state="missing"})', "missing", instant=True
                ),
                target(
                    'max by (node) (cedar_puller_images{state="failed"})', "failed", instant=True
                ),
            ],
            (0, 4, 12, 10),
            description="One row per node. Click through to Cedar / Node for one node's detail.",
        ),
        panel(
            "Images missing per node",
            "timeseries",
            [target('max by (node) (cedar_puller_images{state="missing"})', "{{node}}")],
            (12, 4, 12, 10),
        ),
        panel(
            "Pull rate by result",
            "timeseries",
            [target("sum by (result) (rate(cedar_puller_pulls_total[5m]))", "{{result}}")],
            (0, 14, 12, 8),
            unit="ops",
            stacked=True,
        ),
        panel(
            "Failures by reason",
            "timeseries",
            [target("sum by (reason) (rate(cedar_puller_failures_total[5m]))", "{{reason}}")],
            (12, 14, 12, 8),
            unit="ops",
            stacked=True,
        ),
        panel(
            "Event-to-pull latency",
            "timeseries",
            lat,
            (0, 22, 12, 8),
            unit="s",
            description="From the watcher seeing a change to the puller starting the pull.",
        ),
        panel("Pull duration", "timeseries", dur, (12, 22, 12, 8), unit="s"),
        panel(
            "Registry reachability",
            "timeseries",
            [target("min by (registry) (cedar_puller_registry_up)", "{{registry}}")],
            (0, 30, 12, 7),
            description="1 = every node reaches it; 0 = at least one node does not.",
        ),
        panel(
            "Pruned and evicted images",
            "timeseries",
            [
                target("sum(increase(cedar_puller_pruned_total[1h]))", "pruned / 1h"),
                target("sum(increase(cedar_puller_evicted_total[1h]))", "evicted by kubelet / 1h"),
            ],
            (12, 30, 12, 7),
        ),
    ]
    return dashboard(
        "cedar-fleet",
        "Cedar / Fleet overview",
        "Is every node warm? Images desired vs present, pulls, failures, latency.",
        panels,
        [],
    )


def node() -> dict[str, Any]:
    sel = 'node="$node"'
    panels = [
        panel(
            "Images by state",
            "stat",
            [target(f"max by (state) (cedar_puller_images{{{sel}}})", "{{state}}", instant=True)],
            (0, 0, 12, 5),
        ),
        panel(
            "Start to warm",
            "stat",
            [target(f"max(cedar_puller_warm_seconds{{{sel}}})", instant=True)],
            (12, 0, 4, 5),
            unit="s",
            description="Time from the puller's start until every desired image was present.",
        ),
        panel(
            "Disk free (engine data root)",
            "stat",
            [target(f"max(cedar_puller_disk_free_bytes{{{sel}}})", instant=True)],
            (16, 0, 4, 5),
            unit="bytes",
        ),
        panel(
            "NATS connected",
            "stat",
            [target(f'max(cedar_nats_connected{{job="cedar-puller",{sel}}})', instant=True)],
            (20, 0, 4, 5),
            thresholds=[(None, "red"), (1, "green")],
        ),
        panel(
            "Images by state over time",
            "timeseries",
            [target(f"max by (state) (cedar_puller_images{{{sel}}})", "{{state}}")],
            (0, 5, 12, 8),
        ),
        panel(
            "Pulls by result",
            "timeseries",
            [
                target(
                    f"sum by (result) (rate(cedar_puller_pulls_total{{{sel}}}[5m]))", "{{result}}"
                )
            ],
            (12, 5, 12, 8),
            unit="ops",
            stacked=True,
        ),
        panel(
            "Failures by reason",
            "timeseries",
            [
                target(
                    f"sum by (reason) (rate(cedar_puller_failures_total{{{sel}}}[5m]))",
                    "{{reason}}",
                )
            ],
            (0, 13, 12, 8),
            unit="ops",
            stacked=True,
        ),
        panel(
            "Pull duration",
            "timeseries",
            [
                target(
                    f"histogram_quantile({p}, sum by (le) "
                    f"(rate(cedar_puller_pull_duration_seconds_bucket{{{sel}}}[5m])))",
                    q(p),
                )
                for p in (0.5, 0.99)
            ],
            (12, 13, 12, 8),
            unit="s",
        ),
        panel(
            "Event-to-pull latency",
            "timeseries",
            [
                target(
                    f"histogram_quantile({p}, sum by (le) "
                    f"(rate(cedar_puller_event_to_pull_seconds_bucket{{{sel}}}[5m])))",
                    q(p),
                )
                for p in (0.5, 0.99)
            ],
            (0, 21, 12, 8),
            unit="s",
        ),
        panel(
            "Registries as seen from this node",
            "timeseries",
            [target(f"max by (registry) (cedar_puller_registry_up{{{sel}}})", "{{registry}}")],
            (12, 21, 12, 8),
        ),
        panel(
            "Disk free over time",
            "timeseries",
            [
                target(f"max(cedar_puller_disk_free_bytes{{{sel}}})", "free"),
                target(f"max(cedar_puller_disk_low{{{sel}}})", "low (1 = pulls paused)"),
            ],
            (0, 29, 12, 8),
            unit="bytes",
        ),
        panel(
            "Pruned and evicted",
            "timeseries",
            [
                target(f"sum(increase(cedar_puller_pruned_total{{{sel}}}[1h]))", "pruned / 1h"),
                target(f"sum(increase(cedar_puller_evicted_total{{{sel}}}[1h]))", "evicted / 1h"),
            ],
            (12, 29, 12, 8),
        ),
    ]
    return dashboard(
        "cedar-node",
        "Cedar / Node",
        "One node's image cache: what is missing, what failed and why, disk, registries.",
        panels,
        [variable("node", "Node", "label_values(cedar_puller_images, node)")],
    )


def watcher() -> dict[str, Any]:
    panels = [
        panel(
            "Synced kinds",
            "table",
            [target("min by (pod, kind) (cedar_watcher_synced)", "{{pod}} {{kind}}", instant=True)],
            (0, 0, 8, 8),
            description="1 = the kind's first full list is done and the watch is running.",
        ),
        panel(
            "Workloads by kind",
            "bargauge",
            [target("max by (kind) (cedar_watcher_workloads)", "{{kind}}", instant=True)],
            (8, 0, 8, 8),
        ),
        panel(
            "Pending publishes (NATS backlog)",
            "timeseries",
            [target("max by (pod) (cedar_watcher_pending_publishes)", "{{pod}}")],
            (16, 0, 8, 8),
        ),
        panel(
            "API events by kind and type",
            "timeseries",
            [
                target(
                    "sum by (kind, type) (rate(cedar_watcher_events_total[5m]))",
                    "{{kind}} {{type}}",
                )
            ],
            (0, 8, 12, 8),
            unit="ops",
        ),
        panel(
            "Publishes by result",
            "timeseries",
            [target("sum by (result) (rate(cedar_watcher_publishes_total[5m]))", "{{result}}")],
            (12, 8, 12, 8),
            unit="ops",
            stacked=True,
        ),
        panel(
            "Relists by kind and reason",
            "timeseries",
            [
                target(
                    "sum by (kind, reason) (increase(cedar_watcher_relists_total[15m]))",
                    "{{kind}} {{reason}}",
                )
            ],
            (0, 16, 12, 8),
        ),
        panel(
            "Time since last full sync",
            "timeseries",
            [
                target(
                    "time() - max by (kind) (cedar_watcher_last_sync_timestamp_seconds)",
                    "{{kind}}",
                )
            ],
            (12, 16, 12, 8),
            unit="s",
        ),
        panel(
            "Bad objects by kind and reason",
            "timeseries",
            [
                target(
                    "sum by (kind, reason) (increase(cedar_watcher_bad_objects_total[15m]))",
                    "{{kind}} {{reason}}",
                )
            ],
            (0, 24, 12, 8),
        ),
        panel(
            "NATS connected",
            "timeseries",
            [target('max by (pod) (cedar_nats_connected{job="cedar-watcher"})', "{{pod}}")],
            (12, 24, 12, 8),
        ),
        panel(
            "API event to stored in JetStream",
            "timeseries",
            [
                target(
                    f"histogram_quantile({p}, sum by (le) "
                    f"(rate(cedar_watcher_event_to_stored_seconds_bucket[5m])))",
                    q(p),
                )
                for p in (0.5, 0.9, 0.99)
            ],
            (0, 32, 12, 8),
            unit="s",
        ),
        panel(
            "Kinds the service account may not list",
            "table",
            [target("max by (pod, kind) (cedar_watcher_forbidden) > 0", instant=True)],
            (12, 32, 12, 8),
            description="A kind listed here is skipped; grant list/watch or disable the kind.",
        ),
    ]
    return dashboard(
        "cedar-watcher",
        "Cedar / Watcher",
        "Is the desired state complete and current? Sync, events, publishes, relists.",
        panels,
        [],
    )


def allocator() -> dict[str, Any]:
    total = "max(sum by (instance) (cedar_mcs_labels))"
    panels = [
        panel(
            "Pool used",
            "stat",
            [target(f'1 - max(cedar_mcs_labels{{state="free"}}) / {total}', instant=True)],
            (0, 0, 6, 5),
            unit="percentunit",
            description="Allocated and quarantined labels as a share of the whole pool.",
            thresholds=[(None, "green"), (0.8, "orange"), (0.95, "red")],
        ),
        panel(
            "Labels by state",
            "stat",
            [target("max by (state) (cedar_mcs_labels)", "{{state}}", instant=True)],
            (6, 0, 10, 5),
        ),
        panel(
            "Tamper events (24h)",
            "stat",
            [target("sum(increase(cedar_mcs_tamper_total[24h])) or vector(0)", instant=True)],
            (16, 0, 4, 5),
            thresholds=[(None, "green"), (1, "red")],
        ),
        panel(
            "Conflicts",
            "stat",
            [target("max(cedar_mcs_conflicts) or vector(0)", instant=True)],
            (20, 0, 4, 5),
            thresholds=[(None, "green"), (1, "red")],
            description="Levels claimed by more than one namespace, found by repair.",
        ),
        panel(
            "Labels by state over time",
            "timeseries",
            [target("max by (state) (cedar_mcs_labels)", "{{state}}")],
            (0, 5, 12, 8),
            stacked=True,
        ),
        panel(
            "Allocations by result",
            "timeseries",
            [target("sum by (result) (rate(cedar_mcs_allocations_total[5m]))", "{{result}}")],
            (12, 5, 12, 8),
            unit="ops",
            stacked=True,
        ),
        panel(
            "Tamper events",
            "timeseries",
            [target("sum(increase(cedar_mcs_tamper_total[5m]))", "reverted / 5m")],
            (0, 13, 12, 8),
        ),
        panel(
            "Annotation PATCH failures",
            "timeseries",
            [target("sum by (pod) (increase(cedar_mcs_patch_failures_total[5m]))", "{{pod}}")],
            (12, 13, 12, 8),
        ),
        panel(
            "NATS connected",
            "timeseries",
            [target('max by (pod) (cedar_nats_connected{job="cedar-mcs-allocator"})', "{{pod}}")],
            (0, 21, 12, 6),
        ),
        panel(
            "Versions",
            "table",
            [target("max by (service, version, pod) (cedar_build_info)", instant=True)],
            (12, 21, 12, 6),
        ),
        panel(
            "Ledger load at start-up",
            "timeseries",
            [target("max by (pod) (cedar_mcs_ledger_load_seconds)", "{{pod}}")],
            (0, 27, 12, 6),
            unit="s",
            description="How long each replica took to load its ledger mirror when it started.",
        ),
        panel(
            "Ledger snapshots",
            "timeseries",
            [target("sum by (result) (increase(cedar_mcs_snapshots_total[1h]))", "{{result}}")],
            (12, 27, 12, 6),
            description="Snapshots written, loaded at start, found unusable, or failed to write.",
        ),
        panel(
            "Pods at another level",
            "timeseries",
            [
                target("max(cedar_mcs_pod_mismatches)", "pods at another level"),
                target("max(cedar_mcs_volume_conflicts)", "NFS volumes of another level", "B"),
            ],
            (0, 33, 8, 8),
            description="The watchdog's pods whose effective SELinux level differs from their "
            "namespace's, and NFS volumes whose mount context names another level "
            "(both reported, never changed).",
            thresholds=[(None, "green"), (1, "red")],
        ),
        panel(
            "Pod admissions by result",
            "timeseries",
            [
                target("sum by (result) (rate(cedar_mcs_admissions_total[5m]))", "{{result}}"),
                target(
                    'sum by (rule) (rate(cedar_mcs_admissions_total{result="denied"}[5m]))',
                    "denied: {{rule}}",
                    "B",
                ),
            ],
            (8, 33, 8, 8),
            unit="ops",
            description="AdmissionReviews the webhook answered: mutated (level set), admitted, "
            "denied (by rule), error (namespace unreadable), invalid (malformed).",
        ),
        panel(
            "Webhook latency",
            "timeseries",
            [
                target(
                    "histogram_quantile(0.5, sum by (le) "
                    "(rate(cedar_mcs_admission_seconds_bucket[5m])))",
                    "p50",
                ),
                target(
                    "histogram_quantile(0.99, sum by (le) "
                    "(rate(cedar_mcs_admission_seconds_bucket[5m])))",
                    "p99",
                    "B",
                ),
            ],
            (16, 33, 8, 8),
            unit="s",
            description="Time to answer one AdmissionReview inside the allocator (the API "
            "server adds the network and TLS); the webhook's timeout is 5 s.",
        ),
    ]
    return dashboard(
        "cedar-mcs-allocator",
        "Cedar / MCS allocator",
        "SELinux MCS label pool: usage, allocations, tampering and conflicts; pods and "
        "volumes at another level; the admission webhook.",
        panels,
        [],
    )


DASHBOARDS = {
    "cedar-fleet.json": fleet,
    "cedar-node.json": node,
    "cedar-watcher.json": watcher,
    "cedar-mcs-allocator.json": allocator,
}


def render() -> dict[str, str]:
    return {
        name: json.dumps(build(), indent=2, sort_keys=True) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)


if __name__ == "__main__":
    main()
