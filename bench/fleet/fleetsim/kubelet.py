"""A node's kubelet (image pulls for pods, with backoff) and the pool's scheduler.

The kubelet pulls an image a pod needs when it is not present (IfNotPresent), one pull at a
time per node (`serializeImagePulls: true`, the default), and after a failed pull waits
10 s, doubling to 300 s (`imageBackOffPeriod`, `MaxImageBackOff` in pkg/kubelet/kubelet.go).
A pod waiting for an image starts as soon as it is present. The scheduler puts a launch on
the least loaded schedulable node of the pool (fewest pods; ties at random).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetsim.cluster import Cluster, Node


class Kubelet:
    """IfNotPresent pulls, serialized per node, with the image pull backoff."""

    def __init__(self, cluster: Cluster, node: Node) -> None:
        self.cluster = cluster
        self.node = node
        self.queue: deque[str] = deque()
        self.waiters: dict[str, list[Callable[[], None]]] = {}
        self.busy = False
        self.failures: dict[str, int] = {}
        self.backing_off: set[str] = set()

    def ensure(self, ref: str, ready: Callable[[], None]) -> None:
        if self.node.engine.has(ref):
            ready()
            return
        waiting = self.waiters.get(ref)
        if waiting is not None:
            waiting.append(ready)
            return
        self.waiters[ref] = [ready]
        self.queue.append(ref)
        self._next()

    def image_added(self, ref: str) -> None:
        waiting = self.waiters.pop(ref, None)
        if waiting:
            self.failures.pop(ref, None)
            for ready in waiting:
                ready()

    def _next(self) -> None:
        while not self.busy and self.queue:
            ref = self.queue.popleft()
            if ref not in self.waiters:
                continue  # present by now
            if self.node.engine.has(ref):
                self.image_added(ref)
                continue
            self.busy = True
            self.node.engine.pull(ref, self._callback(ref))

    def _callback(self, ref: str) -> Callable[[bool, str], None]:
        def pulled(ok: bool, error: str) -> None:
            self._pulled(ref, ok, error)

        return pulled

    def _pulled(self, ref: str, ok: bool, error: str) -> None:
        self.busy = False
        if ok:
            self.image_added(ref)
        elif ref in self.waiters and self.node.state != "deleted":
            count = self.failures.get(ref, 0) + 1
            self.failures[ref] = count
            delay = min(self.cluster.backoff_max, self.cluster.backoff_initial * 2 ** (count - 1))
            self.cluster.sim.at(self.cluster.sim.now + delay, self._retry, ref)
        self._next()

    def _retry(self, ref: str) -> None:
        if ref in self.waiters and self.node.state != "deleted":
            self.queue.append(ref)
            self._next()


class PoolScheduler:
    """Least loaded first: nodes in buckets by load, O(1) moves."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.buckets: list[list[Node]] = [[]]

    def add(self, node: Node) -> None:
        if node.sched_pos >= 0:
            return
        load = node.load
        while len(self.buckets) <= load:
            self.buckets.append([])
        bucket = self.buckets[load]
        node.sched_pos, node.sched_load = len(bucket), load
        bucket.append(node)

    def remove(self, node: Node) -> None:
        if node.sched_pos < 0:
            return
        bucket = self.buckets[node.sched_load]
        last = bucket.pop()
        if last is not node:
            bucket[node.sched_pos] = last
            last.sched_pos = node.sched_pos
        node.sched_pos = node.sched_load = -1

    def moved(self, node: Node) -> None:
        if node.sched_pos >= 0:
            self.remove(node)
            self.add(node)

    def pick(self) -> Node | None:
        for bucket in self.buckets:
            if bucket:
                return bucket[self.rng.randrange(len(bucket))]
        return None
