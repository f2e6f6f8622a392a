"""The day in a picture: launch hit ratio and registry load, one line per strategy.

Needs matplotlib (the bench's only extra dependency; the simulation itself does not).
Writes one PNG with three panels: the share of launches that found their image, per
15 minutes; the most pulls in progress at once at the busiest registry, per 5 minutes
(log scale); and the registries' GB per hour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {
    "none": "#7f7f7f",
    "original": "#d62728",
    "fledged": "#ff7f0e",
    "cedar": "#1f77b4",
    "cedar-paced": "#2ca02c",
}


def plot(results: dict[str, dict[str, Any]], out: Path, hours: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hit_ax, load_ax, gb_ax) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    for name, result in results.items():
        series = result["details"]["series"]
        color = COLORS.get(name)
        step = series["launch_bucket_s"] / 3600.0
        xs, ys = [], []
        for i, (launches, hits) in enumerate(zip(series["launches"], series["hits"], strict=True)):
            if launches:
                xs.append((i + 0.5) * step)
                ys.append(100.0 * hits / launches)
        hit_ax.plot(xs, ys, label=name, color=color, linewidth=1.4)
        step = series["load_bucket_s"] / 3600.0
        load = series["registry_peak_pulls"]
        load_ax.step(
            [i * step for i in range(len(load))],
            [max(v, 0.8) for v in load],
            where="post",
            label=name,
            color=color,
            linewidth=1.1,
        )
        gb = series["registry_gb_per_hour"]
        gb_ax.step(
            [i for i in range(len(gb))], gb, where="post", label=name, color=color, linewidth=1.4
        )
    hit_ax.set_ylabel("launches warm (%), per 15 min")
    hit_ax.set_ylim(min(90.0, hit_ax.get_ylim()[0]), 100.5)
    hit_ax.legend(loc="lower left", ncol=5, fontsize=8)
    hit_ax.grid(alpha=0.3)
    load_ax.set_yscale("log")
    load_ax.set_ylabel("registry: most pulls at once\n(busiest registry, per 5 min)")
    load_ax.grid(alpha=0.3, which="both")
    gb_ax.set_ylabel("registry GB per hour")
    gb_ax.set_xlabel("hour of the simulated day")
    gb_ax.grid(alpha=0.3)
    gb_ax.set_xlim(0, hours)
    fig.suptitle("Fleet simulation (bench/fleet): launch hit ratio and registry load")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
