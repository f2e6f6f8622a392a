"""NFS PersistentVolumes get their tenant's SELinux mount context (CEDAR_MCS_NFS_CONTEXT=true).

Watches PersistentVolumes (keeping `nfs.VolumeView` of the NFS ones only) and, through the
namespace cache, the level of each bound claim's namespace. `nfs.decide_volume` says what
to do: add `context="system_u:object_r:<type>:<level>"` to `spec.mountOptions` (a merge
PATCH conditional on the resourceVersion the decision saw; a PV changed meanwhile comes back
through the watch and is decided again), or report a context that names another level:
a Warning Event `MCSVolumeContextConflict` on the PV (in `default`, as for every
cluster-scoped object), an audit record `volume-conflict` and the gauge
`cedar_mcs_volume_conflicts`. Such a PV is never changed. The new option takes effect at the
volume's next mount (pods that have it mounted keep their mount).

I/O: the Kubernetes API (a PV watch through `Reflector`, PATCH, Events), the audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cedar.mcs_allocator.audit import Audit, ObjectAction
from cedar.mcs_allocator.kubewatch import Reflector
from cedar.mcs_allocator.metrics import VOLUME_CONFLICTS, VOLUME_CONTEXTS
from cedar.mcs_allocator.nfs import (
    AddContext,
    ContextConflict,
    VolumeRules,
    VolumeView,
    decide_volume,
    volume_view,
)
from cedar.mcs_allocator.nscache import NamespaceCache
from cedar.mcs_allocator.objectevents import EventRecorder, finding_name
from cedar.mcs_allocator.podlevel import NamespaceLevel
from cedar.runtime.kube import JSON, Conflict, KubeClient, KubeError, NotFound, resource_path

log = logging.getLogger("cedar.mcs_allocator.volumes")

REASON_CONFLICT = "MCSVolumeContextConflict"


class VolumeKeeper:
    def __init__(
        self,
        client: KubeClient,
        cache: NamespaceCache,
        events: EventRecorder,
        audit: Audit | None,
        rules: VolumeRules,
    ) -> None:
        self.client = client
        self.cache = cache
        self.events = events
        self.audit = audit
        self.rules = rules
        self.volumes: Reflector[VolumeView] = Reflector(
            client,
            resource_path("PersistentVolume"),
            self._keep,
            what="persistentvolumes",
            on_change=self._volume_changed,
        )
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self.conflicts: dict[str, tuple[str, str]] = {}  # PV name -> (found, level)
        self._reported: set[tuple[str, str, str]] = set()
        cache.listen(self._namespace_changed)

    def _keep(self, obj: JSON) -> VolumeView | None:
        return volume_view(obj, self.rules)

    def _enqueue(self, name: str) -> None:
        if name not in self._queued:
            self._queued.add(name)
            self._queue.put_nowait(name)

    def _volume_changed(self, key: str, old: VolumeView | None, new: VolumeView | None) -> None:
        if new is None:
            self.conflicts.pop(key, None)
            VOLUME_CONFLICTS.set(len(self.conflicts))
            return
        self._enqueue(key)

    def _namespace_changed(self, namespace: str) -> None:
        for name, view in list(self.volumes.items.items()):
            if view.claim_namespace == namespace:
                self._enqueue(name)

    def _namespace(self, name: str) -> NamespaceLevel | None:
        hit = self.cache.cached(name)
        return hit.view if hit is not None else None

    async def _handle(self, name: str) -> None:
        view = self.volumes.items.get(name)
        if view is None:
            return
        action = decide_volume(view, self._namespace, self.rules)
        if not isinstance(action, ContextConflict) and name in self.conflicts:
            del self.conflicts[name]
            VOLUME_CONFLICTS.set(len(self.conflicts))
        if isinstance(action, AddContext):
            await self._add_context(view, action)
        elif isinstance(action, ContextConflict):
            self.conflicts[name] = (action.found, action.level)
            VOLUME_CONFLICTS.set(len(self.conflicts))
            finding = (view.uid, action.found, action.level)
            if finding not in self._reported:
                self._reported.add(finding)
                await self._report_conflict(view, action)

    async def _add_context(self, view: VolumeView, action: AddContext) -> None:
        body = {
            "metadata": {"resourceVersion": view.resource_version},
            "spec": {"mountOptions": list(action.mount_options)},
        }
        try:
            await self.client.patch(
                resource_path("PersistentVolume", None, view.name), body, merge="merge"
            )
        except (Conflict, NotFound):
            return  # changed or gone meanwhile: the watch brings it back if it matters
        except KubeError as err:
            VOLUME_CONTEXTS.labels(result="failed").inc()
            log.warning("cannot set the mount context of PV %s: %s", view.name, err)
            await asyncio.sleep(1.0)
            self._enqueue(view.name)
            return
        VOLUME_CONTEXTS.labels(result="set").inc()
        option = action.mount_options[-1]
        log.info(
            "PV %s (claim %s/%s): added mount option %s",
            view.name,
            view.claim_namespace,
            view.claim_name,
            option,
            extra={"namespace": view.claim_namespace, "mcs_level": action.level},
        )
        await self._audit("volume-context", view, action.level, None)

    async def _report_conflict(self, view: VolumeView, action: ContextConflict) -> None:
        message = (
            f"mount option {action.found} does not name level {action.level} of namespace "
            f"{view.claim_namespace}, whose claim {view.claim_name} this volume is bound to; "
            "left as it is (changing a volume's context cuts its tenant off from its files); "
            "an operator must relabel the data and fix the PV"
        )
        log.error("PV %s: %s", view.name, message, extra={"namespace": view.claim_namespace})
        involved = {"apiVersion": "v1", "kind": "PersistentVolume", "name": view.name}
        if view.uid:
            involved["uid"] = view.uid
        name = finding_name(view.name, view.uid, action.found, action.level)
        if await self.events.warn(involved, REASON_CONFLICT, message, name=name) != "exists":
            await self._audit("volume-conflict", view, action.level, action.found)

    async def _audit(
        self, action: ObjectAction, view: VolumeView, level: str, found: str | None
    ) -> None:
        if self.audit is None:
            return
        ns = self.cache.cached(view.claim_namespace)
        await self.audit.record_object(
            action,
            namespace=view.claim_namespace,
            namespace_uid=ns.uid if ns is not None else "",
            obj=("PersistentVolume", view.name, view.uid),
            level=level,
            found=found,
        )

    async def _worker(self) -> None:
        while True:
            name = await self._queue.get()
            self._queued.discard(name)
            await self._handle(name)

    async def run(self, stop: asyncio.Event) -> None:
        worker = asyncio.create_task(self._worker(), name="volume-contexts")
        try:
            await self.cache.synced.wait()
            await self.volumes.run(stop)
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
