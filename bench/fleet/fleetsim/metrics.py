"""What one strategy's day measured, and the summary issue 15 asks for.

Launch hit ratio: a tenant launch (a login that starts the tenant's pod) whose image was
present on the node the scheduler chose, at the moment it chose it. Waits: for the other
launches, from scheduling to the image being present. Release to 99% warm: per release
(each new tenant tag, and the DaemonSet's), the time until 99% of the nodes that were
eligible for it at the release (the ones its pods may run on, Ready then and not deleted
since) have it; the JSON value is the median over the day's releases (None when fewer
than half of them got there before the trace ended); the table also shows the worst.
Registry peak pulls: the most pulls in progress at once against one registry (requests
waiting to be answered included). GB per hour: bytes served by all registries over the
simulated hours. Disk: per node, the most image bytes it held at any time; p99 over nodes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

LAUNCH_BUCKET_S = 900.0
LOAD_BUCKET_S = 300.0


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class ReleaseTrack:
    image: str
    kind: str  # "app" or "daemonset"
    t: float
    eligible: set[str]
    warm: set[str] = field(default_factory=set)
    reached_at: float | None = None

    def check(self, now: float) -> None:
        if (
            self.reached_at is None
            and self.eligible
            and len(self.warm & self.eligible) >= math.ceil(0.99 * len(self.eligible))
        ):
            self.reached_at = now


class Metrics:
    def __init__(self, strategy: str, hours: float) -> None:
        self.strategy = strategy
        self.hours = hours
        self.launches = 0
        self.hits = 0
        self.waits: list[float] = []
        self.launch_series: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        self.misses_on_new_nodes = 0
        # Launches of an image whose release has not reached 99% of its nodes yet.
        self.misses_in_release_window = 0
        self.logins_to_running = 0
        self.active: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.peak_series: dict[str, dict[int, int]] = defaultdict(dict)
        self.level_after: dict[str, dict[int, int]] = defaultdict(dict)  # level at a bucket's end
        self.bytes: dict[str, float] = defaultdict(float)
        self.bytes_series: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.request_timeouts = 0
        self.pulls = 0
        self.releases: list[ReleaseTrack] = []
        self.by_image: dict[str, list[ReleaseTrack]] = defaultdict(list)
        self.gc_runs = 0
        self.gc_removed = 0
        self.node_peaks: list[float] = []
        self.new_node_warm_s: list[float] = []
        self.lease_peak: dict[str, int] = {}
        self.extra: dict[str, Any] = {}

    # --- the registry's side (the engine calls these)

    def pull_started(self, host: str, now: float) -> None:
        self.pulls += 1
        active = self.active[host] + 1
        self.active[host] = active
        self.peak[host] = max(self.peak[host], active)
        self._level(host, now, active, active)

    def pull_ended(self, host: str, now: float) -> None:
        self.active[host] -= 1
        self._level(host, now, self.active[host] + 1, self.active[host])

    def _level(self, host: str, now: float, high: int, after: int) -> None:
        bucket = int(now // LOAD_BUCKET_S)
        series = self.peak_series[host]
        if high > series.get(bucket, 0):
            series[bucket] = high
        self.level_after[host][bucket] = after

    def load_series(self, buckets: int) -> list[int]:
        """Per LOAD_BUCKET_S bucket: the most pulls at once at the busiest registry."""
        out = [0] * buckets
        for host, series in self.peak_series.items():
            carry = 0
            after = self.level_after[host]
            for i in range(buckets):
                value = max(series.get(i, 0), carry)
                carry = after.get(i, carry)
                out[i] = max(out[i], value)
        return out

    def add_bytes(self, host: str, nbytes: float, now: float) -> None:
        self.bytes[host] += nbytes
        self.bytes_series[host][int(now // 3600.0)] += nbytes

    # --- launches

    def launch(self, now: float, hit: bool, on_new_node: bool, image: str) -> None:
        self.launches += 1
        bucket = self.launch_series[int(now // LAUNCH_BUCKET_S)]
        bucket[0] += 1
        if hit:
            self.hits += 1
            bucket[1] += 1
        elif on_new_node:
            self.misses_on_new_nodes += 1
        elif any(t.reached_at is None for t in self.by_image.get(image, ())):
            self.misses_in_release_window += 1

    def waited(self, seconds: float) -> None:
        self.waits.append(seconds)

    # --- releases

    def release(
        self, image: str, kind: str, now: float, eligible: set[str], warm: set[str]
    ) -> None:
        track = ReleaseTrack(image, kind, now, eligible, set(warm))
        track.check(now)
        self.releases.append(track)
        self.by_image[image].append(track)

    def image_added(self, node: str, image: str, now: float) -> None:
        for track in self.by_image.get(image, ()):
            if track.reached_at is None and node in track.eligible:
                track.warm.add(node)
                track.check(now)

    def node_deleted(self, node: str, now: float) -> None:
        for track in self.releases:
            if track.reached_at is None and node in track.eligible and node not in track.warm:
                track.eligible.discard(node)
                track.check(now)

    # --- the summary

    def release_times(self) -> list[float]:
        return [
            (t.reached_at - t.t) if t.reached_at is not None else math.inf for t in self.releases
        ]

    def summary(self) -> dict[str, Any]:
        """Exactly the keys of issue 15's JSON."""
        times = self.release_times()
        median = percentile(times, 50) if times else None
        return {
            "launch_hit_ratio": round(self.hits / self.launches, 6) if self.launches else None,
            "wait_p50_s": _round(percentile(self.waits, 50)),
            "wait_p99_s": _round(percentile(self.waits, 99)),
            "release_to_warm_p99_s": _round(median)
            if median is not None and math.isfinite(median)
            else None,
            "registry_peak_pulls": max(self.peak.values(), default=0),
            "registry_gb_per_hour": round(sum(self.bytes.values()) / 1e9 / self.hours, 3),
            "disk_gb_p99": _round(percentile(self.node_peaks, 99), 9, scale=1e9),
        }

    def details(self) -> dict[str, Any]:
        """Everything else: the table's extra columns, and the series for the plot."""
        times = self.release_times()
        finite = [t for t in times if math.isfinite(t)]
        hours = math.ceil(self.hours)
        return {
            "launches": self.launches,
            "hits": self.hits,
            "misses": self.launches - self.hits,
            "misses_on_new_nodes": self.misses_on_new_nodes,
            "misses_in_release_window": self.misses_in_release_window,
            "logins_to_running_pods": self.logins_to_running,
            "wait_max_s": _round(max(self.waits, default=None)),
            "releases": len(times),
            "releases_reaching_99pct": len(finite),
            "release_to_warm_worst_s": _round(max(times))
            if times and math.isfinite(max(times))
            else None,
            "registry_peak_pulls_by_host": dict(self.peak),
            "registry_gb_by_host": {h: round(b / 1e9, 1) for h, b in self.bytes.items()},
            "registry_gb_peak_hour": round(
                max(
                    (
                        sum(self.bytes_series[h].get(i, 0.0) for h in self.bytes_series)
                        for i in range(hours)
                    ),
                    default=0.0,
                )
                / 1e9,
                1,
            ),
            "registry_pulls": self.pulls,
            "registry_request_timeouts": self.request_timeouts,
            "kubelet_gc_runs": self.gc_runs,
            "kubelet_gc_images_removed": self.gc_removed,
            "new_node_warm_s_p50": _round(percentile(self.new_node_warm_s, 50)),
            "new_node_warm_s_max": _round(max(self.new_node_warm_s, default=None)),
            "fleet_lease_peak": dict(self.lease_peak),
            "series": {
                "launch_bucket_s": LAUNCH_BUCKET_S,
                "launches": [
                    self.launch_series[i][0] if i in self.launch_series else 0
                    for i in range(int(self.hours * 3600 // LAUNCH_BUCKET_S))
                ],
                "hits": [
                    self.launch_series[i][1] if i in self.launch_series else 0
                    for i in range(int(self.hours * 3600 // LAUNCH_BUCKET_S))
                ],
                "load_bucket_s": LOAD_BUCKET_S,
                "registry_peak_pulls": self.load_series(int(self.hours * 3600 // LOAD_BUCKET_S)),
                "registry_gb_per_hour": [
                    round(sum(self.bytes_series[h].get(i, 0.0) for h in self.bytes_series) / 1e9, 2)
                    for i in range(hours)
                ],
            },
            **self.extra,
        }


def _round(value: float | None, digits: int = 1, scale: float = 1.0) -> float | None:
    if value is None:
        return None
    return round(value / scale, digits if scale == 1.0 else 1)
