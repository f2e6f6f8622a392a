"""The fleet trace: what happens to the fleet during the simulated day, as a file.

A trace is JSON Lines (gzip when the name ends in `.gz`), one record per line, documented
in bench/fleet/README.md (fleetsim/generate.py makes issue 15's from a seed); `read()`
loads and checks any trace, raising TraceError with the line number and what is wrong.
Every strategy replays the same trace; nothing in it depends on a strategy.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

FORMAT = "cedar-fleet-trace"
VERSION = 1
GB = 1e9
HOUR = 3600.0
DAY = 86400.0

APP_REGISTRY = "harbor.example.com"
PLATFORM_REGISTRY = "registry.platform.example.com"
PRUNE_LABEL = "example.com/prunable"


class TraceError(ValueError):
    """A trace file that cannot be replayed: the message names the line and the problem."""


# --- files -----------------------------------------------------------------------------------


def _reader(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _writer(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return gzip.open(path, "wt", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def write(path: Path, records: Iterable[dict[str, Any]]) -> int:
    count = 0
    with _writer(path) as out:
        for record in records:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
            count += 1
    return count


@dataclass
class Trace:
    """A trace as read: the static description, and the timed events in order."""

    header: dict[str, Any]
    registries: dict[str, dict[str, Any]] = field(default_factory=dict)
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)  # every image, by ref
    tenants: list[dict[str, Any]] = field(default_factory=list)
    daemonsets: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # t > 0 or timed kinds

    @property
    def hours(self) -> float:
        return float(self.header["hours"])


_REQUIRED: dict[str, tuple[str, ...]] = {
    "registry": ("host", "bandwidth_Bps", "requests_per_s", "request_timeout_s", "latency_s"),
    "pool": ("name", "labels", "taints"),
    "image": ("ref", "layers", "created"),
    "node": ("t", "name", "pool", "action"),
    "tenant": ("namespace", "name", "pool", "image", "node_selector", "tolerations"),
    "daemonset": ("namespace", "name", "image", "tolerations"),
    "release": ("t", "image", "namespaces", "spread_s"),
    "ds-release": ("t", "namespace", "name", "image", "rollout_s"),
    "prepull": ("t", "image", "pool", "ttl_s"),
    "outage": ("t", "host", "duration_s"),
    "login": ("t", "namespace", "session_s"),
}


def read(path: Path) -> Trace:
    """Load a trace; TraceError names the first bad line."""
    try:
        with _reader(path) as lines:
            return parse(lines)
    except (EOFError, gzip.BadGzipFile, UnicodeDecodeError) as err:
        raise TraceError(f"{path}: not a trace file: {err}") from None
    except OSError as err:
        raise TraceError(f"{path}: cannot read: {err}") from None


def parse(lines: Iterable[str]) -> Trace:
    trace: Trace | None = None
    last_t = 0.0
    namespaces: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise TraceError(f"line {number}: not JSON: {err}") from None
        if not isinstance(record, dict):
            raise TraceError(f"line {number}: a record must be a JSON object")
        kind = record.get("type")
        if trace is None:
            if kind != "header" or record.get("format") != FORMAT:
                raise TraceError(f"line {number}: the first record must be the {FORMAT} header")
            if record.get("version") != VERSION:
                raise TraceError(
                    f"line {number}: trace version {record.get('version')!r}, expected {VERSION}"
                )
            for key in ("hours", "node", "kubelet", "watcher"):
                if key not in record:
                    raise TraceError(f"line {number}: the header lacks {key!r}")
            trace = Trace(header=record)
            continue
        if kind not in _REQUIRED:
            raise TraceError(f"line {number}: unknown record type {kind!r}")
        missing = [k for k in _REQUIRED[kind] if k not in record]
        if missing:
            raise TraceError(f"line {number}: {kind} record lacks {', '.join(missing)}")
        t = record.get("t", 0.0)
        if not isinstance(t, int | float) or t < 0:
            raise TraceError(f"line {number}: t must be a non-negative number of seconds")
        if t < last_t:
            raise TraceError(f"line {number}: records must be in time order ({t} after {last_t})")
        last_t = float(t)
        if kind == "registry":
            trace.registries[record["host"]] = record
        elif kind == "pool":
            trace.pools[record["name"]] = record
        elif kind == "image":
            # A catalog entry: `t` is when it was pushed, which matters to nobody but its
            # `created` time; the simulator looks images up whenever something pulls them.
            if record["ref"] in trace.images:
                raise TraceError(f"line {number}: image {record['ref']!r} defined twice")
            trace.images[record["ref"]] = record
        elif kind == "tenant":
            if record["pool"] not in trace.pools:
                raise TraceError(f"line {number}: tenant in unknown pool {record['pool']!r}")
            if record["image"] not in trace.images:
                raise TraceError(f"line {number}: tenant image {record['image']!r} is not defined")
            namespaces.add(record["namespace"])
            trace.tenants.append(record)
        elif kind == "daemonset":
            trace.daemonsets.append(record)
        else:
            if kind == "node" and record["pool"] not in trace.pools:
                raise TraceError(f"line {number}: node in unknown pool {record['pool']!r}")
            if kind == "login" and record["namespace"] not in namespaces:
                raise TraceError(f"line {number}: login of unknown tenant {record['namespace']!r}")
            trace.events.append(record)
    if trace is None:
        raise TraceError("empty trace: no header")
    for event in trace.events:
        if (
            event["type"] in ("release", "ds-release", "prepull")
            and event["image"] not in trace.images
        ):
            raise TraceError(
                f"{event['type']} at t={event['t']}: image {event['image']!r} is not defined"
            )
    return trace
