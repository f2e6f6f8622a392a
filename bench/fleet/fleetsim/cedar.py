"""Cedar's puller on every node, driven by the simulated clock: Cedar's own decision code.

Per node this is `cedar.puller.reconcile.Reconciler.reconcile` and `cedar.puller.pulls.Pulls`
with their I/O replaced by the simulated engine: the same calls, in the same order, to
Cedar's pure code (desired set, `plan`, `observe_present`, `on_evicted`,
`on_pull_started/succeeded/failed` with backoff and refresh jitter, `prune.decide`), to
Cedar's registry breaker (`RegistryProbe`, whose only I/O, the `/v2/` GET, asks the
simulated registry) and to Cedar's error classifier (`cedar.puller.engine.classify`).
A pass runs after every change of the desired set and every finished pull, when `plan`
says something falls due, and at the next resync tick after the engine changed under the
puller (kubelet GC, a kubelet pull): the passes the real loop would make that could start
anything. (Resync passes with nothing changed and nothing due start nothing; they are
skipped.)

`cedar-paced` adds the two features of issue 15, with their pure modules: every pull from
a registry with a fleet budget takes a lease of `cedar.puller.pacing.LeaseTable` first (the
table stands for the NATS KV bucket; no puller crashes here, so leases are never renewed or
left to expire), a warming node's pulls before missing images before refreshes, and a
node's own refreshes waiting for a lease give way to its missing images
(`pacing.to_withdraw`); and new nodes join with `cedar.io/warming:NoSchedule`, lifted when
`cedar.puller.warmup.decide` says so. A lease request carries the node's load, read by
Cedar's `cedar.puller.pulls.NodeLoad` from the simulated engine's running containers (at
most `LOAD_MAX_AGE` old), and the image's `want` (`DesiredSet.want`), and is asked again
with both while it waits, as `LeaseStore.acquire` writes it again when the load changed
and at each renewal.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any

from cedar.proto.imageref import parse
from cedar.puller.desired import Change, DesiredSet
from cedar.puller.engine import classify
from cedar.puller.pacing import (
    DEFAULT_LEASE_TTL,
    LeaseTable,
    parse_fleet_pulls,
    priority_of,
    to_withdraw,
)
from cedar.puller.plan import (
    PERMANENT_REASONS,
    ImageRecord,
    Policy,
    observe_present,
    on_evicted,
    on_pull_failed,
    on_pull_started,
    on_pull_succeeded,
    plan,
)
from cedar.puller.prune import LocalImage, Scope, decide, is_desired
from cedar.puller.pulls import NodeLoad
from cedar.puller.warmup import decide as gate_decide
from fleetsim.cedar_parts import (
    _DIGEST,
    PACED,
    Attempt,
    CedarSettings,
    CedarStats,
    SimProbe,
    _is_digest,
    _valid,
    run_sync,
)

if TYPE_CHECKING:
    from fleetsim.cluster import Cluster, Node

# LeaseStore.acquire writes a waiting request again at a third of the TTL (renew_due).
RENEW_EVERY = DEFAULT_LEASE_TTL / 3.0


class CedarStrategy:
    def __init__(self, paced: bool, settings: CedarSettings | None = None) -> None:
        base = settings or CedarSettings()
        if paced and not base.fleet_pulls:
            base = CedarSettings(**{**vars(base), "fleet_pulls": PACED})
        self.settings = base
        self.name = "cedar-paced" if paced else "cedar"
        self.gated = paced
        self.stats = CedarStats()
        self.table: LeaseTable | None = None
        self.waiting: dict[str, tuple[CedarPuller, Attempt]] = {}
        self.pullers: dict[str, CedarPuller] = {}

    def start(self, cluster: Cluster) -> None:
        self.cluster = cluster
        budget = parse_fleet_pulls(self.settings.fleet_pulls)
        if budget.enabled:
            self.table = LeaseTable(budget, ttl=1e12)
        self.scope = Scope.from_settings(None, self.settings.prune_repositories)

    def initial_images(self, node: Node) -> list[str]:
        return self.cluster.feed.current_images(node.pool)

    def node_ready(self, node: Node, initial: bool) -> None:
        puller = CedarPuller(self, node)
        node.agent = puller
        self.pullers[node.name] = puller
        delay = 0.0 if initial else self.settings.start_delay
        self.cluster.sim.at(self.cluster.sim.now + delay, puller.start)

    def node_deleted(self, node: Node) -> None:
        puller = self.pullers.pop(node.name, None)
        if puller is not None:
            puller.stop()

    def granted(self, leases: list[Any]) -> None:
        for lease in leases:
            entry = self.waiting.pop(lease.token, None)
            if entry is None:
                assert self.table is not None
                self.granted(self.table.release(lease.token, self.cluster.sim.now))
                continue
            puller, attempt = entry
            puller.go(attempt)

    def finish(self) -> None:
        s = self.stats
        extra = self.cluster.metrics.extra
        extra["cedar"] = {
            "passes": s.passes,
            "pulls": s.pulls,
            "refreshes": s.refreshes,
            "failures": dict(sorted(s.failures.items())),
            "evictions_seen": s.evictions,
            "refresh_waits_withdrawn": s.withdrawn,
            "pruned": s.pruned,
            "gate_lifted_warm": s.gate_warm,
            "gate_lifted_timeout": s.gate_timeout,
        }
        if self.table is not None:
            self.cluster.metrics.lease_peak = dict(self.table.peak)
            extra["fleet_budget"] = self.settings.fleet_pulls


class CedarPuller:
    """One node's puller (see the module docstring)."""

    def __init__(self, strategy: CedarStrategy, node: Node) -> None:
        cluster = strategy.cluster
        s = strategy.settings
        self.strategy = strategy
        self.cluster = cluster
        self.sim = cluster.sim
        self.node = node
        self.s = s
        self.policy = Policy(
            refresh_interval=s.refresh_interval,
            refresh_jitter=s.refresh_jitter,
            backoff_base=s.backoff_base,
            backoff_max=s.backoff_max,
            permanent_retry=s.permanent_retry,
            node=node.name,
        )
        self.rng = random.Random(f"{cluster.trace.header.get('seed')}:{node.name}")
        self.probe = SimProbe(cluster.registries, lambda: self.sim.now, s)
        self.records: dict[str, ImageRecord] = {}
        self.in_flight: dict[str, Attempt] = {}
        self.desired: DesiredSet | None = None
        self.version = 0
        self.timer_at = math.inf
        self.last_pass = -math.inf
        self.stopped = False
        self.warm = False
        self.lift_asked = False
        self.tracking_dirty = True
        self.undesired_since: dict[str, float] = {}
        self.prune_due = 0.0
        self.local: dict[str, LocalImage] = {}
        self.attempts = 0
        self.load = NodeLoad(node.engine, clock=lambda: self.sim.now)
        self.load_ticking = False  # a look at the load of the waiting requests is due

    # --- life

    def start(self) -> None:
        if self.stopped or self.node.state == "deleted":
            return
        self.desired = self.cluster.feed.subscribe(
            self.node.name, self.node.labels, self.node.taints, self.note_change
        )
        self.schedule(self.sim.now)

    def stop(self) -> None:
        self.stopped = True
        table = self.strategy.table
        for attempt in list(self.in_flight.values()):
            attempt.done = True
            if table is not None:
                self.strategy.waiting.pop(attempt.token, None)
                self.strategy.granted(table.release(attempt.token, self.sim.now))
        self.in_flight.clear()
        if self.desired is not None:
            self.cluster.feed.unsubscribe(
                self.node.name, self.node.labels, self.node.taints, self.note_change
            )

    def note_change(self, change: Change) -> None:
        """Reconciler.note_change: new images get a record; a pass follows."""
        for image in change.added:
            self.records.setdefault(image, ImageRecord(image))
        self.tracking_dirty = True
        self.schedule(self.sim.now + 0.01)

    def engine_changed(self, ref: str, added: bool) -> None:
        """The engine's images changed: seen by the next pass, or the next resync's."""
        self.tracking_dirty = True
        if ref in self.in_flight or self.last_pass == -math.inf:
            return  # the pull's own end (or the first pass) brings a pass
        period = self.s.resync_interval
        due = self.last_pass + period * max(1, math.ceil((self.sim.now - self.last_pass) / period))
        self.schedule(due)

    def schedule(self, t: float) -> None:
        if self.stopped or t >= self.timer_at:
            return
        self.timer_at = t
        self.version += 1
        self.sim.at(t, self._fire, self.version)

    def _fire(self, version: int) -> None:
        if version != self.version or self.stopped:
            return
        self.timer_at = math.inf
        self.reconcile()

    # --- one pass: Reconciler.reconcile

    def reconcile(self) -> None:
        desired = self.desired
        assert desired is not None
        now = self.sim.now
        self.last_pass = now
        self.strategy.stats.passes += 1
        engine = self.node.engine
        records, in_flight, policy = self.records, self.in_flight, self.policy
        images = desired.images()
        present: dict[str, str | None] = {}
        store = engine.images
        digests = _DIGEST
        for image in images:
            record = records.get(image)
            if record is None:
                record = records[image] = ImageRecord(image)
            found = store.get(image)
            if found is not None:
                digest = present[image] = found.spec.digest
                by_digest = digests.get(image)
                if by_digest is None:
                    by_digest = _is_digest(image)
                observe_present(record, policy, digest, now, by_digest=by_digest)
            elif image not in in_flight and _valid(image) and record.settled_at < now:
                if record.brought:
                    on_evicted(record, policy, now, self.rng)
                    self.strategy.stats.evictions += 1
                elif record.state == "present":
                    record.state = "missing"
        if len(records) > len(images):
            for image in [i for i in records if i not in desired and i not in in_flight]:
                del records[image]

        result = self._plan(images, present, now)
        for image, why in result.invalid:
            record = records[image]
            if record.reason != "invalid_reference":
                record.state, record.reason, record.error = "failed", "invalid_reference", why
        for image, kind in result.pulls:
            self._start(image, kind)

        self._check_warm(images, present, now)
        wakeups = [result.next_wakeup, self.probe.next_retry()]
        if not self.strategy.scope.empty:
            self._track_and_prune(images, now)
            wakeups.append(self.prune_due)
        if self.node.warming:
            wakeups.append(self.node.created + self.s.warm_timeout)
        due = [t for t in wakeups if t is not None]
        if due:
            self.schedule(max(min(due), now + 0.05))

    def _plan(self, images: list[str], present: dict[str, str | None], now: float) -> Any:
        desired = self.desired
        assert desired is not None
        slots = self.s.max_concurrent_pulls - len(self.in_flight)
        down = self.probe.open_breakers()
        result = plan(
            images,
            desired.priority,
            present,
            self.in_flight,
            self.records,
            now=now,
            slots=slots,
            registry_down=down,
        )
        if self.strategy.table is None or len(result.pulls) < max(slots, 0):
            return result  # a free slot is left: nothing waits for one
        waiting = {a.token: a.priority for a in self.in_flight.values() if a.waiting}
        if not waiting:
            return result
        chosen = sum(1 for _, kind in result.pulls if kind == "pull")
        wide = plan(
            images,
            desired.priority,
            present,
            self.in_flight,
            self.records,
            now=now,
            slots=slots + len(waiting),
            registry_down=down,
        )
        blocked = sum(1 for _, kind in wide.pulls if kind == "pull") - chosen
        if blocked <= 0:
            return result
        mine = priority_of("pull", node_warming=self.node.warming)
        tokens = set(to_withdraw(waiting, blocked=mine, count=blocked))
        for attempt in [a for a in self.in_flight.values() if a.token in tokens]:
            self._withdraw(attempt)
        return plan(
            images,
            desired.priority,
            present,
            self.in_flight,
            self.records,
            now=now,
            slots=self.s.max_concurrent_pulls - len(self.in_flight),
            registry_down=down,
        )

    def _withdraw(self, attempt: Attempt) -> None:
        table = self.strategy.table
        assert table is not None
        table.cancel(attempt.token)
        self.strategy.waiting.pop(attempt.token, None)
        attempt.done = True
        attempt.record.state = "present" if attempt.kind == "refresh" else "missing"
        self.in_flight.pop(attempt.image, None)
        self.strategy.stats.withdrawn += 1

    def _check_warm(self, images: list[str], present: dict[str, str | None], now: float) -> None:
        """Reconciler._check_warm, and the warm-up gate."""
        if self.warm and not self.node.warming:
            return
        unpullable = {
            i
            for i, r in self.records.items()
            if r.state == "failed" and r.reason in PERMANENT_REASONS
        }
        if not self.warm and all(i in present or i in unpullable for i in images):
            self.warm = True
        if self.node.warming and not self.lift_asked:
            decision = gate_decide(
                tainted=True,
                loaded=True,
                desired=images,
                present=present,
                unpullable=unpullable,
                since=self.node.created,
                now=now,
                timeout=self.s.warm_timeout,
            )
            if decision.remove:
                self.lift_asked = True
                if decision.reason == "warm":
                    self.strategy.stats.gate_warm += 1
                else:
                    self.strategy.stats.gate_timeout += 1
                self.cluster.lift_warming(self.node)

    def _track_and_prune(self, images: list[str], now: float) -> None:
        """Pruner.track_and_prune: the clocks move only when the listing or the set did."""
        prune_now = now >= self.prune_due
        if not (prune_now or self.tracking_dirty):
            return
        self.tracking_dirty = False
        engine = self.node.engine
        local = []
        for ref, present in engine.images.items():
            image = self.local.get(ref)
            if image is None:
                image = self.local[ref] = LocalImage(
                    id=f"id:{ref}", repo_tags=(ref,), labels=present.spec.labels
                )
            local.append(image)
        wanted = set(images) | set(self.in_flight)
        used = {f"id:{ref}" for ref, p in engine.images.items() if p.in_use} if prune_now else set()
        decision = decide(
            local,
            wanted,
            self.undesired_since,
            used,
            scope=self.strategy.scope,
            now=now,
            prune_after=self.s.prune_after if prune_now else math.inf,
        )
        self.undesired_since.update(decision.track)
        for image_id in decision.forget:
            self.undesired_since.pop(image_id, None)
        if not prune_now:
            return
        self.prune_due = now + self.s.prune_interval
        for image in decision.remove:
            if is_desired(image, set(images)):
                continue
            if engine.remove(image.repo_tags[0]) or image.repo_tags[0] not in engine.images:
                self.strategy.stats.pruned += 1
                self.undesired_since.pop(image.id, None)

    # --- pulls: Pulls.start / Pulls._pull

    def _start(self, image: str, kind: str) -> None:
        record = self.records[image]
        on_pull_started(record)
        self.attempts += 1
        attempt = Attempt(image, kind, record, token=f"{self.node.name}/{image}/{self.attempts}")
        self.in_flight[image] = attempt
        ref = parse(image)
        attempt.registry = ref.registry
        if not run_sync(self.probe.is_up(ref.registry, ref.api_host)):
            # Not a failure of this image: it waits behind the registry's breaker.
            record.state = "present" if kind == "refresh" else "missing"
            record.reason = None if kind == "refresh" else "registry_down"
            self._end(attempt)
            return
        table = self.strategy.table
        if table is not None:
            attempt.priority = priority_of(
                "refresh" if kind == "refresh" else "pull", node_warming=self.node.warming
            )
            attempt.load = run_sync(self.load.current())
            attempt.want = self.desired.want(image) if self.desired is not None else 0.0
            attempt.written_at = self.sim.now
            granted = table.request(
                ref.registry,
                self.node.name,
                attempt.token,
                attempt.priority,
                self.sim.now,
                load=attempt.load,
                want=attempt.want,
            )
            if granted is None:
                attempt.waiting = True
                self.strategy.waiting[attempt.token] = (self, attempt)
                self._tick_load()
                return
        self.go(attempt)

    def _tick_load(self) -> None:
        if not self.load_ticking:
            self.load_ticking = True
            self.sim.at(self.sim.now + self.load.max_age, self._look_at_load)

    def _look_at_load(self) -> None:
        """LeaseStore.acquire's loop: a waiting request is written again, with the image's
        current `want`, when the node's load changed (NodeLoad lists at most every
        `max_age`) and when its renewal is due (a third of the lease TTL)."""
        self.load_ticking = False
        waiting = [a for a in self.in_flight.values() if a.waiting and not a.done]
        table = self.strategy.table
        desired = self.desired
        if self.stopped or not waiting or table is None or desired is None:
            return
        load = run_sync(self.load.current())
        now = self.sim.now
        for attempt in waiting:
            if attempt.load == load and now - attempt.written_at < RENEW_EVERY:
                continue
            attempt.load = load
            attempt.want = desired.want(attempt.image)
            attempt.written_at = now
            granted = table.request(
                attempt.registry,
                self.node.name,
                attempt.token,
                attempt.priority,
                now,
                load=load,
                want=attempt.want,
            )
            if granted is not None:
                self.strategy.waiting.pop(attempt.token, None)
                self.go(attempt)
        self._tick_load()

    def go(self, attempt: Attempt) -> None:
        """The lease (if any) is held: the engine pull starts."""
        if attempt.done or self.stopped:
            self._release(attempt)
            return
        attempt.waiting = False
        stats = self.strategy.stats
        if attempt.kind == "refresh":
            stats.refreshes += 1
        else:
            stats.pulls += 1

        def pulled(ok: bool, error: str) -> None:
            self._pulled(attempt, ok, error, None)

        attempt.callback = pulled
        attempt.pull = self.node.engine.pull(attempt.image, pulled)
        self.sim.at(self.sim.now + self.s.pull_timeout, self._timeout, attempt)

    def _timeout(self, attempt: Attempt) -> None:
        if attempt.done:
            return
        if attempt.pull is not None and attempt.callback is not None:
            self.node.engine.give_up(attempt.pull, attempt.callback)
        self._pulled(
            attempt, False, f"pull did not finish within {self.s.pull_timeout:.0f}s", "timeout"
        )

    def _release(self, attempt: Attempt) -> None:
        table = self.strategy.table
        if table is not None:
            self.strategy.granted(table.release(attempt.token, self.sim.now))

    def _pulled(self, attempt: Attempt, ok: bool, error: str, reason: str | None) -> None:
        if attempt.done:
            return
        attempt.done = True
        self._release(attempt)
        if self.stopped:
            return
        record, now = attempt.record, self.sim.now
        if ok:
            digest = self.node.engine.digest(attempt.image)
            on_pull_succeeded(record, self.policy, digest, now, by_digest=False)
        else:
            why = reason or classify(error)
            failures = self.strategy.stats.failures
            failures[why] = failures.get(why, 0) + 1
            if why == "registry_down":
                self.probe.mark_down(attempt.registry, error)
            on_pull_failed(
                record,
                self.policy,
                reason=why,
                error=error,
                now=now,
                rng=self.rng,
                present=attempt.kind == "refresh",
            )
        self._end(attempt)

    def _end(self, attempt: Attempt) -> None:
        if self.in_flight.get(attempt.image) is attempt:
            del self.in_flight[attempt.image]
        self.schedule(self.sim.now + 0.01)
