"""The load of the fault suite: a burst of namespaces and continuous workload churn, and
what Cedar must end up with, computed from what the (simulated) API holds.

Nodes `node-0`..: each with its own `pool` label; workloads pick one pool by nodeSelector,
or none (every node), so each puller has a desired set of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cedar.proto import subjects
from cedar.proto.models import WorkloadImageSet
from cedar.proto.scheduling import mismatch, node_from_object
from cedar.proto.workloads import extract_workload
from cedar.sandbox.kubeapi import KubeAPI

JSON = dict[str, Any]
KINDS = {"deployments": "Deployment", "daemonsets": "DaemonSet"}


def node(name: str, pool: str) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"pool": pool, "kubernetes.io/os": "linux"}},
    }


def namespace(name: str) -> JSON:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def workload(
    plural: str, ns: str, name: str, images: list[str], *, pool: str | None, replicas: int
) -> JSON:
    pod: JSON = {"containers": [{"name": f"c{i}", "image": img} for i, img in enumerate(images)]}
    if pool is not None:
        pod["nodeSelector"] = {"pool": pool}
    spec: JSON = {"selector": {"matchLabels": {"app": name}}, "template": {"spec": pod}}
    if plural == "deployments":
        spec["replicas"] = replicas
    return {
        "apiVersion": "apps/v1",
        "kind": KINDS[plural],
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


@dataclass
class Churn:
    """Creates, changes (images, pool, scale) and deletes workloads until stopped."""

    api: KubeAPI
    namespaces: list[str]
    images: list[str]
    pools: list[str]
    rng: random.Random
    per_second: float
    ops: dict[str, int] = field(default_factory=lambda: {"create": 0, "update": 0, "delete": 0})
    live: dict[tuple[str, str, str], JSON] = field(default_factory=dict)
    _counter: int = 0

    def _new(self) -> JSON:
        self._counter += 1
        plural = "deployments" if self.rng.random() < 0.8 else "daemonsets"
        ns = self.rng.choice(self.namespaces)
        return workload(
            plural,
            ns,
            f"w{self._counter}",
            self.rng.sample(self.images, self.rng.randint(1, 2)),
            pool=self.rng.choice([*self.pools, None]),
            replicas=self.rng.choice([0, 0, 1]),
        )

    def step(self) -> None:
        """One change, made through the API like a user's."""
        roll = self.rng.random()
        if not self.live or roll < 0.4:
            obj = self._new()
            created = self.api.create(obj)
            meta = created["metadata"]
            plural = "deployments" if obj["kind"] == "Deployment" else "daemonsets"
            self.live[(plural, meta["namespace"], meta["name"])] = obj
            self.ops["create"] += 1
        elif roll < 0.8:
            key = self.rng.choice(list(self.live))
            plural, ns, name = key
            obj = self.live[key]
            pod = obj["spec"]["template"]["spec"]
            change = self.rng.random()
            if change < 0.5:
                pod["containers"] = [
                    {"name": f"c{i}", "image": img}
                    for i, img in enumerate(self.rng.sample(self.images, self.rng.randint(1, 2)))
                ]
            elif change < 0.8:
                pool = self.rng.choice([*self.pools, None])
                if pool is None:
                    pod.pop("nodeSelector", None)
                else:
                    pod["nodeSelector"] = {"pool": pool}
            elif plural == "deployments":
                obj["spec"]["replicas"] = 1 - int(obj["spec"].get("replicas", 0) > 0)
            self.api.update(obj)
            self.ops["update"] += 1
        else:
            key = self.rng.choice(list(self.live))
            plural, ns, name = key
            self.api.delete(plural, ns, name)
            del self.live[key]
            self.ops["delete"] += 1

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.step()
            # Exponential gaps: bursts and lulls, not a metronome.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.expovariate(self.per_second))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


async def namespace_burst(
    api: KubeAPI, names: list[str], per_second: float, created: list[str]
) -> None:
    """Create `names` at about `per_second`, in small batches."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i, name in enumerate(names):
        api.create(namespace(name))
        created.append(name)
        due = start + (i + 1) / per_second
        if due > loop.time():
            await asyncio.sleep(due - loop.time())


# ------------------------------------------------------------------ what Cedar must end with


def api_workloads(api: KubeAPI) -> dict[str, WorkloadImageSet]:
    """subject -> the image set the watcher must have published for each live workload."""
    now = datetime.now(UTC)
    out: dict[str, WorkloadImageSet] = {}
    for plural, kind in KINDS.items():
        for obj in api.list(plural):
            item, _ = extract_workload(kind, obj, now)
            out[subjects.workload_subject(kind, item.namespace, item.name)] = item
    return out


def expected_desired(api: KubeAPI, nodes: list[str]) -> dict[str, set[str]]:
    """node -> the images its puller must want: every live workload that may run there."""
    infos = {}
    for name in nodes:
        obj = api.get("nodes", None, name)
        assert obj is not None, f"node {name} is missing from the API"
        infos[name] = node_from_object(obj)
    wanted: dict[str, set[str]] = {name: set() for name in nodes}
    for item in api_workloads(api).values():
        images = {c.reference or c.image for c in item.containers}
        for name, info in infos.items():
            if mismatch(item.scheduling, info) is None:
                wanted[name] |= images
    return wanted


def same_content(stored: WorkloadImageSet, expected: WorkloadImageSet) -> bool:
    """Whether a stored image set says what the API's object says (times aside)."""
    return (
        not stored.deleted
        and stored.uid == expected.uid
        and stored.containers == expected.containers
        and stored.scheduling == expected.scheduling
        and stored.replicas == expected.replicas
    )
