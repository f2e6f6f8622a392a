"""The controllers behind the simulated Kubernetes API, as kube-controller-manager runs them.

They run as one task on the server's event loop (kubeapi_server.py) and follow the store's
watch history the way a controller's informer does, so they see every write only after the
same `watch_delay` as any client; they write back through the store, like a client:

- the namespace controller: a Namespace being deleted loses its content (each object
  DELETED), gets the controller's status conditions, then its `kubernetes` finalizer, and
  with that it is gone (pkg/controller/namespace/deletion/namespaced_resources_deleter.go,
  status_condition_utils.go); `namespace_delay` stands for the controller's discovery and
  queueing before it starts;
- the node lifecycle controller: the NoSchedule taints of a Node follow its conditions
  (doNoScheduleTaintingPass: a Node without conditions loses the `not-ready` taint the API
  put on it at create); a Node whose Ready condition nobody posted within
  `node_startup_grace` (or refreshed within `node_monitor_grace`) turns Ready=Unknown and
  gets `node.kubernetes.io/unreachable` NoSchedule and NoExecute (tryUpdateNodeHealth,
  processTaintBaseEviction in pkg/controller/nodelifecycle/node_lifecycle_controller.go);
- optionally the Deployment controller (kubeapi_deployments.py) and the garbage collector
  for the ReplicaSets it owns (pkg/controller/garbagecollector: a Deployment deleted with
  the default background propagation takes its ReplicaSets with it).

I/O: none of its own; it touches only the store, and logs what it could not do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cedar.sandbox.errors import ApiError
from cedar.sandbox.kubeapi_deployments import controlled_by, plan_sync
from cedar.sandbox.kubeapi_objects import clone, now
from cedar.sandbox.kubeapi_ops import JsonObj, ResourceTable, ResourceType, WatchFilter
from cedar.sandbox.kubeapi_server import Serving
from cedar.sandbox.kubeapi_store import Store

log = logging.getLogger(__name__)

NOT_READY = "node.kubernetes.io/not-ready"
UNREACHABLE = "node.kubernetes.io/unreachable"
UNSCHEDULABLE = "node.kubernetes.io/unschedulable"
# nodeConditionToTaintKeyStatusMap: condition type -> status -> NoSchedule taint key.
CONDITION_TAINTS = {
    "Ready": {"False": NOT_READY, "Unknown": UNREACHABLE},
    "MemoryPressure": {"True": "node.kubernetes.io/memory-pressure"},
    "DiskPressure": {"True": "node.kubernetes.io/disk-pressure"},
    "NetworkUnavailable": {"True": "node.kubernetes.io/network-unavailable"},
    "PIDPressure": {"True": "node.kubernetes.io/pid-pressure"},
}
_CONDITION_KEYS = {key for by_status in CONDITION_TAINTS.values() for key in by_status.values()}
_HEALTH_CONDITIONS = ("Ready", "MemoryPressure", "DiskPressure", "PIDPressure")
_DELETION_CONDITIONS = (
    ("NamespaceDeletionDiscoveryFailure", "ResourcesDiscovered",
     "All resources successfully discovered"),
    ("NamespaceDeletionGroupVersionParsingFailure", "ParsedGroupVersions",
     "All legacy kube types successfully parsed"),
    ("NamespaceDeletionContentFailure", "ContentDeleted",
     "All content successfully deleted, may be waiting on finalization"),
    ("NamespaceContentRemaining", "ContentRemoved", "All content successfully removed"),
    ("NamespaceFinalizersRemaining", "ContentHasNoFinalizers",
     "All content-preserving finalizers finished"),
)  # fmt: skip


@dataclass
class Timings:
    """How long the controllers take (seconds); tests shorten the long ones."""

    namespace_delay: float = 1.0
    node_startup_grace: float = 60.0  # --node-startup-grace-period
    node_monitor_grace: float = 50.0  # --node-monitor-grace-period
    node_monitor_period: float = 5.0  # --node-monitor-period
    deployment_controller: bool = False


def desired_noschedule(node: JsonObj) -> list[JsonObj]:
    """doNoScheduleTaintingPass: the NoSchedule taints a Node's conditions call for."""
    taints: list[JsonObj] = []
    for condition in (node.get("status") or {}).get("conditions") or []:
        key = CONDITION_TAINTS.get(condition.get("type"), {}).get(condition.get("status"))
        if key:
            taints.append({"key": key, "effect": "NoSchedule"})
    if (node.get("spec") or {}).get("unschedulable"):
        taints.append({"key": UNSCHEDULABLE, "effect": "NoSchedule"})
    return taints


def reconciled_taints(node: JsonObj) -> list[JsonObj]:
    """The Node's taints after both tainting passes (NoSchedule, and NoExecute by Ready)."""
    current = list((node.get("spec") or {}).get("taints") or [])
    managed_noschedule = _CONDITION_KEYS | {UNSCHEDULABLE}
    keep = [
        t
        for t in current
        if not (t.get("effect") == "NoSchedule" and t.get("key") in managed_noschedule)
        and not (t.get("effect") == "NoExecute" and t.get("key") in (NOT_READY, UNREACHABLE))
    ]
    wanted = desired_noschedule(node)
    by_key = {(t.get("key"), t.get("effect")): t for t in current}
    result = keep + [by_key.get((t["key"], t["effect"]), t) for t in wanted]
    ready = _condition(node, "Ready")
    no_execute = {"False": NOT_READY, "Unknown": UNREACHABLE}.get((ready or {}).get("status", ""))
    if no_execute:
        result.append(
            by_key.get((no_execute, "NoExecute"))
            or {"key": no_execute, "effect": "NoExecute", "timeAdded": now()}
        )
    return result


def _condition(node: JsonObj, type_: str) -> JsonObj | None:
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_:
            return condition  # type: ignore[no-any-return]
    return None


class Controllers:
    """The controllers of one KubeAPI; `run` is its server's background task."""

    def __init__(self, table: ResourceTable, store: Store, timings: Timings) -> None:
        self.table = table
        self.store = store
        self.timings = timings
        self._ns = table.lookup("namespaces")
        self._nodes = table.lookup("nodes")
        self._deployments = table.lookup("deployments")
        self._replicasets = table.lookup("replicasets")
        self._since: dict[ResourceType, int] = {}
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        # Node name -> (monotonic time of its last heartbeat seen, the heartbeat itself).
        self._probes: dict[str, tuple[float, str | None]] = {}

    async def run(self, serving: Serving) -> None:
        watched = [self._ns, self._nodes]
        if self.timings.deployment_controller:
            watched += [self._deployments, self._replicasets]
        try:
            await self._follow(serving, watched)
        finally:
            self.stop()

    async def _follow(self, serving: Serving, watched: list[ResourceType]) -> None:
        for res in watched:
            self._resync(res)
        while True:
            wakeup = serving.wakeup
            due: float | None = None
            for res in watched:
                got = self.store.pending(res, self._since[res])
                if got is None:  # compacted (expire_watches): relist, as an informer does
                    self._resync(res)
                    continue
                self._since[res] = got.since
                for event in got.events:
                    self._guarded(self._on_event, res, event.type, event.obj)
                if got.due is not None:
                    due = got.due if due is None else min(due, got.due)
            wait = None if due is None else max(due - time.monotonic(), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), wait)

    def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # ------------------------------------------------------------ plumbing

    def _resync(self, res: ResourceType) -> None:
        self._since[res] = self.store.resource_version
        for obj in self.store.list_objects(res, WatchFilter()):
            self._guarded(self._on_event, res, "ADDED", obj)

    def _guarded(self, work: Callable[..., object], *args: Any) -> None:
        try:
            work(*args)
        except ApiError as e:  # a conflict or a vanished object: the next event retries
            log.info("simulated controller: %s", e)
        except Exception:
            log.exception("simulated controller failed")

    def _later(self, key: tuple[str, str], delay: float, work: Callable[[], object]) -> None:
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()

        def fire() -> None:
            self._timers.pop(key, None)
            self._guarded(work)

        self._timers[key] = asyncio.get_running_loop().call_later(delay, fire)

    def _on_event(self, res: ResourceType, type_: str, obj: JsonObj) -> None:
        meta = obj["metadata"]
        if res is self._ns:
            if type_ != "DELETED" and meta.get("deletionTimestamp"):
                key = ("ns", meta["name"])
                if key not in self._timers:
                    self._later(key, self.timings.namespace_delay, lambda: self._finalize(obj))
        elif res is self._nodes:
            self._on_node(type_, obj)
        elif res is self._deployments:
            if type_ == "DELETED":
                self._collect(meta["namespace"], meta["uid"])
            else:
                self._sync_deployment(meta["namespace"], meta["name"])
        elif res is self._replicasets and type_ != "ADDED":
            for ref in meta.get("ownerReferences") or []:
                if ref.get("controller") and ref.get("kind") == "Deployment":
                    self._sync_deployment(meta["namespace"], ref.get("name", ""))

    # ------------------------------------------------------------ namespaces

    def _finalize(self, seen: JsonObj) -> None:
        name = seen["metadata"]["name"]
        current = self.store.get(self._ns, None, name)
        if current["metadata"].get("uid") != seen["metadata"].get("uid"):
            return
        self.store.delete_namespace_content(name)
        stamp = now()
        conditions = [
            {
                "type": type_,
                "status": "False",
                "lastTransitionTime": stamp,
                "reason": reason,
                "message": message,
            }
            for type_, reason, message in _DELETION_CONDITIONS
        ]
        status = {**(current.get("status") or {}), "conditions": conditions}
        self.store.replace(self._ns, None, name, {"status": status}, subresource="status")
        finalizers = [
            f for f in (current.get("spec") or {}).get("finalizers") or [] if f != "kubernetes"
        ]
        self.store.replace(
            self._ns, None, name, {"spec": {"finalizers": finalizers}}, subresource="finalize"
        )

    # ------------------------------------------------------------ nodes

    def _on_node(self, type_: str, node: JsonObj) -> None:
        name = node["metadata"]["name"]
        if type_ == "DELETED":
            self._probes.pop(name, None)
            timer = self._timers.pop(("node", name), None)
            if timer is not None:
                timer.cancel()
            return
        self._taint(name)
        ready = _condition(node, "Ready")
        heartbeat = (ready or {}).get("lastHeartbeatTime")
        seen = self._probes.get(name)
        if seen is None or (ready is not None and seen[1] != heartbeat):
            self._probes[name] = (time.monotonic(), heartbeat)
            if ready is None or ready.get("status") != "Unknown":
                grace = (
                    self.timings.node_startup_grace
                    if ready is None
                    else self.timings.node_monitor_grace
                )
                self._later(("node", name), grace, lambda: self._health(name))

    def _taint(self, name: str) -> None:
        node = self.store.get(self._nodes, None, name)
        taints = reconciled_taints(node)
        if taints != ((node.get("spec") or {}).get("taints") or []):
            self.store.patch(
                self._nodes,
                None,
                name,
                "application/merge-patch+json",
                {"spec": {"taints": taints}},
            )

    def _health(self, name: str) -> None:
        """tryUpdateNodeHealth once the grace period passed without a heartbeat."""
        node = self.store.get(self._nodes, None, name)
        status = clone(node.get("status") or {})
        conditions = status.setdefault("conditions", [])
        stamp = now()
        for type_ in _HEALTH_CONDITIONS:
            found = next((c for c in conditions if c.get("type") == type_), None)
            if found is None:
                conditions.append(
                    {
                        "type": type_,
                        "status": "Unknown",
                        "reason": "NodeStatusNeverUpdated",
                        "message": "Kubelet never posted node status.",
                        "lastHeartbeatTime": node["metadata"].get("creationTimestamp"),
                        "lastTransitionTime": stamp,
                    }
                )
            elif found.get("status") != "Unknown":
                found.update(
                    status="Unknown",
                    reason="NodeStatusUnknown",
                    message="Kubelet stopped posting node status.",
                    lastTransitionTime=stamp,
                )
        self.store.replace(self._nodes, None, name, {"status": status}, subresource="status")

    # ------------------------------------------------------------ deployments

    def _owned(self, namespace: str, uid: str) -> list[JsonObj]:
        rs = self.store.list_objects(self._replicasets, WatchFilter(namespace=namespace))
        return [r for r in rs if controlled_by(r, uid)]

    def _sync_deployment(self, namespace: str, name: str) -> None:
        try:
            deployment = self.store.get(self._deployments, namespace, name)
        except ApiError as e:
            if e.code == 404:
                return
            raise
        if deployment["metadata"].get("deletionTimestamp"):
            return
        plan = plan_sync(deployment, self._owned(namespace, deployment["metadata"]["uid"]))
        for rs in plan.create:
            self.store.create(self._replicasets, rs, namespace)
        for rs in plan.replace:
            self.store.replace(self._replicasets, namespace, rs["metadata"]["name"], rs)
        for rs_name in plan.delete:
            self.store.delete(self._replicasets, namespace, rs_name)
        status = clone(deployment.get("status") or {})
        status["observedGeneration"] = deployment["metadata"].get("generation", 1)
        if plan.collision_count is not None:
            status["collisionCount"] = plan.collision_count
        annotations = dict(deployment["metadata"].get("annotations") or {})
        if plan.revision:
            annotations["deployment.kubernetes.io/revision"] = plan.revision
        self.store.replace(
            self._deployments,
            namespace,
            name,
            {"metadata": {"annotations": annotations}, "status": status},
            subresource="status",
        )

    def _collect(self, namespace: str, uid: str) -> None:
        for rs in self._owned(namespace, uid):
            self.store.delete(self._replicasets, namespace, rs["metadata"]["name"])
