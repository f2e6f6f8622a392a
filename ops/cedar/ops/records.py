"""What `cedar replay` reads from CEDAR_HISTORY, decoded and filtered. Pure.

Every message of the history stream is one of four contracts, told apart by its subject:
a workload's image set (`cedar.workloads.…`), a namespace event (`cedar.namespaces.…`),
a puller's decision (`cedar.decisions.<node>`) or an allocator audit record
(`cedar.audit.…`). Each record names the objects it concerns, so one set of filters
(`--kind/--namespace/--name`) finds a workload's changes, the pullers' decisions taken for
it, and the allocator's records about its namespace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from cedar.proto import subjects
from cedar.proto.models import (
    McsAuditRecord,
    NamespaceEvent,
    PullerDecision,
    WorkloadImageSet,
)

Payload = WorkloadImageSet | NamespaceEvent | PullerDecision | McsAuditRecord

# The record types, as printed and as accepted by --kind besides Kubernetes kinds.
TYPE_WORKLOAD = "workload"
TYPE_NAMESPACE = "namespace"
TYPE_DECISION = "decision"
TYPE_AUDIT = "audit"
TYPE_UNKNOWN = "unknown"


@dataclass(frozen=True)
class Identity:
    kind: str
    namespace: str
    name: str


@dataclass(frozen=True)
class Filters:
    kind: str | None = None
    namespace: str | None = None
    name: str | None = None
    node: str | None = None
    image: str | None = None

    def empty(self) -> bool:
        return not any((self.kind, self.namespace, self.name, self.node, self.image))


@dataclass(frozen=True)
class Record:
    seq: int
    stored_at: datetime
    subject: str
    type: str
    payload: Payload | None
    raw: bytes
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def at(self) -> datetime:
        """When it happened (the payload's time), falling back to when it was stored."""
        p = self.payload
        if isinstance(p, WorkloadImageSet | NamespaceEvent):
            return p.observed_at
        if isinstance(p, PullerDecision | McsAuditRecord):
            return p.at
        return self.stored_at

    def identities(self) -> tuple[Identity, ...]:
        p = self.payload
        if isinstance(p, WorkloadImageSet):
            ids = [Identity(p.kind, p.namespace, p.name)]
            if p.owner is not None:
                ids.append(Identity(p.owner.kind, p.namespace, p.owner.name))
            return tuple(ids)
        if isinstance(p, NamespaceEvent):
            return (Identity("Namespace", p.name, p.name),)
        if isinstance(p, McsAuditRecord):
            return (Identity("Namespace", p.namespace, p.namespace),)
        if isinstance(p, PullerDecision):
            ids = []
            for w in p.workloads:
                ident = parse_workload(w)
                ids.append(ident)
                origin = prepull_origin(ident.kind, ident.namespace, ident.name)
                if origin is not None:
                    ids.append(origin)
            return tuple(ids)
        return ()

    def images(self) -> set[str]:
        p = self.payload
        if isinstance(p, WorkloadImageSet):
            return {c.reference or c.image for c in p.containers}
        if isinstance(p, PullerDecision):
            return {p.image}
        return set()

    def object(self) -> str:
        """The OBJECT column: what this record is about."""
        p = self.payload
        if isinstance(p, WorkloadImageSet):
            return p.identity
        if isinstance(p, NamespaceEvent):
            return f"Namespace/{p.name}"
        if isinstance(p, PullerDecision):
            return f"node/{p.node}"
        if isinstance(p, McsAuditRecord):
            return f"Namespace/{p.namespace}"
        return self.subject

    def summary(self) -> str:
        """The DETAIL column: one line, the facts an operator looks for first."""
        p = self.payload
        if isinstance(p, WorkloadImageSet):
            if p.deleted:
                return "deleted"
            parts = []
            if p.owner is not None:
                parts.append(f"owner={p.owner.kind}/{p.owner.name}")
            if p.replicas is not None:
                parts.append(f"replicas={p.replicas}")
            if p.expires_at is not None:
                parts.append(f"expires={p.expires_at.isoformat()}")
            images = []
            for c in p.containers:
                text = c.reference or f"{c.image} (invalid: {c.error})"
                images.append(f"{'init:' if c.init else ''}{c.container}={text}")
            parts.append("images=" + ",".join(images) if images else "no images")
            return " ".join(parts)
        if isinstance(p, NamespaceEvent):
            if p.deleted:
                return "deleted"
            return f"phase={p.phase or '-'} uid={p.uid}"
        if isinstance(p, PullerDecision):
            text = f"{p.action} {p.image}"
            if p.digest:
                text += f"@{p.digest}" if "@" not in p.image else ""
            if p.reason:
                text += f" ({p.reason})"
            if p.workloads:
                text += " for " + ",".join(p.workloads)
            if p.dry_run:
                text += " [dry-run]"
            return text
        if isinstance(p, McsAuditRecord):
            text = f"{p.action} level={p.level or '-'}"
            if p.previous is not None:
                text += f" found={p.previous}"
            text += f" by {p.replica}"
            if p.dry_run:
                text += " [dry-run]"
            return text
        return self.error or self.raw[:120].decode("utf-8", "replace")

    def matches(self, f: Filters) -> bool:
        if f.empty():
            return True
        p = self.payload
        if f.node is not None and not (isinstance(p, PullerDecision) and p.node == f.node):
            return False
        if f.image is not None and f.image not in self.images():
            return False
        if not (f.kind or f.namespace or f.name):
            return True
        return any(_identity_matches(i, f, self.type) for i in self.identities())

    def as_json(self) -> dict[str, Any]:
        data: Any
        if self.payload is not None:
            data = json.loads(self.payload.model_dump_json())
        else:
            data = self.raw.decode("utf-8", "replace")
        out: dict[str, Any] = {
            "seq": self.seq,
            "stored_at": self.stored_at.isoformat(),
            "subject": self.subject,
            "type": self.type,
            "data": data,
        }
        if self.error:
            out["error"] = self.error
        return out


def _identity_matches(i: Identity, f: Filters, record_type: str) -> bool:
    if f.kind is not None:
        wanted = f.kind.lower()
        if wanted not in (i.kind.lower(), record_type):
            return False
    if f.namespace is not None and i.namespace != f.namespace:
        return False
    return f.name is None or i.name == f.name


# `cedar prepull` names its entries `<kind>-<name>` after the workload they stand for.
PREPULLED_KINDS = (*subjects.KUBERNETES_WORKLOAD_KINDS, "Pod")


def prepull_name(kind: str, name: str) -> str:
    return f"{kind.lower()}-{name}"


def prepull_origin(kind: str, namespace: str, name: str) -> Identity | None:
    """The workload a `Prepull` entry stands for (None for anything else)."""
    if kind != subjects.PREPULL_KIND:
        return None
    for origin in PREPULLED_KINDS:
        prefix = origin.lower() + "-"
        if name.startswith(prefix) and len(name) > len(prefix):
            return Identity(origin, namespace, name[len(prefix) :])
    return None


def parse_workload(text: str) -> Identity:
    """`Kind/namespace/name` as pullers write a workload (namespace may be empty)."""
    parts = text.split("/", 2)
    if len(parts) == 3:
        return Identity(*parts)
    if len(parts) == 2:
        return Identity(parts[0], "", parts[1])
    return Identity("", "", text)


def record_type(subject: str) -> str:
    if subject.startswith(subjects.WORKLOADS_PREFIX + "."):
        return TYPE_WORKLOAD
    if subject.startswith(subjects.NAMESPACES_PREFIX + "."):
        return TYPE_NAMESPACE
    if subject.startswith(subjects.DECISIONS_PREFIX + "."):
        return TYPE_DECISION
    if subject.startswith(subjects.AUDIT_PREFIX + "."):
        return TYPE_AUDIT
    return TYPE_UNKNOWN


_MODELS: dict[str, type[Payload]] = {
    TYPE_WORKLOAD: WorkloadImageSet,
    TYPE_NAMESPACE: NamespaceEvent,
    TYPE_DECISION: PullerDecision,
    TYPE_AUDIT: McsAuditRecord,
}


def decode(
    seq: int,
    stored_at: datetime,
    subject: str,
    data: bytes,
    headers: dict[str, str] | None = None,
) -> Record:
    """A history message as a Record; one that does not parse is kept, with the reason."""
    kind = record_type(subject)
    model = _MODELS.get(kind)
    payload: Payload | None = None
    error: str | None = None
    if model is None:
        error = "unknown subject"
    elif not data:
        # Stream markers (TTL expiry, purge) carry no body.
        error = "empty message (marker)"
    else:
        try:
            payload = model.model_validate_json(data)
        except ValidationError as err:
            error = f"not a valid {model.__name__}: {err.errors()[0].get('msg', err)}"
    return Record(
        seq=seq,
        stored_at=stored_at,
        subject=subject,
        type=kind,
        payload=payload,
        raw=data,
        headers=dict(headers or {}),
        error=error,
    )
