"""Pure: the messages the watcher stores in JetStream, built from the contract models. No I/O.

One `Outgoing` per change: a live image set or namespace event, or a deletion marker. Its
digest (of what the content depends on) tells a real change from a repeat, and its
`Nats-Msg-Id` is derived from the content, so the same change seen by any watcher replica
is stored once. Also: parsing a subject back into (kind, namespace, name).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from cedar.proto import subjects
from cedar.proto.models import NamespaceEvent, WorkloadImageSet

NAMESPACE = "Namespace"
DELETED_DIGEST = "deleted"
# Fields that differ between two watchers seeing the same change; kept out of the digest.
_VOLATILE = {"observed_at", "resource_version", "generation"}

HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_DIGEST = "Cedar-Digest"
HEADER_UID = "Cedar-Uid"


def _hash(*parts: str | bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\x00")
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to store: a live image set / namespace event, or a deletion marker."""

    kind: str
    subject: str
    identity: str
    uid: str
    digest: str  # of (kind, uid, content); DELETED_DIGEST for markers
    msg_id: str  # Nats-Msg-Id: the same for the same change seen by any watcher replica
    body: bytes
    deleted: bool = False
    ttl: float | None = None  # seconds; markers expire, live state never does
    seen: float = 0.0  # time.time() when the watcher saw the change (latency metric)

    @property
    def headers(self) -> dict[str, str]:
        return {HEADER_MSG_ID: self.msg_id, HEADER_DIGEST: self.digest, HEADER_UID: self.uid}


def _splice(content: bytes, volatile: bytes) -> bytes:
    # Both are JSON objects of one model with disjoint fields: join them without
    # serialising the content a second time.
    return content[:-1] + b"," + volatile[1:]


def live_workload(item: WorkloadImageSet, seen: float = 0.0, subject: str = "") -> Outgoing:
    """A workload's image set; `subject` may be given when the caller has it already."""
    content = item.model_dump_json(exclude=_VOLATILE).encode()
    digest = _hash(item.kind, item.uid, content)
    # An id repeats only for the same change (seen by two replicas), never for A -> B -> A:
    # the history's copies into CEDAR_WORKLOADS drop a repeated id too (topology.py).
    if item.generation is not None:
        msg_id = _hash(digest, "generation", str(item.generation))
    else:
        msg_id = _hash(digest, "rv", item.resource_version)
    return Outgoing(
        kind=item.kind,
        subject=subject or subjects.workload_subject(item.kind, item.namespace, item.name),
        identity=item.identity,
        uid=item.uid,
        digest=digest,
        msg_id=msg_id,
        body=_splice(content, item.model_dump_json(include=_VOLATILE).encode()),
        seen=seen,
    )


def workload_marker(
    kind: str,
    namespace: str,
    name: str,
    uid: str,
    *,
    observed_at: datetime,
    ttl: float,
    resource_version: str = "",
    because: tuple[str, ...] = (),
    seen: float = 0.0,
) -> Outgoing:
    """A deletion marker. `because` distinguishes a dropped revision (the kept revisions'
    uids) from a deletion; with the owner's resourceVersion, a revision dropped, kept again
    and dropped again gets another id each time (a deletion happens once per uid)."""
    item = WorkloadImageSet(
        kind=kind,
        namespace=namespace,
        name=name,
        uid=uid,
        resource_version=resource_version,
        observed_at=observed_at,
        deleted=True,
    )
    return Outgoing(
        kind=kind,
        subject=subjects.workload_subject(kind, namespace, name),
        identity=item.identity,
        uid=uid,
        digest=DELETED_DIGEST,
        msg_id=_hash(
            kind, uid, "deleted", *because, *(("rv", resource_version) if because else ())
        ),
        body=item.model_dump_json().encode(),
        deleted=True,
        ttl=ttl,
        seen=seen,
    )


def live_namespace(event: NamespaceEvent, seen: float = 0.0) -> Outgoing:
    """A namespace's lifecycle event."""
    content = event.model_dump_json(exclude=_VOLATILE).encode()
    digest = _hash(NAMESPACE, event.uid, content)
    return Outgoing(
        kind=NAMESPACE,
        subject=subjects.namespace_subject(event.name),
        identity=f"Namespace/{event.name}",
        uid=event.uid,
        digest=digest,
        # No generation on namespaces: the resourceVersion tells A->B->A apart.
        msg_id=_hash(digest, "rv", event.resource_version),
        body=_splice(content, event.model_dump_json(include=_VOLATILE).encode()),
        seen=seen,
    )


def namespace_marker(
    name: str,
    uid: str,
    observed_at: datetime,
    ttl: float,
    *,
    resource_version: str = "",
    seen: float = 0.0,
) -> Outgoing:
    """A namespace's deletion marker."""
    event = NamespaceEvent(
        name=name,
        uid=uid,
        resource_version=resource_version,
        observed_at=observed_at,
        deleted=True,
    )
    return Outgoing(
        kind=NAMESPACE,
        subject=subjects.namespace_subject(name),
        identity=f"Namespace/{name}",
        uid=uid,
        digest=DELETED_DIGEST,
        msg_id=_hash(NAMESPACE, uid, "deleted"),
        body=event.model_dump_json().encode(),
        deleted=True,
        ttl=ttl,
        seen=seen,
    )


def parse_subject(subject: str) -> tuple[str, str, str] | None:
    """(kind, namespace, name) of a workload or namespace subject."""
    parts = subject.split(".")
    if subject.startswith(subjects.WORKLOADS_PREFIX + ".") and len(parts) == 5:
        return parts[2], subjects.untoken(parts[3]), subjects.untoken(parts[4])
    if subject.startswith(subjects.NAMESPACES_PREFIX + ".") and len(parts) == 3:
        return NAMESPACE, "", subjects.untoken(parts[2])
    return None
