"""Fan-out, measured for real: one workload change, a thousand node pullers, one NATS server.

    .venv/bin/python bench/bench_fanout.py                     # 1,000 nodes, 10,000 workloads
    .venv/bin/python bench/bench_fanout.py --nodes 100 --changes 10 --load-workloads 1000

1. Fan-out. A real `nats-server`; Cedar's watcher code path (`WatchState` -> `Outbox` ->
   `Publisher`, pipelined publishes with content-derived Msg-Ids) publishes WORKLOADS
   Deployments, then changes one Deployment's image CHANGES times, INTERVAL seconds apart.
   NODES simulated node pullers, NODES/PROCESSES per worker process, each one what a real
   puller runs to follow the workloads: its own NATS connection, Cedar's `DesiredFeed` (an
   ordered consumer of CEDAR_WORKLOADS from the start, idle heartbeats) and its own
   `DesiredSet` for a node of one of three pools (general, GPU with a taint, high-memory).
   Measured per change and node: from the watcher taking the change in (the Deployment
   MODIFIED event handed to `WatchState`, just before the publish) to that node's desired
   set having applied it (the `on_change` callback with the new image), on one clock (the
   machine's). Reported: p50/p99/max over every (change, node), and per change the time
   until every node had it (p50/p99/max); the NATS server's CPU (seconds, and share of one
   core, over the changes) and memory (RSS, peak RSS) with every puller connected.
2. Load. The stream then holds LOAD_WORKLOADS Deployments (the watcher publishes the rest);
   a new puller process (`DesiredFeed` + `DesiredSet`, as `cedar puller` starts) is timed
   from subscribing to the desired state being loaded (the feed's initial pass done),
   LOAD_RUNS times; its peak RSS too.

Everything is local and real but the Kubernetes API: the Deployment objects are built here
(the shape the API returns) and handed to the watcher's state as its informer would. The
server runs with its defaults: CEDAR_WORKLOADS sets its own consumer limit, above NATS
2.15's default of 1,000 per stream (tests/integration/test_fleet_consumers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
POOLS = ("general", "gpu", "highmem")
MARKER = "registry.example.com/bench/fanout"


def deployment(i: int, image: str | None = None) -> dict[str, Any]:
    """Deployment i of the bench: a tenant's app with a sidecar, in one of the pools. The
    changed one (i = 0) selects no pool and tolerates every taint, so that every node's
    desired set takes it."""
    pool = POOLS[i % 3]
    spec: dict[str, Any] = {
        "containers": [
            {"name": "app", "image": image or f"registry.example.com/t{i % 500}/app{i}:v1"},
            {"name": "proxy", "image": "docker.io/envoyproxy/envoy:v1.30.1"},
        ],
        "initContainers": [{"name": "migrate", "image": f"registry.example.com/t{i % 500}/m:v1"}],
    }
    if i:
        spec["nodeSelector"] = {"pool": pool}
        if pool == "gpu":
            spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    else:
        spec["tolerations"] = [{"operator": "Exists"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"app{i}",
            "namespace": f"tenant-{i % 500}",
            "uid": f"uid-{i}",
            "generation": 1,
            "resourceVersion": str(i + 1),
        },
        "spec": {"replicas": 0, "template": {"spec": spec}},
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss_mb": out.get("VmRSS", 0.0), "peak_rss_mb": out.get("VmHWM", 0.0)}


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) // 1024
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_mb": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


# ====================================================================== the watcher


class Watcher:
    """Cedar's watcher path without the API: WatchState, Outbox, Publisher."""

    async def start(self, url: str) -> None:
        from cedar.runtime import topology
        from cedar.runtime.bus import Bus
        from cedar.runtime.health import Health
        from cedar.watcher.outbox import Outbox
        from cedar.watcher.publisher import Publisher
        from cedar.watcher.settings import WatcherSettings
        from cedar.watcher.watch_state import WatchState

        settings = WatcherSettings(nats_url=url, watch_kinds="Deployment", log_level="WARNING")
        self.bus = Bus(settings, "bench-watcher", Health())
        await self.bus.connect()
        await self.bus.ensure(streams=topology.service_streams(settings))
        self.outbox = Outbox()
        self.publisher = Publisher(self.bus, self.outbox, max_inflight=512)
        await self.publisher.seed(("Deployment",), None)
        self.state = WatchState(self.outbox, previous_revisions=1)
        self.task = asyncio.create_task(self.publisher.run())

    async def list(self, count: int) -> None:
        """The informer's initial list: Deployments 0..count-1."""
        self.state.begin_list("Deployment")
        for i in range(count):
            self.state.apply("Deployment", "LISTED", deployment(i))
        self.state.end_list("Deployment")
        self.publisher.notify()
        await self.publisher.flush(600)

    async def add(self, first: int, count: int) -> None:
        for i in range(first, first + count):
            self.state.apply("Deployment", "ADDED", deployment(i))
            if i % 500 == 0:
                self.publisher.notify()
                await asyncio.sleep(0)
        self.publisher.notify()
        await self.publisher.flush(600)

    def change(self, k: int) -> float:
        """Deployment 0 gets image fanout:v<k>; returns when the watcher took it in."""
        obj = deployment(0, f"{MARKER}:v{k}")
        obj["metadata"]["generation"] = k + 1
        obj["metadata"]["resourceVersion"] = f"c{k}"
        at = time.time()
        self.state.apply("Deployment", "MODIFIED", obj)
        self.publisher.notify()
        return at

    async def close(self) -> None:
        await self.publisher.flush(60)
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.bus.close()


# ====================================================================== worker processes


def worker(args: argparse.Namespace) -> None:
    asyncio.run(_worker(args))


async def _worker(args: argparse.Namespace) -> None:
    from cedar.proto.scheduling import NodeInfo, Taint
    from cedar.puller.desired import Change, DesiredSet
    from cedar.puller.feed import DesiredFeed
    from cedar.puller.settings import PullerSettings
    from cedar.runtime.bus import Bus
    from cedar.runtime.health import Health

    seen: dict[int, list[float]] = {}
    feeds: list[DesiredFeed] = []
    buses: list[Bus] = []

    def on_change(change: Change) -> None:
        now = time.time()
        for image in change.added:
            if image.startswith(MARKER + ":v"):
                seen.setdefault(int(image.rsplit(":v", 1)[1]), []).append(now)

    started = time.perf_counter()
    for n in range(args.first, args.first + args.count):
        name = f"node-{n:04d}"
        pool = POOLS[n % 3]
        taints = (Taint("nvidia.com/gpu", "NoSchedule", "true"),) if pool == "gpu" else ()
        labels = {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "pool": pool}
        node = NodeInfo(name=name, labels=labels, taints=taints)
        settings = PullerSettings(node_name=name, nats_url=args.url, log_level="WARNING")
        health = Health()
        bus = Bus(settings, f"cedar-puller-{name}", health)
        await bus.connect()
        feed = DesiredFeed(
            bus=bus,
            desired=DesiredSet(node),
            health=health,
            on_change=on_change,
            synced=asyncio.Event(),
            dirty=asyncio.Event(),
            from_subject=None,
        )
        await feed.subscribe()
        feeds.append(feed)
        buses.append(bus)
    await asyncio.gather(*(f.synced.wait() for f in feeds))
    workloads = [f.desired.workload_count for f in feeds]
    print(
        json.dumps(
            {
                "ready": len(feeds),
                "seconds": time.perf_counter() - started,
                "workloads": min(workloads),
            }
        ),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    assert line.strip() == "report", line
    print(json.dumps({"seen": seen}), flush=True)
    for feed in feeds:
        await feed.close()
    for bus in buses:
        await bus.close()


def loader(args: argparse.Namespace) -> None:
    asyncio.run(_loader(args))


async def _loader(args: argparse.Namespace) -> None:
    from cedar.proto.scheduling import NodeInfo
    from cedar.puller.desired import DesiredSet
    from cedar.puller.feed import DesiredFeed
    from cedar.puller.settings import PullerSettings
    from cedar.runtime.bus import Bus
    from cedar.runtime.health import Health

    settings = PullerSettings(node_name="new-node", nats_url=args.url, log_level="WARNING")
    health = Health()
    bus = Bus(settings, "cedar-puller-new-node", health)
    await bus.connect()
    labels = {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "pool": "general"}
    desired = DesiredSet(NodeInfo(name="new-node", labels=labels))
    synced = asyncio.Event()
    feed = DesiredFeed(
        bus=bus,
        desired=desired,
        health=health,
        on_change=lambda change: None,
        synced=synced,
        dirty=asyncio.Event(),
        from_subject=None,
    )
    started = time.perf_counter()
    await feed.subscribe()
    await synced.wait()
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "seconds": seconds,
                "workloads": desired.workload_count,
                "images": len(desired),
                "peak_rss_mb": proc_memory(os.getpid())["peak_rss_mb"],
            }
        ),
        flush=True,
    )
    await feed.close()
    await bus.close()


# ====================================================================== the run


def _child(args: argparse.Namespace, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PY, __file__, "--url", args.url, *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _read(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a child process ended (exit {proc.wait()})")
    value: dict[str, Any] = json.loads(line)
    return value


async def fanout(args: argparse.Namespace, watcher: Watcher, nats_pid: int) -> dict[str, Any]:
    per = -(-args.nodes // args.processes)
    workers: list[subprocess.Popen[str]] = []
    first = 0
    while first < args.nodes:
        count = min(per, args.nodes - first)
        workers.append(_child(args, "--worker", "--first", str(first), "--count", str(count)))
        first += count
    try:
        return await _fanout(args, watcher, nats_pid, workers)
    finally:
        for w in workers:  # a worker that failed must not outlive the run
            if w.poll() is None:
                w.kill()
                w.wait(10)


async def _fanout(
    args: argparse.Namespace,
    watcher: Watcher,
    nats_pid: int,
    workers: list[subprocess.Popen[str]],
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    ready = await asyncio.gather(*(loop.run_in_executor(None, _read, w) for w in workers))
    assert sum(r["ready"] for r in ready) == args.nodes
    assert all(r["workloads"] == args.workloads for r in ready), ready
    await asyncio.sleep(2.0)  # connections and consumers settle
    memory_idle = proc_memory(nats_pid)
    cpu_before, wall_before = proc_cpu(nats_pid), time.perf_counter()
    sent: dict[int, float] = {}
    for k in range(1, args.changes + 1):
        sent[k] = watcher.change(k)
        await asyncio.sleep(args.interval)
    await asyncio.sleep(1.0)
    cpu = proc_cpu(nats_pid) - cpu_before
    wall = time.perf_counter() - wall_before
    memory = proc_memory(nats_pid)
    seen: dict[int, list[float]] = {}
    for w in workers:
        assert w.stdin is not None
        w.stdin.write("report\n")
        w.stdin.flush()
    for w in workers:
        report = await loop.run_in_executor(None, _read, w)
        for k, times in report["seen"].items():
            seen.setdefault(int(k), []).extend(times)
    for w in workers:
        w.wait(60)
    per_node = [t - sent[k] for k, times in seen.items() for t in times]
    to_all = [max(times) - sent[k] for k, times in seen.items() if len(times) == args.nodes]
    missing = sum(args.nodes - len(seen.get(k, [])) for k in sent)
    return {
        "nodes": args.nodes,
        "processes": len(workers),
        "workloads": args.workloads,
        "changes": args.changes,
        "interval_s": args.interval,
        "pullers_ready_s": max(r["seconds"] for r in ready),
        "deliveries": len(per_node),
        "missing": missing,
        "per_node_p50_ms": percentile(per_node, 0.5) * 1000,
        "per_node_p99_ms": percentile(per_node, 0.99) * 1000,
        "per_node_max_ms": max(per_node) * 1000,
        "all_nodes_p50_ms": percentile(to_all, 0.5) * 1000,
        "all_nodes_p99_ms": percentile(to_all, 0.99) * 1000,
        "all_nodes_max_ms": max(to_all) * 1000 if to_all else float("nan"),
        "nats_cpu_s": cpu,
        "nats_cpu_share_of_one_core": cpu / wall,
        "nats_rss_idle_mb": memory_idle["rss_mb"],
        "nats_rss_mb": memory["rss_mb"],
        "nats_peak_rss_mb": memory["peak_rss_mb"],
    }


async def load(args: argparse.Namespace, watcher: Watcher) -> dict[str, Any]:
    if args.load_workloads > args.workloads:
        await watcher.add(args.workloads, args.load_workloads - args.workloads)
    runs = []
    loop = asyncio.get_running_loop()
    for _ in range(args.load_runs):
        proc = _child(args, "--load")
        try:
            runs.append(await loop.run_in_executor(None, _read, proc))
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert all(r["workloads"] == args.load_workloads for r in runs), runs
    seconds = [r["seconds"] for r in runs]
    return {
        "workloads": args.load_workloads,
        "desired_images": runs[0]["images"],
        "runs_s": seconds,
        "median_s": statistics.median(seconds),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from cedar.sandbox.nats import NatsServer

    with tempfile.TemporaryDirectory(prefix="cedar-fanout-") as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        try:
            args.url = server.url
            version = (
                await asyncio.to_thread(
                    subprocess.run,
                    [server.command()[0], "--version"],
                    capture_output=True,
                    text=True,
                    check=False,
                )
            ).stdout.strip()
            watcher = Watcher()
            await watcher.start(server.url)
            await watcher.list(args.workloads)
            pid = server.pid
            assert pid is not None
            result = {
                "machine": {**machine(), "nats_server": version},
                "fanout": await fanout(args, watcher, pid),
                "load": await load(args, watcher),
            }
            await watcher.close()
            return result
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--workloads", type=int, default=200)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--load-workloads", type=int, default=10_000)
    parser.add_argument("--load-runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--loader", "--load", dest="loader", action="store_true", help=argparse.SUPPRESS
    )
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.loader:
        loader(args)
        return
    result = asyncio.run(run(args))
    f, ld = result["fanout"], result["load"]
    m = result["machine"]
    print(
        f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_mb']} MB, "
        f"python {m['python']}, {m['nats_server']}"
    )
    print(
        f"fan-out: {f['nodes']} pullers in {f['processes']} processes, {f['workloads']} "
        f"workloads, {f['changes']} changes {f['interval_s']:g}s apart "
        f"({f['deliveries']} deliveries, {f['missing']} missing)"
    )
    print(
        f"  watcher -> a puller's desired set: p50 {f['per_node_p50_ms']:.1f} ms, "
        f"p99 {f['per_node_p99_ms']:.1f} ms, max {f['per_node_max_ms']:.1f} ms"
    )
    print(
        f"  watcher -> every puller's:        p50 {f['all_nodes_p50_ms']:.1f} ms, "
        f"p99 {f['all_nodes_p99_ms']:.1f} ms, max {f['all_nodes_max_ms']:.1f} ms"
    )
    print(
        f"  nats-server: {f['nats_cpu_s']:.2f} CPU s over the changes "
        f"({100 * f['nats_cpu_share_of_one_core']:.1f}% of a core), RSS "
        f"{f['nats_rss_mb']:.0f} MB (idle {f['nats_rss_idle_mb']:.0f} MB, peak "
        f"{f['nats_peak_rss_mb']:.0f} MB)"
    )
    print(
        f"load: a new puller reads {ld['workloads']} workloads ({ld['desired_images']} desired "
        f"images) in {ld['median_s']:.2f} s median of {len(ld['runs_s'])} "
        f"({', '.join(f'{s:.2f}' for s in ld['runs_s'])}), peak RSS {ld['peak_rss_mb']:.0f} MB"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
