"""The warm-up gate, carried out: remove `cedar.io/warming` from this node's Node object.

I/O: the Kubernetes API through cedar.runtime.kube — a get of this one Node (its taints as
stored, and its creationTimestamp) and a JSON patch of its `spec.taints` — and the gate's
metrics. When to lift is `cedar.puller.warmup.decide` (pure); which patch is
`warmup.removal_patch`: it `test`s the taints it read and replaces them with the same list
minus the warming taint, so a concurrent change of the taints (by kubectl, the node
lifecycle controller) fails the patch (422) instead of being overwritten; the gate then
reads the Node again and retries. Nothing else of the Node is ever written, and only this
node's: the ValidatingAdmissionPolicy in deploy/puller/warm-gate/ holds the puller's
ServiceAccount to exactly that.

The timeout counts from the Node's creation (a puller restarted on a node that is still
tainted does not start the clock again), or from when this puller first saw the taint if
it was added later. Without the API (static labels and taints) there is nothing to patch:
the gate only opens in this puller's own bookkeeping (pull priorities), once. A refusal
(403: the warm-gate component is not installed) is logged with what to do and retried
slowly; the API being away is retried with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable
from datetime import datetime
from typing import Any

from cedar.proto.scheduling import NodeInfo
from cedar.puller import metrics
from cedar.puller.warmup import (
    WARMING_TAINT_EFFECT,
    WARMING_TAINT_KEY,
    GateDecision,
    decide,
    has_warming_taint,
    removal_patch,
)
from cedar.runtime.backoff import Backoff
from cedar.runtime.kube import (
    Forbidden,
    KubeClient,
    KubeError,
    NotFound,
    Unavailable,
    resource_path,
)

log = logging.getLogger("cedar.puller.gate")

JSON_PATCH = "application/json-patch+json"
# A 422 answer to the patch: its `test` failed, the taints changed since they were read.
_CONFLICT_RETRY = 0.2
_ATTEMPTS = 5


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class WarmGate:
    def __init__(
        self,
        *,
        node: str,
        client: KubeClient | None,
        timeout: float,
        initial: NodeInfo,
        on_done: Callable[[], None] = lambda: None,
        started: float | None = None,
    ) -> None:
        self.node = node
        self.client = client
        self.timeout = timeout
        self.on_done = on_done  # called when a removal attempt ends (the next pass sees it)
        self.started = time.time() if started is None else started
        self.tainted = has_warming_taint(initial)
        self.lifted = False  # this puller removed it (or, without the API, would have)
        self.since: float | None = None  # when the clock started (wall seconds)
        self.created: float | None = None  # the Node's creationTimestamp
        self.last: GateDecision | None = None
        self.retry_at = 0.0  # monotonic: no attempt before
        self._backoff = Backoff(base=2.0, cap=300.0, floor=0.5)
        self._task: asyncio.Task[None] | None = None
        self._export()

    @property
    def warming(self) -> bool:
        """The node is held out of service for its warm-up: its pulls come first."""
        return self.tainted and not self.lifted

    def _export(self) -> None:
        metrics.WARMING.set(1 if self.warming else 0)

    def node_changed(self, node: NodeInfo) -> None:
        tainted = has_warming_taint(node)
        if tainted and not self.tainted:
            self.lifted = False
            if self.since is not None:  # added while this puller runs: its clock starts now
                self.since = time.time()
        elif not tainted and self.tainted:
            log.info("the warm-up taint is gone from this node", extra={"node": self.node})
        self.tainted = tainted
        self._export()

    async def start(self) -> None:
        """Read the Node's creation time (only a tainted node needs it)."""
        if self.tainted and self.client is not None:
            try:
                obj = await self.client.get(resource_path("Node", name=self.node))
            except KubeError as err:
                log.warning(
                    "cannot read this Node's creation time; the warm-up timeout counts from "
                    "the puller's start",
                    extra={"status": err.status, "error": err.message},
                )
            else:
                self.created = _timestamp((obj.get("metadata") or {}).get("creationTimestamp"))
        self.since = self.created if self.created is not None else self.started

    def check(
        self,
        *,
        loaded: bool,
        desired: Iterable[str],
        present: Collection[str],
        unpullable: Collection[str],
    ) -> GateDecision | None:
        """Decide; start the removal in the background when it is due. None: not tainted."""
        if not self.warming:
            return None
        since = self.since if self.since is not None else self.started
        decision = decide(
            tainted=True,
            loaded=loaded,
            desired=desired,
            present=present,
            unpullable=unpullable,
            since=since,
            now=time.time(),
            timeout=self.timeout,
        )
        self.last = decision
        if decision.remove and time.monotonic() >= self.retry_at and not self._running():
            self._task = asyncio.create_task(self._lift(decision), name="warm-gate")
        return decision

    def _running(self) -> bool:
        return self._task is not None and not self._task.done()

    def next_due(self) -> float | None:
        """Monotonic time the gate wants a pass at: its deadline, or a retry."""
        if not self.warming or self._running():
            return None  # a removal in flight calls on_done when it ends
        if self.last is not None and self.last.remove:
            return max(self.retry_at, time.monotonic() + 0.05)
        since = self.since if self.since is not None else self.started
        return time.monotonic() + max(0.0, since + self.timeout - time.time())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _lift(self, decision: GateDecision) -> None:
        try:
            await self._lift_once(decision)
        finally:
            self.on_done()

    async def _lift_once(self, decision: GateDecision) -> None:
        extra: dict[str, Any] = {
            "node": self.node,
            "reason": decision.reason,
            "missing": decision.missing_count,
        }
        if decision.missing:
            extra["missing_images"] = list(decision.missing)
        if self.client is None:
            self.lifted = True
            self._export()
            log.warning(
                "the warm-up gate opened, but without the Kubernetes API this puller cannot "
                f"remove {WARMING_TAINT_KEY}:{WARMING_TAINT_EFFECT} from its Node",
                extra=extra,
            )
            return
        try:
            removed = await self._patch()
        except Forbidden as err:
            self._failed(
                "forbidden",
                err,
                "the puller may not patch its Node: install "
                "deploy/puller/warm-gate (RBAC and admission policy)",
            )
            return
        except NotFound as err:
            self._failed("error", err, "this node's Node object is gone")
            return
        except Unavailable as err:
            self._failed("unavailable", err, "the Kubernetes API is unavailable")
            return
        except KubeError as err:
            self._failed("conflict" if err.status == 422 else "error", err, "")
            return
        self._backoff.reset()
        self.lifted = True
        self._export()
        if removed:
            metrics.GATE_LIFTED.labels(reason=decision.reason).inc()
            log.info("warm-up taint removed: the node takes tenants now", extra=extra)
        else:
            log.info("the warm-up taint was already gone", extra=extra)

    async def _patch(self) -> bool:
        """Remove the taint; False if it was already gone. Retries lost races (422)."""
        assert self.client is not None
        path = resource_path("Node", name=self.node)
        for attempt in range(_ATTEMPTS):
            obj = await self.client.get(path)
            patch = removal_patch((obj.get("spec") or {}).get("taints"))
            if patch is None:
                return False
            try:
                await self.client.request("PATCH", path, body=patch, content_type=JSON_PATCH)
            except KubeError as err:
                if err.status != 422 or attempt == _ATTEMPTS - 1:
                    raise
                metrics.GATE_ERRORS.labels(reason="conflict").inc()
                log.info(
                    "this Node's taints changed while the warm-up taint was being removed; "
                    "reading it again",
                    extra={"error": err.message},
                )
                await asyncio.sleep(_CONFLICT_RETRY * (attempt + 1))
                continue
            return True
        return False  # not reached: the last attempt raises

    def _failed(self, reason: str, err: KubeError, hint: str) -> None:
        metrics.GATE_ERRORS.labels(reason=reason).inc()
        delay = self._backoff.next_delay()
        self.retry_at = time.monotonic() + delay
        log.warning(
            "cannot remove the warm-up taint; retrying" + (f" ({hint})" if hint else ""),
            extra={
                "node": self.node,
                "status": err.status,
                "error": err.message,
                "retry_in": round(delay, 1),
            },
        )
