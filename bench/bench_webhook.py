"""Benchmark the pod-level admission webhook and the watchdog's memory.

1. The webhook (`cedar.mcs_allocator.webhook`, the code `cedar mcs-allocator` serves with
   CEDAR_MCS_WEBHOOK_PORT) in a process of its own pinned to one core, its namespaces from
   a simulated API (500 tenant namespaces, listed and watched as in production), answering
   AdmissionReview v1 requests over TLS (a trustme CA) from a client pinned to the other
   core: per-admission latency p50/p99 over N reviews on one keep-alive connection at a time
   (latency), and admissions per second with several connections in flight (throughput).
   The reviews are realistic pod creations (a Deployment's pod: two containers, env,
   volumes, ~3 KiB of JSON), a fifth of them refused (another level), as the API server
   sends them. Targets: p99 < 10 ms, >= 1,000 admissions/s on one core.
2. The watchdog's memory: 10,000 running pods (manifests with status, ~4 KiB each) listed
   from the simulated API into the watchdog's pod cache; the Python heap it keeps
   (tracemalloc, after the list's transient JSON is gone) and the RSS growth, per 10,000
   pods.

    .venv/bin/python bench/bench_webhook.py [--reviews 10000] [--connections 8] [--pods 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import trustme

from cedar.mcs_allocator.kubewatch import Reflector
from cedar.mcs_allocator.nscache import NamespaceCache
from cedar.mcs_allocator.podlevel import PodRules, pod_levels
from cedar.mcs_allocator.settings import AllocatorSettings
from cedar.mcs_allocator.webhook import PATH, CertFiles, Webhook
from cedar.runtime.kube import KubeClient, load_config, resource_path
from cedar.sandbox.kubeapi import KubeAPI

ANNOTATION = "cedar.io/selinux-level"
NAMESPACES = 500


def machine() -> str:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"nproc={os.cpu_count()}, CPU: {cpu}, RAM: {mem_kb / 1024 / 1024:.1f} GiB, "
        f"load average: {load}, Python {platform.python_version()}"
    )


def level_of(i: int) -> str:
    return f"s0:c{i % 1000},c{1000 + i % 24}"


def namespaces() -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": f"tenant-{i}",
                "labels": {"kubernetes.io/metadata.name": f"tenant-{i}", "team": f"t{i}"},
                "annotations": {ANNOTATION: level_of(i)},
            },
        }
        for i in range(NAMESPACES)
    ]


def deployment_pod(namespace: str, name: str, level: str | None = None) -> dict[str, Any]:
    def container(cname: str) -> dict[str, Any]:
        return {
            "name": cname,
            "image": f"registry.example.com/tenants/{cname}:v2",
            "imagePullPolicy": "IfNotPresent",
            "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
            "env": [{"name": f"SETTING_{k}", "value": f"value-{k}"} for k in range(8)],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
        }

    spec: dict[str, Any] = {
        "containers": [container("web"), container("sidecar")],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
        "securityContext": {"runAsUser": 1000, "fsGroup": 1000},
        "schedulerName": "default-scheduler",
        "tolerations": [
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}
        ],
    }
    if level is not None:
        spec["securityContext"]["seLinuxOptions"] = {"level": level}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"{name}-7d9c5b6f4-",
            "namespace": namespace,
            "labels": {"app": name, "pod-template-hash": "7d9c5b6f4"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{name}-7d9c5b6f4",
                    "uid": str(uuid.uuid4()),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }


def reviews(count: int) -> list[bytes]:
    out = []
    for i in range(count):
        ns = f"tenant-{i % NAMESPACES}"
        # A fifth ask for another level and are refused; the rest get the level.
        level = level_of(i % NAMESPACES + 1) if i % 5 == 0 else None
        pod = deployment_pod(ns, f"app{i % 17}", level)
        request = {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": ns,
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
        body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
        out.append(json.dumps(body).encode())
    return out


# -- the server process ------------------------------------------------------------------


async def serve(kubeconfig: str, cert: str, key: str) -> None:
    client = KubeClient(load_config(kubeconfig))
    settings = AllocatorSettings()
    cache = NamespaceCache(client, settings.scope(), settings.mcs_annotation)
    webhook = Webhook(cache, PodRules(settings.allowed_types), CertFiles(cert, key))
    stop = asyncio.Event()
    task = asyncio.create_task(cache.run(stop))
    await webhook.start("127.0.0.1", 0)
    await cache.synced.wait()
    print(webhook.port, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    stop.set()
    task.cancel()
    await webhook.stop()
    await client.close()


# -- the client --------------------------------------------------------------------------


async def run_reviews(
    url: str, context: ssl.SSLContext, bodies: list[bytes], connections: int
) -> tuple[list[float], float, dict[str, int]]:
    latencies: list[float] = []
    results: dict[str, int] = {}
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    connector = aiohttp.TCPConnector(ssl=context, limit=connections)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:
        # One warm-up per connection: the TLS handshakes are not part of an admission.
        await asyncio.gather(
            *(session.post(url, data=bodies[0], headers=headers) for _ in range(connections))
        )

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    answer = await resp.json()
                latencies.append(time.perf_counter() - started)
                response = answer["response"]
                kind = (
                    "mutated"
                    if "patch" in response
                    else ("admitted" if response["allowed"] else "denied")
                )
                results[kind] = results.get(kind, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return latencies, elapsed, results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_webhook(count: int, connections: int) -> None:
    print(f"\n== webhook: {count} AdmissionReviews over TLS, server pinned to one core ==")
    with tempfile.TemporaryDirectory() as tmp, KubeAPI() as api:
        api.load(namespaces())
        kubeconfig = api.write_kubeconfig(Path(tmp) / "kubeconfig")
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1")
        cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
        cert.write_bytes(b"".join(b.bytes() for b in issued.cert_chain_pems))
        key.write_bytes(issued.private_key_pem.bytes())
        cores = sorted(os.sched_getaffinity(0))
        server_core, client_core = cores[0], cores[-1]
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(kubeconfig), str(cert), str(key)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        os.sched_setaffinity(proc.pid, {server_core})
        try:
            assert proc.stdout is not None and proc.stdin is not None
            port = int(proc.stdout.readline())
            os.sched_setaffinity(0, {client_core})
            context = ssl.create_default_context()
            ca.configure_trust(context)
            url = f"https://127.0.0.1:{port}{PATH}"
            bodies = reviews(count)
            size = statistics.mean(len(b) for b in bodies)
            cpu_before = _cpu_seconds(proc.pid)
            lat, elapsed, results = asyncio.run(run_reviews(url, context, bodies, 1))
            cpu_latency = _cpu_seconds(proc.pid) - cpu_before
            print(f"review size {size / 1024:.1f} KiB; results {results}")
            print(
                f"one connection: p50 {percentile(lat, 0.5) * 1000:.2f} ms, "
                f"p99 {percentile(lat, 0.99) * 1000:.2f} ms, max {max(lat) * 1000:.2f} ms; "
                f"{count / elapsed:.0f}/s; server CPU {cpu_latency / count * 1e6:.0f} µs "
                "per admission"
            )
            cpu_before = _cpu_seconds(proc.pid)
            lat, elapsed, results = asyncio.run(run_reviews(url, context, bodies, connections))
            cpu_used = _cpu_seconds(proc.pid) - cpu_before
            print(
                f"{connections} connections: {count / elapsed:.0f} admissions/s "
                f"(server on one core, {cpu_used / elapsed * 100:.0f}% of it busy); "
                f"p50 {percentile(lat, 0.5) * 1000:.2f} ms, "
                f"p99 {percentile(lat, 0.99) * 1000:.2f} ms (client-side, queueing included)"
            )
        finally:
            os.sched_setaffinity(0, set(cores))
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(30)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def running_pod(i: int, level: str) -> dict[str, Any]:
    pod = deployment_pod(f"tenant-{i % NAMESPACES}", f"app{i % 17}", level)
    meta = pod["metadata"]
    meta["name"] = meta.pop("generateName") + f"{i:05d}"
    pod["spec"]["nodeName"] = f"node-{i % 50}"
    pod["status"] = {
        "phase": "Running",
        "hostIP": "10.0.0.1",
        "podIP": f"10.1.{i // 250}.{i % 250}",
        "startTime": "2026-11-23T01:22:33Z",
        "qosClass": "Burstable",
        "conditions": [
            {"type": t, "status": "True", "lastTransitionTime": "2026-11-23T01:22:33Z"}
            for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
        ],
        "containerStatuses": [
            {
                "name": c,
                "ready": True,
                "restartCount": 0,
                "image": f"registry.example.com/tenants/{c}:v2",
                "imageID": "registry.example.com/tenants/web@sha256:" + "a" * 64,
                "containerID": "containerd://" + "b" * 64,
                "started": True,
                "state": {"running": {"startedAt": "2026-11-23T01:22:35Z"}},
            }
            for c in ("web", "sidecar")
        ],
    }
    return pod


async def _watchdog_cache(kubeconfig: str, count: int) -> tuple[int, int]:
    client = KubeClient(load_config(kubeconfig))
    reflector = Reflector(client, resource_path("Pod"), pod_levels, what="pods")
    gc.collect()
    rss_before = _rss()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    stop = asyncio.Event()
    task = asyncio.create_task(reflector.run(stop))
    await reflector.synced.wait()
    assert len(reflector.items) == count, len(reflector.items)
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    rss_after = _rss()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.close()
    return kept, rss_after - rss_before


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_watchdog_memory(count: int) -> None:
    print(f"\n== watchdog: {count} running pods kept ==")
    with tempfile.TemporaryDirectory() as tmp, KubeAPI() as api:
        api.load(namespaces())
        api.load(running_pod(i, level_of(i % NAMESPACES)) for i in range(count))
        size = len(json.dumps(running_pod(0, level_of(0))))
        kubeconfig = api.write_kubeconfig(Path(tmp) / "kubeconfig")
        proc = subprocess.run(
            [sys.executable, __file__, "--watchdog-child", str(kubeconfig), str(count)],
            capture_output=True,
            text=True,
            check=True,
        )
        kept, rss = (int(x) for x in proc.stdout.split())
        per = 10_000 / count
        print(
            f"pod manifest {size / 1024:.1f} KiB of JSON; kept heap {kept / 2**20 * per:.2f} MiB "
            f"per 10,000 pods ({kept / count:.0f} B/pod); RSS growth after the list "
            f"{rss / 2**20 * per:.1f} MiB per 10,000 pods (tracemalloc running: an upper bound)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reviews", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--serve", nargs=3, metavar=("KUBECONFIG", "CERT", "KEY"))
    parser.add_argument("--watchdog-child", nargs=2, metavar=("KUBECONFIG", "COUNT"))
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(*args.serve))
        return
    if args.watchdog_child:
        kept, rss = asyncio.run(
            _watchdog_cache(args.watchdog_child[0], int(args.watchdog_child[1]))
        )
        print(kept, rss)
        return
    print(machine())
    bench_webhook(args.reviews, args.connections)
    bench_watchdog_memory(args.pods)


if __name__ == "__main__":
    main()
