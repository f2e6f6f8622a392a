"""The allocator's Kubernetes calls: read, list and annotate namespaces, record Events.

Transient failures (throttled, failing, unreachable, stalled: `Unavailable`) of a read or an
annotation are retried a few times with jittered backoff, never sooner than the server's
Retry-After; the client holds every request back while the server pushes back, so the
handlers' retries together stay at about one request per backoff, not one per handler.

I/O: the Kubernetes API through cedar.runtime.kube (errors arrive as `KubeError`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from cedar.mcs_allocator.decide import NsObject
from cedar.mcs_allocator.metrics import PATCH_FAILURES
from cedar.proto.events import core_event
from cedar.runtime.backoff import Backoff, after
from cedar.runtime.kube import (
    Conflict,
    KubeClient,
    KubeError,
    NotFound,
    Unavailable,
    resource_path,
)

log = logging.getLogger("cedar.mcs_allocator.kube")

# Statuses worth retrying: unreachable (0), throttled, server-side trouble.
_TRANSIENT = {0, 429, 500, 502, 503, 504}
PATCH_ATTEMPTS = 6

REASON_TAMPERED = "MCSLevelTampered"
REASON_EXHAUSTED = "MCSLevelsExhausted"
REASON_CONFLICT = "MCSLevelConflict"


def transient(err: KubeError) -> bool:
    return isinstance(err, Unavailable) or err.status in _TRANSIENT


def retry_delay(backoff: Backoff, err: KubeError) -> float:
    """The next wait: the backoff's, but never sooner than the server's Retry-After."""
    return after(backoff.next_delay(), err.retry_after if isinstance(err, Unavailable) else None)


class NamespaceIO:
    """Namespaces as the allocator reads and annotates them; Warning Events on them."""

    def __init__(self, client: KubeClient, component: str, replica: str) -> None:
        self.client = client
        self.component = component
        self.replica = replica

    async def get(self, name: str) -> NsObject | None:
        """The namespace as it is now; None when it does not exist."""
        backoff = Backoff(base=0.05, cap=2.0)
        while True:
            try:
                raw = await self.client.get(resource_path("Namespace", None, name))
                return NsObject.from_api(raw)
            except NotFound:
                return None
            except KubeError as err:
                if not transient(err) or backoff.attempts >= PATCH_ATTEMPTS:
                    raise
                await asyncio.sleep(retry_delay(backoff, err))

    async def list_all(self) -> AsyncIterator[NsObject]:
        async for items, _rv in self.client.list_pages(resource_path("Namespace"), limit=500):
            for item in items:
                yield NsObject.from_api(item)

    async def write_level(self, obj: NsObject, annotations: dict[str, str]) -> None:
        """Merge the annotations, on the condition that the namespace is still `obj`.

        The resourceVersion precondition makes the write fail with Conflict (409) if the
        namespace changed since it was read (or was deleted and re-created under the same
        name): the caller reads it again and decides anew. Transient failures are retried
        with backoff and counted.
        """
        body: dict[str, object] = {"metadata": {"annotations": annotations}}
        if obj.resource_version:
            body = {
                "metadata": {"annotations": annotations, "resourceVersion": obj.resource_version}
            }
        path = resource_path("Namespace", None, obj.name)
        backoff = Backoff(base=0.05, cap=2.0)
        while True:
            try:
                await self.client.patch(path, body, merge="merge")
                return
            except (Conflict, NotFound):
                raise
            except KubeError as err:
                PATCH_FAILURES.inc()
                if not transient(err) or backoff.attempts >= PATCH_ATTEMPTS:
                    raise
                delay = retry_delay(backoff, err)
                log.warning(
                    "annotating namespace %s failed (%s); retrying in %.2fs",
                    obj.name,
                    err,
                    delay,
                    extra={"namespace": obj.name},
                )
                await asyncio.sleep(delay)

    async def warn(self, obj: NsObject, reason: str, message: str) -> None:
        """A Warning Event on the namespace (so in `default`, as the API requires for a
        cluster-scoped object); failures are logged, never fatal."""
        event = core_event(
            {"apiVersion": "v1", "kind": "Namespace", "name": obj.name, "uid": obj.uid},
            reason=reason,
            message=message,
            event_type="Warning",
            component=self.component,
            instance=self.replica,
            now=datetime.now(UTC),
        )
        try:
            await self.client.create(resource_path("Event", event["metadata"]["namespace"]), event)
        except KubeError as err:
            log.warning("cannot record Event %s on %s: %s", reason, obj.name, err)
