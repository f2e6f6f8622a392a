"""The audit trail: one McsAuditRecord per claim, release, adoption, tamper and conflict,
and per pod found at another level and NFS volume given (or refused) a mount context.

I/O: publishes to `cedar.audit.mcs.<action>` on JetStream (kept by CEDAR_HISTORY for
`cedar replay`) through cedar.runtime.bus; a record that cannot be published is logged.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Literal

from nats.js import JetStreamContext
from pydantic import ValidationError

from cedar.proto.models import McsAuditRecord
from cedar.proto.subjects import audit_subject
from cedar.runtime.bus import BusError, bus_errors

log = logging.getLogger("cedar.mcs_allocator.audit")

AuditAction = Literal["claim", "release", "free", "adopt", "tamper", "conflict", "exhausted"]
# Records about an object in a namespace (a pod, the PV bound to a claim there).
ObjectAction = Literal["pod-mismatch", "volume-context", "volume-conflict"]


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
        await self._publish(record)

    async def record_object(
        self,
        action: ObjectAction,
        *,
        namespace: str,
        namespace_uid: str,
        obj: tuple[str, str, str],
        level: str,
        found: str | None = None,
    ) -> None:
        """A record about `obj` = (kind, name, uid): the level expected, what was found."""
        kind, name, uid = obj
        try:
            record = McsAuditRecord.model_validate(
                {
                    "action": action,
                    "namespace": namespace,
                    "namespace_uid": namespace_uid,
                    "level": level,
                    "previous": found,
                    "object_kind": kind,
                    "object_name": name,
                    "object_uid": uid,
                    "replica": self.replica,
                    "at": datetime.now(UTC),
                }
            )
        except ValidationError as err:
            # A contract that does not know these records yet (cedar.proto.models).
            log.error(
                "the audit contract refuses a %s record about %s %s/%s: %s",
                action,
                kind,
                namespace,
                name,
                err,
            )
            return
        await self._publish(record)

    async def _publish(self, record: McsAuditRecord) -> None:
        try:
            with bus_errors("publish an audit record"):
                await self.js.publish(
                    audit_subject(record.action), record.model_dump_json().encode(), timeout=5
                )
        except BusError as err:
            # The ledger, not the trail, is the truth; losing a record must not stop work.
            log.warning(
                "cannot publish audit record (%s)",
                err,
                extra={"audit": record.model_dump(mode="json")},
            )
