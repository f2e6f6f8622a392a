"""The soak's load: bounded continuous churn of namespaces and Deployments in the simulated
API, with a steady population, and the node's heartbeat (as its kubelet would keep it up).

Only the simulated API is touched (its thread-safe control methods), from the test's loop.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cedar.sandbox.errors import ApiError
from cedar.sandbox.kubeapi import KubeAPI

RATE = 20.0  # changes per second, at most
NODE = "soak-node-1"
TENANT_LABEL = "cedar.io/tenant"
# Bounded pools: namespace and Deployment names are reused; a namespace comes back with a
# new uid (so a new MCS label), a Deployment with new ReplicaSets.
NAMESPACES = [f"soak-{i:02d}" for i in range(40)]
NS_TARGET = 16  # live tenant namespaces
APPS = [f"app-{i}" for i in range(5)]
APPS_TARGET = 4  # Deployments per namespace
WINDOW = 8  # images in use at a time; the window moves by one every WINDOW_STEP seconds
WINDOW_STEP = 20.0


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_object() -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux"}
    labels["kubernetes.io/arch"] = "amd64"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "labels": labels},
        "status": node_status(),
    }


def node_status() -> dict[str, Any]:
    stamp = now()
    ready = {"type": "Ready", "status": "True", "reason": "KubeletReady"}
    return {"conditions": [{**ready, "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}]}


def deployment(
    ns: str, name: str, images: list[str], replicas: int, selector: str | None
) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "containers": [
            {"name": f"c{i}", "image": image, "imagePullPolicy": "IfNotPresent"}
            for i, image in enumerate(images)
        ]
    }
    if selector is not None:
        pod["nodeSelector"] = {"disktype": selector}  # "hdd": this node is not one of them
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod},
        },
    }


@dataclass
class Churn:
    """Bounded continuous churn of namespaces and Deployments in the simulated API."""

    api: KubeAPI
    images: list[str]
    missing: str  # a reference the registry does not have: the puller's failure path
    rng: random.Random = field(default_factory=lambda: random.Random(16))
    done: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    writes: int = 0

    def live_namespaces(self) -> list[str]:
        found = self.api.list("namespaces", label_selector=f"{TENANT_LABEL}=true")
        return [
            n["metadata"]["name"]
            for n in found
            if not (n.get("metadata") or {}).get("deletionTimestamp")
        ]

    def deployments(self, ns: str) -> list[str]:
        return [d["metadata"]["name"] for d in self.api.list("deployments", namespace=ns)]

    def window(self) -> list[str]:
        first = int((time.monotonic() - self.started) / WINDOW_STEP)
        return [self.images[(first + i) % len(self.images)] for i in range(WINDOW)]

    def pick_images(self) -> list[str]:
        if self.rng.random() < 0.02:
            return [self.missing]
        return self.rng.sample(self.window(), self.rng.choice((1, 1, 2)))

    def step(self) -> int:
        """One change, or a replacement (two); returns how many writes it made.

        The population is kept steady: NS_TARGET live namespaces, APPS_TARGET Deployments in
        each; past the initial fill, a namespace or Deployment deleted is replaced at once.
        """
        live = self.live_namespaces()
        ns = self.rng.choice(live) if live else ""
        apps = self.deployments(ns) if ns else []
        if len(live) < NS_TARGET:
            kind = "namespace_created"
        elif len(apps) < APPS_TARGET:
            kind = "deployment_created"
        else:
            kinds = {
                "namespace_replaced": 0.03,
                "scaled": 0.3,
                "image_changed": 0.45,
                "deployment_replaced": 0.12,
            }
            kind = self.rng.choices(list(kinds), list(kinds.values()))[0]
        try:
            writes = self._do(kind, live, ns, apps)
        except ApiError as err:  # e.g. a namespace still terminating; counted, not fatal
            self.refused[f"{kind} ({err.code})"] += 1
            return 1
        self.done[kind] += 1
        return writes

    def _create_namespace(self, live: list[str]) -> None:
        free = [
            n for n in NAMESPACES if n not in live and self.api.get("namespaces", None, n) is None
        ]
        meta = {"name": self.rng.choice(free), "labels": {TENANT_LABEL: "true"}}
        self.api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})

    def _create_deployment(self, ns: str, apps: list[str]) -> None:
        name = self.rng.choice([a for a in APPS if a not in apps])
        selector = "hdd" if self.rng.random() < 0.1 else None
        replicas = self.rng.randrange(4)
        self.api.create(deployment(ns, name, self.pick_images(), replicas, selector))

    def _do(self, kind: str, live: list[str], ns: str, apps: list[str]) -> int:
        if kind == "namespace_created":
            self._create_namespace(live)
        elif kind == "namespace_replaced":
            self.api.delete("namespaces", None, ns)  # its Deployments go with it
            self._create_namespace([n for n in live if n != ns])
            return 2
        elif kind == "deployment_created":
            self._create_deployment(ns, apps)
        elif kind == "deployment_replaced":
            gone = self.rng.choice(apps)
            self.api.delete("deployments", ns, gone)
            self._create_deployment(ns, [a for a in apps if a != gone])
            return 2
        elif kind == "scaled":
            patch = {"spec": {"replicas": self.rng.randrange(4)}}
            self.api.patch("deployments", ns, self.rng.choice(apps), patch)
        elif kind == "image_changed":
            name = self.rng.choice(apps)
            current = self.api.get("deployments", ns, name)
            assert current is not None
            containers = current["spec"]["template"]["spec"]["containers"]
            fresh = self.pick_images()
            # A merge patch replaces the list: the same containers, other images.
            spec = [{**c, "image": fresh[i % len(fresh)]} for i, c in enumerate(containers)]
            self.api.patch(
                "deployments", ns, name, {"spec": {"template": {"spec": {"containers": spec}}}}
            )
        return 1

    async def run(self, until: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        beat = due
        while loop.time() < until:
            writes = self.step()
            self.writes += writes
            if loop.time() >= beat:  # the kubelet's heartbeat, so the node stays Ready
                self.api.update_status("nodes", None, NODE, node_status())
                beat += 10.0
            due += writes / RATE
            await asyncio.sleep(max(0.0, due - loop.time()))
