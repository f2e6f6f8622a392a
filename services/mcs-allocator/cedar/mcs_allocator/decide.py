"""What to do about one namespace, given the ledger mirror. Pure: no I/O.

`decide` turns a namespace's observed state and the ledger mirror into a list of actions;
`cedar.mcs_allocator.handler` executes them with compare-and-set writes and, when one loses
a race, reads the keys involved again and decides anew. A namespace is identified by its uid.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cedar.mcs_allocator.ledger_view import LedgerView
from cedar.mcs_allocator.scope import Scope
from cedar.proto.levels import Level, try_parse
from cedar.proto.models import NamespaceEvent


@dataclass(frozen=True)
class NsObject:
    """The parts of a namespace the allocator reads."""

    name: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""
    deleted: bool = False

    @classmethod
    def from_event(cls, event: NamespaceEvent) -> NsObject:
        return cls(
            name=event.name,
            uid=event.uid,
            labels=dict(event.labels),
            annotations=dict(event.annotations),
            resource_version=event.resource_version,
            deleted=event.deleted,
        )

    @classmethod
    def from_api(cls, obj: Mapping[str, Any]) -> NsObject:
        meta = obj.get("metadata") or {}
        return cls(
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            resource_version=str(meta.get("resourceVersion", "")),
        )

    def gone(self) -> NsObject:
        return NsObject(self.name, self.uid, self.labels, self.annotations, "", deleted=True)


# -- actions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Noop:
    reason: str  # "out-of-scope", "existing", "no-label"
    level: Level | None = None


@dataclass(frozen=True)
class Release:
    """Quarantine a label whose namespace (uid) is gone."""

    uid: str
    name: str
    level: Level


@dataclass(frozen=True)
class Drop:
    """Delete a label key this uid claimed but never bound (an interrupted race)."""

    uid: str
    level: Level


@dataclass(frozen=True)
class Unbind:
    """Delete an `ns.<uid>` key that points at a label the uid does not hold."""

    uid: str


@dataclass(frozen=True)
class Allocate:
    previous: str | None  # an invalid value found in the annotation, if any


@dataclass(frozen=True)
class Bind:
    level: Level


@dataclass(frozen=True)
class Write:
    """Put the level into the annotation(s)."""

    level: Level
    tamper: bool
    previous: str | None


@dataclass(frozen=True)
class MarkWritten:
    level: Level


@dataclass(frozen=True)
class Adopt:
    level: Level


@dataclass(frozen=True)
class LevelConflict:
    """The annotation names a label the ledger gives to someone else: report, never reassign."""

    level: Level
    owner_uid: str
    owner_name: str
    owner_state: str


Action = (
    Noop | Release | Drop | Unbind | Allocate | Bind | Write | MarkWritten | Adopt | LevelConflict
)

# Actions that write to the namespace or claim for it: taken only on a fresh read. A new
# namespace's allocation is taken on the event alone when it carries a resourceVersion: the
# PATCH is conditional on it, so a namespace changed or gone since fails (409/404) and is
# read again; that saves a GET on the hot path.
NEEDS_FRESH = (Write, Adopt, Bind)


@dataclass(frozen=True)
class Policy:
    scope: Scope
    annotations: tuple[str, ...]  # the first is the authoritative one
    categories: int
    per_label: int


def decide(obj: NsObject, view: LedgerView, policy: Policy) -> list[Action]:
    actions: list[Action] = []
    if obj.deleted:
        actions.extend(Release(obj.uid, obj.name, lv) for lv in sorted(view.labels_of(obj.uid)))
        return actions or [Noop("no-label")]

    # The same name under a new uid: the old namespace is gone, whatever events were lost.
    old_uid = view.uid_for_name(obj.name)
    if old_uid is not None and old_uid != obj.uid:
        actions.extend(Release(old_uid, obj.name, lv) for lv in sorted(view.labels_of(old_uid)))

    mine = view.labels_of(obj.uid)
    bound = view.ns.get(obj.uid)
    if bound is not None and bound.level not in mine:
        actions.append(Unbind(obj.uid))
        bound = None

    if not policy.scope.includes(obj.name, obj.labels) and not mine:
        actions.append(Noop("out-of-scope"))
        return actions

    text = obj.annotations.get(policy.annotations[0])
    current = try_parse(text, policy.categories, policy.per_label)

    if mine:
        if bound is not None:
            level = bound.level
        elif current is not None and current in mine:
            level = current
        else:
            level = min(mine)
        actions.extend(Drop(obj.uid, extra) for extra in sorted(mine - {level}))
        if bound is None:
            actions.append(Bind(level))
        written = bound is not None and bound.written
        wanted = str(level)
        if current != level or any(obj.annotations.get(a) != wanted for a in policy.annotations):
            # Only a value the allocator had written can have been tampered with; the
            # openshift mirror annotation is ours to keep in step without alarm.
            actions.append(Write(level, tamper=written and current != level, previous=text))
        elif not written:
            actions.append(MarkWritten(level))
        else:
            actions.append(Noop("existing", level))
        return actions

    if current is not None:
        owner = view.labels.get(current)
        if owner is None:
            actions.append(Adopt(current))
        else:
            actions.append(LevelConflict(current, owner.uid, owner.namespace, owner.state))
        return actions
    actions.append(Allocate(previous=text))
    return actions


def needs_fresh(obj: NsObject, actions: list[Action]) -> bool:
    """Whether the decision rests on the namespace as it is now, not on an event.

    Releasing another uid's label because this name now has this uid is only right if
    this uid is current: a stale event of an old uid must not release the new one's.
    """
    return any(
        isinstance(a, NEEDS_FRESH) or (isinstance(a, Release) and a.uid != obj.uid) for a in actions
    )


def needs_ledger_check(actions: list[Action]) -> bool:
    """Whether the decision deletes ledger keys on the strength of the mirror alone.

    The mirror may lag (or hold keys refreshed out of order); such a decision is taken
    again after the namespace's keys were read from the bucket itself.
    """
    return any(isinstance(a, Unbind | Drop) for a in actions)


def conflicts(namespaces: list[NsObject], policy: Policy) -> dict[Level, list[NsObject]]:
    """Labels that more than one live namespace's annotation claims (repair's report)."""
    by_level: dict[Level, list[NsObject]] = {}
    for obj in namespaces:
        level = try_parse(obj.annotations.get(policy.annotations[0]), policy.categories, None)
        if level is not None:
            by_level.setdefault(level, []).append(obj)
    return {level: objs for level, objs in by_level.items() if len(objs) > 1}
