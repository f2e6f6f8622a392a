"""The control plane as Cedar sees it: Kubernetes objects -> Cedar's watcher -> the stream ->
each node's desired set.

The trace's tenants and DaemonSet become Deployment, ReplicaSet and DaemonSet objects (the
shape the API returns); a release is what the Deployment controller does (the Deployment's
template changes, a ReplicaSet of the next revision appears). They go through Cedar's own
watcher state (`cedar.watcher.watch_state.WatchState`: extraction, kept revisions,
deletion markers, de-duplication) and outbox; every message is decoded from its JSON body
as a puller decodes it and applied to Cedar's own `DesiredSet`.

One `DesiredSet` serves every node that Cedar's match cannot tell apart: the same labels
(but `kubernetes.io/hostname`) and taints. That is exact, not an approximation: a desired
set is a function of the node's labels and taints and of the stream, and no workload of the
trace selects on the hostname or `metadata.name` (checked; if one did, each node would get
its own). It is also what makes a 1,000-node fleet fit in one process: a set per node would
be 1,000 copies of 20,000 workloads. `per_node=True` forces one set per node (tests compare).
Replica count changes (0 <-> 1 at logins) are not fed: they change no desired set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from cedar.proto.models import WorkloadImageSet
from cedar.proto.scheduling import NodeInfo, Taint
from cedar.puller.desired import Change, DesiredSet
from cedar.watcher.outbox import Outbox
from cedar.watcher.watch_state import WatchState
from fleetsim.engine import Sim

EPOCH = datetime(2025, 3, 3, tzinfo=UTC)  # a Monday, 00:00 UTC: simulated time 0
HOSTNAME = "kubernetes.io/hostname"


def wall(t: float) -> datetime:
    return EPOCH + timedelta(seconds=t)


def _pod_spec(
    image: str, selector: dict[str, str], tolerations: list[dict[str, Any]]
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": image}]}
    if selector:
        spec["nodeSelector"] = dict(selector)
    if tolerations:
        spec["tolerations"] = [dict(t) for t in tolerations]
    return spec


class Tenant:
    """One tenant namespace's Deployment and its ReplicaSet revisions, as the API has them."""

    __slots__ = (
        "generation",
        "image",
        "name",
        "namespace",
        "pool",
        "revisions",
        "selector",
        "tolerations",
        "uid",
    )

    def __init__(self, record: dict[str, Any]) -> None:
        self.namespace = str(record["namespace"])
        self.name = str(record["name"])
        self.pool = str(record["pool"])
        self.image = str(record["image"])
        self.selector = dict(record["node_selector"])
        self.tolerations = list(record["tolerations"])
        self.uid = f"uid-deploy-{self.namespace}"
        self.generation = 1
        self.revisions: list[tuple[int, str]] = [(1, self.image)]

    def deployment(self) -> dict[str, Any]:
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "generation": self.generation,
                "resourceVersion": f"{self.generation}",
                "annotations": {"deployment.kubernetes.io/revision": str(self.revisions[-1][0])},
            },
            "spec": {
                "replicas": 0,
                "template": {"spec": _pod_spec(self.image, self.selector, self.tolerations)},
            },
        }

    def replicaset(self, revision: int, image: str, created: float) -> dict[str, Any]:
        return {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": f"{self.name}-r{revision}",
                "namespace": self.namespace,
                "uid": f"uid-rs-{self.namespace}-{revision}",
                "generation": 1,
                "resourceVersion": f"rs{revision}",
                "creationTimestamp": wall(created).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "annotations": {"deployment.kubernetes.io/revision": str(revision)},
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": self.name,
                        "uid": self.uid,
                        "controller": True,
                    }
                ],
            },
            "spec": {
                "replicas": 0,
                "template": {"spec": _pod_spec(image, self.selector, self.tolerations)},
            },
        }


def daemonset_object(record: dict[str, Any], image: str, generation: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": record["name"],
            "namespace": record["namespace"],
            "uid": f"uid-ds-{record['namespace']}-{record['name']}",
            "generation": generation,
            "resourceVersion": f"ds{generation}",
        },
        "spec": {"template": {"spec": _pod_spec(image, {}, list(record["tolerations"]))}},
    }


def class_node(
    name: str, labels: dict[str, str], taints: tuple[Taint, ...], per_node: bool
) -> tuple[str, NodeInfo]:
    """The key of the desired set a node uses, and the node as Cedar's match sees it.

    Only the taints the match looks at (`NodeInfo.blocking_taints`: not the warm-up taint)
    tell nodes apart, so a node keeps its desired set when its puller lifts the warm-up
    taint, as a real puller's set is unchanged by it."""
    full = {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", **labels}
    if per_node:
        full[HOSTNAME] = name
        node = NodeInfo(name=name, labels=full, taints=taints)
        return name, NodeInfo(name=name, labels=full, taints=node.blocking_taints())
    blocking = NodeInfo(name="", labels=full, taints=taints).blocking_taints()
    key = repr((sorted(full.items()), blocking))
    name = "class-" + hashlib.sha256(key.encode()).hexdigest()[:10]
    return key, NodeInfo(name=name, labels=full, taints=blocking)


class Feed:
    """Cedar's watcher over the simulated API, the stream, and the desired sets."""

    def __init__(
        self, sim: Sim, *, latency: float, previous_revisions: int = 1, per_node: bool = False
    ) -> None:
        self.sim = sim
        self.latency = latency
        self.per_node = per_node
        self.outbox = Outbox()
        self.state = WatchState(
            self.outbox,
            previous_revisions=previous_revisions,
            clock=lambda: wall(self.sim.now),
            wall=lambda: self.sim.now,
        )
        self.stream: dict[str, WorkloadImageSet] = {}  # subject -> last message
        self.sets: dict[str, DesiredSet] = {}
        self.listeners: dict[str, list[Callable[[Change], None]]] = {}
        self.tenants: dict[str, Tenant] = {}
        self.daemonsets: dict[str, tuple[dict[str, Any], str, int]] = {}
        self._flush_due = False
        self.messages = 0
        self.reports: list[str] = []

    # --- the API side

    def load(self, tenants: list[dict[str, Any]], daemonsets: list[dict[str, Any]]) -> None:
        """The watcher's initial lists."""
        for record in tenants:
            tenant = Tenant(record)
            self.tenants[tenant.namespace] = tenant
            if HOSTNAME in tenant.selector or any("hostname" in str(t) for t in tenant.tolerations):
                self.per_node = True
        for kind in ("Deployment", "ReplicaSet", "DaemonSet"):
            self.state.begin_list(kind)
            if kind == "DaemonSet":
                for record in daemonsets:
                    key = f"{record['namespace']}/{record['name']}"
                    self.daemonsets[key] = (record, str(record["image"]), 1)
                    self._apply(kind, "LISTED", daemonset_object(record, str(record["image"]), 1))
            for tenant in self.tenants.values():
                if kind == "Deployment":
                    self._apply(kind, "LISTED", tenant.deployment())
                elif kind == "ReplicaSet":
                    self._apply(kind, "LISTED", tenant.replicaset(1, tenant.image, -86400.0))
            self.state.end_list(kind)
        self.flush()

    def move(self, namespace: str, image: str) -> None:
        """A release moves one tenant: what the Deployment controller does."""
        tenant = self.tenants[namespace]
        if tenant.image == image:
            return
        tenant.image = image
        tenant.generation += 1
        revision = tenant.revisions[-1][0] + 1
        tenant.revisions.append((revision, image))
        self._apply("ReplicaSet", "ADDED", tenant.replicaset(revision, image, self.sim.now))
        self._apply("Deployment", "MODIFIED", tenant.deployment())
        self._soon()

    def update_daemonset(self, namespace: str, name: str, image: str) -> None:
        key = f"{namespace}/{name}"
        record, _, generation = self.daemonsets[key]
        self.daemonsets[key] = (record, image, generation + 1)
        self._apply("DaemonSet", "MODIFIED", daemonset_object(record, image, generation + 1))
        self._soon()

    def prepull(self, tenant_like: dict[str, Any], image: str, ttl: float) -> None:
        """`cedar prepull` of one workload manifest: a time-limited Prepull entry."""
        from cedar.ops.manifests import Manifest, prepull_set

        doc = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "release-" + hashlib.sha256(image.encode()).hexdigest()[:10],
                "namespace": "release",
            },
            "spec": {
                "template": {
                    "spec": _pod_spec(
                        image, tenant_like["node_selector"], tenant_like["tolerations"]
                    )
                }
            },
        }
        wis = prepull_set(
            Manifest("release.yaml", 1, doc), wall(self.sim.now), timedelta(seconds=ttl)
        )
        if wis is not None:
            self.sim.at(self.sim.now + self.latency, self._deliver, wis)
            self.sim.at(self.sim.now + ttl + self.latency, self.expire)

    def _apply(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        for report in self.state.apply(kind, type_, obj):
            self.reports.append(f"{report.identity}: {report.reason}: {report.detail}")

    def _soon(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            self.sim.at(self.sim.now + self.latency, self.flush)

    # --- the stream and the pullers' side

    def flush(self) -> None:
        """Store what the outbox holds; every puller's consumer receives it."""
        self._flush_due = False
        while len(self.outbox.pending):
            for out in self.outbox.take(len(self.outbox.pending)):
                self.outbox.ack(out)
                self._deliver(WorkloadImageSet.model_validate_json(out.body), out.subject)

    def _deliver(self, wis: WorkloadImageSet, subject: str | None = None) -> None:
        self.messages += 1
        self.stream[subject or wis.identity] = wis
        now = wall(self.sim.now)
        for key, desired in self.sets.items():
            change = desired.apply(wis, now)
            if change:
                for listener in self.listeners.get(key, ()):
                    listener(change)

    def expire(self) -> None:
        """Prepull entries past their expiry drop out (DesiredSet.expire)."""
        now = wall(self.sim.now)
        for key, desired in self.sets.items():
            change = desired.expire(now)
            if change:
                for listener in self.listeners.get(key, ()):
                    listener(change)

    def subscribe(
        self,
        name: str,
        labels: dict[str, str],
        taints: tuple[Taint, ...],
        listener: Callable[[Change], None],
    ) -> DesiredSet:
        """A puller starts: its desired set, loaded from the stream (shared when exact)."""
        key, node = class_node(name, labels, taints, self.per_node)
        desired = self.sets.get(key)
        if desired is None:
            desired = self.sets[key] = DesiredSet(node)
            now = wall(self.sim.now)
            for wis in self.stream.values():
                desired.apply(wis, now)
        self.listeners.setdefault(key, []).append(listener)
        return desired

    def unsubscribe(
        self,
        name: str,
        labels: dict[str, str],
        taints: tuple[Taint, ...],
        listener: Callable[[Change], None],
    ) -> None:
        key, _ = class_node(name, labels, taints, self.per_node)
        listeners = self.listeners.get(key, [])
        if listener in listeners:
            listeners.remove(listener)
        if self.per_node and not listeners:
            self.sets.pop(key, None)

    # --- what the baselines read from the API

    def current_images(self, pool: str | None = None) -> list[str]:
        """The images the Deployments and DaemonSets name now (of one pool's tenants)."""
        images = {t.image for t in self.tenants.values() if pool is None or t.pool == pool}
        images |= {image for _, image, _ in self.daemonsets.values()}
        return sorted(images)
