"""What the simulation models instead of running: the clock and node image stores.

- `Sim`: the event loop in simulated seconds (a heap; ties run in scheduling order).
- `NodeEngine`: a node's image store. Images are made of layers; a layer present (or being
  downloaded by another pull on the node) is not downloaded again; two pulls of one image
  on a node are one pull (Docker and containerd both join them); a pull of a present tag
  still costs the registry a request. Disk is the sum of the layers present. Removing an
  image frees the layers no other image uses; a pull cut short keeps its complete layers.
- `Pull`: one engine-level pull, through its registry (fleetsim/registry.py).

`NodeEngine.running_containers` is the engine's answer to the puller's container listing
(`ImageEngine.running_containers`): the containers the simulation runs on the node, the
DaemonSet's pod and the tenants' pods that started (a pod waiting for its image runs none).

Failure messages are the engine's own texts, so that Cedar's classifier sorts them.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetsim.registry import Registry, _Channel, _Flow

Callback = Callable[[bool, str], None]  # (ok, error message)


class Sim:
    """Simulated time and the event heap."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.events = 0

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (max(t, self.now), next(self._seq), fn, args))

    def run(self, until: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= until:
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            self.events += 1
            fn(*args)
        self.now = until


@dataclass(frozen=True, slots=True)
class ImageSpec:
    ref: str
    registry: str
    layers: tuple[tuple[str, int], ...]
    created: float
    labels: dict[str, str]
    size: int = 0
    digest: str = ""  # the manifest digest the engine reports

    @classmethod
    def of(
        cls, ref: str, layers: tuple[tuple[str, int], ...], created: float, labels: dict[str, str]
    ) -> ImageSpec:
        manifest = hashlib.sha256(repr((ref, layers)).encode()).hexdigest()
        return cls(
            ref=ref,
            registry=ref.split("/", 1)[0],
            layers=layers,
            created=created,
            labels=labels,
            size=sum(size for _, size in layers),
            digest=f"sha256:{manifest}",
        )


@dataclass
class Present:
    spec: ImageSpec
    first_detected: float
    last_used: float = float("-inf")  # never used by a container
    in_use: int = 0


class Pull:
    """One engine-level pull of one image on one node, however many asked for it."""

    _serials = itertools.count()

    def __init__(self, engine: NodeEngine, spec: ImageSpec, registry: Registry) -> None:
        self.engine = engine
        self.spec = spec
        self.registry = registry
        self.waiters: list[Callback] = []
        self.flow: _Flow | None = None
        self.own: list[tuple[str, int]] = []  # layers this pull downloads
        self.deps: set[Pull] = set()  # pulls downloading layers this one needs
        self.dependants: set[Pull] = set()
        self.flow_pending = False
        self.finished = False
        self.counted = False
        self.serial = next(Pull._serials)

    def start(self) -> None:
        self.registry.pulls.add(self)
        self.counted = True
        self.engine.stats.pull_started(self.registry.host, self.engine.sim.now)
        self.registry.request(self._manifest)

    def _manifest(self, ok: bool, error: str) -> None:
        if self.finished:
            return
        if not ok:
            self.fail(error)
            return
        engine = self.engine
        nbytes = 0
        for digest, size in self.spec.layers:
            if digest in engine.layers:
                continue
            other = engine.downloading.get(digest)
            if other is not None and other is not self:
                self.deps.add(other)
                other.dependants.add(self)
                continue
            engine.downloading[digest] = self
            self.own.append((digest, size))
            nbytes += size
        if nbytes > 0:
            self.flow = _Flow(self, engine.channel(self.registry), float(nbytes))
            self.flow_pending = True
            self.flow.channel.add(self.flow)
        else:
            self._uncount()
            self._maybe_done()

    def flow_done(self) -> None:
        if self.finished:
            return
        self.flow_pending = False
        self._land_layers(len(self.own))
        self._uncount()
        self._maybe_done()

    def dep_done(self, dep: Pull) -> None:
        self.deps.discard(dep)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.finished or self.flow_pending or self.deps:
            return
        self.finished = True
        self.engine.pull_finished(self, True, "")
        for dependant in list(self.dependants):
            dependant.dep_done(self)

    def _uncount(self) -> None:
        if self.counted:
            self.counted = False
            self.registry.pulls.discard(self)
            self.engine.stats.pull_ended(self.registry.host, self.engine.sim.now)

    def _land_layers(self, count: int) -> None:
        engine = self.engine
        for digest, size in self.own[:count]:
            if engine.downloading.get(digest) is self:
                del engine.downloading[digest]
            engine.landed_bytes += size
            engine.add_layer(digest, size)

    def fail(self, error: str) -> None:
        """The registry failed this pull (or every requester gave up): keep finished layers."""
        if self.finished:
            return
        self.finished = True
        if self.flow is not None and self.flow_pending:
            done_bytes = self.flow.channel.progress(self.flow)
            self.flow.channel.remove(self.flow)
            self.flow_pending = False
            self.engine.stats.add_bytes(self.registry.host, done_bytes, self.engine.sim.now)
            landed, total = 0, 0.0
            for _, size in self.own:
                if total + size > done_bytes:
                    break
                total += size
                landed += 1
            self._land_layers(landed)
            self.engine.lost_bytes += done_bytes - total
        for digest, _ in self.own:
            if self.engine.downloading.get(digest) is self:
                del self.engine.downloading[digest]
        self._uncount()
        for dep in self.deps:
            dep.dependants.discard(self)
        self.deps.clear()
        self.engine.pull_finished(self, False, error)
        for dependant in sorted(self.dependants, key=lambda p: p.serial):
            dependant.fail(error)


class NodeEngine:
    """A node's image store and its pulls in flight (see the module docstring)."""

    def __init__(
        self,
        sim: Sim,
        name: str,
        *,
        registries: dict[str, Registry],
        catalog: dict[str, ImageSpec],
        stats: Any,
        on_change: Callable[[str, str, bool], None],
    ) -> None:
        self.sim = sim
        self.name = name
        self.registries = registries
        self.catalog = catalog
        self.stats = stats
        self.on_change = on_change  # (node, image, added?) for every image added or removed
        self.layers: dict[str, int] = {}  # digest -> size
        self.layer_users: dict[str, int] = {}  # digest -> images present using it
        self.images: dict[str, Present] = {}
        self.pulls: dict[str, Pull] = {}
        self.downloading: dict[str, Pull] = {}  # layer digest -> the pull downloading it
        self.channels: dict[str, _Channel] = {}
        self.used_bytes = 0
        self.peak_bytes = 0
        self.landed_bytes = 0  # layer bytes that arrived by pulls (not placed at time 0)
        self.lost_bytes = 0.0  # bytes downloaded by pulls cut short, of layers that never landed
        self.alive = True

    def channel(self, registry: Registry) -> _Channel:
        channel = self.channels.get(registry.host)
        if channel is None:
            channel = self.channels[registry.host] = _Channel(registry)
        return channel

    def has(self, ref: str) -> bool:
        return ref in self.images

    async def running_containers(self) -> int:
        """ImageEngine.running_containers: one container per started pod (never waits)."""
        return sum(present.in_use for present in self.images.values())

    def digest(self, ref: str) -> str | None:
        present = self.images.get(ref)
        return None if present is None else present.spec.digest

    def add_layer(self, digest: str, size: int) -> None:
        if digest not in self.layers:
            self.layers[digest] = size
            self.layer_users.setdefault(digest, 0)
            self.used_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def place(self, ref: str) -> None:
        """Put an image in the store without pulling (the state at time 0)."""
        spec = self.catalog[ref]
        for digest, size in spec.layers:
            self.add_layer(digest, size)
        self._add_image(spec)

    def _add_image(self, spec: ImageSpec) -> None:
        if spec.ref in self.images:
            return
        for digest, _ in spec.layers:
            self.layer_users[digest] = self.layer_users.get(digest, 0) + 1
        self.images[spec.ref] = Present(spec, first_detected=self.sim.now)
        self.on_change(self.name, spec.ref, True)

    def pull(self, ref: str, callback: Callback) -> Pull | None:
        """Pull `ref` (or join the pull in progress); `callback(ok, error)` when it ends."""
        if not self.alive:
            self.sim.at(self.sim.now, callback, False, "engine gone")
            return None
        if ref in self.images:
            # A pull of a present tag still asks the registry whether the tag moved.
            pull = self.pulls.get(ref)
            if pull is None:
                pull = self._new_pull(ref)
            pull.waiters.append(callback)
            return pull
        pull = self.pulls.get(ref)
        if pull is None:
            pull = self._new_pull(ref)
        pull.waiters.append(callback)
        return pull

    def _new_pull(self, ref: str) -> Pull:
        spec = self.catalog[ref]
        pull = Pull(self, spec, self.registries[spec.registry])
        self.pulls[ref] = pull
        pull.start()
        return pull

    def give_up(self, pull: Pull, callback: Callback) -> None:
        """One requester stops waiting (its own timeout); the pull goes on for the others."""
        if callback in pull.waiters:
            pull.waiters.remove(callback)
        if not pull.waiters and not pull.finished:
            pull.fail("context canceled")

    def pull_finished(self, pull: Pull, ok: bool, error: str) -> None:
        if self.pulls.get(pull.spec.ref) is pull:
            del self.pulls[pull.spec.ref]
        if ok and self.alive:
            self._add_image(pull.spec)
        waiters, pull.waiters = pull.waiters, []
        for callback in waiters:
            callback(ok, error)

    def remove(self, ref: str) -> int:
        """Remove an image nobody uses; returns the bytes freed (0 if refused or absent)."""
        present = self.images.get(ref)
        if present is None or present.in_use > 0:
            return 0
        del self.images[ref]
        freed = 0
        for digest, _ in present.spec.layers:
            users = self.layer_users.get(digest, 0) - 1
            self.layer_users[digest] = users
            if users <= 0 and digest in self.layers and digest not in self.downloading:
                freed += self.layers.pop(digest)
                del self.layer_users[digest]
        self.used_bytes -= freed
        self.on_change(self.name, ref, False)
        return freed

    def shutdown(self) -> None:
        """The node is deleted: abandon its pulls."""
        self.alive = False
        for pull in sorted(self.pulls.values(), key=lambda p: p.serial):
            pull.fail("engine gone")
