"""The watchdog: pods of labelled namespaces that run at another level are reported.

Admission stops new pods from running at the wrong level; pods created before the policies
were bound, or while a namespace's annotation was being tampered with, still do. The
watchdog watches every pod outside the excluded namespaces (one cluster-wide watch with a
field selector that leaves those out), keeps only `podlevel.PodLevels` of each (name, uid,
the pod-level level and containers' own levels), and compares them with the namespace's
level from the namespace cache, again whenever that level changes. Each pod found at
another level is reported once per finding: a Warning Event `MCSLevelMismatch` on the pod
(named after the finding, so two replicas record one), an audit record `pod-mismatch`, and
the gauge `cedar_mcs_pod_mismatches`. It never deletes or changes a pod: restarting a
tenant's workload is the tenant's or the operator's call.

I/O: the Kubernetes API (a pod watch through `Reflector`, Events), the audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cedar.mcs_allocator.audit import Audit
from cedar.mcs_allocator.kubewatch import Reflector
from cedar.mcs_allocator.metrics import POD_MISMATCHES, PODS_WATCHED
from cedar.mcs_allocator.nscache import NamespaceCache
from cedar.mcs_allocator.objectevents import EventRecorder, finding_name
from cedar.mcs_allocator.podlevel import PodLevels, describe, mismatch, pod_levels
from cedar.runtime.kube import KubeClient, resource_path

log = logging.getLogger("cedar.mcs_allocator.watchdog")

REASON_MISMATCH = "MCSLevelMismatch"


def field_selector(excluded: frozenset[str]) -> str:
    return ",".join(f"metadata.namespace!={name}" for name in sorted(excluded))


class Watchdog:
    def __init__(
        self,
        client: KubeClient,
        cache: NamespaceCache,
        events: EventRecorder,
        audit: Audit | None,
        excluded: frozenset[str],
    ) -> None:
        self.cache = cache
        self.events = events
        self.audit = audit
        self.pods: Reflector[PodLevels] = Reflector(
            client,
            resource_path("Pod"),
            pod_levels,
            what="pods",
            on_change=self._pod_changed,
            params={"fieldSelector": field_selector(excluded)} if excluded else None,
        )
        self._by_namespace: dict[str, set[str]] = {}
        # pod key -> (uid, expected level, why): what is currently wrong
        self.mismatched: dict[str, tuple[str, str, str]] = {}
        self._reported: set[tuple[str, str, str]] = set()
        self._queue: asyncio.Queue[tuple[PodLevels, str, str, str]] = asyncio.Queue()
        cache.listen(self._namespace_changed)

    # -- keeping the picture ------------------------------------------------------------

    def _pod_changed(self, key: str, old: PodLevels | None, new: PodLevels | None) -> None:
        current = new if new is not None else old
        if current is None:
            return
        namespace = current.namespace
        if new is None:
            keys = self._by_namespace.get(namespace)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_namespace[namespace]
            gone = self.mismatched.pop(key, None)
            if gone is not None:
                self._reported.discard(gone)
        else:
            self._by_namespace.setdefault(namespace, set()).add(key)
            self._check(key, new)
        PODS_WATCHED.set(len(self.pods.items))
        POD_MISMATCHES.set(len(self.mismatched))

    def _namespace_changed(self, namespace: str) -> None:
        for key in list(self._by_namespace.get(namespace, ())):
            pod = self.pods.items.get(key)
            if pod is not None:
                self._check(key, pod)
        POD_MISMATCHES.set(len(self.mismatched))

    def _check(self, key: str, pod: PodLevels) -> None:
        ns = self.cache.cached(pod.namespace)
        found = None
        expected = ""
        if ns is not None and ns.view.in_scope and ns.view.level:
            expected = ns.view.level
            found = mismatch(pod, expected)
        if found is None:
            gone = self.mismatched.pop(key, None)
            if gone is not None:
                self._reported.discard(gone)
            return
        who, level = found
        finding = (pod.uid, expected, f"{who}={level}")
        self.mismatched[key] = finding
        if finding not in self._reported:
            self._reported.add(finding)
            self._queue.put_nowait((pod, expected, who, level))

    # -- reporting ----------------------------------------------------------------------

    async def _report(self, pod: PodLevels, expected: str, who: str, found: str) -> None:
        message = (
            f"{describe(who, found)}, not at its namespace's level {expected}: it was created "
            "before the pod-level policies were bound, or while the namespace's level "
            f"annotation was tampered with. Cedar does not delete pods; recreate it to run at "
            f"{expected}."
        )
        log.warning(
            "pod %s/%s: %s",
            pod.namespace,
            pod.name,
            message,
            extra={"namespace": pod.namespace, "pod": pod.name, "mcs_level": expected},
        )
        involved = {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid,
        }
        name = finding_name(pod.name, pod.uid, expected, who, found)
        outcome = await self.events.warn(involved, REASON_MISMATCH, message, name=name)
        if outcome == "exists" or self.audit is None:
            return  # another replica reported this very finding
        ns = self.cache.cached(pod.namespace)
        await self.audit.record_object(
            "pod-mismatch",
            namespace=pod.namespace,
            namespace_uid=ns.uid if ns is not None else "",
            obj=("Pod", pod.name, pod.uid),
            level=expected,
            found=found or None,
        )

    async def _reporter(self) -> None:
        while True:
            pod, expected, who, found = await self._queue.get()
            await self._report(pod, expected, who, found)

    async def run(self, stop: asyncio.Event) -> None:
        """Watch pods (once the namespaces are known) and report until `stop`."""
        reporter = asyncio.create_task(self._reporter(), name="watchdog-reports")
        try:
            await self.cache.synced.wait()
            await self.pods.run(stop)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
