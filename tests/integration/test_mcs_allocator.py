"""The allocator end to end: simulated Kubernetes API, real NATS, real `cedar mcs-allocator`
processes. Namespace events reach NATS through a small in-test bridge from the simulated
API's watch (the watcher's part of the contract), so these tests do not need the watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cedar.proto import subjects
from cedar.proto.levels import parse
from cedar.proto.models import NamespaceEvent
from cedar.runtime.bus import TRANSIENT_ERRORS, Bus
from cedar.runtime.health import Health
from cedar.runtime.kube import KubeClient, KubeError, load_config, resource_path
from cedar.runtime.settings import CommonSettings
from cedar.runtime.topology import history_stream, kv_stream, kv_subject, namespaces_stream
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.procs import free_port
from tests.harness import waiting

pytestmark = pytest.mark.integration

ANN = "cedar.io/selinux-level"
EXCLUDED = {"kube-system", "kube-public", "kube-node-lease", "default", "cedar-system"}


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


class Bridge:
    """List + watch namespaces in the simulated API and publish NamespaceEvents."""

    def __init__(self, kubeconfig: Path, nats_url: str) -> None:
        self.kubeconfig = kubeconfig
        self.settings = CommonSettings(nats_url=nats_url)
        self.bus = Bus(self.settings, "test-bridge", Health())
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Bridge:
        await self.bus.connect()
        await self.bus.ensure(
            streams=[history_stream(self.settings), namespaces_stream(self.settings)]
        )
        self.task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        # Bus.close() raises when the client is between reconnect attempts.
        with contextlib.suppress(Exception):
            await self.bus.close()

    async def publish(self, obj: dict[str, Any], deleted: bool = False) -> None:
        meta = obj["metadata"]
        event = NamespaceEvent(
            name=meta["name"],
            uid=meta["uid"],
            labels=meta.get("labels") or {},
            annotations=meta.get("annotations") or {},
            resource_version=meta.get("resourceVersion", ""),
            observed_at=datetime.now(UTC),
            deleted=deleted,
        )
        while True:
            try:
                await self.bus.js.publish(
                    subjects.namespace_subject(event.name), event.model_dump_json().encode()
                )
                return
            except (*TRANSIENT_ERRORS, nats.errors.Error):
                await asyncio.sleep(0.2)

    async def _run(self) -> None:
        client = KubeClient(load_config(str(self.kubeconfig)))
        path = resource_path("Namespace")
        try:
            while True:
                try:
                    rv = ""
                    async for items, list_rv in client.list_pages(path):
                        rv = list_rv
                        for item in items:
                            await self.publish(item)
                    while True:
                        async for ev in client.watch(path, rv, timeout_seconds=60):
                            obj = ev["object"]
                            rv = obj["metadata"]["resourceVersion"]
                            if ev["type"] in ("ADDED", "MODIFIED"):
                                await self.publish(obj)
                            elif ev["type"] == "DELETED":
                                await self.publish(obj, deleted=True)
                except KubeError:
                    await asyncio.sleep(0.1)
        finally:
            await client.close()


class Replicas:
    """`cedar mcs-allocator` child processes, stopped by PID."""

    def __init__(self, tmp: Path, nats_url: str, kubeconfig: Path, **env: str) -> None:
        self.tmp = tmp
        self.env = {
            **os.environ,
            "CEDAR_NATS_URL": nats_url,
            "KUBECONFIG": str(kubeconfig),
            "CEDAR_LOG_LEVEL": "INFO",
            **env,
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []

    def start(self, count: int = 1, args: tuple[str, ...] = (), **env: str) -> None:
        for _ in range(count):
            i = len(self.procs)
            port = free_port()
            log = (self.tmp / f"allocator-{i}.log").open("wb")
            proc = subprocess.Popen(
                [sys.executable, "-m", "cedar.cli", "mcs-allocator", *args],
                env={
                    **self.env,
                    "CEDAR_METRICS_PORT": str(port),
                    "CEDAR_POD_NAME": f"allocator-{i}",
                    **env,
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            self.procs.append(proc)
            self.ports.append(port)

    def log(self, i: int) -> str:
        return (self.tmp / f"allocator-{i}.log").read_text(errors="replace")

    def kill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait(10)

    def metric(self, i: int, name: str) -> float:
        url = f"http://127.0.0.1:{self.ports[i]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                head, value = line.rsplit(" ", 1)
                if head == name or head.startswith(name + "{"):
                    total += float(value)
        return total

    def metric_ok(self, i: int) -> bool:
        try:
            self.metric(i, "cedar_mcs_labels")
        except OSError:
            return False
        return True

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(25)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def replicas(tmp_path: Path, nats_url: str, kubeconfig: Path) -> Iterator[Replicas]:
    r = Replicas(tmp_path, nats_url, kubeconfig)
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
async def bridge(kubeconfig: Path, nats_url: str) -> AsyncIterator[Bridge]:
    b = await Bridge(kubeconfig, nats_url).start()
    try:
        yield b
    finally:
        await b.stop()


async def wait_until(
    check: Callable[[], bool], limit: float, what: str, logs: Callable[[], str] = str
) -> None:
    await waiting.eventually(check, limit, what, details=logs, interval=0.1)


def annotations(api: KubeAPI) -> dict[str, str | None]:
    return {
        ns["metadata"]["name"]: (ns["metadata"].get("annotations") or {}).get(ANN)
        for ns in api.list("namespaces")
        if ns["metadata"]["name"] not in EXCLUDED
    }


def uid_of(api: KubeAPI, name: str) -> str:
    obj = api.get("namespaces", None, name)
    assert obj is not None
    return str(obj["metadata"]["uid"])


async def read_ledger(url: str) -> dict[str, dict[str, Any]]:
    """The ledger's current values, through an ephemeral pull consumer (no callbacks)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        stream = kv_stream(subjects.KV_MCS_LEDGER)
        prefix = kv_subject(subjects.KV_MCS_LEDGER)
        sub = await js.pull_subscribe(
            prefix + ">",
            stream=stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.NONE
            ),
        )
        out: dict[str, dict[str, Any]] = {}
        pending = (await sub.consumer_info()).num_pending
        while pending > 0:
            for msg in await sub.fetch(batch=min(pending, 1000), timeout=10):
                pending -= 1
                key = msg.subject[len(prefix) :]
                if msg.data and not (msg.headers or {}).get("KV-Operation"):
                    out[key] = json.loads(msg.data)
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


def allocated_by_uid(ledger: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in ledger.items():
        if key.startswith("label.") and value["state"] == "allocated":
            out.setdefault(value["uid"], []).append(value["level"])
    return out


async def ledger_settles(url: str, api: KubeAPI, limit: float = 60) -> dict[str, dict[str, Any]]:
    """Wait until the ledger holds exactly one label per namespace, the annotated one.

    A replica killed (or cut off from NATS) between claiming a label and binding it leaves
    an unbound claim; the periodic repair drops it. Bindings are checked at every poll:
    they must never disagree with the annotations.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        ledger = await read_ledger(url)
        by_uid = allocated_by_uid(ledger)
        found = {uid_of(api, n): v for n, v in annotations(api).items()}
        for uid, value in found.items():
            bound = ledger.get(f"ns.{uid}")
            assert bound is not None and bound["level"] == value, (uid, value, bound)
        if {u: [v] for u, v in found.items()} == by_uid:
            return ledger
        if loop.time() > deadline:
            extra = {u: v for u, v in by_uid.items() if len(v) > 1 or u not in found}
            pytest.fail(f"ledger did not settle: {extra}")
        await asyncio.sleep(0.5)


def events(api: KubeAPI, reason: str) -> list[dict[str, Any]]:
    return [e for e in api.events_for() if e.get("reason") == reason]


# -- tests ---------------------------------------------------------------------------------


async def test_thousands_at_once_three_replicas_one_killed(
    kube_api: KubeAPI, replicas: Replicas, bridge: Bridge, nats_url: str
) -> None:
    count = 2000
    replicas.start(3, CEDAR_MCS_RESYNC_INTERVAL="5s")
    kube_api.load(namespace(f"tenant-{i:04d}") for i in range(count))
    kube_api.load(namespace(n) for n in ("kube-system", "default", "cedar-system"))

    def labelled() -> int:
        return sum(1 for v in annotations(kube_api).values() if v)

    await wait_until(
        lambda: labelled() >= count // 4, 120, "a quarter labelled", lambda: replicas.log(0)
    )
    replicas.kill(0)  # SIGKILL mid-run: its unacked events go to the others
    await wait_until(lambda: labelled() == count, 180, "all labelled", lambda: replicas.log(1))

    found = annotations(kube_api)
    values = [v for v in found.values() if v]
    assert len(values) == count
    assert len(set(values)) == count, "labels must be distinct"
    for value in values:
        assert str(parse(value)) == value, f"{value} is not canonical"
    for name in ("kube-system", "default", "cedar-system"):
        obj = kube_api.get("namespaces", None, name)
        assert obj is not None
        assert ANN not in (obj["metadata"].get("annotations") or {})

    # Exactly one label per namespace in the ledger too, the same one, written.
    ledger = await ledger_settles(nats_url, kube_api)
    for name in found:
        assert ledger[f"ns.{uid_of(kube_api, name)}"]["written"] is True


async def test_tamper_delete_recreate(
    kube_api: KubeAPI, replicas: Replicas, bridge: Bridge, nats_url: str
) -> None:
    replicas.start(1, CEDAR_MCS_QUARANTINE="1h")
    kube_api.create(namespace("tenant-a"))
    await wait_until(
        lambda: bool(annotations(kube_api).get("tenant-a")), 60, "labelled", lambda: replicas.log(0)
    )
    level = annotations(kube_api)["tenant-a"]
    assert level is not None

    # Changed: restored, with a Warning Event and the counter.
    kube_api.patch("namespaces", None, "tenant-a", {"metadata": {"annotations": {ANN: "s0:c1,c2"}}})
    await wait_until(
        lambda: len(events(kube_api, "MCSLevelTampered")) == 1,
        30,
        "tamper event",
        lambda: replicas.log(0),
    )
    await wait_until(lambda: annotations(kube_api)["tenant-a"] == level, 30, "restored")
    # Removed: restored too.
    kube_api.patch("namespaces", None, "tenant-a", {"metadata": {"annotations": {ANN: None}}})
    await wait_until(lambda: len(events(kube_api, "MCSLevelTampered")) == 2, 30, "tamper event 2")
    await wait_until(lambda: annotations(kube_api)["tenant-a"] == level, 30, "restored again")
    assert replicas.metric(0, "cedar_mcs_tamper_total") == 2
    event = events(kube_api, "MCSLevelTampered")[0]
    assert event["type"] == "Warning" and event["involvedObject"]["name"] == "tenant-a"
    # A Namespace is cluster-scoped: the real API takes its Events only in `default`
    # (kubernetes/kubernetes pkg/apis/core/validation/events.go, legacyValidateEvent).
    assert event["metadata"]["namespace"] == "default"
    assert "namespace" not in event["involvedObject"]
    assert "s0:c1,c2" in replicas.log(0)  # the old value is logged

    # Deleted and re-created under the same name as soon as the API allows it (a namespace
    # is Terminating until its finalizer is done; a create before that is 409 AlreadyExists,
    # staging/src/k8s.io/apiserver/pkg/registry/generic/registry/store.go): a new label; the old one
    # is quarantined.
    old_uid = uid_of(kube_api, "tenant-a")
    kube_api.delete("namespaces", None, "tenant-a")
    await kube_api.await_gone("namespaces", None, "tenant-a")
    kube_api.create(namespace("tenant-a"))
    new_uid = uid_of(kube_api, "tenant-a")

    def relabelled() -> bool:
        value = annotations(kube_api).get("tenant-a")
        return value is not None and value != level

    await wait_until(relabelled, 30, "a new label", lambda: replicas.log(0))
    ledger = await read_ledger(nats_url)
    old = ledger["label." + parse(level).key_token]
    assert old["state"] == "quarantined" and old["uid"] == old_uid
    assert allocated_by_uid(ledger)[new_uid] == [annotations(kube_api)["tenant-a"]]
    assert f"ns.{old_uid}" not in ledger


async def test_tiny_range_exhausted_then_freed_after_quarantine(
    kube_api: KubeAPI, replicas: Replicas, bridge: Bridge, nats_url: str
) -> None:
    replicas.start(1, CEDAR_MCS_CATEGORIES="4", CEDAR_MCS_QUARANTINE="2s")
    for i in range(6):
        kube_api.create(namespace(f"t{i}"))
    await wait_until(
        lambda: all(annotations(kube_api).values()) and len(annotations(kube_api)) == 6,
        60,
        "6 labelled",
        lambda: replicas.log(0),
    )
    assert set(annotations(kube_api).values()) == {
        "s0:c0,c1", "s0:c0,c2", "s0:c1,c2", "s0:c0,c3", "s0:c1,c3", "s0:c2,c3",
    }  # fmt: skip

    kube_api.create(namespace("t6"))
    await wait_until(
        lambda: len(events(kube_api, "MCSLevelsExhausted")) == 1,
        30,
        "exhausted event",
        lambda: replicas.log(0),
    )
    assert annotations(kube_api)["t6"] is None
    assert replicas.metric(0, 'cedar_mcs_allocations_total{result="exhausted"}') == 1
    assert "no free MCS level" in replicas.log(0)

    freed = annotations(kube_api)["t0"]
    assert freed is not None
    kube_api.delete("namespaces", None, "t0")
    await wait_until(
        lambda: annotations(kube_api).get("t6") is not None,
        30,
        "t6 labelled",
        lambda: replicas.log(0),
    )
    assert annotations(kube_api)["t6"] == freed
    ledger = await read_ledger(nats_url)
    entry = ledger["label." + parse(freed, 4).key_token]
    assert entry["state"] == "allocated" and entry["namespace"] == "t6"
    # Only one Event however often the exhausted namespace was retried.
    assert len(events(kube_api, "MCSLevelsExhausted")) == 1


async def test_nats_restarted_mid_run(
    kube_api: KubeAPI, fresh_nats: Any, kubeconfig: Path, tmp_path: Path
) -> None:
    r = Replicas(tmp_path, fresh_nats.url, kubeconfig)
    b = await Bridge(kubeconfig, fresh_nats.url).start()
    try:
        r.start(2, CEDAR_MCS_RESYNC_INTERVAL="3s")
        count = 300
        kube_api.load(namespace(f"n{i:03d}") for i in range(count))

        def labelled() -> int:
            return sum(1 for v in annotations(kube_api).values() if v)

        await wait_until(lambda: labelled() >= 50, 60, "some labelled", lambda: r.log(0))
        await asyncio.to_thread(fresh_nats.restart)
        kube_api.load(namespace(f"m{i:03d}") for i in range(100))
        await wait_until(
            lambda: labelled() == count + 100, 120, "all labelled", lambda: r.log(0) + r.log(1)
        )
        values = [v for v in annotations(kube_api).values() if v]
        assert len(set(values)) == count + 100
        await ledger_settles(fresh_nats.url, kube_api)
    finally:
        await b.stop()
        r.stop()


async def test_patch_failures_retried(
    kube_api: KubeAPI, replicas: Replicas, bridge: Bridge
) -> None:
    replicas.start(1)
    await wait_until(lambda: replicas.metric_ok(0), 30, "allocator up", lambda: replicas.log(0))
    kube_api.fail_next("patch", "namespaces", count=3, status=503)
    kube_api.create(namespace("flaky"))
    await wait_until(
        lambda: bool(annotations(kube_api).get("flaky")), 60, "labelled", lambda: replicas.log(0)
    )
    assert replicas.metric(0, "cedar_mcs_patch_failures_total") == 3


async def test_repair_adopts_restores_releases_and_reports_conflicts(
    kube_api: KubeAPI, replicas: Replicas, bridge: Bridge, nats_url: str
) -> None:
    replicas.start(1)
    kube_api.create(namespace("soon-gone"))
    await wait_until(
        lambda: bool(annotations(kube_api).get("soon-gone")),
        60,
        "labelled",
        lambda: replicas.log(0),
    )
    gone_level = annotations(kube_api)["soon-gone"]
    gone_uid = uid_of(kube_api, "soon-gone")
    await bridge.stop()  # from here on only the repair's direct list sees changes
    replicas.stop()

    kube_api.delete("namespaces", None, "soon-gone")
    # Gone for good before the replica lists (until then it is Terminating, still listed).
    await kube_api.await_gone("namespaces", None, "soon-gone")
    kube_api.create(
        {**namespace("adoptee"), "metadata": {"name": "adoptee", "annotations": {ANN: "s0:c9,c5"}}}
    )
    for name in ("twin-a", "twin-b"):
        kube_api.create(
            {**namespace(name), "metadata": {"name": name, "annotations": {ANN: "s0:c7,c8"}}}
        )
    kube_api.create(namespace("unlabelled"))

    replicas.start(1)
    await wait_until(
        lambda: bool(annotations(kube_api).get("unlabelled")),
        60,
        "repaired",
        lambda: replicas.log(1),
    )
    await wait_until(
        lambda: replicas.metric_ok(1) and replicas.metric(1, "cedar_mcs_conflicts") == 1,
        30,
        "conflict metric",
        lambda: replicas.log(1),
    )
    found = annotations(kube_api)
    assert found["adoptee"] == "s0:c5,c9"  # adopted, spelled canonically
    assert found["twin-a"] == found["twin-b"] == "s0:c7,c8"  # reported, never reassigned
    ledger = await read_ledger(nats_url)
    assert allocated_by_uid(ledger)[uid_of(kube_api, "adoptee")] == ["s0:c5,c9"]
    assert gone_level is not None
    released = ledger["label." + parse(gone_level).key_token]
    assert released["state"] == "quarantined" and released["uid"] == gone_uid
    assert "claimed by 2 namespaces" in replicas.log(1)


async def test_refuses_settings_that_cannot_hold_the_ledger(
    kube_api: KubeAPI, replicas: Replicas, bridge: Bridge
) -> None:
    replicas.start(1)
    kube_api.create(
        {**namespace("wide"), "metadata": {"name": "wide", "annotations": {ANN: "s0:c5,c900"}}}
    )
    await wait_until(lambda: "adopted" in replicas.log(0), 60, "adopted", lambda: replicas.log(0))
    replicas.stop()
    replicas.start(1, CEDAR_MCS_CATEGORIES="16")
    code = await asyncio.to_thread(replicas.procs[1].wait, 60)
    assert code != 0
    assert "refusing to start" in replicas.log(1)


async def test_restart_from_the_snapshot_and_the_changes_after_it(
    kube_api: KubeAPI, replicas: Replicas, bridge: Bridge
) -> None:
    def labelled(names: list[str]) -> bool:
        found = annotations(kube_api)
        return all(found.get(n) for n in names)

    def loaded_from(i: int) -> str:
        for line in replicas.log(i).splitlines():
            if "ledger loaded from the" in line:
                return line
        return ""

    # A replica labels 30 namespaces and keeps a snapshot (checked every second).
    first = [f"snap-{i}" for i in range(30)]
    replicas.start(1, CEDAR_MCS_SNAPSHOT_INTERVAL="1s", CEDAR_MCS_QUARANTINE="1h")
    kube_api.load(namespace(n) for n in first)
    await wait_until(lambda: labelled(first), 60, "30 labelled", lambda: replicas.log(0))
    written = 'cedar_mcs_snapshots_total{result="written"}'

    def snapshot_written() -> bool:
        return replicas.metric(0, written) >= 1 and labelled(first)

    await wait_until(snapshot_written, 30, "a snapshot", lambda: replicas.log(0))
    replicas.stop()

    # The next one starts from it, then changes the ledger: 10 new, 5 deleted.
    replicas.start(1, CEDAR_MCS_SNAPSHOT_INTERVAL="1h", CEDAR_MCS_QUARANTINE="1h")
    await wait_until(lambda: bool(loaded_from(1)), 60, "loaded", lambda: replicas.log(1))
    assert "from the snapshot" in loaded_from(1)
    second = [f"after-{i}" for i in range(10)]
    kube_api.load(namespace(n) for n in second)
    for name in first[:5]:
        kube_api.delete("namespaces", None, name)
    await wait_until(lambda: labelled(second), 60, "10 more labelled", lambda: replicas.log(1))

    def settled(i: int) -> bool:
        return replicas.metric_ok(i) and (
            replicas.metric(i, 'cedar_mcs_labels{state="allocated"}'),
            replicas.metric(i, 'cedar_mcs_labels{state="quarantined"}'),
        ) == (35, 5)

    await wait_until(lambda: settled(1), 60, "35 allocated, 5 quarantined", lambda: replicas.log(1))
    replicas.stop()

    # A third: the old snapshot plus the stream after it gives the whole, current mirror.
    replicas.start(1, CEDAR_MCS_SNAPSHOT_INTERVAL="1h", CEDAR_MCS_QUARANTINE="1h")
    await wait_until(lambda: settled(2), 60, "the same mirror", lambda: replicas.log(2))
    line = loaded_from(2)
    assert "from the snapshot" in line
    assert json.loads(line)["replayed"] > 0
    third = [f"third-{i}" for i in range(5)]
    kube_api.load(namespace(n) for n in third)
    await wait_until(lambda: labelled(third), 60, "5 more labelled", lambda: replicas.log(2))
    values = [v for v in annotations(kube_api).values() if v]
    assert len(values) == len(set(values)) == 40


async def test_openshift_compat_writes_both_annotations(
    kube_api: KubeAPI, replicas: Replicas, bridge: Bridge
) -> None:
    replicas.start(1, CEDAR_MCS_OPENSHIFT_COMPAT="true")
    kube_api.create(namespace("os-tenant"))

    def both() -> bool:
        obj = kube_api.get("namespaces", None, "os-tenant") or {}
        ann = obj.get("metadata", {}).get("annotations") or {}
        return bool(ann.get(ANN)) and ann.get(ANN) == ann.get("openshift.io/sa.scc.mcs")

    await wait_until(both, 60, "both annotations", lambda: replicas.log(0))


async def test_dry_run_from_subject_decides_without_writing(
    kube_api: KubeAPI, replicas: Replicas, nats_url: str
) -> None:
    obj = kube_api.create(namespace("replayed"))
    replicas.start(1, args=("--dry-run", "--from-subject", "cedar.replay.t.>"))
    await wait_until(lambda: replicas.metric_ok(0), 30, "allocator up", lambda: replicas.log(0))
    event = NamespaceEvent(
        name="replayed",
        uid=obj["metadata"]["uid"],
        resource_version=obj["metadata"]["resourceVersion"],
        observed_at=datetime.now(UTC),
    )
    nc = await nats.connect(nats_url)
    try:
        for _ in range(100):  # the subscription may not be up yet: publish until seen
            await nc.publish("cedar.replay.t.replayed", event.model_dump_json().encode())
            await nc.flush()
            if "dry run: would allocate" in replicas.log(0):
                break
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
    await wait_until(
        lambda: "dry run: would allocate" in replicas.log(0),
        10,
        "decision",
        lambda: replicas.log(0),
    )
    assert annotations(kube_api)["replayed"] is None
    assert kube_api.requests("patch") == 0
    assert await read_ledger(nats_url) == {}
