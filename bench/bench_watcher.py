"""Watcher benchmarks: initial sync (Cedar vs. the naive typed-client list) and steady state.

    .venv/bin/python bench/bench_watcher.py       # full size: 50,000 RS + 10,000 Deployments
    .venv/bin/python bench/bench_watcher.py --replicasets 5000 --deployments 1000  # quick

Every party runs in its own process so that its peak RSS is its own: the simulated
Kubernetes API (with the objects and the load generator), nats-server, Cedar's watcher,
and the naive lister. Figures are printed as a table and as JSON (--json FILE).

Initial sync: from process start to every resulting message acknowledged by JetStream.
  - cedar: paginated list on raw JSON, extraction into the message models, pipelined
    publish_async with content-derived Msg-Ids (the watcher's own code path).
  - naive: the official client's typed models, `list_replica_set_for_all_namespaces()` and
    `list_deployment_for_all_namespaces()` with pagination, then one awaited publish per
    message (the same revision rule, so both publish the same messages).
Steady state (watcher pinned to one CPU):
  - throughput: a burst of spec changes (each publishes) and of status-only updates (each
    publishes nothing); events per second of watcher CPU time, and wall-clock rate.
  - latency: spec changes written at a fixed rate; for each, JetStream's stored timestamp
    minus the time the API server committed the write (the tag of the image carries it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# ====================================================================== objects


def pod_template(app: str, image: str) -> dict[str, Any]:
    labels = {"app": app, "tier": "web", "tenant": app.split("-", maxsplit=1)[0]}
    return {
        "metadata": {"labels": labels, "annotations": {"prometheus.io/scrape": "true"}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
                    "env": [
                        {"name": f"SETTING_{i}", "value": f"value-{i}-{app}"} for i in range(6)
                    ],
                    "resources": {
                        "requests": {"cpu": "100m", "memory": "128Mi"},
                        "limits": {"cpu": "1", "memory": "512Mi"},
                    },
                    "readinessProbe": {
                        "httpGet": {"path": "/healthz", "port": 8080},
                        "periodSeconds": 10,
                    },
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                },
                {
                    "name": "proxy",
                    "image": "docker.io/envoyproxy/envoy:v1.30.1",
                    "args": ["--config-path", "/etc/envoy/envoy.yaml"],
                    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                },
            ],
            "initContainers": [{"name": "migrate", "image": f"{image}-migrate"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "tenant", "operator": "Exists", "effect": "NoSchedule"}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": f"{app}-data"}}],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "securityContext": {"runAsNonRoot": True, "fsGroup": 1000},
        },
    }


def deployment(i: int) -> dict[str, Any]:
    app = f"t{i % 500}-app{i}"
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": app, "namespace": f"tenant-{i % 500}", "labels": {"app": app}},
        "spec": {
            "replicas": i % 3,  # a third scaled to zero
            "selector": {"matchLabels": {"app": app}},
            "strategy": {"type": "RollingUpdate"},
            "template": pod_template(app, f"registry.example.com/t{i % 500}/app{i}:v5"),
        },
        "status": {"replicas": i % 3, "observedGeneration": 1},
    }


def replicaset(dep: dict[str, Any], revision: int) -> dict[str, Any]:
    meta = dep["metadata"]
    app = meta["name"]
    image = f"registry.example.com/{app.split('-')[0]}/{app.split('-')[1]}:v{revision}"
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {
            "name": f"{app}-{revision:08x}",
            "namespace": meta["namespace"],
            "labels": {"app": app, "pod-template-hash": f"{revision:08x}"},
            "annotations": {
                "deployment.kubernetes.io/desired-replicas": "1",
                "deployment.kubernetes.io/max-replicas": "2",
                "deployment.kubernetes.io/revision": str(revision),
            },
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": app,
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "replicas": 1 if revision == 5 else 0,
            "selector": {"matchLabels": {"app": app}},
            "template": pod_template(app, image),
        },
        "status": {"replicas": 0, "observedGeneration": 1},
    }


# ====================================================================== API child


def serve_api(args: argparse.Namespace) -> None:
    import gc

    from cedar.sandbox.kubeapi import KubeAPI

    api = KubeAPI(
        bookmark_interval=5.0, history_limit=200_000, watch_delay=args.watch_delay
    ).start()
    per = max(args.replicasets // max(args.deployments, 1), 1)
    api.load(deployment(i) for i in range(args.deployments))
    deployments = api.list("deployments")
    rs: list[dict[str, Any]] = []
    for dep in deployments:
        for revision in range(5 - per + 1, 6):
            rs.append(replicaset(dep, revision))
    api.load(rs[: args.replicasets])
    del rs
    kubeconfig = api.write_kubeconfig(Path(args.workdir) / "kubeconfig")
    print(json.dumps({"url": api.url, "kubeconfig": str(kubeconfig)}), flush=True)
    # The same order as the benchmark expects: deployment(i) for i in 0..n-1.
    count = min(max(args.burst, 2000), args.deployments)
    targets = [(f"tenant-{i % 500}", f"t{i % 500}-app{i}") for i in range(count)]
    gc.collect()
    gc.freeze()  # the simulator's own pauses would show up as watcher latency
    del deployments
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            break
        if cmd[0] == "burst":  # burst N spec|status [tag prefix]
            count, what = int(cmd[1]), cmd[2]
            prefix = cmd[3] if len(cmd) > 3 else "b"
            for n in range(count):
                ns, name = targets[n % len(targets)]
                if what == "spec":
                    image = f"registry.example.com/burst/app:{prefix}{n}"
                    api.patch(
                        "deployments",
                        ns,
                        name,
                        {
                            "spec": {
                                "template": {
                                    "spec": {"containers": [{"name": "app", "image": image}]}
                                }
                            }
                        },
                    )
                else:
                    api.update_status("deployments", ns, name, {"replicas": n, "readyReplicas": n})
            gc.collect()
            gc.freeze()  # the history grew: keep the simulator's GC pauses out of the figures
            print(json.dumps({"done": count}), flush=True)
        elif cmd[0] == "pace":  # pace RATE SECONDS: spec changes carrying their write time
            rate, seconds = float(cmd[1]), float(cmd[2])
            total = int(rate * seconds)
            start = time.perf_counter()
            for n in range(total):
                due = start + n / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                ns, name = targets[n % len(targets)]
                written = time.time_ns() // 1000
                image = f"registry.example.com/paced/app:w{written}"
                api.patch(
                    "deployments",
                    ns,
                    name,
                    {
                        "spec": {
                            "template": {"spec": {"containers": [{"name": "app", "image": image}]}}
                        }
                    },
                )
            achieved = total / (time.perf_counter() - start)
            print(json.dumps({"done": total, "rate": achieved}), flush=True)
    api.stop()


# ====================================================================== sync children


def _settings(args: argparse.Namespace) -> Any:
    from cedar.watcher.settings import WatcherSettings

    return WatcherSettings(
        nats_url=args.nats_url,
        kubeconfig=args.kubeconfig,
        watch_kinds="Deployment,ReplicaSet",
        metrics_port=0,
        log_level="WARNING",
    )


def cedar_sync(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    asyncio.run(_cedar_sync(args, start))


async def _cedar_sync(args: argparse.Namespace, start: float) -> None:
    import gc

    from cedar.runtime import topology
    from cedar.runtime.bus import Bus
    from cedar.runtime.health import Health
    from cedar.runtime.kube import KubeClient, load_config
    from cedar.watcher import app
    from cedar.watcher.informer import Informer
    from cedar.watcher.outbox import Outbox
    from cedar.watcher.publisher import Publisher
    from cedar.watcher.watch_state import WatchState

    settings = _settings(args)
    gc.set_threshold(*app.GC_THRESHOLDS)  # as `cedar watcher` does
    gc.freeze()
    gc.disable()
    health = Health()
    bus = Bus(settings, "bench-cedar", health)
    await bus.connect()
    await bus.ensure(streams=topology.service_streams(settings))
    outbox = Outbox()
    publisher = Publisher(bus, outbox, max_inflight=settings.publish_max_inflight)
    await publisher.seed(settings.kinds, None)
    state = WatchState(outbox, previous_revisions=1)
    client = KubeClient(load_config(settings.kubeconfig), timeout=120)
    pub = asyncio.create_task(publisher.run())
    informers = [
        Informer(kind, client, state, publisher.notify, health, page_size=settings.watch_page_size)
        for kind in settings.kinds
    ]
    for inf in informers:
        inf.resource_version = await inf.relist("start")
    await publisher.flush(600)
    elapsed = time.perf_counter() - start
    info = await bus.js.stream_info("CEDAR_WORKLOADS")
    pub.cancel()
    await client.close()
    await bus.close()
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "peak_rss_mb": peak_rss_mb(),
                "messages": info.state.messages,
                "objects": sum(state.count(k) for k in settings.kinds),
            }
        ),
        flush=True,
    )


def naive_sync(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    asyncio.run(_naive_sync(args, start))


async def _naive_sync(args: argparse.Namespace, start: float) -> None:
    import kubernetes
    import nats

    from cedar.proto import subjects
    from cedar.proto.imageref import InvalidReference, normalize
    from cedar.proto.models import ContainerImage, OwnerRef, WorkloadImageSet, utcnow
    from cedar.watcher.ownership import RevisionInfo, kept_revisions

    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(
        config_file=args.kubeconfig, client_configuration=configuration
    )
    apps = kubernetes.client.AppsV1Api(kubernetes.client.ApiClient(configuration))

    def list_all(call: Any) -> list[Any]:
        items: list[Any] = []
        token = None
        while True:
            page = call(limit=500, _continue=token) if token else call(limit=500)
            items.extend(page.items)
            token = page.metadata._continue
            if not token:
                return items

    deployments = list_all(apps.list_deployment_for_all_namespaces)
    replicasets = list_all(apps.list_replica_set_for_all_namespaces)
    listed = time.perf_counter() - start

    def images(spec: Any) -> tuple[ContainerImage, ...]:
        out = []
        for init, containers in (
            (True, spec.init_containers or []),
            (False, spec.containers or []),
        ):
            for c in containers:
                try:
                    ref, err = normalize(c.image), None
                except InvalidReference as e:
                    ref, err = None, e.reason
                out.append(
                    ContainerImage(
                        container=c.name,
                        init=init,
                        image=c.image,
                        reference=ref,
                        error=err,
                        pull_policy=c.image_pull_policy,
                    )
                )
        return tuple(out)

    groups: dict[str, list[Any]] = {}
    for rs in replicasets:
        owner = next((o for o in rs.metadata.owner_references or [] if o.controller), None)
        if owner is not None and owner.kind == "Deployment":
            groups.setdefault(owner.uid, []).append(rs)
    kept: set[str] = set()
    for members in groups.values():
        kept |= kept_revisions(
            (
                RevisionInfo(
                    uid=m.metadata.uid,
                    revision=int(
                        (m.metadata.annotations or {}).get("deployment.kubernetes.io/revision", 0)
                    ),
                    created=str(m.metadata.creation_timestamp),
                    name=m.metadata.name,
                )
                for m in members
            ),
            1,
        )

    nc = await nats.connect(args.nats_url)
    js = nc.jetstream()
    published = 0
    for obj, kind in [(d, "Deployment") for d in deployments] + [
        (r, "ReplicaSet") for r in replicasets
    ]:
        meta = obj.metadata
        owner = None
        if kind == "ReplicaSet":
            if meta.uid not in kept:
                continue
            ref = meta.owner_references[0]
            owner = OwnerRef(kind=ref.kind, name=ref.name, uid=ref.uid)
        item = WorkloadImageSet(
            kind=kind,
            namespace=meta.namespace,
            name=meta.name,
            uid=meta.uid,
            owner=owner,
            containers=images(obj.spec.template.spec),
            replicas=obj.spec.replicas,
            resource_version=meta.resource_version,
            generation=meta.generation,
            observed_at=utcnow(),
        )
        await js.publish(
            subjects.workload_subject(kind, meta.namespace, meta.name),
            item.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"{meta.uid}-{meta.generation}"},
        )
        published += 1
    elapsed = time.perf_counter() - start
    await nc.close()
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "list_seconds": listed,
                "peak_rss_mb": peak_rss_mb(),
                "messages": published,
                "objects": len(deployments) + len(replicasets),
            }
        ),
        flush=True,
    )


def cedar_serve(args: argparse.Namespace) -> None:
    """The real service (`cedar watcher`), until SIGTERM; prints 'ready' once ready."""
    from cedar.runtime import service
    from cedar.watcher import app

    settings = _settings(args)
    app.TUNE_GC = True  # as `cedar watcher` does

    async def main(rt: Any) -> None:
        from cedar.watcher.informer import health_check_name

        for kind in settings.kinds:  # before app.main runs, so `ready` cannot come early
            rt.health.require(health_check_name(kind))
        task = asyncio.create_task(app.main(rt))
        while not rt.health.ready:  # noqa: ASYNC110 - Health has no event to wait on
            await asyncio.sleep(0.05)
        print("ready", flush=True)
        await task

    sys.exit(service.run("watcher", settings, main))


# ====================================================================== orchestration


def child(
    mode: str, args: argparse.Namespace, *extra: str, cpu: int | None = None, stdin: Any = None
) -> subprocess.Popen[str]:
    cmd = [
        PY,
        __file__,
        "--mode",
        mode,
        "--nats-url",
        args.nats_url,
        "--kubeconfig",
        args.kubeconfig,
        *extra,
    ]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=stdin, text=True)


def run_child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    proc = child(mode, args)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def reset_streams(url: str) -> None:
    """Empty streams, as on a fresh cluster (the naive lister does not create them)."""
    import nats

    from cedar.runtime import bus as busmod
    from cedar.runtime import topology
    from cedar.runtime.settings import CommonSettings

    nc = await nats.connect(url)
    js = nc.jetstream()
    for stream in ("CEDAR_WORKLOADS", "CEDAR_NAMESPACES", "CEDAR_HISTORY"):
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
    settings = CommonSettings(nats_url=url)
    for config in topology.service_streams(settings):
        await busmod.ensure_stream(js, config)
    await nc.close()


async def steady_state(args: argparse.Namespace, api: subprocess.Popen[str]) -> dict[str, Any]:
    watcher = child("cedar-serve", args, cpu=0)
    try:
        return await _steady_state(args, api, watcher)
    finally:
        watcher.send_signal(signal.SIGTERM)
        try:
            watcher.wait(60)
        except subprocess.TimeoutExpired:
            watcher.kill()


async def _steady_state(
    args: argparse.Namespace, api: subprocess.Popen[str], watcher: subprocess.Popen[str]
) -> dict[str, Any]:
    import nats
    from nats.js.api import DeliverPolicy

    assert watcher.stdout is not None
    assert watcher.stdout.readline().strip() == "ready"
    nc = await nats.connect(args.nats_url)
    js = nc.jetstream()
    targets = min(max(args.burst, 2000), args.deployments)
    # Per burst: the tag each target's last change carries. A watcher may coalesce several
    # changes of one workload into one message (latest wins); the burst is done when every
    # target's last change is stored.
    expected: dict[str, str] = {}
    missing: set[str] = set()  # targets whose expected last change is not stored yet
    received: list[Any] = []
    done = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        received.append(msg)
        name = msg.subject.rsplit(".", 1)[1]
        if name in missing and expected.get(name) == _tag(msg.data):
            missing.discard(name)
            if not missing:
                done.set()

    await js.subscribe(
        "cedar.workloads.Deployment.>",
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
    )
    assert api.stdin is not None and api.stdout is not None
    names = [f"t{i % 500}-app{i}" for i in range(targets)]

    async def command(text: str) -> dict[str, Any]:
        api.stdin.write(text + "\n")  # type: ignore[union-attr]
        api.stdin.flush()  # type: ignore[union-attr]
        line = await asyncio.to_thread(api.stdout.readline)  # type: ignore[union-attr]
        return dict(json.loads(line))

    def expect(count: int, prefix: str) -> None:
        expected.clear()
        received.clear()
        done.clear()
        for n in range(max(count - targets, 0), count):
            expected[names[n % targets]] = f"{prefix}{n}"
        missing.clear()
        missing.update(expected)

    results: dict[str, Any] = {}

    # Throughput with one core: the watcher is paused (SIGSTOP) while the API server takes
    # a burst of writes, then resumed: it works through the backlog as fast as it can, so
    # the figure is the watcher's capacity, not the load generator's speed.
    async def burst(kind: str, count: int) -> dict[str, Any]:
        watcher.send_signal(signal.SIGSTOP)
        try:
            if kind == "status":
                expected.clear()
                missing.clear()
                await command(f"burst {count} status")
                expect(1, "e")
                await command("burst 1 spec e")  # marks the end of the backlog
            else:
                expect(count, "b")
                await command(f"burst {count} spec")
        finally:
            cpu0, t0 = cpu_seconds(watcher.pid), time.perf_counter()
            watcher.send_signal(signal.SIGCONT)
        await asyncio.wait_for(done.wait(), 300)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(watcher.pid) - cpu0
        events = count + (1 if kind == "status" else 0)
        return {
            "events": events,
            "messages_stored": len(received),
            "watcher_cpu_s": round(cpu, 2),
            "wall_s": round(wall, 2),
            "events_per_s": round(events / wall),
            "events_per_cpu_s": round(events / cpu),
        }

    results: dict[str, Any] = {}
    results["spec_changes"] = await burst("spec", args.burst)
    results["status_updates"] = await burst("status", args.burst)

    # Latency at a fixed rate: API write committed -> stored in JetStream.
    total = int(args.rate * args.seconds)
    expected.clear()
    received.clear()
    paced = await command(f"pace {args.rate} {args.seconds}")
    last = {names[k % targets]: None for k in range(max(total - targets, 0), total)}
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline:
        seen = {m.subject.rsplit(".", 1)[1] for m in received if _tag(m.data).startswith("w")}
        if set(last) <= seen and len(received) >= total * 0.99:
            break
        await asyncio.sleep(0.2)
    latencies = []
    for msg in received:
        tag = _tag(msg.data)
        if not tag.startswith("w"):
            continue
        stored_us = msg.metadata.timestamp.timestamp() * 1e6
        latencies.append((stored_us - int(tag[1:])) / 1000)
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2)

    results["latency"] = {
        "rate_requested": args.rate,
        "rate_achieved": round(paced["rate"]),
        "writes": total,
        "messages": len(latencies),
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": round(latencies[-1], 2),
    }
    await nc.close()
    return results


def _tag(data: bytes) -> str:
    """The tag of the first container's image: b<n> (burst) or w<microseconds> (paced)."""
    item = json.loads(data)
    containers = item.get("containers") or []
    app = next((c for c in containers if c.get("container") == "app"), None)
    return str(app["image"]).rsplit(":", 1)[1] if app else ""


def machine() -> dict[str, Any]:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        line.split()[1]
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_gb": round(int(mem) / 2**20, 1),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mode", default="main", choices=["main", "api", "cedar-sync", "naive-sync", "cedar-serve"]
    )
    parser.add_argument("--replicasets", type=int, default=50_000)
    parser.add_argument("--deployments", type=int, default=10_000)
    parser.add_argument("--burst", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--watch-delay",
        type=float,
        default=0.02,
        help="seconds from a write to its watch event in the simulated API (the watch "
        "cache's delivery; 0 measures the watcher alone)",
    )
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-sync", action="store_true", help="only the steady state")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--nats-url", default="")
    parser.add_argument("--kubeconfig", default="")
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()
    if args.mode == "api":
        return serve_api(args)
    if args.mode == "cedar-sync":
        return cedar_sync(args)
    if args.mode == "naive-sync":
        return naive_sync(args)
    if args.mode == "cedar-serve":
        return cedar_serve(args)

    from cedar.sandbox.nats import NatsServer

    results: dict[str, Any] = {
        "machine": machine(),
        "replicasets": args.replicasets,
        "deployments": args.deployments,
    }
    with tempfile.TemporaryDirectory(prefix="cedar-bench-watcher-") as tmp:
        nats_server = NatsServer(Path(tmp) / "nats")
        nats_server.start()
        api = subprocess.Popen(
            [
                PY,
                __file__,
                "--burst",
                str(args.burst),
                "--mode",
                "api",
                "--workdir",
                tmp,
                "--replicasets",
                str(args.replicasets),
                "--deployments",
                str(args.deployments),
                "--watch-delay",
                str(args.watch_delay),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert api.stdout is not None
            info = json.loads(api.stdout.readline())
            args.nats_url, args.kubeconfig = nats_server.url, info["kubeconfig"]
            print(
                f"simulated API ready with {args.replicasets} RS + {args.deployments} Deployments",
                file=sys.stderr,
            )
            asyncio.run(reset_streams(args.nats_url))
            if not args.skip_sync:
                results["cedar_sync"] = run_child("cedar-sync", args)
                print("cedar sync", results["cedar_sync"], file=sys.stderr)
            if not args.skip_naive and not args.skip_sync:
                asyncio.run(reset_streams(args.nats_url))
                results["naive_sync"] = run_child("naive-sync", args)
                print("naive sync", results["naive_sync"], file=sys.stderr)
                results["speedup"] = (
                    results["naive_sync"]["seconds"] / results["cedar_sync"]["seconds"]
                )
            asyncio.run(reset_streams(args.nats_url))
            results["steady"] = asyncio.run(steady_state(args, api))
            results["loadavg_at_end"] = os.getloadavg()
        finally:
            if api.stdin is not None:
                with contextlib.suppress(BrokenPipeError, ValueError):
                    api.stdin.write("quit\n")
                    api.stdin.close()
            try:
                api.wait(30)
            except subprocess.TimeoutExpired:
                api.kill()
            nats_server.stop()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
