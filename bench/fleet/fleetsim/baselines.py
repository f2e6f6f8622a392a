"""What users run instead of Cedar: nothing, the original tool, a kube-fledged-like cache.

- `none`: no pre-pull; the kubelet pulls at launch.
- `original`: on every node, every hour (from when its pod started), list the images of
  every workload in the cluster (no scheduling filter) and `docker pull` them one after
  the other; a failed pull is skipped until the next hour. Once a day (03:00) `docker
  system prune --filter until=72h --filter label=...`, which (without `--all`) removes
  only dangling images: with the trace's immutable tags there are none, so it frees
  nothing (it is modelled, and counted, all the same).
- `fledged`: every 15 minutes, for each pool, the images its workloads name now; every
  Ready node of the pool pulls every one of them at once (one pull job per image and
  node, no bound; a present image still costs the registry a manifest request); images
  dropped from the list are removed from the nodes (kube-fledged's purge). A failed pull
  waits for the next refresh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetsim.cluster import Cluster, Node

HOUR = 3600.0
FLEDGED_REFRESH_S = 900.0


class NoPrepull:
    name = "none"
    gated = False

    def start(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def initial_images(self, node: Node) -> list[str]:
        return self.cluster.feed.current_images(node.pool)

    def node_ready(self, node: Node, initial: bool) -> None:
        return None

    def node_deleted(self, node: Node) -> None:
        return None

    def finish(self) -> None:
        return None


class _OriginalAgent:
    def __init__(self, cluster: Cluster, node: Node) -> None:
        self.cluster = cluster
        self.node = node
        self.queue: list[str] = []
        self.run_started = 0.0
        self.failed = 0

    def engine_changed(self, ref: str, added: bool) -> None:
        return None

    def run(self) -> None:
        if self.node.state == "deleted":
            return
        self.run_started = self.cluster.sim.now
        self.queue = self.cluster.feed.current_images()  # every workload's images, all pools
        self._next()

    def _next(self) -> None:
        if self.node.state == "deleted":
            return
        if self.queue:
            ref = self.queue.pop(0)
            self.node.engine.pull(ref, self._pulled)
            return
        due = max(self.cluster.sim.now, self.run_started + HOUR)
        self.cluster.sim.at(due, self.run)

    def _pulled(self, ok: bool, error: str) -> None:
        if not ok:
            self.failed += 1
        self._next()

    def prune(self) -> None:
        """`docker system prune --filter until=72h --filter label=...`: dangling images only."""
        if self.node.state == "deleted":
            return
        engine = self.node.engine
        dangling = [ref for ref in engine.images if ":" not in ref.rsplit("/", 1)[-1]]
        for ref in dangling:
            engine.remove(ref)
        self.cluster.sim.at(self.cluster.sim.now + 24 * HOUR, self.prune)


class Original:
    name = "original"
    gated = False

    def start(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.agents: list[_OriginalAgent] = []

    def initial_images(self, node: Node) -> list[str]:
        return self.cluster.feed.current_images()

    def node_ready(self, node: Node, initial: bool) -> None:
        agent = _OriginalAgent(self.cluster, node)
        node.agent = agent
        self.agents.append(agent)
        sim = self.cluster.sim
        first = sim.now + (self.cluster.rng.uniform(0, HOUR) if initial else 10.0)
        sim.at(first, agent.run)
        day = 24 * HOUR
        prune_at = 3 * HOUR + day * ((sim.now - 3 * HOUR) // day + 1)
        sim.at(prune_at, agent.prune)

    def node_deleted(self, node: Node) -> None:
        return None

    def finish(self) -> None:
        self.cluster.metrics.extra["original_failed_pulls"] = sum(a.failed for a in self.agents)


class Fledged:
    name = "fledged"
    gated = False

    def start(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.lists: dict[str, list[str]] = {}
        self.failed = 0
        self.jobs = 0
        cluster.sim.at(FLEDGED_REFRESH_S, self.refresh)

    def initial_images(self, node: Node) -> list[str]:
        return self.cluster.feed.current_images(node.pool)

    def node_ready(self, node: Node, initial: bool) -> None:
        return None

    def node_deleted(self, node: Node) -> None:
        return None

    def refresh(self) -> None:
        cluster = self.cluster
        for pool in sorted(cluster.trace.pools):
            images = cluster.feed.current_images(pool)
            dropped = set(self.lists.get(pool, [])) - set(images)
            self.lists[pool] = images
            for node in sorted(cluster.nodes.values(), key=lambda n: n.name):
                if node.pool != pool or node.state != "ready":
                    continue
                for ref in sorted(dropped):
                    node.engine.remove(ref)
                for ref in images:
                    self.jobs += 1
                    node.engine.pull(ref, self._job_done)
        cluster.sim.at(cluster.sim.now + FLEDGED_REFRESH_S, self.refresh)

    def _job_done(self, ok: bool, error: str) -> None:
        if not ok:
            self.failed += 1

    def finish(self) -> None:
        self.cluster.metrics.extra["fledged_jobs"] = self.jobs
        self.cluster.metrics.extra["fledged_failed_jobs"] = self.failed
