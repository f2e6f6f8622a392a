"""The audit trail: one McsAuditRecord per claim, release, adoption, tamper and conflict.

I/O: publishes to `cedar.audit.mcs.<action>` on JetStream (kept by CEDAR_HISTORY for
`cedar replay`) through cedar.runtime.bus; a record that cannot be published is logged.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Literal

from nats.js import JetStreamContext

from cedar.proto.models import McsAuditRecord
from cedar.proto.subjects import audit_subject
from cedar.runtime.bus import BusError, bus_errors

log = logging.getLogger("cedar.mcs_allocator.audit")

AuditAction = Literal["claim", "release", "free", "adopt", "tamper", "conflict", "exhausted"]


class Audit:
    def __init__(self, js: JetStreamContext, replica: str) -> None:
        self.js = js
        self.replica = replica

    async def record(
        self,
        action: AuditAction,
        namespace: str,
        uid: str,
        level: str | None = None,
        previous: str | None = None,
    ) -> None:
        record = McsAuditRecord(
            action=action,
            namespace=namespace,
            namespace_uid=uid,
            level=level,
            previous=previous,
            replica=self.replica,
            at=datetime.now(UTC),
        )
        try:
            with bus_errors("publish an audit record"):
                await self.js.publish(
                    audit_subject(action), record.model_dump_json().encode(), timeout=5
                )
        except BusError as err:
            # The ledger, not the trail, is the truth; losing a record must not stop work.
            log.warning(
                "cannot publish audit record (%s)",
                err,
                extra={"audit": record.model_dump(mode="json")},
            )
