"""What the watcher knows and what it still has to publish. Pure: no I/O, no clock reads
except through the `clock` it is given.

Two parts:

- `Ledger`: per NATS subject, what was last stored in JetStream (digest of the content, uid,
  deleted or not), what is in flight, and what is pending. Pending changes are coalesced
  per subject (latest wins), so a NATS outage costs memory proportional to the number of
  changed workloads, not to the number of events. A deletion of something that was never
  stored (nor is in flight) is simply dropped.
- `WatchState`: the Kubernetes objects seen per kind. It turns list and watch events into
  offers to the ledger, skips status-only updates without re-reading the object (the
  fingerprint of what the content depends on did not change), decides which Deployment
  revisions are kept, and after a (re)list emits deletions for everything that vanished,
  including what a previous run of the watcher stored and is now gone.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cedar.proto import subjects
from cedar.proto.models import NamespaceEvent, WorkloadImageSet, utcnow
from cedar.watcher import ownership
from cedar.watcher.extract import (
    JSON,
    BadObject,
    controller_of,
    extract_namespace,
    extract_workload,
    identity,
    revision_of,
)

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
    content = item.model_dump_json(exclude=_VOLATILE).encode()
    digest = _hash(item.kind, item.uid, content)
    generation = "" if item.generation is None else str(item.generation)
    return Outgoing(
        kind=item.kind,
        subject=subject or subjects.workload_subject(item.kind, item.namespace, item.name),
        identity=item.identity,
        uid=item.uid,
        digest=digest,
        msg_id=_hash(digest, "generation", generation),
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
    uids) from a deletion, so that a revision dropped, kept again and dropped again within
    the duplicate window is not de-duplicated away."""
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
        msg_id=_hash(kind, uid, "deleted", *because),
        body=item.model_dump_json().encode(),
        deleted=True,
        ttl=ttl,
        seen=seen,
    )


def live_namespace(event: NamespaceEvent, seen: float = 0.0) -> Outgoing:
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


# ==================================================================== ledger


@dataclass(slots=True)
class Record:
    kind: str
    uid: str
    digest: str
    deleted: bool


class Ledger:
    """Stored / in flight / pending, per subject."""

    def __init__(self) -> None:
        self.stored: dict[str, Record] = {}
        self.pending: dict[str, Outgoing] = {}  # insertion order = publish order
        self.inflight: dict[str, Outgoing] = {}
        # Subjects whose last publish may or may not have been stored (ack lost).
        self.uncertain: set[str] = set()
        # Bumped whenever something is queued: tells the caller whether to wake the publisher.
        self.queued = 0

    def __len__(self) -> int:
        return len(self.pending) + len(self.inflight)

    def seed(self, subject: str, record: Record) -> None:
        """What a previous run (or another replica) stored, read back from the stream."""
        self.stored[subject] = record

    def _committed(self, subject: str) -> Record | Outgoing | None:
        return self.inflight.get(subject) or self.stored.get(subject)

    def offer(self, out: Outgoing) -> bool:
        """Queue `out` unless it is what is (or will be) stored already. True if queued."""
        committed = self._committed(out.subject)
        if (
            committed is not None
            and not committed.deleted
            and committed.digest == out.digest
            and not out.deleted
        ):
            self.pending.pop(out.subject, None)  # latest wins: back to what is stored
            return False
        self.pending.pop(out.subject, None)
        self.pending[out.subject] = out
        self.queued += 1
        return True

    def retire(self, subject: str, build: Callable[[], Outgoing]) -> bool:
        """The subject should hold nothing live. `build` makes the marker, if one is needed."""
        committed = self._committed(subject)
        if committed is None or committed.deleted:
            # Never stored (nor on its way): nothing to take back, and nothing to publish.
            self.pending.pop(subject, None)
            return False
        self.pending.pop(subject, None)
        self.pending[subject] = build()
        self.queued += 1
        return True

    def live(self, kind: str) -> list[tuple[str, str]]:
        """(subject, uid) of every subject of `kind` that is or will be live."""
        effective: dict[str, str | None] = {}
        for subject, record in self.stored.items():
            if record.kind == kind:
                effective[subject] = None if record.deleted else record.uid
        for source in (self.inflight, self.pending):  # later wins
            for subject, out in source.items():
                if out.kind == kind:
                    effective[subject] = None if out.deleted else out.uid
        return [(subject, uid) for subject, uid in effective.items() if uid is not None]

    def take(self, limit: int) -> list[Outgoing]:
        """Move up to `limit` pending changes in flight, one per subject at a time (a newer
        change waits until the older one is acked, so they cannot be stored out of order)."""
        chosen: list[str] = []
        for subject in self.pending:  # no copy: this runs for every batch
            if len(chosen) >= limit:
                break
            if subject not in self.inflight:
                chosen.append(subject)
        taken: list[Outgoing] = []
        for subject in chosen:
            out = self.pending.pop(subject)
            self.inflight[subject] = out
            taken.append(out)
        return taken

    def ack(self, out: Outgoing) -> None:
        if self.inflight.get(out.subject) is out:
            del self.inflight[out.subject]
        self.uncertain.discard(out.subject)
        self.stored[out.subject] = Record(out.kind, out.uid, out.digest, out.deleted)

    def resubmit(self, old: Outgoing, new: Outgoing) -> None:
        """Replace a just-failed `old` (back in pending) by `new`, unless a newer change
        for the subject is waiting."""
        if self.pending.get(old.subject) is old:
            self.pending[old.subject] = new

    def fail(self, out: Outgoing, *, uncertain: bool) -> None:
        """Put a failed publish back, unless a newer change for its subject is waiting."""
        if self.inflight.get(out.subject) is out:
            del self.inflight[out.subject]
        if uncertain:
            self.uncertain.add(out.subject)
        if out.subject not in self.pending:
            # Retried first: it is the oldest change there is.
            self.pending = {out.subject: out, **self.pending}
            self.queued += 1


# ==================================================================== watch state


@dataclass(frozen=True, slots=True)
class Report:
    """A bad object: logged with its identity and counted by reason."""

    kind: str
    identity: str
    reason: str
    detail: str


@dataclass(slots=True)
class Known:
    uid: str
    subject: str
    fingerprint: tuple[Any, ...] | None
    live: bool  # whether its desired state is a live message (False: folded or dropped)
    group: str | None = None  # the controlling Deployment's uid, for revisions


@dataclass(slots=True)
class Member:
    info: ownership.RevisionInfo
    namespace: str
    # None: too large to publish, or `stripped`: a dropped revision's message is not kept in
    # memory (at 50,000 ReplicaSets that is most of the watcher's memory); in the rare case
    # it is kept again, the object is fetched anew (`WatchState.refetch`).
    out: Outgoing | None
    stripped: bool = False


@dataclass
class _Listing:
    seen: set[tuple[str, str]] = field(default_factory=set)
    dirty_groups: set[str] = field(default_factory=set)


class WatchState:
    def __init__(
        self,
        ledger: Ledger,
        *,
        previous_revisions: int = 1,
        marker_ttl: float = 7 * 86400.0,
        max_body: int = 900_000,
        clock: Callable[[], datetime] = utcnow,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.previous_revisions = previous_revisions
        self.marker_ttl = marker_ttl
        self.max_body = max_body
        self.clock = clock
        self.wall = wall
        self.known: dict[str, dict[tuple[str, str], Known]] = {}
        self.groups: dict[str, dict[str, Member]] = {}
        self._listing: dict[str, _Listing] = {}
        # ReplicaSets kept again after their message was dropped from memory: the informer
        # GETs them and applies them as MODIFIED.
        self.refetch: set[tuple[str, str]] = set()

    def count(self, kind: str) -> int:
        return len(self.known.get(kind, ()))

    # ------------------------------------------------------------ lists

    def begin_list(self, kind: str) -> None:
        self._listing[kind] = _Listing()

    def end_list(self, kind: str) -> list[Report]:
        """After a complete list: vanished objects are deleted, revisions decided, and
        anything stored for this kind that is no longer desired is retired."""
        listing = self._listing.pop(kind, _Listing())
        known = self.known.setdefault(kind, {})
        for key in [k for k in known if k not in listing.seen]:
            entry = known.pop(key)
            self._forget(kind, key, entry, "", listing.dirty_groups)
        for group in listing.dirty_groups:
            self._evaluate(group)
        desired = {entry.subject for entry in known.values() if entry.live}
        now = self.clock()
        for subject, uid in self.ledger.live(kind):
            if subject in desired:
                continue
            parsed = parse_subject(subject)
            if parsed is None:
                continue
            _, namespace, name = parsed
            self.ledger.retire(subject, self._marker_builder(kind, namespace, name, uid, now))
        return []

    # ------------------------------------------------------------ events

    def apply(self, kind: str, type_: str, obj: JSON) -> list[Report]:
        """One list item (type LISTED) or watch event (ADDED, MODIFIED, DELETED)."""
        namespaced = kind != NAMESPACE
        try:
            ident = identity(obj, namespaced=namespaced)
        except BadObject as err:
            name = ""
            if isinstance(obj, dict):
                meta = obj.get("metadata")
                if isinstance(meta, dict):
                    name = f"{meta.get('namespace') or ''}/{meta.get('name') or '?'}"
            return [Report(kind, f"{kind}/{name}", err.reason, err.detail)]
        # Thousands of objects share a namespace: one string for all of them.
        key = (sys.intern(ident.namespace), ident.name)
        listing = self._listing.get(kind)
        if listing is not None:
            listing.seen.add(key)
        known = self.known.setdefault(kind, {})
        if type_ == "DELETED":
            entry = known.pop(key, None)
            if entry is None:
                entry = Known(ident.uid, self._subject(kind, *key), None, True)
            self._forget(kind, key, entry, ident.resource_version, None)
            return []
        if kind == NAMESPACE:
            return self._namespace(obj, ident.resource_version, key, known)
        return self._workload(
            kind,
            obj,
            uid=ident.uid,
            generation=ident.generation,
            key=key,
            known=known,
            listing=listing,
        )

    @staticmethod
    def _subject(kind: str, namespace: str, name: str) -> str:
        if kind == NAMESPACE:
            return subjects.namespace_subject(name)
        return subjects.workload_subject(kind, namespace, name)

    def _namespace(
        self, obj: JSON, rv: str, key: tuple[str, str], known: dict[tuple[str, str], Known]
    ) -> list[Report]:
        entry = known.get(key)
        uid = obj["metadata"]["uid"]
        if entry is not None and entry.uid == uid and rv and entry.fingerprint == (rv,):
            return []
        event, problems = extract_namespace(obj, self.clock())
        out = live_namespace(event, self.wall())
        known[key] = Known(uid, out.subject, (rv,) if rv else None, True)
        self.ledger.offer(out)
        return [Report(NAMESPACE, out.identity, p.reason, p.detail) for p in problems]

    def _workload(
        self,
        kind: str,
        obj: JSON,
        *,
        uid: str,
        generation: int | None,
        key: tuple[str, str],
        known: dict[tuple[str, str], Known],
        listing: _Listing | None,
    ) -> list[Report]:
        controller = controller_of(obj)
        revision = revision_of(obj) if kind == "ReplicaSet" else None
        fingerprint = (
            (uid, generation, revision, controller.uid if controller else None)
            if generation is not None
            else None
        )
        entry = known.get(key)
        if entry is not None and fingerprint is not None and entry.fingerprint == fingerprint:
            return []  # a status-only update: nothing the message depends on changed
        role = ownership.role_of(kind, controller)
        subject = subjects.workload_subject(kind, *key)
        old_group = entry.group if entry is not None else None
        reports: list[Report] = []
        identity_text = f"{kind}/{key[0]}/{key[1]}"
        out: Outgoing | None = None
        if role != ownership.FOLDED:
            item, problems = extract_workload(
                kind,
                obj,
                self.clock(),
                owner=controller if role == ownership.REVISION else None,
                revision=revision,
            )
            reports = [Report(kind, identity_text, p.reason, p.detail) for p in problems]
            out = live_workload(item, self.wall(), subject)
            if len(out.body) > self.max_body:
                reports.append(
                    Report(
                        kind,
                        identity_text,
                        "too_large",
                        f"image set of {len(out.body)} bytes exceeds {self.max_body}; "
                        "previous state kept",
                    )
                )
                out = None
        group = controller.uid if role == ownership.REVISION and controller else None
        new = Known(uid, subject, fingerprint, role == ownership.OWN, group)
        known[key] = new
        if old_group is not None and (old_group != group or (entry and entry.uid != uid)):
            members = self.groups.get(old_group, {})
            if entry is not None:
                members.pop(entry.uid, None)
            self._touch(old_group, listing)
        if role == ownership.OWN:
            if out is not None:
                self.ledger.offer(out)
        elif role == ownership.FOLDED:
            self.ledger.retire(subject, self._marker_builder(kind, *key, uid, self.clock()))
        else:
            assert group is not None
            meta = obj.get("metadata") or {}
            info = ownership.RevisionInfo(
                uid=uid,
                revision=revision,
                created=str(meta.get("creationTimestamp") or ""),
                name=key[1],
            )
            members = self.groups.setdefault(group, {})
            members[uid] = Member(info, key[0], out)
            if listing is not None:
                self._strip(members, None)  # keeps the memory of an initial list flat
            self._touch(group, listing)
        return reports

    def _touch(self, group: str, listing: _Listing | None) -> None:
        if listing is not None:
            listing.dirty_groups.add(group)  # decided once the whole list is in
        else:
            self._evaluate(group)

    def _evaluate(self, group: str) -> None:
        members = self.groups.get(group)
        if not members:
            self.groups.pop(group, None)
            return
        kept = ownership.kept_revisions((m.info for m in members.values()), self.previous_revisions)
        because = tuple(sorted(kept))
        known = self.known.setdefault("ReplicaSet", {})
        now = self.clock()
        for uid, member in members.items():
            key = (member.namespace, member.info.name)
            entry = known.get(key)
            subject = subjects.workload_subject("ReplicaSet", *key)
            if uid in kept:
                if entry is not None:
                    entry.live = True
                if member.out is not None:
                    self.ledger.offer(member.out)
                elif member.stripped:
                    self.refetch.add(key)
                    if entry is not None:
                        entry.fingerprint = None  # re-read it in full
            else:
                if entry is not None:
                    entry.live = False
                self.ledger.retire(
                    subject,
                    self._marker_builder("ReplicaSet", *key, uid, now, because=because),
                )
        self._strip(members, kept)

    def _strip(self, members: dict[str, Member], kept: frozenset[str] | None) -> None:
        """Forget the messages of revisions that are (or, while listing, surely will be)
        dropped. While listing, members only get added, so a revision outside the top
        1+N now can never be kept by the end of the list."""
        with_out = [m for m in members.values() if m.out is not None]
        if kept is None:
            if len(with_out) <= 1 + self.previous_revisions:
                return
            kept = ownership.kept_revisions(
                (m.info for m in members.values()), self.previous_revisions
            )
        for member in with_out:
            if member.info.uid not in kept:
                member.out = None
                member.stripped = True

    def _forget(
        self,
        kind: str,
        key: tuple[str, str],
        entry: Known,
        resource_version: str,
        dirty: set[str] | None,
    ) -> None:
        if entry.group is not None:
            members = self.groups.get(entry.group)
            if members is not None:
                members.pop(entry.uid, None)
            if dirty is not None:
                dirty.add(entry.group)
            else:
                self._evaluate(entry.group)
        self.ledger.retire(
            entry.subject,
            self._marker_builder(
                kind, *key, entry.uid, self.clock(), resource_version=resource_version
            ),
        )

    def _marker_builder(
        self,
        kind: str,
        namespace: str,
        name: str,
        uid: str,
        now: datetime,
        *,
        resource_version: str = "",
        because: tuple[str, ...] = (),
    ) -> Callable[[], Outgoing]:
        def build() -> Outgoing:
            if kind == NAMESPACE:
                return namespace_marker(
                    name,
                    uid,
                    now,
                    self.marker_ttl,
                    resource_version=resource_version,
                    seen=self.wall(),
                )
            return workload_marker(
                kind,
                namespace,
                name,
                uid,
                observed_at=now,
                ttl=self.marker_ttl,
                resource_version=resource_version,
                because=because,
                seen=self.wall(),
            )

        return build
