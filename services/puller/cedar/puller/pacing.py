"""Fleet-wide registry pacing: budgets, grant order and lease bookkeeping. Pure: no I/O.

It touches only its arguments; every time is a float passed in (seconds, one clock per
caller). What it decides, the NATS-backed lease store and the puller's wiring carry out.

**Budget.** `CEDAR_REGISTRY_FLEET_PULLS` is a comma-separated list of `host=N` entries
(`harbor.example.com=40,*=100`): at most N pulls from that registry run at once across every
node of the fleet. `*` is the budget of every registry not listed; without `*`, registries
not listed are not paced. Hosts are folded like image references (lower case, Docker Hub's
aliases become `docker.io`), so `Harbor.Example.com` and `harbor.example.com` are one entry.

**Order.** A pull waits for a lease of its registry. Requests are ranked by priority: a
node whose warm-up gate is still closed (a new node, empty cache) before a missing image on
a warm node, before a refresh. Within a priority, by `load`, the containers running on the
node (kept current while the request waits): the scheduler puts the next launches on the
least loaded nodes (kube-scheduler's default scoring, for alike pods), so those should have
the new images first. Within a load, by `want`, the share of the node's workloads that use
the image (kept current too): the chance that the node's next launch needs it, so a pull
that serves a tenth of a node's workloads goes before one that serves a hundredth, whatever
pool either node is in. Then by `share`, the number of leases and requests its node already
had for that registry when it asked (a node's first pull before its second): the budget
spreads over alike nodes instead of piling onto a few, whose own bandwidth would then bound
the registry's throughput. Then first come, first served, then by holder and token, so that
every node computes the same order from the same data. (The order was chosen by running the
fleet simulation of bench/fleet over the alternatives; docs/benchmarks.md has the figures.)
A request may take a slot only when fewer requests rank ahead of it than slots are free,
and it takes the free slot whose index is its rank among the waiters: requests that see the
same table choose different slots, so compare-and-set races are rare.

**Leases.** A lease names its registry, slot, holder (node) and token (one pull); it
expires at `expires_at` unless renewed (at a third of the TTL). A holder that crashes stops
renewing and its lease lapses within one TTL; a waiter's request lapses the same way, so a
dead node never blocks the queue. A lease store that cannot be reached means the node's
local bound only (`CEDAR_MAX_CONCURRENT_PULLS`), never a stall: `without_store()`.

**The NATS mechanism (for the store).** One KV bucket with a per-key TTL: a lease is key
`lease.<registry key>.<slot>`, claimed by `create` (fails if the key exists: compare-and-set,
as the MCS ledger claims labels), renewed by `update` with the revision read, released by
`delete`; a request is `wait.<registry key>.<token>`, same TTL, refreshed while waiting; a
watch on the bucket wakes waiters. KV rather than a work-queue stream: a lease must be held
(visibly, for metrics and operators), lapse by itself when its holder dies, and be claimed
atomically, which create/update-with-revision and the TTL give without a coordinator.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Literal, TypeVar

from cedar.proto.imageref import canonical_registry
from cedar.puller.errors import PullerConfigError

FLEET_PULLS_VARIABLE = "CEDAR_REGISTRY_FLEET_PULLS"
WILDCARD = "*"
DEFAULT_LEASE_TTL = 30.0
MAX_LOOK_INTERVAL = 2.0  # a waiting request looks at the table at least this often
MAX_BUDGET = 100_000
_HOST = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
    r"|\[[0-9a-f:]+\])(?::[0-9]{1,5})?$"
)


class FleetPullsError(PullerConfigError):
    """`CEDAR_REGISTRY_FLEET_PULLS` (or a stored lease) is unusable; the message says why."""


class PullPriority(IntEnum):
    """Lower is served first."""

    COLD = 0  # the node's warm-up gate is closed: a new node with an empty cache
    MISSING = 1  # a desired image the node does not have
    REFRESH = 2  # re-pulling a tag the node has


def priority_of(kind: Literal["pull", "refresh"], *, node_warming: bool) -> PullPriority:
    """The priority of one pull: a warming node's pulls come first, refreshes last."""
    if node_warming:
        return PullPriority.COLD
    return PullPriority.REFRESH if kind == "refresh" else PullPriority.MISSING


# --- the budget ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FleetBudget:
    """At most `limits[host]` pulls at once from `host` across the fleet (`default` for the
    rest; None: not paced)."""

    limits: Mapping[str, int] = field(default_factory=dict)
    default: int | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.limits) or self.default is not None

    def limit_for(self, registry: str) -> int | None:
        """The fleet-wide bound for `registry`, or None when its pulls are not paced."""
        return self.limits.get(canonical_registry(registry), self.default)

    def __str__(self) -> str:
        parts = [f"{host}={n}" for host, n in sorted(self.limits.items())]
        if self.default is not None:
            parts.append(f"{WILDCARD}={self.default}")
        return ",".join(parts)


def parse_fleet_pulls(text: str) -> FleetBudget:
    """`harbor.example.com=40,*=100` -> FleetBudget. Empty text: no pacing.

    Raises FleetPullsError naming the bad entry: a missing `=`, a host that is not a
    registry host (a path, a scheme, spaces), a count that is not an integer from 1 to
    100000, or a host given twice.
    """
    limits: dict[str, int] = {}
    default: int | None = None
    for entry in filter(None, (raw.strip() for raw in text.split(","))):
        host_text, sep, count_text = entry.rpartition("=")
        host_text, count_text = host_text.strip(), count_text.strip()
        if not sep or not host_text:
            raise FleetPullsError(
                f"{FLEET_PULLS_VARIABLE}: entry {entry!r} is not host=N "
                "(e.g. harbor.example.com=40)"
            )
        count = _count(entry, count_text)
        if host_text == WILDCARD:
            if default is not None:
                raise FleetPullsError(f"{FLEET_PULLS_VARIABLE}: '*' is given twice")
            default = count
            continue
        host = canonical_registry(host_text)
        if "/" in host_text or not _HOST.match(host):
            raise FleetPullsError(
                f"{FLEET_PULLS_VARIABLE}: {host_text!r} in {entry!r} is not a registry host "
                "(host or host:port, no scheme or path)"
            )
        if host in limits:
            raise FleetPullsError(f"{FLEET_PULLS_VARIABLE}: registry {host!r} is given twice")
        limits[host] = count
    return FleetBudget(limits=limits, default=default)


def _count(entry: str, text: str) -> int:
    if not text.lstrip("-").isdigit():
        raise FleetPullsError(
            f"{FLEET_PULLS_VARIABLE}: {text!r} in {entry!r} is not a whole number"
        )
    if not 1 <= (count := int(text)) <= MAX_BUDGET:
        raise FleetPullsError(
            f"{FLEET_PULLS_VARIABLE}: {count} in {entry!r} must be 1 to {MAX_BUDGET}"
        )
    return count


# --- leases and requests -------------------------------------------------------------------


# The order of requests (lower first): priority, load, -want, share, since, holder, token.
Rank = tuple[int, int, float, int, float, str, str]


@dataclass(frozen=True, slots=True)
class Request:
    """One pull waiting for a lease of `registry`."""

    registry: str
    holder: str  # the node
    token: str  # one pull, unique in the fleet (e.g. node + image + attempt)
    priority: PullPriority
    since: float  # when the request was first made
    expires_at: float  # lapses unless refreshed while waiting
    share: int = 0  # the holder's leases and requests of this registry when it asked
    # Containers running on the holder's node, as of the request's last write. Requests
    # stored by pullers that did not send it read as 0.
    load: int = 0
    # The share (0 to 1) of the node's workloads that use the image, as of the last write.
    # Requests stored by pullers that did not send it read as 0: after the others.
    want: float = 0.0

    def rank(self) -> Rank:
        return (
            int(self.priority),
            self.load,
            -self.want,
            self.share,
            self.since,
            self.holder,
            self.token,
        )


@dataclass(frozen=True, slots=True)
class Lease:
    """Slot `slot` of `registry`'s budget, held by `holder` for the pull `token`."""

    registry: str
    slot: int
    holder: str
    token: str
    priority: PullPriority
    acquired_at: float
    expires_at: float


_Expiring = TypeVar("_Expiring", Lease, Request)


@dataclass(frozen=True, slots=True)
class Grant:
    slot: int | None  # None: not paced, or the store is unavailable (local bound only)
    reason: str


@dataclass(frozen=True, slots=True)
class Wait:
    ahead: int  # requests ranked ahead of this one
    free: int  # slots free now


def live(items: Iterable[_Expiring], now: float) -> list[_Expiring]:
    """The leases (or requests) that have not lapsed at `now`."""
    return [item for item in items if item.expires_at > now]


def decide(
    request: Request,
    *,
    limit: int | None,
    leases: Iterable[Lease],
    waiting: Iterable[Request],
    now: float,
) -> Grant | Wait:
    """May `request` take a lease now, and which slot? Expired leases and requests do not
    count; `waiting` may include `request` itself. `limit` None: not paced, go."""
    if limit is None:
        return Grant(slot=None, reason="registry not paced")
    host = canonical_registry(request.registry)
    registry_leases = [
        lease for lease in live(leases, now) if canonical_registry(lease.registry) == host
    ]
    for lease in registry_leases:
        if lease.token == request.token:
            return Grant(slot=lease.slot, reason=f"already holds slot {lease.slot} of {limit}")
    held = {lease.slot for lease in registry_leases if 0 <= lease.slot < limit}
    free = [slot for slot in range(limit) if slot not in held]
    mine = request.rank()
    ahead = sum(
        1
        for other in live(waiting, now)
        if canonical_registry(other.registry) == host
        and other.token != request.token
        and other.rank() < mine
    )
    if ahead < len(free):
        return Grant(slot=free[ahead], reason=f"slot {free[ahead]} of {limit}")
    return Wait(ahead=ahead, free=len(free))


def without_store(request: Request) -> Grant:
    """The lease store cannot be reached: go, within the node's own bound only."""
    return Grant(
        slot=None, reason=f"fleet lease store unavailable: local bound only for {request.registry}"
    )


def renew_due(item: Lease | Request, now: float, ttl: float) -> bool:
    """Renew (a lease, or a waiting request) once a third of the TTL has passed since it was
    written: two renewals can fail before a live holder loses it."""
    return now >= item.expires_at - ttl * 2.0 / 3.0


def next_look(
    mine: Request, leases: list[Lease], requests: list[Request], now: float, *, ttl: float
) -> float:
    """Seconds a waiting request may sleep until something that could let it go happens: a
    lease or a request ranked ahead lapses, or its own renewal falls due (at most
    MAX_LOOK_INTERVAL, at least 50 ms)."""
    due = [mine.expires_at - ttl * 2.0 / 3.0, now + MAX_LOOK_INTERVAL]
    due += [x.expires_at for x in live(leases, now) if x.registry == mine.registry]
    due += [
        x.expires_at
        for x in live(requests, now)
        if x.registry == mine.registry and x.rank() < mine.rank()
    ]
    return max(0.05, min(due) - now)


def renewed(lease: Lease, now: float, ttl: float) -> Lease:
    return replace(lease, expires_at=now + ttl)


def to_withdraw(
    waiting: Mapping[str, PullPriority], *, blocked: PullPriority, count: int
) -> list[str]:
    """A node's own waiting requests to withdraw so that `count` pulls of priority `blocked`
    without a local slot get one: strictly lower priorities only, the lowest first (else a
    node whose slots all wait on refresh leases holds back its own missing images)."""
    lower = sorted(
        (token for token, priority in waiting.items() if priority > blocked),
        key=lambda token: (-int(waiting[token]), token),
    )
    return lower[: max(count, 0)]


def share_of(
    holder: str, registry: str, leases: Iterable[Lease], waiting: Iterable[Request], now: float
) -> int:
    """A new request's `share`: its holder's live leases and requests of `registry`."""
    host = canonical_registry(registry)
    held = [(x.holder, x.registry) for x in live(leases, now)]
    asked = [(x.holder, x.registry) for x in live(waiting, now)]
    return sum(1 for h, r in held + asked if h == holder and canonical_registry(r) == host)


# --- one table, for a single process (the fleet simulation; a store's local mirror) --------


class LeaseTable:
    """Leases and requests of every registry, with the rules above applied in one place.

    `request()` registers a pull and grants it if it may go; `release()` frees a lease and
    returns the leases waiting requests took, in rank order; `cancel()` withdraws a request;
    `expire()` drops what lapsed. The grants are `decide()`'s over the same data (tested), at
    O(log n) a call, so that one process holds the table of a thousand simulated nodes.
    """

    def __init__(self, budget: FleetBudget, ttl: float = DEFAULT_LEASE_TTL) -> None:
        if ttl <= 0:
            raise FleetPullsError(f"lease TTL must be positive, not {ttl}")
        self.budget = budget
        self.ttl = ttl
        self._leases: dict[str, Lease] = {}  # token -> lease
        self._requests: dict[str, Request] = {}  # token -> waiting request
        self._held: dict[str, set[str]] = {}  # registry -> tokens holding a lease
        self._free: dict[str, list[int]] = {}  # registry -> heap of free slots
        self._queue: dict[str, list[tuple[Rank, str]]] = {}
        # (registry, holder) -> its leases and requests: the `share` of its next request
        self._outstanding: dict[tuple[str, str], int] = {}
        self.peak: dict[str, int] = {}  # registry -> most leases held at once

    def held(self, registry: str) -> int:
        return len(self._held.get(canonical_registry(registry), ()))

    def waiting(self, registry: str) -> int:
        host = canonical_registry(registry)
        return sum(1 for r in self._requests.values() if r.registry == host)

    def leases(self) -> list[Lease]:
        return list(self._leases.values())

    def requests(self) -> list[Request]:
        return list(self._requests.values())

    def request(
        self,
        registry: str,
        holder: str,
        token: str,
        priority: PullPriority,
        now: float,
        *,
        load: int = 0,
        want: float = 0.0,
    ) -> Lease | Grant | None:
        """A Lease when granted now, Grant(slot=None) when the registry is not paced, None
        to wait (then `release()` or `expire()` hands the lease over later). Asking again
        with the same token refreshes the request: it keeps its share and `since`, and
        takes the node's `load` and the image's `want` now (its place moves if they
        changed)."""
        host = canonical_registry(registry)
        limit = self.budget.limit_for(host)
        if limit is None:
            return Grant(slot=None, reason="registry not paced")
        held = self._leases.get(token)
        if held is not None:
            return held
        previous = self._requests.get(token)
        if previous is None:
            key = (host, holder)
            share = self._outstanding.get(key, 0)
            self._outstanding[key] = share + 1
            since = now
        else:
            share, since = previous.share, previous.since
        mine = Request(host, holder, token, priority, since, now + self.ttl, share, load, want)
        self._requests[token] = mine
        if previous is None or previous.rank() != mine.rank():
            heapq.heappush(self._queue.setdefault(host, []), (mine.rank(), token))
        granted = self._grant_waiting(host, now)
        return self._leases[token] if any(g.token == token for g in granted) else None

    def cancel(self, token: str) -> None:
        """Withdraw a waiting request (the pull went away before it got a lease)."""
        request = self._requests.pop(token, None)
        if request is not None:
            self._done(request.registry, request.holder)

    def _done(self, host: str, holder: str) -> None:
        key = (host, holder)
        left = self._outstanding.get(key, 0) - 1
        if left > 0:
            self._outstanding[key] = left
        else:
            self._outstanding.pop(key, None)

    def release(self, token: str, now: float) -> list[Lease]:
        """Free the lease of `token` (or withdraw its request); return the leases granted."""
        self.cancel(token)
        if token not in self._leases:
            return []
        return self._grant_waiting(self._drop(token), now)

    def _drop(self, token: str) -> str:
        lease = self._leases.pop(token)
        self._done(lease.registry, lease.holder)
        self._held[lease.registry].discard(token)
        heapq.heappush(self._free[lease.registry], lease.slot)
        return lease.registry

    def renew(self, token: str, now: float) -> Lease | None:
        lease = self._leases.get(token)
        if lease is None or lease.expires_at <= now:
            return None
        fresh = renewed(lease, now, self.ttl)
        self._leases[token] = fresh
        return fresh

    def expire(self, now: float) -> list[Lease]:
        """Drop lapsed leases and requests; return the leases granted to waiters as a result."""
        registries = {
            self._drop(token)
            for token in [t for t, lease in self._leases.items() if lease.expires_at <= now]
        }
        for token in [t for t, r in self._requests.items() if r.expires_at <= now]:
            lapsed = self._requests.pop(token)
            self._done(lapsed.registry, lapsed.holder)
            registries.add(lapsed.registry)
        granted: list[Lease] = []
        for registry in sorted(registries):
            granted.extend(self._grant_waiting(registry, now))
        return granted

    def _grant_waiting(self, host: str, now: float) -> list[Lease]:
        limit = self.budget.limit_for(host)
        assert limit is not None
        free = self._free.get(host)
        if free is None:
            free = self._free[host] = list(range(limit))
            self._held[host] = set()
        queue = self._queue.get(host, [])
        granted: list[Lease] = []
        while free and queue:
            rank, token = heapq.heappop(queue)
            request = self._requests.get(token)
            if request is None or request.rank() != rank:
                continue  # withdrawn, granted or re-ranked since it was queued
            if request.expires_at <= now:
                self.cancel(token)
                continue
            granted.append(self._take(request, heapq.heappop(free), now))
        return granted

    def _take(self, request: Request, slot: int, now: float) -> Lease:
        r = request
        lease = Lease(r.registry, slot, r.holder, r.token, r.priority, now, now + self.ttl)
        del self._requests[request.token]
        self._leases[request.token] = lease
        holders = self._held[request.registry]
        holders.add(request.token)
        self.peak[request.registry] = max(self.peak.get(request.registry, 0), len(holders))
        return lease
