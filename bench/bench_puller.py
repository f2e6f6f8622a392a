"""Benchmark the puller: warming an empty engine, and idle memory.

1. COUNT images of SIZE from a local registry into an empty Docker engine, three ways in
   the same run (the engine's images are removed between variants):
   - the original tool: `docker pull` of each image in turn;
   - all COUNT `docker pull` commands started at once (the engine's own parallelism);
   - `cedar puller` (in this process) learning the images from NATS, start -> all present.
   Target: >= 2x faster than the sequential loop, within 15% of the parallel pull.
2. Idle RSS of a `cedar puller` process following WORKLOADS workloads (all of whose images
   are already present, so it is idle once warm). Target: < 80 MB.

Everything is real and local: nats-server, dockerd (two private engines: one builds and
pushes, the other is the node being warmed), docker-registry.

    .venv/bin/python bench/bench_puller.py [--count 20] [--size-mb 50] [--rounds 1]
        [--workloads 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from cedar.proto import subjects
from cedar.proto.imageref import normalize
from cedar.proto.models import ContainerImage, PodScheduling, WorkloadImageSet
from cedar.puller.app import assemble
from cedar.puller.settings import PullerSettings
from cedar.runtime.bus import Bus
from cedar.runtime.health import Health
from cedar.runtime.topology import workloads_stream
from cedar.sandbox.dockerd import DockerEngine
from cedar.sandbox.images import make_images
from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import find_binary, kill_pid
from cedar.sandbox.registry import Registry


def clear_images(engine: DockerEngine) -> None:
    ids = engine.docker("images", "-aq").stdout.split()
    if ids:
        engine.docker("rmi", "-f", *sorted(set(ids)))
    assert not engine.docker("images", "-aq").stdout.split()


def sequential(engine: DockerEngine, refs: list[str]) -> float:
    started = time.perf_counter()
    for ref in refs:
        engine.docker("pull", "-q", ref)
    return time.perf_counter() - started


def parallel(engine: DockerEngine, refs: list[str]) -> float:
    docker = find_binary("docker")
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [docker, "pull", "-q", ref],
            env=engine.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for ref in refs
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(err.decode())
    return time.perf_counter() - started


def wis(name: str, images: list[str], index: int = 0) -> WorkloadImageSet:
    return WorkloadImageSet(
        kind="Deployment",
        namespace=f"tenant-{index % 500}",
        name=name,
        uid=str(uuid.uuid4()),
        containers=tuple(
            ContainerImage(container=f"c{i}", image=img, reference=normalize(img))
            for i, img in enumerate(images)
        ),
        scheduling=PodScheduling(node_selector={"kubernetes.io/os": "linux"}),
        replicas=0,
        observed_at=datetime.now(UTC),
    )


async def publish(nats_url: str, workloads: list[WorkloadImageSet]) -> None:
    settings = PullerSettings(node_name="bench", nats_url=nats_url)
    bus = Bus(settings, "bench-publisher", Health())
    await bus.connect()
    await bus.ensure(streams=[workloads_stream(settings)])
    # Publish in windows of acks: 5,000 one-at-a-time round trips would dominate setup.
    for start in range(0, len(workloads), 500):
        batch = workloads[start : start + 500]
        await asyncio.gather(
            *(
                bus.js.publish(
                    subjects.workload_subject(w.kind, w.namespace, w.name),
                    w.model_dump_json().encode(),
                )
                for w in batch
            )
        )
    await bus.close()


async def with_puller(nats_url: str, engine: DockerEngine, refs: list[str]) -> float:
    await publish(nats_url, [wis(f"app-{i}", [ref]) for i, ref in enumerate(refs)])
    settings = PullerSettings(
        node_name=f"bench-{uuid.uuid4().hex[:6]}",
        nats_url=nats_url,
        docker_host=engine.host,
        node_from_api=False,
    )
    health = Health()
    bus = Bus(settings, "bench-puller", health)
    stop = asyncio.Event()
    started = time.perf_counter()
    await bus.connect()
    puller = await assemble(settings, bus, health, stop)
    assert puller is not None
    task = asyncio.create_task(puller.run(stop))
    await asyncio.wait(
        {task, asyncio.ensure_future(puller.reconciler.warm.wait())}, return_when="FIRST_COMPLETED"
    )
    elapsed = time.perf_counter() - started
    if task.done():
        task.result()
    stop.set()
    await task
    await bus.close()
    records = puller.reconciler.records
    missing = [r for r in refs if records[normalize(r)].state != "present"]
    if missing:
        raise RuntimeError(f"puller finished without {missing}")
    return elapsed


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def idle_rss(
    nats_url: str, engine: DockerEngine, refs: list[str], count: int, base: Path
) -> tuple[int, float]:
    # Many tenants share few images: each workload names 1-3 of the present images.
    workloads = [
        wis(f"idle-{i}", [refs[i % len(refs)], refs[(i * 7) % len(refs)]], i) for i in range(count)
    ]
    await publish(nats_url, workloads)
    log = base / "idle-puller.log"
    env = {
        **engine.env(),
        "CEDAR_NODE_NAME": "bench-idle",
        "CEDAR_NATS_URL": nats_url,
        "CEDAR_NODE_FROM_API": "false",
        "CEDAR_METRICS_PORT": "0",
    }
    proc = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "cedar.cli", "puller"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    started = time.perf_counter()
    try:
        while "node is warm" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                raise RuntimeError(f"puller exited: {log.read_text()[-2000:]}")
            if time.perf_counter() - started > 120:
                raise RuntimeError("puller did not become warm")
            await asyncio.sleep(0.2)
        warm = time.perf_counter() - started
        await asyncio.sleep(10)  # idle: a few resync rounds
        return rss_kib(proc.pid), warm
    finally:
        kill_pid(proc.pid)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workloads", type=int, default=5000)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="cb-", dir="/tmp"))
    nats = NatsServer(base / "nats")
    registry = Registry(base / "registry")
    builder = DockerEngine(base / "e1")
    node = DockerEngine(base / "e2")
    servers = [nats, registry, builder, node]
    try:
        for server in servers:
            server.start()
        print(f"making {args.count} images of {args.size_mb} MB ...", flush=True)
        t = time.perf_counter()
        refs = make_images(
            builder, registry, args.count, args.size_mb * 1024 * 1024, prefix="bench/img"
        )
        print(f"  made in {time.perf_counter() - t:.1f}s", flush=True)
        results: dict[str, list[float]] = {"sequential": [], "parallel": [], "puller": []}
        for round_no in range(args.rounds):
            for name in ("sequential", "parallel", "puller"):
                clear_images(node)
                if name == "sequential":
                    seconds = sequential(node, refs)
                elif name == "parallel":
                    seconds = parallel(node, refs)
                else:
                    seconds = await with_puller(nats.url, node, refs)
                results[name].append(seconds)
                print(f"  round {round_no + 1} {name:>10}: {seconds:6.2f}s", flush=True)
        best = {k: min(v) for k, v in results.items()}
        print()
        print(f"| variant | seconds (best of {args.rounds}) | MB/s |")
        print("| --- | --- | --- |")
        total_mb = args.count * args.size_mb
        for name, seconds in best.items():
            print(f"| {name} | {seconds:.2f} | {total_mb / seconds:.0f} |")
        print()
        print(f"puller vs sequential: {best['sequential'] / best['puller']:.2f}x faster")
        print(f"puller vs parallel:   {best['puller'] / best['parallel'] * 100 - 100:+.1f}%")

        rss, warm = await idle_rss(nats.url, node, refs, args.workloads, base)
        print(
            f"idle RSS following {args.workloads} workloads: {rss / 1024:.1f} MiB "
            f"(warm after {warm:.1f}s)"
        )
        print(
            f"machine: {platform.platform()}, {os.cpu_count()} CPUs, "
            f"python {platform.python_version()}, "
            f"{node.docker('version', '--format', '{{.Server.Version}}').stdout.strip()} dockerd "
            f"({node.docker('info', '--format', '{{.Driver}}').stdout.strip()})"
        )
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
