"""List then watch one kind, forever. I/O: the Kubernetes API through cedar.runtime.kube.

What it reads goes into the `WatchState`; the publisher is woken through `notify`.

A paginated list gives a consistent snapshot and its resourceVersion; the watch continues
from there, with bookmarks keeping the resourceVersion fresh. A watch that ends normally, or
that sent nothing for the client's idle timeout (`Stalled`: longer than the server's
bookmark interval), is renewed from the last resourceVersion seen. `410 Gone` (history
compacted), a broken stream or any API error leads to a full relist, diffed against what is
known so that objects deleted in the gap get their deletion markers. Errors back off with
full jitter, never sooner than the server's Retry-After; a 410 relists at once, but 410s
that follow each other with nothing in between (a server that answers every watch so) back
off too, so no fault makes a hot loop. A kind the service account may not list is reported
once (log and metric), retried slowly, and does not hold up the other kinds or readiness.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cedar.runtime.backoff import Backoff, after
from cedar.runtime.health import Health
from cedar.runtime.kube import (
    Forbidden,
    Gone,
    KubeClient,
    KubeError,
    Stalled,
    Unavailable,
    resource_path,
)
from cedar.watcher import metrics
from cedar.watcher.messages import NAMESPACE
from cedar.watcher.watch_state import Report, WatchState

log = logging.getLogger("cedar.watcher.informer")

# A forbidden kind is retried slowly: only a permission change can fix it.
FORBIDDEN_RETRY_MIN_SECONDS = 5.0


def health_check_name(kind: str) -> str:
    return f"synced:{kind}"


class Informer:
    def __init__(
        self,
        kind: str,
        client: KubeClient,
        state: WatchState,
        notify: Callable[[], None],
        health: Health,
        *,
        namespace: str | None = None,
        page_size: int = 500,
        watch_timeout: int = 300,
        on_synced: Callable[[str], None] | None = None,
    ) -> None:
        self.kind = kind
        self.client = client
        self.state = state
        self.notify = notify
        self.health = health
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.params: dict[str, str] = {}
        if kind == NAMESPACE:
            self.path = resource_path(kind)
            if namespace:
                self.params["fieldSelector"] = f"metadata.name={namespace}"
        else:
            self.path = resource_path(kind, namespace)
        self.resource_version: str | None = None
        self.synced = False
        self.delivered = False  # whether the last watch sent any event
        self.on_synced = on_synced
        self._forbidden = False
        self._events = {
            t: metrics.EVENTS.labels(kind=kind, type=t)
            for t in ("LISTED", "ADDED", "MODIFIED", "DELETED", "BOOKMARK")
        }
        self._workloads = metrics.WORKLOADS.labels(kind=kind)
        self._last_sync = metrics.LAST_SYNC.labels(kind=kind)

    async def run(self) -> None:
        backoff = Backoff(base=0.5, cap=30.0)
        # 410s with no event in between: the first relists at once, the next ones wait.
        expired = Backoff(base=2.0, cap=30.0, floor=0.5)
        expired_in_a_row = 0
        reason = "start"
        while True:
            try:
                if self.resource_version is None:
                    self.resource_version = await self.relist(reason)
                    backoff.reset()
                await self.watch()
                if self.delivered:
                    expired_in_a_row = 0
                    expired.reset()
                continue  # the server ended the watch normally: renew it
            except Gone:
                reason = "expired"
                self.resource_version = None
                if self.delivered:
                    expired_in_a_row = 0
                    expired.reset()
                expired_in_a_row += 1
                delay = expired.next_delay() if expired_in_a_row > 1 else 0.0
                log.info(
                    "%s: resourceVersion expired; relisting%s",
                    self.kind,
                    f" in {delay:.1f}s (410 {expired_in_a_row} times in a row)" if delay else "",
                )
                if delay:
                    await asyncio.sleep(delay)
                continue  # a first 410: a relist right away is the cure, no need to wait
            except Forbidden as err:
                self._report_forbidden(err)
                reason = "error"
                delay = max(backoff.next_delay(), FORBIDDEN_RETRY_MIN_SECONDS)
            except KubeError as err:
                reason = "stream_broken" if err.reason == "StreamBroken" else "error"
                retry_after = err.retry_after if isinstance(err, Unavailable) else None
                delay = after(backoff.next_delay(), retry_after)
                log.warning(
                    "%s: %s; relisting in %.1fs",
                    self.kind,
                    err,
                    delay,
                    extra={"kind": self.kind, "status": err.status},
                )
            except ValueError as err:  # an undecodable line or page
                metrics.BAD_OBJECTS.labels(kind=self.kind, reason="undecodable").inc()
                reason = "error"
                delay = backoff.next_delay()
                log.warning("%s: undecodable response (%s); relisting", self.kind, err)
            self.resource_version = None
            await asyncio.sleep(delay)

    def _report_forbidden(self, err: KubeError) -> None:
        metrics.FORBIDDEN.labels(kind=self.kind).set(1)
        if not self._forbidden:
            self._forbidden = True
            log.error(
                "the service account may not list/watch %s: %s — images of this kind are not "
                "kept warm; grant list and watch on it, or remove it from CEDAR_WATCH_KINDS",
                self.kind,
                err.message or err,
                extra={"kind": self.kind},
            )
        # It cannot sync until permissions change; the other kinds keep the service useful.
        self.health.set(health_check_name(self.kind), True)

    async def relist(self, reason: str) -> str:
        metrics.RELISTS.labels(kind=self.kind, reason=reason).inc()
        self.delivered = False
        self.state.begin_list(self.kind)
        rv = ""
        listed = self._events["LISTED"]
        async for items, list_rv in self.client.list_pages(
            self.path, limit=self.page_size, params=self.params
        ):
            apply = self.state.apply
            for obj in items:
                reports = apply(self.kind, "LISTED", obj)
                if reports:
                    self._report(reports)
            listed.inc(len(items))
            rv = list_rv
            self.notify()
            await asyncio.sleep(0)  # let the publisher send what this page produced
        self.state.end_list(self.kind)
        await self._refetch()
        self.notify()
        self._workloads.set(self.state.count(self.kind))
        self._last_sync.set(time.time())
        if self._forbidden:
            self._forbidden = False
            metrics.FORBIDDEN.labels(kind=self.kind).set(0)
            log.info("%s can be listed again", self.kind)
        if not self.synced:
            self.synced = True
            metrics.SYNCED.labels(kind=self.kind).set(1)
            self.health.set(health_check_name(self.kind), True)
            if self.on_synced is not None:
                self.on_synced(self.kind)
            log.info(
                "%s: first full sync done",
                self.kind,
                extra={"kind": self.kind, "objects": self.state.count(self.kind)},
            )
        return rv

    async def watch(self) -> None:
        """Follow the watch until the server ends it (`delivered`: whether it sent anything).

        A watch that sends nothing for the client's idle timeout ends here too (it is
        renewed from the last resourceVersion; a relist is not needed for that).
        """
        assert self.resource_version is not None
        self.delivered = False
        try:
            await self._follow()
        except Stalled as err:
            log.warning(
                "%s: the watch sent nothing for too long (%s); watching again from %s",
                self.kind,
                err,
                self.resource_version,
                extra={"kind": self.kind},
            )

    async def _follow(self) -> None:
        assert self.resource_version is not None
        apply = self.state.apply
        outbox = self.state.outbox
        async for event in self.client.watch(
            self.path,
            self.resource_version,
            timeout_seconds=self.watch_timeout,
            params=self.params,
        ):
            self.delivered = True
            type_ = event.get("type")
            obj = event.get("object")
            if not isinstance(obj, dict):
                continue
            meta = obj.get("metadata")
            rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
            if type_ == "BOOKMARK":
                self._events["BOOKMARK"].inc()
                if rv:
                    self.resource_version = str(rv)
                self._last_sync.set(time.time())
                continue
            if type_ not in ("ADDED", "MODIFIED", "DELETED"):
                continue
            self._events[type_].inc()
            queued = outbox.queued
            reports = apply(self.kind, type_, obj)
            if reports:
                self._report(reports)
            if rv:
                self.resource_version = str(rv)
            if type_ != "MODIFIED":
                self._workloads.set(self.state.count(self.kind))
            if self.state.refetch and self.kind == "ReplicaSet":
                await self._refetch()
            if outbox.queued != queued:
                self.notify()

    async def _refetch(self) -> None:
        """Read again the revisions that are kept anew but whose message was not kept.

        By a list with a `metadata.name` field selector, not a get: the watcher's RBAC grants
        list and watch only (deploy/watcher/rbac.yaml), and a get would be refused.
        """
        while self.state.refetch and self.kind == "ReplicaSet":
            namespace, name = self.state.refetch.pop()
            params = {"fieldSelector": f"metadata.name={name}"}
            async for items, _ in self.client.list_pages(
                resource_path(self.kind, namespace), limit=1, params=params
            ):
                for obj in items:  # none: deleted meanwhile, its DELETED event follows
                    self._report(self.state.apply(self.kind, "MODIFIED", obj))

    def _report(self, reports: list[Report]) -> None:
        for report in reports:
            metrics.BAD_OBJECTS.labels(kind=report.kind, reason=report.reason).inc()
            log.warning(
                "bad object %s: %s (%s)",
                report.identity,
                report.reason,
                report.detail[:500],
                extra={"object": report.identity, "reason": report.reason},
            )
