"""Warning Events on pods and PersistentVolumes (the watchdog's and the volume keeper's).

Built by `cedar.proto.events.core_event`, so each lands where the API requires it: an Event
about a Pod in the pod's namespace, one about a PersistentVolume (cluster-scoped) in
`default`. An Event may be given a name derived from what it reports: then a second replica
reporting the same finding gets 409 AlreadyExists, and knows it was reported.

I/O: creates Events through cedar.runtime.kube; failures are logged, never fatal.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import Any, Literal

from cedar.proto.events import core_event
from cedar.runtime.kube import Conflict, KubeClient, KubeError, resource_path

log = logging.getLogger("cedar.mcs_allocator.events")

Recorded = Literal["recorded", "exists", "failed"]

# Event names are DNS subdomains: at most 253 characters.
_MAX_NAME = 253


def finding_name(object_name: str, *parts: str) -> str:
    """A stable Event name for one finding about one object."""
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    suffix = f".mcs-{digest}"
    return object_name[: _MAX_NAME - len(suffix)] + suffix


class EventRecorder:
    def __init__(self, client: KubeClient, component: str, replica: str) -> None:
        self.client = client
        self.component = component
        self.replica = replica

    async def warn(
        self, involved: dict[str, Any], reason: str, message: str, *, name: str | None = None
    ) -> Recorded:
        event = core_event(
            involved,
            reason=reason,
            message=message,
            event_type="Warning",
            component=self.component,
            instance=self.replica,
            now=datetime.now(UTC),
        )
        if name is not None:
            event["metadata"]["name"] = name
        namespace = event["metadata"]["namespace"]
        try:
            await self.client.create(resource_path("Event", namespace), event)
        except Conflict:
            return "exists"
        except KubeError as err:
            log.warning(
                "cannot record Event %s on %s %s: %s",
                reason,
                involved.get("kind"),
                involved.get("name"),
                err,
            )
            return "failed"
        return "recorded"
