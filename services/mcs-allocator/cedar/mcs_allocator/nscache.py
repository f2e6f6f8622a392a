"""Every namespace's level and scope, from a watch of the API: what admission and the
watchdog compare pods against.

The cache holds, per namespace, only its name, uid, the level in CEDAR_MCS_ANNOTATION ('' while
none) and whether it is in scope (CEDAR_MCS_EXCLUDE, CEDAR_NAMESPACE, CEDAR_MCS_SELECTOR).
A namespace the watch has not delivered yet, or one that has no level in the cache, is read
with a GET before admission refuses a pod for it: the watch may lag the allocator's PATCH
by a few milliseconds, and a refusal costs the tenant's controller a backoff. That read
waits at most LOOKUP_PATIENCE seconds for a server that pushes back (429, 5xx): admission
must answer within its timeout, and a refusal is retried by the pod's controller.

I/O: the Kubernetes API through cedar.runtime.kube and `Reflector`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from cedar.mcs_allocator.kubewatch import Reflector
from cedar.mcs_allocator.podlevel import NamespaceLevel
from cedar.mcs_allocator.scope import Scope
from cedar.runtime.kube import JSON, KubeClient, NotFound, resource_path

log = logging.getLogger("cedar.mcs_allocator.nscache")

# The longest an admission lookup waits while the API server pushes back.
LOOKUP_PATIENCE = 2.0


@dataclass(frozen=True, slots=True)
class CachedNamespace:
    uid: str
    view: NamespaceLevel


class NamespaceCache:
    def __init__(self, client: KubeClient, scope: Scope, annotation: str) -> None:
        self.client = client
        self.scope = scope
        self.annotation = annotation
        self._listeners: list[Callable[[str], None]] = []
        self.reflector: Reflector[CachedNamespace] = Reflector(
            client,
            resource_path("Namespace"),
            self.reduce,
            what="namespaces",
            on_change=self._changed,
        )
        self.gets = 0

    def reduce(self, obj: JSON) -> CachedNamespace:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", ""))
        labels = meta.get("labels") or {}
        level = (meta.get("annotations") or {}).get(self.annotation)
        in_scope = self.scope.includes(name, labels)
        view = NamespaceLevel(name, level if isinstance(level, str) else "", in_scope)
        return CachedNamespace(str(meta.get("uid", "")), view)

    def listen(self, callback: Callable[[str], None]) -> None:
        """`callback(name)` whenever a namespace's level or scope changes (or it goes)."""
        self._listeners.append(callback)

    def _changed(self, key: str, old: CachedNamespace | None, new: CachedNamespace | None) -> None:
        if old is not None and new is not None and old.view == new.view:
            return
        for callback in self._listeners:
            callback(key)

    @property
    def synced(self) -> asyncio.Event:
        return self.reflector.synced

    async def run(self, stop: asyncio.Event) -> None:
        await self.reflector.run(stop)

    def cached(self, name: str) -> CachedNamespace | None:
        return self.reflector.items.get(name)

    async def lookup(self, name: str) -> NamespaceLevel | None:
        """The namespace for an admission decision; None when it does not exist.

        From the cache when it is there with a level (or out of scope); otherwise read now.
        Raises KubeError when the API cannot be read.
        """
        hit = self.reflector.items.get(name)
        if hit is not None and (hit.view.level or not hit.view.in_scope):
            return hit.view
        self.gets += 1
        try:
            raw = await self.client.get(
                resource_path("Namespace", None, name), patience=LOOKUP_PATIENCE
            )
        except NotFound:
            return None
        fresh = self.reduce(raw)
        # Only ever move the cache forward: the watch may already hold a newer version.
        if hit is None or fresh.view.level:
            self.reflector.put(name, fresh)
        return fresh.view
