"""Pure: what the watcher knows of the Kubernetes objects it watches. No I/O, no clock reads
except through the `clock` and `wall` it is given.

`WatchState` keeps the objects seen per kind and turns list and watch events into changes
offered to the outbox. It skips status-only updates without re-reading the object (the
fingerprint of what the content depends on did not change), decides which Deployment
revisions are kept, and after a (re)list retires everything that vanished, including what
a previous run of the watcher stored and is now gone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cedar.proto import subjects
from cedar.proto.models import utcnow
from cedar.proto.workloads import (
    JSON,
    BadObject,
    controller_of,
    extract_namespace,
    extract_workload,
    identity,
    revision_of,
)
from cedar.watcher import ownership
from cedar.watcher.messages import (
    NAMESPACE,
    Outgoing,
    live_namespace,
    live_workload,
    namespace_marker,
    parse_subject,
    workload_marker,
)
from cedar.watcher.outbox import Outbox


@dataclass(frozen=True, slots=True)
class Report:
    """A bad object: logged with its identity and counted by reason."""

    kind: str
    identity: str
    reason: str
    detail: str


@dataclass(slots=True)
class Known:
    """One object seen: where its message goes, and what its content depends on."""

    uid: str
    subject: str
    fingerprint: tuple[Any, ...] | None
    live: bool  # whether its desired state is a live message (False: folded or dropped)
    group: str | None = None  # the controlling Deployment's uid, for revisions


@dataclass(slots=True)
class Member:
    """One revision (ReplicaSet) of a Deployment, and its message while it may be kept."""

    info: ownership.RevisionInfo
    namespace: str
    # None: too large to publish, or `stripped`: a dropped revision's message is not kept in
    # memory (at 50,000 ReplicaSets that is most of the watcher's memory); in the rare case
    # it is kept again, the object is fetched anew (`WatchState.refetch`).
    out: Outgoing | None
    stripped: bool = False


@dataclass
class _Listing:
    """A list in progress: what it has seen, and the revision groups to decide at its end."""

    seen: set[tuple[str, str]] = field(default_factory=set)
    dirty_groups: set[str] = field(default_factory=set)


class WatchState:
    """The objects seen per kind, and the revision groups of Deployments."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        previous_revisions: int = 1,
        marker_ttl: float = 7 * 86400.0,
        max_body: int = 900_000,
        clock: Callable[[], datetime] = utcnow,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
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

    def end_list(self, kind: str) -> None:
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
        for subject, uid in self.outbox.live(kind):
            if subject in desired:
                continue
            parsed = parse_subject(subject)
            if parsed is None:
                continue
            _, namespace, name = parsed
            self.outbox.retire(subject, self._marker_builder(kind, namespace, name, uid, now))

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
        self.outbox.offer(out)
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
                self.outbox.offer(out)
        elif role == ownership.FOLDED:
            self.outbox.retire(subject, self._marker_builder(kind, *key, uid, self.clock()))
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
                    self.outbox.offer(member.out)
                elif member.stripped:
                    self.refetch.add(key)
                    if entry is not None:
                        entry.fingerprint = None  # re-read it in full
            else:
                if entry is not None:
                    entry.live = False
                self.outbox.retire(
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
        self.outbox.retire(
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
