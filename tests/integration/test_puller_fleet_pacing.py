"""Fleet-wide registry pacing with real NATS, real engines and a real (slowed) registry.

Several `cedar puller` processes, each driving a private dockerd, pull from one registry
through a proxy that slows its answers (so that pulls overlap and a holder can be killed
mid-pull); `CEDAR_REGISTRY_FLEET_PULLS` caps that registry. What is checked:

- the budget is never exceeded: the lease bucket is followed from the start (every lease
  ever created, and no slot beyond the budget), and, independently, the pullers' own
  `pull`/`pulled` decisions (CEDAR_HISTORY, in the order the server stored them: a pull's
  `pulled` is acknowledged before its lease is released) never overlap more than that;
- a SIGKILLed holder's lease is not renewed after the kill, carries the TTL, lapses, and
  the slot's next lease is taken only once the dead one had expired;
- a node with an empty cache (warming) is served before a refresh that asked earlier;
- NATS unavailable: waiting pulls go on at once within the node's own bound (never a
  stall), and a waiting refresh gives its local slot to a missing image.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from prometheus_client import REGISTRY

from cedar.proto import subjects
from cedar.proto.imageref import canonical_registry, normalize
from cedar.proto.models import ContainerImage, PodScheduling, PullerDecision, WorkloadImageSet
from cedar.puller.app import assemble
from cedar.puller.fleet_leases import Held, LeaseStore
from cedar.puller.lease_codec import (
    decode_lease,
    decode_request,
    encode_lease,
    lease_key,
)
from cedar.puller.pacing import (
    Lease,
    PullPriority,
    Request,
    parse_fleet_pulls,
)
from cedar.puller.settings import PullerSettings
from cedar.runtime.bus import Bus, ensure_stream, kv_deleted, read_to_end
from cedar.runtime.health import Health
from cedar.runtime.topology import (
    fleet_leases_stream,
    kv_stream,
    kv_subject,
    service_streams,
)
from cedar.sandbox.dockerd import DockerEngine
from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import kill_pid
from cedar.sandbox.registry import Registry
from tests.harness.registry import ImageMaker
from tests.harness.waiting import eventually

pytestmark = pytest.mark.integration

TTL = 3  # seconds: the lease TTL of every puller here
RATE = 1024 * 1024  # bytes per second per connection through the slow proxy


# --- a registry that answers slowly -------------------------------------------------------


class SlowProxy:
    """TCP proxy to a registry on 127.0.0.1 that sends the registry's answers at `rate`
    bytes per second per connection (requests go through at full speed)."""

    def __init__(self, upstream: Registry, rate: int) -> None:
        self.upstream = upstream
        self.rate = rate
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ref(self, ref: str) -> str:
        """The same image, reached through the proxy."""
        return self.host + "/" + ref.split("/", 1)[1]

    async def __aenter__(self) -> SlowProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream.port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, None), self._pipe(up_reader, writer, self.rate)
            )
        except asyncio.CancelledError:
            pass  # the proxy closes: end quietly (asyncio logs a cancelled handler task)
        finally:
            self._tasks.discard(task)
            for w in (writer, up_writer):
                w.close()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, rate: int | None) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await src.read(32 * 1024):
                dst.write(data)
                await dst.drain()
                if rate:
                    await asyncio.sleep(len(data) / rate)
        with contextlib.suppress(OSError):
            dst.close()


# --- the lease bucket as it changes -------------------------------------------------------


@dataclass
class Change:
    seq: int
    key: str
    removed: bool
    entry: Lease | Request | None
    ttl: str | None  # the Nats-TTL header
    stored: datetime  # the server's time of the write


@dataclass
class BucketLog:
    """Every write to the lease bucket from its creation, in the server's order."""

    changes: list[Change] = field(default_factory=list)

    async def on_message(self, msg: Msg) -> None:
        key = msg.subject.removeprefix(kv_subject(subjects.KV_FLEET_LEASES))
        removed = kv_deleted(msg.headers)
        entry: Lease | Request | None = None
        if not removed:
            entry = decode_lease(msg.data) if key.startswith("lease.") else decode_request(msg.data)
        self.changes.append(
            Change(
                msg.metadata.sequence.stream,
                key,
                removed,
                entry,
                (msg.headers or {}).get("Nats-TTL"),
                msg.metadata.timestamp,
            )
        )

    def leases(self) -> list[tuple[Change, Lease]]:
        """Each lease when it was created (not its renewals)."""
        seen: set[str] = set()
        out = []
        for change in self.changes:
            if isinstance(change.entry, Lease) and change.entry.token not in seen:
                seen.add(change.entry.token)
                out.append((change, change.entry))
        return out

    def waiting(self, holder: str) -> list[Request]:
        """`holder`'s requests present now (written and not removed)."""
        current: dict[str, Request | None] = {}
        for change in self.changes:
            if change.key.startswith("wait."):
                current[change.key] = None if change.removed else change.entry  # type: ignore[assignment]
        return [r for r in current.values() if r is not None and r.holder == holder]

    def holders(self) -> dict[str, str]:
        """slot key -> holder of the lease the key holds now, per the writes seen."""
        current: dict[str, str] = {}
        for change in self.changes:
            if change.key.startswith("lease."):
                if change.removed:
                    current.pop(change.key, None)
                elif isinstance(change.entry, Lease):
                    current[change.key] = change.entry.holder
        return current


@contextlib.asynccontextmanager
async def follow_bucket(url: str) -> AsyncIterator[BucketLog]:
    log = BucketLog()
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, fleet_leases_stream(PullerSettings(node_name="t")))
        sub = await js.subscribe(
            kv_subject(subjects.KV_FLEET_LEASES, ">"),
            stream=kv_stream(subjects.KV_FLEET_LEASES),
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            cb=log.on_message,
        )
        try:
            yield log
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()


async def decisions(url: str) -> list[PullerDecision]:
    """Every puller decision stored in CEDAR_HISTORY, in the order the server stored them."""
    nc = await nats.connect(url)
    try:
        stored = await read_to_end(
            nc.jetstream(), subjects.STREAM_HISTORY, f"{subjects.DECISIONS_PREFIX}.>"
        )
        return [PullerDecision.model_validate_json(msg.data) for msg in stored]
    finally:
        await nc.close()


def most_at_once(stored: list[PullerDecision]) -> int:
    """The most engine pulls in progress at once, from `pull`/`refresh` to its end."""
    running: set[tuple[str, str]] = set()
    most = 0
    for d in stored:
        if d.action in ("pull", "refresh"):
            running.add((d.node, d.image))
            most = max(most, len(running))
        elif d.action in ("pulled", "failed"):
            running.discard((d.node, d.image))
    return most


# --- workloads and pullers ----------------------------------------------------------------


def workload(name: str, pool: str, *images: str) -> WorkloadImageSet:
    return WorkloadImageSet(
        kind="Deployment",
        namespace="tenant",
        name=name,
        uid=f"uid-{name}",
        containers=tuple(
            ContainerImage(container=f"c{i}", image=img, reference=normalize(img))
            for i, img in enumerate(images)
        ),
        scheduling=PodScheduling(node_selector={"pool": pool}),
        replicas=0,
        observed_at=datetime.now(UTC),
    )


async def publish(url: str, *sets: WorkloadImageSet) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        settings = PullerSettings(node_name="t")
        for stream in service_streams(settings):
            with contextlib.suppress(nats.js.errors.BadRequestError):
                await js.add_stream(stream)
        for wis in sets:
            subject = subjects.workload_subject(wis.kind, wis.namespace, wis.name)
            await js.publish(subject, wis.model_dump_json().encode())
    finally:
        await nc.close()


@dataclass
class Fleet:
    url: str
    budget: str
    tmp: Path
    engines: Callable[[], DockerEngine]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, node: str, pool: str, **env: str) -> DockerEngine:
        engine = self.engines()
        environ = {
            **engine.env(),
            "CEDAR_RUNTIME": "docker",
            "CEDAR_NODE_NAME": node,
            "CEDAR_NATS_URL": self.url,
            "CEDAR_NODE_FROM_API": "false",
            "CEDAR_NODE_LABELS": f"pool={pool}",
            "CEDAR_METRICS_PORT": "0",
            "CEDAR_RESYNC_INTERVAL": "1s",
            "CEDAR_REGISTRY_PROBE_TTL": "1s",
            "CEDAR_REGISTRY_FLEET_PULLS": self.budget,
            "CEDAR_FLEET_LEASE_TTL": f"{TTL}s",
            **env,
        }
        log = (self.tmp / f"{node}.log").open("wb")
        self.procs[node] = subprocess.Popen(
            [sys.executable, "-m", "cedar.cli", "puller"],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        return engine

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
            for p in sorted(self.tmp.glob("*.log"))
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                kill_pid(proc.pid)


@pytest.fixture
def fleet_factory(
    nats_url: str, tmp_path: Path, docker_engine_factory: Callable[[], DockerEngine]
) -> Iterator[Callable[[str], Fleet]]:
    fleets: list[Fleet] = []

    def make(budget: str) -> Fleet:
        fleet = Fleet(nats_url, budget, tmp_path, docker_engine_factory)
        fleets.append(fleet)
        return fleet

    try:
        yield make
    finally:
        for fleet in fleets:
            fleet.stop()


async def has_image(engine: DockerEngine, ref: str) -> bool:
    """Whether the engine has `ref` (the CLI runs in a thread: the proxy shares the loop)."""
    out = await asyncio.to_thread(
        engine.docker, "images", "--format", "{{.Repository}}:{{.Tag}}", check=False
    )
    return ref in out.stdout.split()


async def has_all(engine: DockerEngine, refs: list[str]) -> bool:
    return all([await has_image(engine, ref) for ref in refs])


# --- several real pullers ---------------------------------------------------------------


async def test_the_budget_is_never_exceeded_across_pullers(
    nats_url: str, registry: Registry, make_images: ImageMaker, fleet_factory: Any
) -> None:
    refs = await make_images.make(6, 2 * 1024 * 1024)
    async with SlowProxy(registry, RATE) as proxy, follow_bucket(nats_url) as bucket:
        slow = [proxy.ref(r) for r in refs]
        await publish(
            nats_url, *(workload(f"w{i}", f"p{i}", *slow[2 * i : 2 * i + 2]) for i in range(3))
        )
        fleet = fleet_factory(f"{proxy.host}=2")
        engines = [fleet.start(f"node-{i}", f"p{i}") for i in range(3)]

        async def all_pulled() -> bool:
            return all([await has_all(engines[i], slow[2 * i : 2 * i + 2]) for i in range(3)])

        await eventually(all_pulled, 60, "every node pulled its images", details=fleet.logs)
        fleet.stop()
    leases = bucket.leases()
    assert len(leases) == 6  # one lease per pull, each pull once
    assert {lease.slot for _, lease in leases} <= {0, 1}  # no slot beyond the budget
    assert {lease.holder for _, lease in leases} == {"node-0", "node-1", "node-2"}
    assert all(change.ttl == str(TTL) for change, _ in leases)
    # Independently of the leases: what the pullers did, in the order the server stored it.
    stored = [d for d in await decisions(nats_url) if d.node.startswith("node-")]
    assert sum(d.action == "pulled" for d in stored) == 6
    assert most_at_once(stored) == 2  # the budget, reached and never exceeded (local: 3 x 2)


async def test_a_killed_holder_frees_its_slot_and_a_cold_node_goes_first(
    nats_url: str,
    registry: Registry,
    make_images: ImageMaker,
    builder_engine: DockerEngine,
    fleet_factory: Any,
) -> None:
    (big,) = await make_images.make(1, 32 * 1024 * 1024)  # over 30 s through the proxy
    warm_ref, cold_ref = await make_images.make(2, 256 * 1024)
    async with SlowProxy(registry, RATE) as proxy, follow_bucket(nats_url) as bucket:
        big, warm_ref, cold_ref = proxy.ref(big), proxy.ref(warm_ref), proxy.ref(cold_ref)
        await publish(
            nats_url,
            workload("k", "k", big),
            workload("w", "w", warm_ref),
            workload("c", "c", cold_ref),
        )
        fleet = fleet_factory(f"{proxy.host}=1")
        fleet.start("holder", "k")
        await eventually(
            lambda: "holder" in bucket.holders().values(), 30, "holder leased", details=fleet.logs
        )
        # A warm node whose tag is due for a refresh, then a new node with an empty cache.
        warm = fleet.engines()
        await asyncio.to_thread(warm.docker, "pull", warm_ref)
        _start_with(fleet, "warm", "w", warm, CEDAR_REFRESH_INTERVAL="1s")
        await eventually(lambda: bucket.waiting("warm"), 30, "refresh waits", details=fleet.logs)
        fleet.start("cold", "c", CEDAR_NODE_TAINTS="cedar.io/warming:NoSchedule")
        await eventually(lambda: bucket.waiting("cold"), 30, "cold node waits", details=fleet.logs)
        (refresh,) = bucket.waiting("warm")
        (cold,) = bucket.waiting("cold")
        assert refresh.priority == PullPriority.REFRESH and cold.priority == PullPriority.COLD
        assert refresh.since < cold.since  # the refresh asked first

        assert "holder" in bucket.holders().values()  # still pulling: killed mid-pull
        killed_at = datetime.now(UTC)
        os.kill(fleet.procs["holder"].pid, signal.SIGKILL)
        fleet.procs["holder"].wait(10)
        await eventually(
            lambda: [lease for _, lease in bucket.leases() if lease.holder == "warm"],
            60,
            "the refresh got its lease in the end",
            details=fleet.logs,
        )
        fleet.stop()

    leases = bucket.leases()
    dead = [lease for _, lease in leases if lease.holder == "holder"]
    assert len(dead) == 1
    writes = [c for c in bucket.changes if c.key.startswith("lease.") and c.entry is not None]
    last_write = max(
        (c for c in writes if isinstance(c.entry, Lease) and c.entry.token == dead[0].token),
        key=lambda c: c.seq,
    )
    # Never renewed after the kill (a renewal already on its way may land just after)...
    assert last_write.stored <= killed_at + timedelta(seconds=0.5)
    assert last_write.ttl == str(TTL)  # ...so the server drops it one TTL after that write
    assert isinstance(last_write.entry, Lease)
    after = [lease for _, lease in leases if lease.holder != "holder"]
    # The slot went to the new node first, the refresh that asked earlier after it,
    # and only once the dead holder's lease had expired.
    assert [lease.holder for lease in after][:2] == ["cold", "warm"]
    assert after[0].priority == PullPriority.COLD
    assert after[0].acquired_at >= last_write.entry.expires_at - 0.5


def _start_with(fleet: Fleet, node: str, pool: str, engine: DockerEngine, **env: str) -> None:
    """Like Fleet.start, on an engine the test prepared."""
    engines = fleet.engines
    fleet.engines = lambda: engine
    try:
        fleet.start(node, pool, **env)
    finally:
        fleet.engines = engines


def _runnable_image(engine: DockerEngine, ref: str) -> None:
    """Import `ref` into `engine` from this machine's /bin/sleep and the libraries it
    links (no registry or network needed): an image whose container really runs."""
    files = ["/bin/sleep", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        pytest.skip(f"this machine has no {missing[0]} to build a running container from")
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for name in files:
            real = Path(name).resolve()
            info = tar.gettarinfo(str(real), arcname=name.lstrip("/"))
            with real.open("rb") as data:
                tar.addfile(info, data)
    subprocess.run(
        [engine.cli, "import", "-", ref],
        input=layer.getvalue(),
        env=engine.env(),
        capture_output=True,
        check=True,
        timeout=60,
    )


async def test_a_node_running_containers_waits_behind_an_idle_node(
    nats_url: str, registry: Registry, make_images: ImageMaker, fleet_factory: Any
) -> None:
    busy_ref, idle_ref = await make_images.make(2, 256 * 1024)
    async with SlowProxy(registry, RATE) as proxy, follow_bucket(nats_url) as bucket:
        busy_ref, idle_ref = proxy.ref(busy_ref), proxy.ref(idle_ref)
        budget = f"{proxy.host}=1"
        fleet = fleet_factory(budget)
        async with blocker(nats_url, proxy.host, budget) as held:
            # A node running a container (and one that exited: not counted) asks first...
            busy = fleet.engines()
            sleeper = "cedar-test/sleeper:1"
            await asyncio.to_thread(_runnable_image, busy, sleeper)
            await asyncio.to_thread(
                busy.docker, "run", "--network", "none", "-d", sleeper, "/bin/sleep", "600"
            )
            await asyncio.to_thread(
                busy.docker, "run", "--network", "none", sleeper, "/bin/sleep", "0"
            )
            _start_with(fleet, "busy", "busy", busy)
            await publish(nats_url, workload("busy", "busy", busy_ref))
            await eventually(lambda: bucket.waiting("busy"), 30, "busy waits", details=fleet.logs)
            # ...then an idle node, for the same registry.
            fleet.start("idle", "idle")
            await publish(nats_url, workload("idle", "idle", idle_ref))
            await eventually(lambda: bucket.waiting("idle"), 30, "idle waits", details=fleet.logs)
            (busy_request,) = bucket.waiting("busy")
            (idle_request,) = bucket.waiting("idle")
            assert (busy_request.load, idle_request.load) == (1, 0)
            assert busy_request.priority == idle_request.priority == PullPriority.MISSING
            assert busy_request.since < idle_request.since  # first come would serve busy
            await held.store.release(held.held)
            await eventually(
                lambda: len([lease for _, lease in bucket.leases()]) == 3,
                30,
                "both nodes leased after the blocker",
                details=fleet.logs,
            )
        fleet.stop()
    # The slot went to the idle node first, where the scheduler puts the next launch.
    assert [lease.holder for _, lease in bucket.leases()] == ["blocker", "idle", "busy"]


async def test_among_idle_nodes_the_image_most_of_a_nodes_workloads_use_goes_first(
    nats_url: str, registry: Registry, make_images: ImageMaker, fleet_factory: Any
) -> None:
    first_ref, second_ref, focused_ref = await make_images.make(3, 256 * 1024)
    async with SlowProxy(registry, RATE) as proxy, follow_bucket(nats_url) as bucket:
        first_ref, second_ref = proxy.ref(first_ref), proxy.ref(second_ref)
        focused_ref = proxy.ref(focused_ref)
        budget = f"{proxy.host}=1"
        fleet = fleet_factory(budget)
        async with blocker(nats_url, proxy.host, budget) as held:
            # A node whose two workloads use an image each asks first, for both...
            fleet.start("spread", "spread")
            await publish(
                nats_url,
                workload("spread-a", "spread", first_ref),
                workload("spread-b", "spread", second_ref),
            )
            await eventually(
                lambda: len(bucket.waiting("spread")) == 2, 30, "spread waits", details=fleet.logs
            )
            # ...then a node whose one workload uses its image, for the same registry.
            fleet.start("focused", "focused")
            await publish(nats_url, workload("focused", "focused", focused_ref))
            await eventually(
                lambda: bucket.waiting("focused"), 30, "focused waits", details=fleet.logs
            )
            spread = bucket.waiting("spread")
            (focused,) = bucket.waiting("focused")
            assert sorted(r.want for r in spread) == [0.5, 0.5]
            assert focused.want == 1.0
            assert {r.load for r in [*spread, focused]} == {0}  # alike idle nodes
            assert max(r.since for r in spread) < focused.since  # first come: spread
            await held.store.release(held.held)
            await eventually(
                lambda: len(bucket.leases()) == 4,
                60,
                "all three pulls leased after the blocker",
                details=fleet.logs,
            )
        fleet.stop()
    # The slot went first where the next launch most likely needs the image.
    holders = [lease.holder for _, lease in bucket.leases()]
    assert holders == ["blocker", "focused", "spread", "spread"]


# --- one puller in this process: the fallback and the withdrawal --------------------------


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


@contextlib.asynccontextmanager
async def in_process(url: str, engine: DockerEngine, **overrides: Any) -> AsyncIterator[Any]:
    settings = PullerSettings(
        **{
            "node_name": f"node-{uuid.uuid4().hex[:6]}",
            "nats_url": url,
            "runtime": "docker",
            "docker_host": engine.host,
            "node_from_api": False,
            "registry_probe_ttl": "1s",
            "resync_interval": "1s",
            "fleet_lease_ttl": f"{TTL}s",
            **overrides,
        }
    )
    health = Health()
    bus = Bus(settings, "test-puller", health)
    assert await bus.connect()
    stop = asyncio.Event()
    puller = await asyncio.wait_for(assemble(settings, bus, health, stop), 30)
    assert puller is not None
    task = asyncio.create_task(puller.run(stop))
    try:
        await eventually(lambda: puller.feed.synced.is_set() or task.done(), 30, "synced")
        yield puller
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await bus.close()


@dataclass
class Blocker:
    store: LeaseStore
    held: Held


@contextlib.asynccontextmanager
async def blocker(url: str, registry: str, budget: str) -> AsyncIterator[Blocker]:
    """A lease store in this process that holds `registry`'s only slot until released."""
    settings = PullerSettings(node_name="blocker", nats_url=url)
    bus = Bus(settings, "test-blocker", Health())
    assert await bus.connect()
    await bus.ensure(streams=[fleet_leases_stream(settings)])
    kv = await bus.js.key_value(subjects.KV_FLEET_LEASES)
    store = LeaseStore(bus=bus, kv=kv, budget=parse_fleet_pulls(budget), holder="blocker", ttl=TTL)
    await store.start()
    held = await store.acquire(registry, "blocker-token", PullPriority.COLD)
    assert held.lease is not None
    try:
        yield Blocker(store, held)
    finally:
        await store.release(held)
        await store.close()
        await bus.close()


async def test_a_lease_that_lapses_while_it_is_claimed_is_taken_not_a_store_failure(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15, made deterministic. nats-py's `KeyValue.create` is two steps (upstream
    nats-io/nats.py, nats/js/kv.py `create`): a write conditional on the key having no
    message, and, when it has one, a `_get` to tell a delete marker (recreate over it)
    from a live value; a `_get` that finds nothing raises KeyNotFoundError. A waiter claims
    a dead holder's slot at the lease's `expires_at`, while the server drops the message
    one TTL after it stored it, a little later: the write finds the lease, the look finds
    it gone. That is a free slot, not an unavailable store (which pulls without a lease)."""
    host = canonical_registry(f"race-{uuid.uuid4().hex[:8]}.example.com")
    settings = PullerSettings(node_name="claimer", nats_url=nats_url)
    bus = Bus(settings, "test-claimer", Health())
    assert await bus.connect()
    try:
        await bus.ensure(streams=[fleet_leases_stream(settings)])
        kv = await bus.js.key_value(subjects.KV_FLEET_LEASES)
        key = lease_key(host, 0)
        # A crashed holder's lease whose value says it lapses well before the server drops
        # it (Nats-TTL 5s): the claimer's create is sure to find it there.
        now = time.time()
        dead = Lease(host, 0, "dead", "dead-token", PullPriority.REFRESH, now, now + 0.5)
        await kv.create(key, encode_lease(dead), msg_ttl=5)

        async def lapsed() -> bool:
            try:
                await bus.js.get_msg(
                    kv_stream(subjects.KV_FLEET_LEASES),
                    subject=kv_subject(subjects.KV_FLEET_LEASES, key),
                )
            except nats.js.errors.NotFoundError:
                return True
            return False

        real_get = kv._get
        looked: list[str] = []

        async def get_once_it_lapsed(key: str, revision: int | None = None) -> Any:
            """create's look at the key, held back until the server has dropped it."""
            looked.append(key)
            if len(looked) == 1:
                await eventually(lapsed, 15, "the dead lease dropped by its TTL")
            return await real_get(key, revision)

        monkeypatch.setattr(kv, "_get", get_once_it_lapsed)
        store = LeaseStore(
            bus=bus, kv=kv, budget=parse_fleet_pulls(f"{host}=1"), holder="claimer", ttl=TTL
        )
        await store.start()
        fallbacks = metric("cedar_puller_fleet_lease_grants_total", result="unavailable")
        try:
            held = await asyncio.wait_for(
                store.acquire(host, store.new_token("img"), PullPriority.COLD), 30
            )
            assert looked == [key]  # the race happened: the write found the lease, then not
            assert held.lease is not None, held.reason  # a lease, not the local bound
            assert held.lease.slot == 0 and held.lease.holder == "claimer"
            assert decode_lease((await kv.get(key)).value or b"").token == held.token
            assert metric("cedar_puller_fleet_lease_grants_total", result="unavailable") == (
                fallbacks
            )
            await store.release(held)
        finally:
            await store.close()
    finally:
        await bus.close()


async def test_nats_unavailable_means_the_local_bound_never_a_stall(
    fresh_nats: NatsServer,
    registry: Registry,
    make_images: ImageMaker,
    fresh_docker_engine: DockerEngine,
) -> None:
    refs = await make_images.make(4, 1024 * 1024)
    async with SlowProxy(registry, RATE) as proxy:
        slow = [proxy.ref(r) for r in refs]
        await publish(fresh_nats.url, workload("many", "any", *slow))
        budget = f"{proxy.host}=1"
        fallbacks = metric("cedar_puller_fleet_lease_grants_total", result="unavailable")
        async with (
            blocker(fresh_nats.url, proxy.host, budget),
            in_process(
                fresh_nats.url,
                fresh_docker_engine,
                node_labels="pool=any",
                registry_fleet_pulls=budget,
                max_concurrent_pulls=2,
            ) as puller,
        ):
            pulls = puller.pulls
            await eventually(lambda: len(pulls.waiting) == 2, 30, "two pulls wait for a lease")
            assert pulls.engine_pulls == 0  # the only slot is the blocker's
            fresh_nats.stop()
            await eventually(
                lambda: has_all(fresh_docker_engine, slow), 60, "every image pulled without NATS"
            )
            assert pulls.max_engine_pulls == 2  # the node's own bound, no more
            assert metric("cedar_puller_fleet_lease_grants_total", result="unavailable") >= (
                fallbacks + 4
            )
            fresh_nats.start()  # so that the blocker and the puller close cleanly


async def test_a_waiting_refresh_gives_its_slot_to_a_missing_image(
    nats_url: str,
    registry: Registry,
    make_images: ImageMaker,
    fresh_docker_engine: DockerEngine,
) -> None:
    present, missing = await make_images.make(2, 256 * 1024)
    async with SlowProxy(registry, RATE) as proxy:
        present, missing = proxy.ref(present), proxy.ref(missing)
        await asyncio.to_thread(fresh_docker_engine.docker, "pull", present)
        await publish(nats_url, workload("present", "x", present))
        budget = f"{proxy.host}=1"
        withdrawn = metric("cedar_puller_fleet_lease_withdrawn_total")
        async with (
            follow_bucket(nats_url) as bucket,
            blocker(nats_url, proxy.host, budget) as held,
            in_process(
                nats_url,
                fresh_docker_engine,
                node_labels="pool=x",
                registry_fleet_pulls=budget,
                max_concurrent_pulls=1,
                refresh_interval="1s",
            ) as puller,
        ):
            node = puller.settings.node
            await eventually(
                lambda: [r.priority for r in bucket.waiting(node)] == [PullPriority.REFRESH],
                30,
                "the refresh waits, holding the node's only slot",
            )
            await publish(nats_url, workload("missing", "x", missing))
            await eventually(
                lambda: [r.priority for r in bucket.waiting(node)] == [PullPriority.MISSING],
                30,
                "the missing image waits in the refresh's place",
            )
            assert metric("cedar_puller_fleet_lease_withdrawn_total") == withdrawn + 1
            assert puller.reconciler.records[normalize(present)].state == "present"
            await held.store.release(held.held)
            await eventually(lambda: has_image(fresh_docker_engine, missing), 30, "pulled")
