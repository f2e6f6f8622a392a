"""Repair: every namespace (a direct list from the API) reconciled with the ledger.

Each namespace goes through the same handler as its events; ledger entries whose uid was
not listed are released once a GET by name confirms the namespace is gone; labels that
several namespaces' annotations claim are reported (`cedar_mcs_conflicts`), never
reassigned.

I/O only through its collaborators: the Kubernetes API (`NamespaceIO`), the handler and the
audit trail. Their failures arrive as `BusError` and `KubeError`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from cedar.mcs_allocator import decide as D
from cedar.mcs_allocator.audit import Audit
from cedar.mcs_allocator.handler import NamespaceHandler
from cedar.mcs_allocator.kubeio import NamespaceIO
from cedar.mcs_allocator.metrics import CONFLICTS
from cedar.mcs_allocator.mirror import Mirror
from cedar.runtime.errors import BusError, KubeError

log = logging.getLogger("cedar.mcs_allocator")


@dataclass
class RepairReport:
    namespaces: int = 0
    in_scope: int = 0
    released: int = 0
    conflicts: int = 0
    retry: int = 0


class Repair:
    def __init__(
        self,
        mirror: Mirror,
        handler: NamespaceHandler,
        kube: NamespaceIO,
        audit: Audit,
        policy: D.Policy,
    ) -> None:
        self.mirror = mirror
        self.handler = handler
        self.kube = kube
        self.audit = audit
        self.policy = policy

    async def run(self, concurrency: int = 16) -> RepairReport:
        """Reconcile every namespace (a direct list) with the ledger."""
        report = RepairReport()
        objs = [obj async for obj in self.kube.list_all()]
        report.namespaces = len(objs)
        report.in_scope = sum(1 for o in objs if self.policy.scope.includes(o.name, o.labels))
        live = {o.uid for o in objs}
        sem = asyncio.Semaphore(concurrency)

        async def one(obj: D.NsObject, fresh: bool) -> None:
            async with sem:
                try:
                    if await self.handler.handle(obj, fresh=fresh) is not None:
                        report.retry += 1
                except (KubeError, BusError) as err:
                    report.retry += 1
                    log.warning("repair of %s failed: %s", obj.name, err)

        await asyncio.gather(*(one(o, True) for o in objs))
        # A ledger entry whose uid was not listed may belong to a namespace created since
        # the list began: `handle` reads it by name before releasing anything.
        orphans = [e for e in self.mirror.view.allocated() if e.uid not in live]
        for entry in orphans:
            got = await self.kube.get(entry.namespace)
            if got is None or got.uid != entry.uid:
                gone = D.NsObject(entry.namespace, entry.uid, deleted=True)
                await one(gone, True)
                report.released += 1
        found = D.conflicts(objs, self.policy)
        CONFLICTS.set(len(found))
        report.conflicts = len(found)
        for level, claimants in found.items():
            owner = self.mirror.view.labels.get(level)
            names = sorted(o.name for o in claimants)
            log.error(
                "label %s is claimed by %d namespaces: %s (ledger owner: %s); not reassigned",
                level,
                len(claimants),
                ", ".join(names),
                owner.namespace if owner else "none",
                extra={"mcs_level": str(level), "namespaces": names},
            )
            for obj in claimants:
                if owner is not None and obj.uid == owner.uid:
                    continue
                if self.handler.first_report(obj.uid, level):
                    await self.audit.record("conflict", obj.name, obj.uid, str(level))
        self.mirror.update_metrics()
        log.info("repair done", extra={"report": report.__dict__})
        return report
