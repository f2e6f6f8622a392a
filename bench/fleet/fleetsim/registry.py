"""A simulated registry: its request queue, its blob bandwidth, its outages.

Requests (token + manifest) are served first come, first served at `requests_per_s`, each
taking `latency_s` more; one that would wait longer than `request_timeout_s` fails with the
client's timeout. Blobs share `bandwidth_Bps` equally among the nodes downloading, each at
most at its own bandwidth, and a node's share equally among its pulls: processor sharing at
both levels, computed exactly with a virtual clock U per registry (bytes one downloading
node has received) and Z per node and registry (bytes one of its pulls has received), so a
pull's start or end costs O(log n) and nothing is stepped in time. An outage refuses every
request and cuts the downloads in progress. The error texts are the engine's own.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleetsim.engine import Pull, Sim

REFUSED = "dial tcp 10.0.0.5:443: connect: connection refused"
RESET = "read tcp 10.0.1.7:51234->10.0.0.5:443: read: connection reset by peer"
CLIENT_TIMEOUT = "net/http: request canceled (Client.Timeout exceeded while awaiting headers)"


class _Flow:
    __slots__ = ("bytes", "cancelled", "channel", "pull", "z_end", "z_start")

    def __init__(self, pull: Pull, channel: _Channel, nbytes: float) -> None:
        self.pull = pull
        self.channel = channel
        self.bytes = nbytes
        self.z_start = 0.0
        self.z_end = 0.0
        self.cancelled = False


class _Channel:
    """One node's downloads from one registry: processor sharing in the node's clock Z."""

    __slots__ = ("flows", "k", "registry", "u_sync", "version", "z")

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.k = 0
        self.z = 0.0
        self.u_sync = registry.u
        self.flows: list[tuple[float, int, _Flow]] = []
        self.version = 0

    def sync(self) -> None:
        u = self.registry.u
        if self.k:
            self.z += (u - self.u_sync) / self.k
        self.u_sync = u

    def progress(self, flow: _Flow) -> float:
        self.registry.advance()
        self.sync()
        return min(flow.bytes, max(0.0, self.z - flow.z_start))

    def add(self, flow: _Flow) -> None:
        reg = self.registry
        reg.advance()
        self.sync()
        flow.z_start = self.z
        flow.z_end = self.z + flow.bytes
        heapq.heappush(self.flows, (flow.z_end, next(reg.seq), flow))
        self.k += 1
        if self.k == 1:
            reg.set_active(+1)
        self.push()

    def remove(self, flow: _Flow) -> None:
        """Cut a flow short (abort); its entry in the heap is skipped later."""
        reg = self.registry
        reg.advance()
        self.sync()
        flow.cancelled = True
        self.k -= 1
        if self.k == 0:
            reg.set_active(-1)
        self.push()

    def push(self) -> None:
        """(Re)announce this channel's next completion, in the registry's U clock."""
        self.version += 1
        while self.flows and self.flows[0][2].cancelled:
            heapq.heappop(self.flows)
        if self.flows and self.k:
            u_end = self.u_sync + (self.flows[0][0] - self.z) * self.k
            heapq.heappush(self.registry.heap, (u_end, self.version, next(self.registry.seq), self))
        self.registry.reschedule()

    def complete_due(self) -> list[_Flow]:
        self.sync()
        done: list[_Flow] = []
        while self.flows:
            z_end, _, flow = self.flows[0]
            if flow.cancelled:
                heapq.heappop(self.flows)
                continue
            if z_end > self.z + 1.0:  # bytes; float noise below one byte is done
                break
            heapq.heappop(self.flows)
            done.append(flow)
        if done:
            self.k -= len(done)
            if self.k == 0:
                self.registry.set_active(-1)
        return done


class Registry:
    """One registry host: a request queue and blob bandwidth (see the module docstring)."""

    def __init__(self, sim: Sim, spec: dict[str, Any], node_bandwidth: float, stats: Any) -> None:
        self.sim = sim
        self.host = str(spec["host"])
        self.bandwidth = float(spec["bandwidth_Bps"])
        self.service = 1.0 / float(spec["requests_per_s"])
        self.timeout = float(spec["request_timeout_s"])
        self.latency = float(spec["latency_s"])
        self.node_bandwidth = node_bandwidth
        self.stats = stats
        self.up = True
        self.next_free = 0.0
        # The U clock: bytes one downloading node has received since time 0.
        self.u = 0.0
        self.t_sync = 0.0
        self.m = 0  # nodes downloading now
        self.slope = 0.0
        self.heap: list[tuple[float, int, int, _Channel]] = []
        self.seq = itertools.count()
        self.tick_version = 0
        self.pulls: set[Pull] = set()  # pulls in progress against this registry

    # --- requests

    def request(self, on_done: Callable[[bool, str], None]) -> None:
        """One request (token + manifest): answered in order, or timed out, or refused."""
        now = self.sim.now
        if not self.up:
            self.sim.at(now + 0.01, on_done, False, f'Get "https://{self.host}/v2/": {REFUSED}')
            return
        start = max(now, self.next_free)
        done = start + self.service + self.latency
        if done - now > self.timeout:
            self.stats.request_timeouts += 1
            self.sim.at(
                now + self.timeout,
                on_done,
                False,
                f'Get "https://{self.host}/v2/": {CLIENT_TIMEOUT}',
            )
            return
        self.next_free = start + self.service
        self.sim.at(done, self._answered, on_done)

    def _answered(self, on_done: Callable[[bool, str], None]) -> None:
        if not self.up:
            on_done(False, f'Get "https://{self.host}/v2/": {RESET}')
        else:
            on_done(True, "")

    # --- bandwidth

    def advance(self) -> None:
        now = self.sim.now
        if now > self.t_sync:
            self.u += self.slope * (now - self.t_sync)
            self.t_sync = now

    def set_active(self, delta: int) -> None:
        self.advance()
        self.m += delta
        self.slope = min(self.node_bandwidth, self.bandwidth / self.m) if self.m else 0.0

    def reschedule(self) -> None:
        while self.heap and self.heap[0][1] != self.heap[0][3].version:
            heapq.heappop(self.heap)
        self.tick_version += 1
        if not self.heap or self.slope <= 0:
            return
        wait = max(0.0, (self.heap[0][0] - self.u) / self.slope)
        self.sim.at(self.sim.now + wait, self._tick, self.tick_version)

    def _tick(self, version: int) -> None:
        if version != self.tick_version:
            return
        self.advance()
        finished: list[_Flow] = []
        while self.heap and self.heap[0][0] <= self.u + 1.0:
            _, entry_version, _, channel = heapq.heappop(self.heap)
            if entry_version != channel.version:
                continue
            finished.extend(channel.complete_due())
            channel.push()
        self.reschedule()
        for flow in finished:
            self.stats.add_bytes(self.host, flow.bytes, self.sim.now)
            flow.pull.flow_done()

    # --- outages

    def go_down(self) -> None:
        self.up = False
        for pull in sorted(self.pulls, key=lambda p: p.serial):
            pull.fail(f"{RESET}")

    def come_back(self) -> None:
        self.up = True
