"""Running the strategies on one trace, and the table issue 15 asks for."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

from fleetsim.baselines import Fledged, NoPrepull, Original
from fleetsim.cedar import CedarStrategy
from fleetsim.cedar_parts import CedarSettings
from fleetsim.cluster import Cluster, Strategy
from fleetsim.trace import Trace, read

STRATEGIES = ("none", "original", "fledged", "cedar", "cedar-paced")


def make_strategy(name: str, fleet_pulls: str | None = None) -> Strategy:
    if name == "none":
        return NoPrepull()
    if name == "original":
        return Original()
    if name == "fledged":
        return Fledged()
    if name == "cedar":
        return CedarStrategy(paced=False)
    if name == "cedar-paced":
        settings = CedarSettings(fleet_pulls=fleet_pulls) if fleet_pulls else None
        return CedarStrategy(paced=True, settings=settings)
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")


def run_one(
    trace: Trace | Path,
    name: str,
    seed: int,
    per_node_desired: bool = False,
    fleet_pulls: str | None = None,
) -> dict[str, Any]:
    """One strategy on one trace: {"summary": ..., "details": ..., "seconds": wall time}."""
    logging.getLogger("cedar").setLevel(logging.ERROR)  # 1,000 pullers' INFO lines otherwise
    if isinstance(trace, Path):
        trace = read(trace)
    started, cpu = time.perf_counter(), time.process_time()
    cluster = Cluster(
        trace, make_strategy(name, fleet_pulls), seed, per_node_desired=per_node_desired
    )
    # Millions of small, acyclic objects: the cycle collector would only rescan them.
    gc.collect()
    gc.freeze()
    threshold = gc.get_threshold()
    gc.set_threshold(200_000, 50, 100)
    try:
        metrics = cluster.run()
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
    seconds = time.perf_counter() - started
    return {
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "summary": metrics.summary(),
        "details": metrics.details(),
        "seconds": round(seconds, 1),
    }


def _fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits:
        return f"{value:.{digits}f}{unit}"
    if isinstance(value, float):
        return f"{value:.0f}{unit}"
    return f"{value}{unit}"


def table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        "strategy",
        "launches",
        "warm",
        "misses (new node, release)",
        "wait p50/p99/max s",
        "release->99% warm median/worst s",
        "registry peak pulls",
        "GB/h mean/peak",
        "disk p99 GB",
        "GC removals",
        "sim s",
    )
    rows = [head]
    for name, result in results.items():
        s, d = result["summary"], result["details"]
        ratio = s["launch_hit_ratio"]
        rows.append(
            (
                name,
                str(d["launches"]),
                f"{100 * ratio:.3f}%" if ratio is not None else "-",
                f"{d['misses']} ({d['misses_on_new_nodes']}, {d['misses_in_release_window']})",
                f"{_fmt(s['wait_p50_s'])}/{_fmt(s['wait_p99_s'])}/{_fmt(d['wait_max_s'])}",
                f"{_fmt(s['release_to_warm_p99_s'])}/{_fmt(d['release_to_warm_worst_s'])}"
                f" ({d['releases_reaching_99pct']}/{d['releases']} reached)",
                str(s["registry_peak_pulls"]),
                f"{s['registry_gb_per_hour']:.0f}/{d['registry_gb_peak_hour']:.0f}",
                _fmt(s["disk_gb_p99"], digits=1),
                str(d["kubelet_gc_images_removed"]),
                str(result["seconds"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    out = [
        "| strategy | launches warm | misses (on new nodes, in release windows) | "
        "wait of the others p50 / p99 / max | "
        "release → 99% of eligible nodes warm, median / worst | registry peak concurrent pulls | "
        "registry GB/h, mean / peak hour | disk per node p99 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        s, d = result["summary"], result["details"]
        ratio = s["launch_hit_ratio"]
        waits = (
            f"{_fmt(s['wait_p50_s'], ' s')} / {_fmt(s['wait_p99_s'], ' s')} / "
            f"{_fmt(d['wait_max_s'], ' s')}"
        )
        release = (
            f"{_fmt(s['release_to_warm_p99_s'], ' s')} / "
            f"{_fmt(d['release_to_warm_worst_s'], ' s')} "
            f"({d['releases_reaching_99pct']} of {d['releases']} releases reach 99%)"
        )
        cells = [
            f"`{name}`",
            f"{100 * ratio:.2f}% of {d['launches']:,}",
            f"{d['misses']:,} ({d['misses_on_new_nodes']:,}, {d['misses_in_release_window']:,})",
            waits,
            release,
            f"{s['registry_peak_pulls']:,}",
            f"{s['registry_gb_per_hour']:.0f} / {d['registry_gb_peak_hour']:.0f}",
            _fmt(s["disk_gb_p99"], " GB", 1),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
