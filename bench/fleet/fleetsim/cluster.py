"""The cluster around the image stores: nodes, tenants' sessions, image GC, releases.

- Nodes join (Ready `boot_s` after they are created) and leave (cordoned; deleted when
  their last pod ends, or 15 minutes later). With a gated strategy they join with the
  `cedar.io/warming:NoSchedule` taint and are schedulable once their puller lifts it.
- A login launches the tenant's pod on the node the scheduler picks (fleetsim/kubelet.py:
  the least loaded of the pool), which the kubelet there starts once its image is present.
- Image garbage collection (pkg/kubelet/images/image_gc_manager.go): every 5 minutes, at
  85% disk use or more, free down to 80%: images by last use (never used first), then by
  first detection; an image a container uses stops the pass; images younger than 2 minutes
  are skipped; the freed amount is counted by image size, as the kubelet does.
- The platform DaemonSet runs on every node; its update rolls node by node over
  `rollout_s`.
"""

from __future__ import annotations

import math
import random
from typing import Any, Protocol

from cedar.proto.scheduling import Taint
from cedar.puller.warmup import WARMING_TAINT_EFFECT, WARMING_TAINT_KEY
from fleetsim.engine import ImageSpec, NodeEngine, Sim
from fleetsim.feed import Feed
from fleetsim.kubelet import Kubelet, PoolScheduler
from fleetsim.metrics import Metrics
from fleetsim.registry import Registry
from fleetsim.trace import Trace

NEW_NODE_WINDOW_S = 1800.0  # a launch on a node Ready less than this long ago is "on a new node"
DRAIN_LIMIT_S = 900.0
WARMING = Taint(key=WARMING_TAINT_KEY, effect=WARMING_TAINT_EFFECT)


class Strategy(Protocol):
    name: str
    gated: bool  # nodes join with the warming taint

    def start(self, cluster: Cluster) -> None: ...
    def initial_images(self, node: Node) -> list[str]: ...
    def node_ready(self, node: Node, initial: bool) -> None: ...
    def node_deleted(self, node: Node) -> None: ...
    def finish(self) -> None: ...


class Node:
    def __init__(
        self, cluster: Cluster, name: str, pool: str, created: float, initial: bool
    ) -> None:
        spec = cluster.trace.pools[pool]
        self.name = name
        self.pool = pool
        self.labels: dict[str, str] = dict(spec["labels"])
        taints = [
            Taint(key=t["key"], effect=t["effect"], value=t.get("value") or "")
            for t in spec["taints"]
        ]
        self.warming = cluster.strategy.gated and not initial
        if self.warming:
            taints.append(WARMING)
        self.taints: tuple[Taint, ...] = tuple(taints)
        self.created = created
        self.ready_at = -math.inf if initial else math.inf
        self.initial = initial
        self.state = "booting"
        self.load = 0
        self.engine = NodeEngine(
            cluster.sim,
            name,
            registries=cluster.registries,
            catalog=cluster.catalog,
            stats=cluster.metrics,
            on_change=cluster.image_changed,
        )
        self.kubelet = Kubelet(cluster, self)
        self.agent: Any = None
        self.gc_phase = cluster.rng.uniform(0, cluster.gc_period)
        self.gc_due = False
        self.ds_image: str | None = None
        self.sched_pos = -1
        self.sched_load = -1
        self.sessions: set[str] = set()
        self.warm_target: set[str] | None = None

    @property
    def schedulable(self) -> bool:
        return self.state == "ready" and not self.warming


class Session:
    __slots__ = ("end", "image", "node", "started", "version")

    def __init__(self, node: Node, image: str, end: float) -> None:
        self.node = node
        self.image = image
        self.end = end
        self.started = False
        self.version = 0


class Cluster:
    def __init__(
        self, trace: Trace, strategy: Strategy, seed: int, *, per_node_desired: bool = False
    ) -> None:
        self.trace = trace
        self.strategy = strategy
        self.sim = Sim()
        self.rng = random.Random(f"{seed}:cluster")
        self.metrics = Metrics(strategy.name, trace.hours)
        header = trace.header
        node_cfg, kubelet_cfg = header["node"], header["kubelet"]
        self.node_bandwidth = float(node_cfg["bandwidth_Bps"])
        self.disk = float(node_cfg["disk_bytes"])
        self.system = float(node_cfg["system_bytes"])
        self.gc_high = float(node_cfg["gc_high_percent"]) / 100.0
        self.gc_low = float(node_cfg["gc_low_percent"]) / 100.0
        self.gc_min_age = float(node_cfg["gc_min_age_s"])
        self.gc_period = float(node_cfg["gc_period_s"])
        self.boot = float(node_cfg["boot_s"])
        self.backoff_initial = float(kubelet_cfg["backoff_initial_s"])
        self.backoff_max = float(kubelet_cfg["backoff_max_s"])
        self.registries = {
            host: Registry(self.sim, spec, self.node_bandwidth, self.metrics)
            for host, spec in trace.registries.items()
        }
        self.catalog = {
            ref: ImageSpec.of(
                ref,
                tuple((str(d), int(s)) for d, s in rec["layers"]),
                float(rec["created"]),
                dict(rec.get("labels") or {}),
            )
            for ref, rec in trace.images.items()
        }
        for spec in self.catalog.values():
            if spec.registry not in self.registries:
                raise ValueError(
                    f"image {spec.ref} names registry {spec.registry}, not in the trace"
                )
        self.feed = Feed(
            self.sim, latency=float(header["watcher"]["latency_s"]), per_node=per_node_desired
        )
        self.nodes: dict[str, Node] = {}
        self.all_nodes: list[Node] = []
        self.schedulers = {
            pool: PoolScheduler(random.Random(f"{seed}:sched:{pool}")) for pool in trace.pools
        }
        self.sessions: dict[str, Session] = {}
        self.unschedulable = 0
        self.abandoned = 0  # sessions that ended (node deleted) before their image came
        self.on_warming = 0  # launches on a node with the warming taint: must stay 0
        self.tenant_pool = {t["namespace"]: t["pool"] for t in trace.tenants}
        self.tenant_record = {t["namespace"]: t for t in trace.tenants}

    # --- running

    def run(self) -> Metrics:
        self.feed.load(self.trace.tenants, self.trace.daemonsets)
        self.strategy.start(self)
        for event in self.trace.events:
            self.sim.at(float(event["t"]), self._event, event)
        horizon = self.trace.hours * 3600.0
        self.sim.run(horizon)
        self.strategy.finish()
        self.metrics.node_peaks = [n.engine.peak_bytes for n in self.all_nodes]
        self.metrics.extra["launches_waiting_at_end"] = sum(
            1 for s in self.sessions.values() if not s.started
        )
        self.metrics.extra["launches_abandoned"] = self.abandoned
        self.metrics.extra["launches_on_warming_nodes"] = self.on_warming
        self.metrics.extra["bytes_landed"] = sum(n.engine.landed_bytes for n in self.all_nodes)
        self.metrics.extra["bytes_lost"] = sum(n.engine.lost_bytes for n in self.all_nodes)
        self.metrics.extra["unschedulable_launches"] = self.unschedulable
        self.metrics.extra["sim_events"] = self.sim.events
        self.metrics.extra["watcher_messages"] = self.feed.messages
        if self.feed.reports:
            self.metrics.extra["watcher_reports"] = self.feed.reports[:20]
        return self.metrics

    def _event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "login":
            self.login(str(event["namespace"]), float(event["session_s"]))
        elif kind == "node":
            if event["action"] == "add":
                self.add_node(str(event["name"]), str(event["pool"]), initial=self.sim.now == 0.0)
            else:
                self.remove_node(str(event["name"]))
        elif kind == "release":
            self.release(event)
        elif kind == "ds-release":
            self.ds_release(event)
        elif kind == "prepull":
            like = next(t for t in self.trace.tenants if t["pool"] == event["pool"])
            self.feed.prepull(like, str(event["image"]), float(event["ttl_s"]))
        elif kind == "outage":
            registry = self.registries[str(event["host"])]
            registry.go_down()
            self.sim.at(self.sim.now + float(event["duration_s"]), registry.come_back)

    # --- nodes

    def add_node(self, name: str, pool: str, initial: bool) -> None:
        node = Node(self, name, pool, self.sim.now, initial)
        self.nodes[name] = node
        self.all_nodes.append(node)
        if initial:
            for ref in self.strategy.initial_images(node):
                node.engine.place(ref)
            self._ready(node)
        else:
            self.sim.at(self.sim.now + self.boot, self._ready, node)

    def _ready(self, node: Node) -> None:
        if node.state != "booting":
            return
        node.state = "ready"
        node.ready_at = self.sim.now if not node.initial else -math.inf
        if node.schedulable:
            self.schedulers[node.pool].add(node)
        ds = sorted(image for _, image, _ in self.feed.daemonsets.values())
        for ref in ds:
            self._run_daemon_pod(node, ref)
        if not node.initial:
            node.warm_target = set(self.feed.current_images(node.pool))
            self._check_new_node_warm(node)
        self.strategy.node_ready(node, node.initial)

    def _run_daemon_pod(self, node: Node, ref: str) -> None:
        def started() -> None:
            if node.state == "deleted" or ref not in node.engine.images:
                return
            old = node.ds_image
            node.engine.images[ref].in_use += 1
            node.ds_image = ref
            if old is not None and old in node.engine.images:
                present = node.engine.images[old]
                present.in_use -= 1
                present.last_used = self.sim.now

        node.kubelet.ensure(ref, started)

    def lift_warming(self, node: Node) -> None:
        """The puller removed `cedar.io/warming` (an API round trip later)."""

        def lifted() -> None:
            if not node.warming:
                return
            node.warming = False
            node.taints = tuple(t for t in node.taints if t != WARMING)
            if node.schedulable:
                self.schedulers[node.pool].add(node)

        self.sim.at(self.sim.now + 0.2, lifted)

    def remove_node(self, name: str) -> None:
        node = self.nodes.get(name)
        if node is None or node.state in ("cordoned", "deleted"):
            return
        self.schedulers[node.pool].remove(node)
        if node.state == "booting":
            node.state = "cordoned"
            self._delete(node)
            return
        node.state = "cordoned"
        if node.load == 0:
            self._delete(node)
        else:
            self.sim.at(self.sim.now + DRAIN_LIMIT_S, self._delete, node)

    def _delete(self, node: Node) -> None:
        if node.state == "deleted":
            return
        node.state = "deleted"
        for namespace in list(node.sessions):
            self._end(namespace, force=True)
        self.strategy.node_deleted(node)
        node.engine.shutdown()
        self.metrics.node_deleted(node.name, self.sim.now)
        del self.nodes[node.name]

    def image_changed(self, node_name: str, ref: str, added: bool) -> None:
        node = self.nodes.get(node_name)
        if node is None:
            return
        if added:
            self.metrics.image_added(node_name, ref, self.sim.now)
            node.kubelet.image_added(ref)
            if node.warm_target is not None:
                self._check_new_node_warm(node)
            if not node.gc_due and self.system + node.engine.used_bytes >= self.gc_high * self.disk:
                node.gc_due = True
                period = self.gc_period
                t = node.gc_phase + period * math.ceil((self.sim.now - node.gc_phase) / period)
                self.sim.at(max(t, self.sim.now), self._gc, node)
        if node.agent is not None:
            node.agent.engine_changed(ref, added)

    def _check_new_node_warm(self, node: Node) -> None:
        target = node.warm_target
        if target is not None and all(node.engine.has(ref) for ref in target):
            self.metrics.new_node_warm_s.append(self.sim.now - node.ready_at)
            node.warm_target = None

    # --- kubelet image GC

    def _gc(self, node: Node) -> None:
        node.gc_due = False
        if node.state == "deleted":
            return
        engine = node.engine
        capacity = self.disk
        if self.system + engine.used_bytes < self.gc_high * capacity:
            return
        self.metrics.gc_runs += 1
        now = self.sim.now
        to_free = self.system + engine.used_bytes - self.gc_low * capacity
        order = sorted(
            engine.images.values(),
            key=lambda p: (now if p.in_use else p.last_used, p.first_detected, p.spec.ref),
        )
        freed = 0.0
        for present in order:
            if present.in_use:
                break
            if now - present.first_detected < self.gc_min_age:
                continue
            engine.remove(present.spec.ref)
            if present.spec.ref not in engine.images:
                freed += present.spec.size
                self.metrics.gc_removed += 1
            if freed >= to_free:
                break
        if self.system + engine.used_bytes >= self.gc_high * capacity:
            node.gc_due = True
            self.sim.at(now + self.gc_period, self._gc, node)

    # --- tenants

    def login(self, namespace: str, session_s: float) -> None:
        now = self.sim.now
        session = self.sessions.get(namespace)
        if session is not None:
            self.metrics.logins_to_running += 1
            if now + session_s > session.end:
                session.end = now + session_s
                if session.started:
                    session.version += 1
                    self.sim.at(session.end, self._end_at, namespace, session.version)
            return
        pool = self.tenant_pool[namespace]
        node = self.schedulers[pool].pick()
        if node is None:
            self.unschedulable += 1
            return
        if node.warming or not node.schedulable:
            self.on_warming += 1
        image = self.feed.tenants[namespace].image
        session = Session(node, image, now + session_s)
        self.sessions[namespace] = session
        node.sessions.add(namespace)
        node.load += 1
        self.schedulers[pool].moved(node)
        hit = node.engine.has(image)
        self.metrics.launch(now, hit, now - node.ready_at < NEW_NODE_WINDOW_S, image)
        if hit:
            self._start(namespace, session, now)
        else:
            node.kubelet.ensure(image, lambda: self._start(namespace, session, now))

    def _start(self, namespace: str, session: Session, scheduled: float) -> None:
        if self.sessions.get(namespace) is not session or session.node.state == "deleted":
            return
        now = self.sim.now
        if now > scheduled:
            self.metrics.waited(now - scheduled)
        present = session.node.engine.images[session.image]
        present.in_use += 1
        present.last_used = now
        session.started = True
        session.end = max(session.end, now + 1.0)
        self.sim.at(session.end, self._end_at, namespace, session.version)

    def _end_at(self, namespace: str, version: int) -> None:
        session = self.sessions.get(namespace)
        if session is not None and session.version == version:
            self._end(namespace)

    def _end(self, namespace: str, force: bool = False) -> None:
        session = self.sessions.pop(namespace)
        node = session.node
        node.sessions.discard(namespace)
        node.load -= 1
        if not session.started:
            self.abandoned += 1
        else:
            present = node.engine.images.get(session.image)
            if present is not None:
                present.in_use -= 1
                present.last_used = self.sim.now
        if node.state == "ready":
            self.schedulers[node.pool].moved(node)
        elif node.state == "cordoned" and node.load == 0 and not force:
            self._delete(node)

    # --- releases

    def release(self, event: dict[str, Any]) -> None:
        image, pool = str(event["image"]), str(event.get("pool") or "")
        namespaces = list(event["namespaces"])
        if not pool and namespaces:
            pool = self.tenant_pool[namespaces[0]]
        eligible = {n.name for n in self.nodes.values() if n.pool == pool and n.state == "ready"}
        warm = {name for name in eligible if self.nodes[name].engine.has(image)}
        self.metrics.release(image, "app", self.sim.now, eligible, warm)
        spread = float(event["spread_s"])
        step = spread / max(len(namespaces), 1)
        for i, namespace in enumerate(namespaces):
            self.sim.at(self.sim.now + i * step, self.feed.move, namespace, image)

    def ds_release(self, event: dict[str, Any]) -> None:
        image = str(event["image"])
        eligible = {n.name for n in self.nodes.values() if n.state == "ready"}
        warm = {name for name in eligible if self.nodes[name].engine.has(image)}
        self.metrics.release(image, "daemonset", self.sim.now, eligible, warm)
        self.feed.update_daemonset(str(event["namespace"]), str(event["name"]), image)
        rollout = float(event["rollout_s"])
        order = sorted(self.nodes.values(), key=lambda n: n.name)
        self.rng.shuffle(order)
        for i, node in enumerate(order):
            self.sim.at(
                self.sim.now + rollout * i / max(len(order), 1), self._roll_daemon, node, image
            )

    def _roll_daemon(self, node: Node, image: str) -> None:
        if node.state in ("ready", "cordoned"):
            self._run_daemon_pod(node, image)
