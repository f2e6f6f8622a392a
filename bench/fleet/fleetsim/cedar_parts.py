"""The pieces of the simulated Cedar puller: its settings, its registry probe, a pull attempt.

`SimProbe` is Cedar's `RegistryProbe` (breaker, cache, growing retry) whose only I/O, the
`/v2/` GET, asks the simulated registry instead; `run_sync` runs its coroutine, which never
waits here, without an event loop (as it runs `NodeLoad.current`, whose engine listing is
the simulated engine's).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cedar.puller.pacing import PullPriority
from cedar.puller.plan import ImageRecord, parse_image
from cedar.puller.registry import RegistryProbe
from fleetsim.engine import Pull
from fleetsim.registry import Registry


@dataclass(frozen=True)
class CedarSettings:
    """The puller's defaults (services/puller/cedar/puller/settings.py), and the prune scope
    a deployment replacing the original tool sets (CEDAR_PRUNE_REPOSITORIES)."""

    max_concurrent_pulls: int = 3
    refresh_interval: float = 3600.0
    refresh_jitter: float = 0.1
    backoff_base: float = 2.0
    backoff_max: float = 600.0
    permanent_retry: float = 3600.0
    resync_interval: float = 60.0
    pull_timeout: float = 900.0
    probe_ttl: float = 15.0
    probe_timeout: float = 5.0
    prune_repositories: tuple[str, ...] = ("harbor.example.com/tenants/",)
    prune_after: float = 72 * 3600.0
    prune_interval: float = 24 * 3600.0
    start_delay: float = 5.0  # pod start and the initial read of the stream on a new node
    fleet_pulls: str = ""  # CEDAR_REGISTRY_FLEET_PULLS
    warm_timeout: float = 600.0  # CEDAR_WARM_TIMEOUT


PACED = "harbor.example.com=40,*=20"  # the platform registry is the smaller one


_DIGEST: dict[str, bool] = {}


def _is_digest(image: str) -> bool:
    known = _DIGEST.get(image)
    if known is None:
        ref = parse_image(image)
        known = _DIGEST[image] = bool(ref and ref.is_digest)
    return known


def _valid(image: str) -> bool:
    return parse_image(image) is not None


class SimProbe(RegistryProbe):
    """Cedar's breaker, probing the simulated registries."""

    def __init__(
        self, registries: dict[str, Registry], clock: Callable[[], float], s: CedarSettings
    ) -> None:
        super().__init__(ttl=s.probe_ttl, timeout=s.probe_timeout, clock=clock)
        self.registries = registries

    async def _probe(self, api_host: str) -> tuple[bool, str]:
        self.probes += 1
        registry = self.registries.get(api_host)
        if registry is not None and registry.up:
            return True, ""
        return False, "ClientConnectorError"


T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never waits (the probe's over the simulated registry, the
    node load's over the simulated engine)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    coro.close()
    raise RuntimeError("a puller coroutine waited on something in the simulation")


@dataclass(eq=False)
class Attempt:
    image: str
    kind: str
    record: ImageRecord
    token: str
    priority: PullPriority = PullPriority.MISSING
    waiting: bool = False
    done: bool = False
    pull: Pull | None = None
    callback: Callable[[bool, str], None] | None = None
    registry: str = ""
    load: int = 0  # the node's load its lease request carries
    want: float = 0.0  # the image's share of the node's workloads, in the same request
    written_at: float = 0.0  # when the request was last written


@dataclass
class CedarStats:
    passes: int = 0
    pulls: int = 0
    refreshes: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    evictions: int = 0
    withdrawn: int = 0
    pruned: int = 0
    gate_warm: int = 0
    gate_timeout: int = 0
