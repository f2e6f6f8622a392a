"""Benchmark the puller: warming an empty engine, and idle memory, on Docker and on containerd.

1. COUNT images of SIZE from a local registry into an empty Docker engine, three ways in
   the same run (the engine's images are removed between variants):
   - the original tool: `docker pull` of each image in turn;
   - all COUNT `docker pull` commands started at once (the engine's own parallelism);
   - `cedar puller` (in this process) learning the images from NATS, start -> all present.
   Target: >= 2x faster than the sequential loop, within 15% of the parallel pull.
2. The same images into an empty containerd (CRI plugin on), in the same run:
   - `ctr -n k8s.io images pull` of each image in turn;
   - all COUNT `ctr` pulls at once (containerd's own parallelism);
   - `cedar puller --runtime cri` (in this process), through the CRI.
   Target: within 15% of the parallel `ctr` pull, and not slower than the Docker path.
3. Idle RSS of a `cedar puller` process following WORKLOADS workloads (all of whose images
   are already present, so it is idle once warm), for each engine. Target: < 80 MB.

Everything is real and local: nats-server, dockerd (two private engines: one builds and
pushes, the other is the node being warmed), containerd (the other node), docker-registry.

    .venv/bin/python bench/bench_puller.py [--count 20] [--size-mb 50] [--rounds 1]
        [--workloads 5000] [--engines docker,cri]
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
from cedar.puller.cri_engine import CriImageEngine
from cedar.puller.settings import PullerSettings
from cedar.runtime.bus import Bus
from cedar.runtime.health import Health
from cedar.runtime.topology import service_streams
from cedar.sandbox.containerd import PAUSE_IMAGE, Containerd
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


async def clear_containerd(node: Containerd) -> None:
    """Every image but the pause image removed through the CRI (as kubelet's GC would), and
    containerd's garbage collector done with their content and snapshots."""
    engine = CriImageEngine(node.endpoint, node="bench")
    try:
        for image in await engine.images():
            if PAUSE_IMAGE not in image.repo_tags:
                await engine.remove(image)
    finally:
        await engine.close()
    deadline = time.perf_counter() + 60
    while True:
        blobs = node.ctr("content", "ls", "-q").stdout.split()
        snapshots = node.ctr("snapshots", "ls").stdout.strip().splitlines()[1:]
        if len(blobs) <= 3 and len(snapshots) <= 1:  # the pause image: 3 blobs, 1 snapshot
            return
        if time.perf_counter() > deadline:
            raise RuntimeError(f"containerd kept {len(blobs)} blobs, {len(snapshots)} snapshots")
        await asyncio.sleep(0.2)


def ctr_pull_cmd(node: Containerd, ref: str) -> list[str]:
    return [
        find_binary("ctr"),
        "--address",
        str(node.socket_path),
        "--namespace",
        "k8s.io",
        "images",
        "pull",
        "--plain-http",
        ref,
    ]


def ctr_sequential(node: Containerd, refs: list[str]) -> float:
    started = time.perf_counter()
    for ref in refs:
        subprocess.run(ctr_pull_cmd(node, ref), check=True, capture_output=True)
    return time.perf_counter() - started


def ctr_parallel(node: Containerd, refs: list[str]) -> float:
    started = time.perf_counter()
    procs = [
        subprocess.Popen(ctr_pull_cmd(node, ref), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for ref in refs
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(err.decode())
    return time.perf_counter() - started


def engine_settings(engine: DockerEngine | Containerd) -> dict[str, str]:
    if isinstance(engine, Containerd):
        return {"runtime": "cri", "cri_endpoint": engine.endpoint}
    return {"runtime": "docker", "docker_host": engine.host}


def engine_env(engine: DockerEngine | Containerd) -> dict[str, str]:
    if isinstance(engine, Containerd):
        return {**os.environ, "CEDAR_RUNTIME": "cri", "CEDAR_CRI_ENDPOINT": engine.endpoint}
    return {**engine.env(), "CEDAR_RUNTIME": "docker"}


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
    await bus.ensure(streams=service_streams(settings))
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


async def with_puller(nats_url: str, engine: DockerEngine | Containerd, refs: list[str]) -> float:
    await publish(nats_url, [wis(f"app-{i}", [ref]) for i, ref in enumerate(refs)])
    settings = PullerSettings(
        node_name=f"bench-{uuid.uuid4().hex[:6]}",
        nats_url=nats_url,
        node_from_api=False,
        **engine_settings(engine),
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


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS, and its anonymous and file-backed (shared libraries) parts, in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            found[key] = int(value.split()[0])
    if "VmRSS" not in found:
        raise RuntimeError("no VmRSS")
    return found


async def idle_rss(
    nats_url: str, engine: DockerEngine | Containerd, refs: list[str], count: int, base: Path
) -> tuple[dict[str, int], float]:
    # Many tenants share few images: each workload names 1-3 of the present images.
    workloads = [
        wis(f"idle-{i}", [refs[i % len(refs)], refs[(i * 7) % len(refs)]], i) for i in range(count)
    ]
    await publish(nats_url, workloads)
    kind = "cri" if isinstance(engine, Containerd) else "docker"
    log = base / f"idle-puller-{kind}.log"
    env = {
        **engine_env(engine),
        "CEDAR_NODE_NAME": f"bench-idle-{kind}",
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


def table(results: dict[str, list[float]], rounds: int, total_mb: int) -> dict[str, float]:
    best = {k: min(v) for k, v in results.items() if v}
    print()
    print(f"| variant | seconds (best of {rounds}) | MB/s |")
    print("| --- | --- | --- |")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.2f} | {total_mb / seconds:.0f} |")
    print()
    return best


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workloads", type=int, default=5000)
    parser.add_argument("--engines", default="docker,cri", help="docker, cri or both")
    args = parser.parse_args()
    engines = {e.strip() for e in args.engines.split(",") if e.strip()}

    base = Path(tempfile.mkdtemp(prefix="cb-", dir="/tmp"))
    nats = NatsServer(base / "nats")
    registry = Registry(base / "registry")
    builder = DockerEngine(base / "e1")
    node = DockerEngine(base / "e2")
    cnode = Containerd(base / "c3", registries=[registry.host])
    servers: list[NatsServer | Registry | DockerEngine | Containerd] = [nats, registry, builder]
    servers += [node] if "docker" in engines else []
    servers += [cnode] if "cri" in engines else []
    try:
        for server in servers:
            server.start()
        print(f"making {args.count} images of {args.size_mb} MB ...", flush=True)
        t = time.perf_counter()
        refs = make_images(
            builder, registry, args.count, args.size_mb * 1024 * 1024, prefix="bench/img"
        )
        print(f"  made in {time.perf_counter() - t:.1f}s", flush=True)
        total_mb = args.count * args.size_mb
        results: dict[str, list[float]] = {}
        for round_no in range(args.rounds):
            if "docker" in engines:
                for name in ("sequential", "parallel", "puller"):
                    clear_images(node)
                    if name == "sequential":
                        seconds = sequential(node, refs)
                    elif name == "parallel":
                        seconds = parallel(node, refs)
                    else:
                        seconds = await with_puller(nats.url, node, refs)
                    results.setdefault(name, []).append(seconds)
                    print(f"  round {round_no + 1} {name:>16}: {seconds:6.2f}s", flush=True)
            if "cri" in engines:
                for name in ("ctr sequential", "ctr parallel", "puller (CRI)"):
                    await clear_containerd(cnode)
                    if name == "ctr sequential":
                        seconds = ctr_sequential(cnode, refs)
                    elif name == "ctr parallel":
                        seconds = ctr_parallel(cnode, refs)
                    else:
                        seconds = await with_puller(nats.url, cnode, refs)
                    results.setdefault(name, []).append(seconds)
                    print(f"  round {round_no + 1} {name:>16}: {seconds:6.2f}s", flush=True)
        best = table(results, args.rounds, total_mb)
        if "docker" in engines:
            print(f"puller vs sequential: {best['sequential'] / best['puller']:.2f}x faster")
            print(f"puller vs parallel:   {best['puller'] / best['parallel'] * 100 - 100:+.1f}%")
        if "cri" in engines:
            cri = best["puller (CRI)"]
            print(f"CRI puller vs ctr sequential: {best['ctr sequential'] / cri:.2f}x faster")
            print(f"CRI puller vs ctr parallel:   {cri / best['ctr parallel'] * 100 - 100:+.1f}%")
        if engines >= {"docker", "cri"}:
            versus = best["puller (CRI)"] / best["puller"] * 100 - 100
            print(f"CRI puller vs Docker puller:  {versus:+.1f}%")

        for engine in ([node] if "docker" in engines else []) + (
            [cnode] if "cri" in engines else []
        ):
            kind = "CRI" if isinstance(engine, Containerd) else "Docker"
            rss, warm = await idle_rss(nats.url, engine, refs, args.workloads, base)
            print(
                f"idle RSS of the {kind} puller following {args.workloads} workloads: "
                f"{rss['VmRSS'] / 1024:.1f} MiB (anonymous {rss.get('RssAnon', 0) / 1024:.1f}, "
                f"files {rss.get('RssFile', 0) / 1024:.1f}; warm after {warm:.1f}s)"
            )
        versions = []
        if "docker" in engines:
            versions.append(
                f"{node.docker('version', '--format', '{{.Server.Version}}').stdout.strip()} "
                f"dockerd ({node.docker('info', '--format', '{{.Driver}}').stdout.strip()})"
            )
        if "cri" in engines:
            versions.append(
                cnode.ctr("version").stdout.split("Server:")[-1].split()[1]
                + " containerd (overlayfs)"
            )
        print(
            f"machine: {platform.platform()}, {os.cpu_count()} CPUs, "
            f"python {platform.python_version()}, {', '.join(versions)}"
        )
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
