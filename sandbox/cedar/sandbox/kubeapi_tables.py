"""Pure: the server-side `Table` that `kubectl get` asks for, column for column.

kubectl get sends `Accept: application/json;as=Table;v=v1;g=meta.k8s.io, ...` and prints the
columns the server chose. These are those of pkg/printers/internalversion/printers.go for
the kinds the sandbox serves (a kind not listed gets Name and Age, as the default table
convertor gives: staging/src/k8s.io/apiserver/pkg/registry/rest/table.go); ages are
rendered like staging/src/k8s.io/apimachinery/pkg/util/duration HumanDuration. Each row
carries the object's metadata (includeObject=Metadata, the default). No I/O.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from cedar.sandbox.kubeapi_ops import JsonObj

Row = Callable[[JsonObj], list[Any]]
CREATED = "creationTimestamp"


def wants_table(accept: str) -> bool:
    return any("as=table" in part.replace(" ", "").lower() for part in accept.split(","))


def human_duration(seconds: float) -> str:
    s = int(max(seconds, 0))
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    return f"{days // 365}y"


def _age(stamp: Any) -> str:
    if not isinstance(stamp, str) or not stamp:
        return "<unknown>"
    try:
        then = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return "<unknown>"
    return human_duration((datetime.datetime.now(datetime.UTC) - then).total_seconds())


def _meta(obj: JsonObj) -> JsonObj:
    return obj.get("metadata") or {}


def _spec(obj: JsonObj) -> JsonObj:
    return obj.get("spec") or {}


def _status(obj: JsonObj) -> JsonObj:
    return obj.get("status") or {}


def _node_status(obj: JsonObj) -> str:
    ready = next(
        (c for c in _status(obj).get("conditions") or [] if c.get("type") == "Ready"), None
    )
    state = {"True": "Ready", "False": "NotReady"}.get(str((ready or {}).get("status")), "Unknown")
    return f"{state},SchedulingDisabled" if _spec(obj).get("unschedulable") else state


def _roles(obj: JsonObj) -> str:
    prefix = "node-role.kubernetes.io/"
    roles = sorted(k[len(prefix) :] for k in _meta(obj).get("labels") or {} if k.startswith(prefix))
    return ",".join(roles) or "<none>"


def _involved(obj: JsonObj) -> str:
    involved = obj.get("involvedObject") or obj.get("regarding") or {}
    return f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}"


def _selector(obj: JsonObj) -> str:
    chosen = (_spec(obj).get("template") or {}).get("spec", {}).get("nodeSelector") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(chosen.items())) or "<none>"


def _last_schedule(obj: JsonObj) -> str:
    stamp = _status(obj).get("lastScheduleTime")
    return _age(stamp) if stamp else "<none>"


def _job_status(obj: JsonObj) -> str:
    for condition in _status(obj).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return str(condition["type"])
    return "Suspended" if _spec(obj).get("suspend") else "Running"


_COLUMNS: dict[str, tuple[list[str], Row]] = {
    "Namespace": (["Status"], lambda o: [_status(o).get("phase", "")]),
    "Node": (
        ["Status", "Roles"],
        lambda o: [_node_status(o), _roles(o)],
    ),
    "Deployment": (
        ["Ready", "Up-to-date", "Available"],
        lambda o: [
            f"{_status(o).get('readyReplicas', 0)}/{_spec(o).get('replicas', 1)}",
            _status(o).get("updatedReplicas", 0),
            _status(o).get("availableReplicas", 0),
        ],
    ),
    "ReplicaSet": (
        ["Desired", "Current", "Ready"],
        lambda o: [
            _spec(o).get("replicas", 1),
            _status(o).get("replicas", 0),
            _status(o).get("readyReplicas", 0),
        ],
    ),
    "DaemonSet": (
        ["Desired", "Current", "Ready", "Up-to-date", "Available", "Node Selector"],
        lambda o: [
            _status(o).get("desiredNumberScheduled", 0),
            _status(o).get("currentNumberScheduled", 0),
            _status(o).get("numberReady", 0),
            _status(o).get("updatedNumberScheduled", 0),
            _status(o).get("numberAvailable", 0),
            _selector(o),
        ],
    ),
    "StatefulSet": (
        ["Ready"],
        lambda o: [f"{_status(o).get('readyReplicas', 0)}/{_spec(o).get('replicas', 1)}"],
    ),
    "Job": (
        ["Status", "Completions"],
        lambda o: [
            _job_status(o),
            f"{_status(o).get('succeeded', 0)}/{_spec(o).get('completions', 1)}",
        ],
    ),
    "CronJob": (
        ["Schedule", "Timezone", "Suspend", "Active", "Last Schedule"],
        lambda o: [
            _spec(o).get("schedule", ""),
            _spec(o).get("timeZone") or "<none>",
            "True" if _spec(o).get("suspend") else "False",
            len(_status(o).get("active") or []),
            _age(_status(o).get("lastScheduleTime"))
            if _status(o).get("lastScheduleTime")
            else "<none>",
        ],
    ),
}


def _column(name: str) -> JsonObj:
    return {
        "name": name,
        "type": "string",
        "format": "name" if name == "Name" else "",
        "description": "",
        "priority": 0,
    }


def _partial(obj: JsonObj) -> JsonObj:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": _meta(obj)}


def _event_row(obj: JsonObj) -> list[Any]:
    last = obj.get("lastTimestamp") or obj.get("eventTime") or _meta(obj).get("creationTimestamp")
    return [
        _age(last),
        obj.get("type", ""),
        obj.get("reason", ""),
        _involved(obj),
        obj.get("message") or obj.get("note", ""),
    ]


def table(kind: str, items: list[JsonObj], list_meta: JsonObj) -> JsonObj:
    """The meta.k8s.io/v1 Table of `items` (one object's table when there is one item)."""
    if kind == "Event":
        names = ["Last Seen", "Type", "Reason", "Object", "Message"]
        rows = [{"cells": _event_row(o), "object": _partial(o)} for o in items]
    else:
        extra, row = _COLUMNS.get(kind, ([], lambda o: []))
        names = ["Name", *extra, "Age"]
        rows = [
            {
                "cells": [
                    _meta(o).get("name", ""),
                    *row(o),
                    _age(_meta(o).get("creationTimestamp")),
                ],
                "object": _partial(o),
            }
            for o in items
        ]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {k: v for k, v in list_meta.items() if k in ("resourceVersion", "continue")},
        "columnDefinitions": [_column(n) for n in names],
        "rows": rows,
    }
