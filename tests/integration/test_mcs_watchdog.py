"""The watchdog against the simulated API and a real NATS: pods at another level are reported
(Warning Event on the pod, in its namespace; gauge; audit record), once per finding even with
two replicas, again when a namespace's level changes under running pods, and never deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cedar.mcs_allocator.audit import Audit
from cedar.mcs_allocator.metrics import POD_MISMATCHES
from cedar.mcs_allocator.nscache import NamespaceCache
from cedar.mcs_allocator.objectevents import EventRecorder
from cedar.mcs_allocator.scope import Scope
from cedar.mcs_allocator.watchdog import REASON_MISMATCH, Watchdog, field_selector
from cedar.runtime.bus import Bus
from cedar.runtime.health import Health
from cedar.runtime.kube import KubeClient, load_config
from cedar.runtime.settings import CommonSettings
from cedar.runtime.topology import history_stream
from cedar.sandbox.kubeapi import KubeAPI
from tests.harness import waiting
from tests.unit.test_mcs_admission_table import (
    ANNOTATION,
    EXCLUDED,
    LEVEL,
    OTHER,
    container,
    pod,
    sel,
)

pytestmark = pytest.mark.integration


def namespace(name: str, level: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if level:
        meta["annotations"] = {ANNOTATION: level}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def named(obj: dict[str, Any], name: str) -> dict[str, Any]:
    obj["metadata"] = {"name": name, "namespace": obj["metadata"]["namespace"]}
    return obj


@dataclass
class Replica:
    cache: NamespaceCache
    watchdog: Watchdog
    tasks: list[asyncio.Task[None]]


class Setup:
    def __init__(self, api: KubeAPI, kubeconfig: Path, bus: Bus) -> None:
        self.api = api
        self.kubeconfig = kubeconfig
        self.bus = bus
        self.stop = asyncio.Event()
        self.replicas: list[Replica] = []
        self.clients: list[KubeClient] = []
        self.audit: list[dict[str, Any]] = []

    async def start_replica(self, name: str) -> Replica:
        client = KubeClient(load_config(str(self.kubeconfig)))
        self.clients.append(client)
        cache = NamespaceCache(client, Scope.of(EXCLUDED, ""), ANNOTATION)
        events = EventRecorder(client, "cedar-mcs-allocator", name)
        watchdog = Watchdog(client, cache, events, Audit(self.bus.js, name), EXCLUDED)
        tasks = [
            asyncio.create_task(cache.run(self.stop)),
            asyncio.create_task(watchdog.run(self.stop)),
        ]
        replica = Replica(cache, watchdog, tasks)
        self.replicas.append(replica)
        await waiting.eventually(watchdog.pods.synced.is_set, 10, "pods listed")
        return replica

    def events(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.api.events_for(namespace) if e["reason"] == REASON_MISMATCH]

    async def close(self) -> None:
        self.stop.set()
        for replica in self.replicas:
            for task in replica.tasks:
                task.cancel()
            await asyncio.gather(*replica.tasks, return_exceptions=True)
        for client in self.clients:
            await client.close()


@pytest.fixture
async def setup(kube_api: KubeAPI, kubeconfig: Path, nats_url: str) -> AsyncIterator[Setup]:
    settings = CommonSettings(nats_url=nats_url)
    bus = Bus(settings, "watchdog-test", Health())
    await bus.connect()
    await bus.ensure(streams=[history_stream(settings)])
    s = Setup(kube_api, kubeconfig, bus)

    async def on_record(msg: Any) -> None:
        s.audit.append(json.loads(msg.data))

    sub = await bus.nc.subscribe("cedar.audit.mcs.pod-mismatch", cb=on_record)
    try:
        yield s
    finally:
        await s.close()
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await bus.close()


def seed(api: KubeAPI) -> None:
    api.create(namespace("tenant-a", LEVEL))
    api.create(namespace("tenant-b", OTHER))
    api.create(namespace("kube-system", None))
    api.create(named(pod(context=sel(level=LEVEL)), "good"))
    api.create(named(pod(), "from-before"))  # no level: the runtime chose one
    api.create(named(pod("tenant-b", context=sel(level=OTHER)), "b-good"))
    api.create(named(pod("kube-system", context=sel(type="spc_t")), "system"))


async def test_mismatched_pods_are_reported_on_the_pod(setup: Setup) -> None:
    seed(setup.api)
    replica = await setup.start_replica("r0")
    watchdog = replica.watchdog
    await waiting.eventually(lambda: len(setup.events()) == 1, 10, "one Event")
    (event,) = setup.events()
    assert event["metadata"]["namespace"] == "tenant-a"  # the pod's namespace
    assert event["type"] == "Warning"
    assert event["involvedObject"]["kind"] == "Pod"
    assert event["involvedObject"]["name"] == "from-before"
    assert event["involvedObject"]["namespace"] == "tenant-a"
    assert LEVEL in event["message"] and "a pair the runtime chose" in event["message"]
    assert set(watchdog.mismatched) == {"tenant-a/from-before"}
    assert POD_MISMATCHES._value.get() == 1
    # Excluded namespaces are not even watched.
    assert "kube-system/system" not in watchdog.pods.items
    assert watchdog.pods.params == {"fieldSelector": field_selector(EXCLUDED)}

    # A pod with another level appears (e.g. created while the policy was unbound).
    setup.api.create(
        named(
            pod(
                containers=[container("web", seLinuxOptions={"level": OTHER})],
                context=sel(level=LEVEL),
            ),
            "sneaky",
        )
    )
    await waiting.eventually(lambda: len(setup.events()) == 2, 10, "a second Event")
    sneaky = [e for e in setup.events() if e["involvedObject"]["name"] == "sneaky"]
    assert sneaky and f"container web runs at {OTHER}" in sneaky[0]["message"]

    # A tampered annotation under running pods: every one of them is now off.
    setup.api.patch(
        "namespaces", None, "tenant-b", {"metadata": {"annotations": {ANNOTATION: "s0:c8,c9"}}}
    )
    await waiting.eventually(
        lambda: "tenant-b/b-good" in watchdog.mismatched, 10, "the level change to be seen"
    )
    await waiting.eventually(lambda: setup.events("tenant-b"), 10, "an Event in tenant-b")

    # Restored: no longer a mismatch. Gone: forgotten. Nothing was deleted by the watchdog.
    setup.api.patch(
        "namespaces", None, "tenant-b", {"metadata": {"annotations": {ANNOTATION: OTHER}}}
    )
    await waiting.eventually(lambda: "tenant-b/b-good" not in watchdog.mismatched, 10, "restored")
    setup.api.delete("pods", "tenant-a", "sneaky")
    await waiting.eventually(lambda: "tenant-a/sneaky" not in watchdog.mismatched, 10, "forgotten")
    names = {p["metadata"]["name"] for p in setup.api.list("pods")}
    assert names == {"good", "from-before", "b-good", "system"}
    # Over HTTP (the test's own writes are direct calls): the watchdog only listed and watched.
    for verb in ("create", "update", "patch", "delete"):
        assert setup.api.requests(verb, "pods") == 0, verb


async def test_two_replicas_record_one_event_per_finding(setup: Setup) -> None:
    seed(setup.api)
    await setup.start_replica("r0")
    await setup.start_replica("r1")

    def seen_by_both() -> bool:
        return all("tenant-a/from-before" in r.watchdog.mismatched for r in setup.replicas)

    await waiting.eventually(seen_by_both, 10, "both replicas to see the pod")
    # Both tried; the Event's name is the finding's, so the second create was refused.
    await waiting.eventually(
        lambda: setup.api.requests("create", "events") >= 2, 10, "both replicas reporting"
    )
    assert len(setup.events()) == 1


async def test_each_finding_is_an_audit_record(setup: Setup) -> None:
    # Needs McsAuditRecord to know "pod-mismatch" and object_* (cedar.proto.models).
    seed(setup.api)
    await setup.start_replica("r0")
    await waiting.eventually(lambda: setup.audit, 10, "an audit record")
    (record,) = setup.audit
    assert record["action"] == "pod-mismatch"
    assert record["namespace"] == "tenant-a"
    assert record["level"] == LEVEL
    assert record["previous"] is None  # no level: the runtime's choice
    assert (record["object_kind"], record["object_name"]) == ("Pod", "from-before")
    assert record["replica"] == "r0"


async def test_memory_per_pod_kept(setup: Setup) -> None:
    setup.api.create(namespace("tenant-a", LEVEL))
    count = 2_000
    setup.api.load(
        named(pod(context=sel(level=LEVEL), containers=[container("a"), container("b")]), f"p{i}")
        for i in range(count)
    )
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        replica = await setup.start_replica("r0")
        await waiting.eventually(lambda: len(replica.watchdog.pods.items) == count, 20, "all kept")
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    kept = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    # What stays is the small record per pod, not the manifest (~1 KiB of JSON each here).
    assert kept / count < 1024, f"{kept / count:.0f} bytes per pod"
    assert not replica.watchdog.mismatched
