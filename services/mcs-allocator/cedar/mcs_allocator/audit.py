"""The audit trail: one McsAuditRecord per claim, release, adoption, tamper and conflict,
published to `cedar.audit.mcs.<action>` (kept by CEDAR_HISTORY for `cedar replay`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Literal

from nats.errors import Error as NatsError

from cedar.proto.models import McsAuditRecord
from cedar.proto.subjects import audit_subject
from cedar.runtime.bus import TRANSIENT_ERRORS, Bus

log = logging.getLogger("cedar.mcs_allocator.audit")

AuditAction = Literal["claim", "release", "free", "adopt", "tamper", "conflict", "exhausted"]


class Audit:
    def __init__(self, bus: Bus | None, replica: str, dry_run: bool = False) -> None:
        self.bus = bus
        self.replica = replica
        self.dry_run = dry_run

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
            dry_run=self.dry_run,
            at=datetime.now(UTC),
        )
        if self.bus is None or self.dry_run:
            log.info("audit %s", action, extra={"audit": record.model_dump(mode="json")})
            return
        try:
            await self.bus.js.publish(
                audit_subject(action), record.model_dump_json().encode(), timeout=5
            )
        except (*TRANSIENT_ERRORS, NatsError) as err:
            # The ledger, not the trail, is the truth; losing a record must not stop work.
            log.warning(
                "cannot publish audit record (%s)",
                err,
                extra={"audit": record.model_dump(mode="json")},
            )
