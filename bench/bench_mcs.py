"""Benchmark the MCS allocator.

1. Choosing a free label with the pool 0%, 50% and 99% full (523,776 labels): time per
   choice. Target: < 50 µs at 99% full.
2. Start-up rebuild of a full ledger (523,776 allocated labels): the mirror and pool built
   from the ledger's entries (pure), and `Mirror.load()` from a real NATS KV bucket in a
   fresh process, as a replica starts: reading every key, from the ledger snapshot, and from
   the snapshot plus 10,000 ledger changes after it. Target: < 5 s.
3. End to end, namespace created in the (simulated) Kubernetes API -> annotation written,
   with two `cedar mcs-allocator` replicas, real NATS, and the in-test watcher bridge:
   namespaces per second for a burst, and p50/p99 latency at a steady 300/s.
   Target: 300/s and p99 < 100 ms. With `--e2e-real`, the simulated API and the real
   `cedar watcher` run as processes of their own instead of inside this one.

    .venv/bin/python bench/bench_mcs.py [--burst 3000] [--rate 300] [--seconds 10]
        [--skip-e2e] [--skip-kv] [--with-ns] [--e2e-real] [--only-e2e]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cedar.mcs_allocator.ledger_view import LedgerView
from cedar.mcs_allocator.pool import Pool
from cedar.mcs_allocator.settings import AllocatorSettings
from cedar.proto.ledger import LabelEntry, NsEntry, label_key, ns_key

TOTAL = 523_776


def machine() -> str:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    py = platform.python_version()
    return f"nproc={os.cpu_count()}, CPU: {cpu}, load average: {load}, Python {py}"


def bench_choice() -> None:
    rng = random.Random(42)
    print("## choosing a free label (1024 categories, 2 per label: 523,776 labels)")
    for fill in (0.0, 0.5, 0.99):
        taken = rng.sample(range(TOTAL), int(TOTAL * fill))
        pool = Pool.build(1024, 2, taken, rng=rng)
        n = min(5000, pool.free // 2)
        start = time.perf_counter()
        for _ in range(n):
            pool.choose(0.0, 0.0)
        per = (time.perf_counter() - start) / n * 1e6
        print(f"- {fill:4.0%} full: {per:.2f} µs per choice ({n} choices)")


def full_entries(with_ns: bool = False) -> list[tuple[str, bytes, int]]:
    """Every label allocated; with `with_ns`, also each namespace's `ns.<uid>` binding.

    Names, uids (UUIDs, as Kubernetes makes them) and times differ per entry, as in a real
    ledger, so neither the decoder nor compression gets an easy ride.
    """
    pool = Pool(1024, 2)
    rng = random.Random(7)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    out = []
    for i in range(TOTAL):
        level = pool.unrank(i)
        uid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        name = f"tenant-{rng.getrandbits(40):010x}"
        at = start + timedelta(seconds=i * 37, microseconds=rng.randrange(1_000_000))
        entry = LabelEntry(level, "allocated", name, uid, at, f"cedar-mcs-allocator-{i % 2}")
        out.append((label_key(level), entry.encode(), len(out) + 1))
        if with_ns:
            bound = NsEntry(uid, name, level, True, at + timedelta(milliseconds=3))
            out.append((ns_key(bound.uid), bound.encode(), len(out) + 1))
    return out


def bench_rebuild(entries: list[tuple[str, bytes, int]]) -> None:
    start = time.perf_counter()
    view = LedgerView.build(1024, 2, 7 * 86400.0, entries)
    took = time.perf_counter() - start
    assert view.pool.free == 0
    assert len(view.labels) == TOTAL
    print(f"- rebuild from {len(entries)} ledger entries (decode + mirror + pool): {took:.2f} s")


TAIL = 10_000


async def bench_kv_load(entries: list[tuple[str, bytes, int]]) -> None:
    """Fill a real bucket, then time `Mirror.load()` in fresh processes (as a replica
    starts): reading every key, from a snapshot at the ledger's end, and from a snapshot
    with TAIL ledger changes after it."""
    import nats

    from cedar.proto import subjects
    from cedar.runtime.topology import kv_subject, mcs_ledger_bucket
    from cedar.sandbox.nats import NatsServer

    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "store")
        server.start()
        try:
            nc = await nats.connect(server.url)
            settings = AllocatorSettings(nats_url=server.url)
            kv = await nc.jetstream().create_key_value(mcs_ledger_bucket(settings))
            start = time.perf_counter()
            prefix = kv_subject(subjects.KV_MCS_LEDGER)
            # Acknowledged publishes (async, bounded in flight): plain publishes at this rate
            # were silently dropped now and then, and the fill waited forever.
            js = nc.jetstream()

            async def publish(items: list[tuple[str, bytes, int]]) -> None:
                acks = []
                for key, value, _ in items:
                    acks.append(await js.publish_async(prefix + key, value))
                    if len(acks) >= 20000:
                        await asyncio.gather(*acks)
                        acks.clear()
                await asyncio.gather(*acks)

            await publish(entries)
            assert (await kv.status()).values == len(entries)
            print(f"  (filling the bucket took {time.perf_counter() - start:.1f} s)")
            keys = len(entries)
            full = _child_load(server.url, snapshots=False, write=True)
            print(
                f"- start-up load, reading every key ({keys} keys): "
                f"{full['seconds']:.2f} s (ledger read + build); {_memory(full)}"
            )
            print(
                f"- snapshot written after it: {full['write_seconds']:.2f} s, "
                f"{full['bytes'] / 1e6:.1f} MB"
            )
            snap = _child_load(server.url, snapshots=True)
            assert snap["loaded_from"] == "snapshot" and snap["replayed"] == 0, snap
            print(
                f"- start-up load from the snapshot (nothing after it): {snap['seconds']:.2f} s; "
                f"{_memory(snap)}"
            )
            # TAIL changes after the snapshot: labels released into quarantine.
            changed = []
            released = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            for key, value, _ in entries[: TAIL * (2 if len(entries) > TOTAL else 1)]:
                if key.startswith("label."):
                    data = json.loads(value)
                    data["state"] = "quarantined"
                    data["at"] = released
                    changed.append((key, json.dumps(data, separators=(",", ":")).encode(), 0))
            await publish(changed)
            tail = _child_load(server.url, snapshots=True)
            assert tail["loaded_from"] == "snapshot" and tail["replayed"] == len(changed), tail
            assert tail["quarantined"] == len(changed), tail
            print(
                f"- start-up load from the snapshot + {len(changed):,} ledger changes after it: "
                f"{tail['seconds']:.2f} s"
            )
            every = _child_load(server.url, snapshots=False)
            assert every["quarantined"] == len(changed), every
            assert every["digest"] == tail["digest"], "the two loads built different mirrors"
            print(f"  (the same ledger read key by key: {every['seconds']:.2f} s; same mirror)")
            await nc.close()
        finally:
            server.stop()


def _memory(result: dict[str, Any]) -> str:
    return f"RSS after {result['rss_mb']:.0f} MiB, peak {result['peak_rss_mb']:.0f} MiB"


def _child_load(url: str, *, snapshots: bool, write: bool = False) -> dict[str, Any]:
    args = [sys.executable, __file__, "--child-load", url]
    args += ["--child-snapshots"] if snapshots else []
    args += ["--child-write"] if write else []
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def child_load(url: str, snapshots: bool, write: bool) -> None:
    """One replica's start-up load in this (fresh) process; prints one JSON line."""
    import hashlib
    import logging

    import nats

    from cedar.mcs_allocator.ledger_store import LedgerStore
    from cedar.mcs_allocator.ledger_stream import LedgerStream
    from cedar.mcs_allocator.mirror import Mirror, NoSnapshots, SnapshotSource
    from cedar.mcs_allocator.snapshot_keeper import SnapshotReader, SnapshotWriter
    from cedar.mcs_allocator.snapshot_store import SnapshotStore
    from cedar.runtime.bus import ensure_object_store
    from cedar.runtime.topology import mcs_ledger_bucket, mcs_snapshots_bucket

    logging.disable(logging.INFO)
    nc = await nats.connect(url)
    js = nc.jetstream()
    settings = AllocatorSettings(nats_url=url)
    kv = await js.key_value(mcs_ledger_bucket(settings).bucket)
    config = mcs_snapshots_bucket(settings)
    store = SnapshotStore(await ensure_object_store(js, config), js)
    source: SnapshotSource = SnapshotReader(store) if snapshots else NoSnapshots()
    mirror = Mirror(settings, LedgerStream(js), LedgerStore(kv), source)
    start = time.perf_counter()
    await mirror.load()
    took = time.perf_counter() - start
    # Memory right after the load, before the fingerprint below adds its own.
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would report the
    # parent's size at fork.
    status = Path("/proc/self/status").read_text()  # noqa: ASYNC240 - a tiny procfs file
    kib = {
        k: int(v.split()[0])
        for k, v in (ln.split(":", 1) for ln in status.splitlines())
        if k in ("VmRSS", "VmHWM")
    }
    rss, peak = kib["VmRSS"] / 1024, kib["VmHWM"] / 1024
    view = mirror.view
    counts = view.counts(datetime.now(UTC))
    # A fingerprint of the whole mirror, to show both ways of loading agree.
    digest = hashlib.sha256()
    for level in sorted(view.labels):
        digest.update(repr(view.labels[level]).encode())
    for uid in sorted(view.ns):
        digest.update(repr(view.ns[uid]).encode())
    result: dict[str, Any] = {
        "rss_mb": rss,
        "peak_rss_mb": peak,
        "seconds": took,
        "loaded_from": mirror.loaded_from,
        "replayed": mirror.replayed,
        "quarantined": counts["quarantined"],
        "digest": digest.hexdigest(),
    }
    if write:
        start = time.perf_counter()
        header = await SnapshotWriter(mirror, store, dry_run=False).write()
        result["write_seconds"] = time.perf_counter() - start
        info = await store.stored()
        result["bytes"] = info.size if info else 0
        result["labels"] = header.labels
    await nc.close()
    print(json.dumps(result))


async def record_labelled(client: Any, written: dict[str, float]) -> None:
    """Watch namespaces in the API; note when each first carries the level annotation."""
    from cedar.runtime.kube import resource_path
    from tests.integration.test_mcs_allocator import ANN

    path = resource_path("Namespace")
    rv = "0"
    async for _, list_rv in client.list_pages(path):
        rv = list_rv
    while True:
        async for ev in client.watch(path, rv, timeout_seconds=300):
            meta = ev["object"]["metadata"]
            rv = meta["resourceVersion"]
            name = meta.get("name")
            if (meta.get("annotations") or {}).get(ANN) and name not in written:
                written[name] = time.perf_counter()


async def wait_labelled(
    written: dict[str, float], names: list[str], limit: float, interval: float
) -> None:
    deadline = time.perf_counter() + limit
    while any(n not in written for n in names):
        if time.perf_counter() > deadline:
            missing = sum(1 for n in names if n not in written)
            raise RuntimeError(f"{missing} namespaces never labelled")
        await asyncio.sleep(interval)


async def bench_e2e(burst: int, rate: int, seconds: float) -> None:
    from cedar.runtime.kube import KubeClient, load_config
    from cedar.sandbox.kubeapi import KubeAPI
    from cedar.sandbox.nats import NatsServer
    from tests.integration.test_mcs_allocator import ANN, Bridge, Replicas, namespace

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = NatsServer(tmp / "store")
        server.start()
        api = KubeAPI(bookmark_interval=5.0).start()
        kubeconfig = api.write_kubeconfig(tmp / "kubeconfig")
        published: dict[str, float] = {}

        class TimedBridge(Bridge):
            async def publish(self, obj: dict[str, Any], deleted: bool = False) -> None:
                await super().publish(obj, deleted)
                published.setdefault(obj["metadata"]["name"], time.perf_counter())

        bridge = await TimedBridge(kubeconfig, server.url).start()
        replicas = Replicas(tmp, server.url, kubeconfig, CEDAR_LOG_LEVEL="WARNING")
        created: dict[str, float] = {}
        written: dict[str, float] = {}
        client = KubeClient(load_config(str(kubeconfig)))

        watcher = asyncio.create_task(record_labelled(client, written))
        try:
            replicas.start(2)
            await asyncio.sleep(3.0)  # both replicas up and consuming

            async def wait_all(names: list[str], limit: float = 300) -> None:
                await wait_labelled(written, names, limit, interval=0.05)

            # Burst: all at once, throughput.
            names = [f"burst-{i:05d}" for i in range(burst)]
            start = time.perf_counter()
            for name in names:
                created[name] = time.perf_counter()
                api.create(namespace(name))
            await wait_all(names)
            took = max(written[n] for n in names) - start
            print(f"- burst of {burst} namespaces: {burst / took:.0f} namespaces/s ({took:.1f} s)")

            # Steady rate: latency.
            count = int(rate * seconds)
            names = [f"steady-{i:05d}" for i in range(count)]
            start = time.perf_counter()
            for i, name in enumerate(names):
                due = start + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                created[name] = time.perf_counter()
                await asyncio.to_thread(api.create, namespace(name))
            await wait_all(names)
            lat = sorted((written[n] - created[n]) * 1000 for n in names)
            achieved = count / (created[names[-1]] - start)

            def pct(values: list[float]) -> str:
                values = sorted(values)
                p99 = values[int(len(values) * 0.99) - 1]
                return f"p50 {statistics.median(values):.1f} ms, p99 {p99:.1f} ms"

            to_bus = [(published[n] - created[n]) * 1000 for n in names]
            on_bus = [(written[n] - published[n]) * 1000 for n in names]
            print(f"  created in the API -> event on NATS (sim + in-process bridge): {pct(to_bus)}")
            print(f"  event on NATS -> annotation written (the allocator): {pct(on_bus)}")
            p50 = statistics.median(lat)
            p99 = lat[int(len(lat) * 0.99) - 1]
            print(
                f"- steady {achieved:.0f}/s for {seconds:.0f} s ({count} namespaces): latency "
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {lat[-1]:.1f} ms"
            )
            values = [
                (ns["metadata"].get("annotations") or {}).get(ANN) for ns in api.list("namespaces")
            ]
            assert len(set(values)) == len(values), "duplicate labels"
        finally:
            watcher.cancel()
            for step in (client.close, bridge.stop):
                with contextlib.suppress(Exception):
                    await step()
            replicas.stop()
            api.stop()
            server.stop()


# The simulated API in a process of its own: started, kubeconfig written, stopped on stdin EOF.
_API_SCRIPT = """
import sys
from cedar.sandbox.kubeapi import KubeAPI
api = KubeAPI(bookmark_interval=5.0).start()
api.write_kubeconfig(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
api.stop()
"""


def _popen(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Started before any load, so blocking the loop for it costs nothing measured."""
    return subprocess.Popen(args, **kwargs)


async def bench_e2e_real(burst: int, rate: int, seconds: float) -> None:
    """Every part in its own process: the simulated API, `cedar watcher`, two allocators.

    The benchmark process only creates namespaces over HTTP, watches for the annotation and
    listens (core NATS) to the namespace events the watcher publishes, to split the latency
    into the watcher's leg and the allocator's leg.
    """
    import nats

    from cedar.proto import subjects
    from cedar.runtime.kube import KubeClient, load_config, resource_path
    from cedar.sandbox.nats import NatsServer
    from cedar.sandbox.procs import free_port, kill_pid
    from tests.integration.test_mcs_allocator import ANN, Replicas, namespace

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        kubeconfig = tmp / "kubeconfig"
        server = NatsServer(tmp / "store")
        server.start()
        procs: list[subprocess.Popen[bytes]] = []
        api_proc = _popen(
            [sys.executable, "-c", _API_SCRIPT, str(kubeconfig)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        procs.append(api_proc)
        replicas = Replicas(tmp, server.url, kubeconfig, CEDAR_LOG_LEVEL="WARNING")
        created: dict[str, float] = {}
        acked: dict[str, float] = {}
        published: dict[str, float] = {}
        written: dict[str, float] = {}
        nc = None
        observer_client = creator = None
        tasks: list[asyncio.Task[None]] = []
        try:
            assert api_proc.stdout is not None
            line = await asyncio.to_thread(api_proc.stdout.readline)
            assert line.strip() == b"ready", line
            watcher_log = (tmp / "watcher.log").open("wb")
            procs.append(
                _popen(
                    [sys.executable, "-m", "cedar.cli", "watcher"],
                    env={
                        **os.environ,
                        "CEDAR_NATS_URL": server.url,
                        "KUBECONFIG": str(kubeconfig),
                        "CEDAR_WATCH_KINDS": "Namespace",
                        "CEDAR_METRICS_PORT": str(free_port()),
                        "CEDAR_LOG_LEVEL": "WARNING",
                    },
                    stdout=watcher_log,
                    stderr=subprocess.STDOUT,
                )
            )
            replicas.start(2)

            nc = await nats.connect(server.url)

            async def on_event(msg: Any) -> None:
                name = json.loads(msg.data).get("name")
                if name not in published:
                    published[name] = time.perf_counter()

            await nc.subscribe(f"{subjects.NAMESPACES_PREFIX}.>", cb=on_event)

            observer_client = KubeClient(load_config(str(kubeconfig)))
            creator = KubeClient(load_config(str(kubeconfig)))
            path = resource_path("Namespace")

            tasks.append(asyncio.create_task(record_labelled(observer_client, written)))

            async def create(name: str) -> None:
                assert creator is not None
                created[name] = time.perf_counter()
                await creator.create(path, namespace(name))
                acked[name] = time.perf_counter()

            async def wait_all(names: list[str], limit: float = 300) -> None:
                await wait_labelled(written, names, limit, interval=0.02)

            # Warm-up: one namespace through the whole chain proves every process is up.
            await create("warmup")
            await wait_all(["warmup"], limit=60)
            await asyncio.sleep(1.0)

            def pct(values: list[float]) -> str:
                values = sorted(values)
                p99 = values[max(0, int(len(values) * 0.99) - 1)]
                return (
                    f"p50 {statistics.median(values):.1f} ms, p99 {p99:.1f} ms, "
                    f"max {values[-1]:.1f} ms"
                )

            # Burst: created as fast as 32 connections allow, throughput.
            names = [f"burst-{i:05d}" for i in range(burst)]
            sem = asyncio.Semaphore(32)

            async def bounded(name: str) -> None:
                async with sem:
                    await create(name)

            start = time.perf_counter()
            await asyncio.gather(*(bounded(n) for n in names))
            api_done = time.perf_counter() - start
            await wait_all(names)
            took = max(written[n] for n in names) - start
            print(
                f"- burst of {burst} namespaces: {burst / took:.0f} namespaces/s ({took:.1f} s; "
                f"all created in the API after {api_done:.1f} s = {burst / api_done:.0f}/s)"
            )
            await asyncio.sleep(2.0)

            # Steady rate: latency, one create at a time on its schedule.
            count = int(rate * seconds)
            names = [f"steady-{i:05d}" for i in range(count)]
            start = time.perf_counter()
            pending: list[asyncio.Task[None]] = []
            for i, name in enumerate(names):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(asyncio.create_task(create(name)))
            await asyncio.gather(*pending)
            await wait_all(names)
            achieved = count / (created[names[-1]] - start)
            late = [(created[n] - (start + i / rate)) * 1000 for i, n in enumerate(names)]
            print(
                f"- steady {achieved:.0f}/s for {seconds:.0f} s ({count} namespaces), "
                f"create sent behind schedule: {pct(late)}"
            )
            rtt = [(acked[n] - created[n]) * 1000 for n in names]
            print(f"  POST sent -> API response: {pct(rtt)}")
            print(
                "  POST sent -> event seen on NATS (API + `cedar watcher`): "
                + pct([(published[n] - created[n]) * 1000 for n in names if n in published])
            )
            print(
                "  event seen on NATS -> annotation seen (2 x `cedar mcs-allocator` + API): "
                + pct([(written[n] - published[n]) * 1000 for n in names if n in published])
            )
            print(
                "  end to end, POST sent -> annotation seen by a watch: "
                + pct([(written[n] - created[n]) * 1000 for n in names])
            )
            values: list[str] = []
            assert observer_client is not None
            async for items, _ in observer_client.list_pages(path):
                values += [
                    a
                    for ns in items
                    if (a := (ns["metadata"].get("annotations") or {}).get(ANN)) is not None
                ]
            assert len(set(values)) == len(values), "duplicate labels"
            print(f"  {len(values)} namespaces labelled, no duplicate labels")
        finally:
            for task in tasks:
                task.cancel()
            for client in (observer_client, creator):
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.close()
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
            replicas.stop()
            for proc in reversed(procs[1:]):
                kill_pid(proc.pid)
                with contextlib.suppress(Exception):
                    proc.wait(10)
            if api_proc.stdin is not None:
                with contextlib.suppress(Exception):
                    api_proc.stdin.close()
            try:
                api_proc.wait(10)
            except subprocess.TimeoutExpired:
                kill_pid(api_proc.pid)
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=3000)
    parser.add_argument("--rate", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-kv", action="store_true")
    parser.add_argument(
        "--e2e-real",
        action="store_true",
        help="end to end with the simulated API, `cedar watcher` and both allocators each in "
        "a process of their own (instead of in-process API + bridge)",
    )
    parser.add_argument("--only-e2e", action="store_true", help="skip the choice/rebuild parts")
    parser.add_argument(
        "--with-ns",
        action="store_true",
        help="the full ledger also holds every namespace's ns.<uid> key (twice the entries)",
    )
    parser.add_argument("--child-load", metavar="NATS_URL", help=argparse.SUPPRESS)
    parser.add_argument("--child-snapshots", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-write", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_load:
        asyncio.run(child_load(args.child_load, args.child_snapshots, args.child_write))
        return 0
    print(f"machine: {machine()}")
    if not args.only_e2e:
        bench_choice()
        print("## start-up rebuild of a full ledger")
        entries = full_entries(args.with_ns)
        bench_rebuild(entries)
        if not args.skip_kv:
            asyncio.run(bench_kv_load(entries))
        del entries
    if args.e2e_real:
        print("## end to end (separate processes: simulated API, cedar watcher, 2 allocators)")
        asyncio.run(bench_e2e_real(args.burst, args.rate, args.seconds))
    elif not args.skip_e2e:
        print("## end to end (2 replicas, simulated API, real NATS)")
        asyncio.run(bench_e2e(args.burst, args.rate, args.seconds))
    print(json.dumps({"done": True}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
