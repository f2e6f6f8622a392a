"""The allocation ledger in the NATS KV bucket `cedar-mcs-ledger`, and each replica's mirror.

Key schema (values are JSON objects; times are RFC 3339 UTC):

``label.<A>_<B>`` (``label.<A>_<B>_<C>`` with three categories per label), categories in
ascending order, e.g. ``label.5_9`` for ``s0:c5,c9`` — one key per label ever handed out::

    {"level": "s0:c5,c9", "state": "allocated" | "quarantined",
     "namespace": "tenant-a", "uid": "<namespace uid>", "at": "<claimed or released at>",
     "replica": "<allocator pod>"}

  The key's existence is the label's claim: it is created with ``kv.create`` (fails when the
  key exists), and changed only with ``kv.update(..., last=revision)``. A quarantined label
  keeps the namespace and uid that last held it; ``at`` is the release time, and the label
  is reusable once ``at + CEDAR_MCS_QUARANTINE`` has passed (the reuse is again a CAS update).
  A key with no value (deleted) is a free label.

``ns.<uid>`` — the namespace (by uid) that holds a label::

    {"level": "s0:c5,c9", "namespace": "tenant-a", "uid": "<uid>", "written": true,
     "at": "<bound at>"}

  Created (``kv.create``) after the label's key, before the annotation is written; it makes
  two replicas racing on one namespace agree on one label. ``written`` turns true once the
  annotation carries the level: a missing annotation with ``written`` false is an
  allocation that was interrupted, with ``written`` true it was tampered with. Deleted when
  the namespace's label is released.

Readers such as ``cedar status --namespaces`` should read ``label.*`` for the truth about
labels and ``ns.*`` for a namespace's level.
"""

from __future__ import annotations

import gc
import json
import json.scanner
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Literal, NamedTuple

from nats.js.errors import (
    APIError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from cedar.mcs_allocator.levels import Level, from_key_token, parse
from cedar.mcs_allocator.pool import Pool

log = logging.getLogger("cedar.mcs_allocator.ledger")

_decode = json.JSONDecoder().decode
# The C scanner without `decode`'s whitespace handling: ~2x faster on the ledger's own
# compact JSON (start-up decodes every key).
_scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
_STATES = frozenset(("allocated", "quarantined"))
LABEL_PREFIX = "label."
_WRONG_LAST = (10071, 10164)
NS_PREFIX = "ns."

State = Literal["allocated", "quarantined"]


def label_key(level: Level) -> str:
    return LABEL_PREFIX + level.key_token


def ns_key(uid: str) -> str:
    return NS_PREFIX + uid


def _ts(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)  # Python 3.11 reads the "Z" suffix


class LabelEntry(NamedTuple):
    level: Level
    state: State
    namespace: str
    uid: str
    at: datetime
    replica: str = ""
    revision: int = 0

    def encode(self) -> bytes:
        return json.dumps(
            {
                "level": str(self.level),
                "state": self.state,
                "namespace": self.namespace,
                "uid": self.uid,
                "at": _ts(self.at),
                "replica": self.replica,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, key: str, raw: bytes, revision: int) -> LabelEntry:
        data = _decode(raw.decode())
        # The key is the label; the value's "level" is for readers only.
        level = from_key_token(key[len(LABEL_PREFIX) :])
        state = data["state"]
        if state not in ("allocated", "quarantined"):
            raise ValueError(f"unknown state {state!r}")
        return cls(
            level=level,
            state=state,
            namespace=str(data.get("namespace", "")),
            uid=str(data.get("uid", "")),
            at=_parse_ts(str(data["at"])),
            replica=str(data.get("replica", "")),
            revision=revision,
        )


class NsEntry(NamedTuple):
    uid: str
    namespace: str
    level: Level
    written: bool
    at: datetime
    revision: int = 0

    def encode(self) -> bytes:
        return json.dumps(
            {
                "level": str(self.level),
                "namespace": self.namespace,
                "uid": self.uid,
                "written": self.written,
                "at": _ts(self.at),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, key: str, raw: bytes, revision: int) -> NsEntry:
        data = json.loads(raw)
        return cls(
            uid=key.removeprefix(NS_PREFIX),
            namespace=str(data.get("namespace", "")),
            level=parse(str(data["level"]), 1 << 20, None),
            written=bool(data.get("written", False)),
            at=_parse_ts(str(data["at"])),
            revision=revision,
        )


class LedgerView:
    """One replica's in-memory mirror of the ledger, kept current from a KV watch.

    It may lag behind the bucket; every write is a CAS against the bucket, so a lagging
    mirror costs a retry, never a duplicate.
    """

    def __init__(self, pool: Pool, quarantine_seconds: float) -> None:
        self.pool = pool
        self.quarantine_seconds = quarantine_seconds
        self.labels: dict[Level, LabelEntry] = {}
        self.ns: dict[str, NsEntry] = {}
        # uid -> its label; a second label of one uid (an interrupted race) goes to _more.
        self._by_uid: dict[str, Level] = {}
        self._more: dict[str, set[Level]] = {}
        self._by_name: dict[str, str] = {}
        self.misfits: list[LabelEntry] = []

    # -- queries -----------------------------------------------------------------------

    def labels_of(self, uid: str) -> set[Level]:
        """Labels allocated to this namespace uid."""
        first = self._by_uid.get(uid)
        if first is None:
            return set()
        return {first} | self._more.get(uid, set())

    def uid_for_name(self, name: str) -> str | None:
        return self._by_name.get(name)

    def allocated(self) -> Iterable[LabelEntry]:
        return (e for e in self.labels.values() if e.state == "allocated")

    def counts(self, now: datetime) -> dict[str, int]:
        allocated = sum(1 for e in self.labels.values() if e.state == "allocated")
        quarantined = sum(
            1
            for e in self.labels.values()
            if e.state == "quarantined" and (now - e.at).total_seconds() < self.quarantine_seconds
        )
        return {
            "allocated": allocated,
            "quarantined": quarantined,
            "free": self.pool.total - allocated - quarantined,
        }

    # -- updates -----------------------------------------------------------------------

    def _unindex(self, entry: LabelEntry) -> None:
        if entry.state != "allocated":
            return
        uid = entry.uid
        more = self._more.get(uid)
        if more is not None and entry.level in more:
            more.discard(entry.level)
        elif self._by_uid.get(uid) == entry.level:
            if more:
                self._by_uid[uid] = more.pop()
            else:
                del self._by_uid[uid]
                if self._by_name.get(entry.namespace) == uid:
                    del self._by_name[entry.namespace]
        if more is not None and not more:
            del self._more[uid]

    def _index(self, entry: LabelEntry) -> None:
        if entry.state != "allocated":
            return
        first = self._by_uid.get(entry.uid)
        if first is None:
            self._by_uid[entry.uid] = entry.level
        elif first != entry.level:
            self._more.setdefault(entry.uid, set()).add(entry.level)
        self._by_name[entry.namespace] = entry.uid

    def set_label(self, entry: LabelEntry, *, update_pool: bool = True) -> None:
        old = self.labels.get(entry.level)
        if old is not None and old.revision > entry.revision:
            return  # an older read arriving late
        if old is not None:
            self._unindex(old)
        self.labels[entry.level] = entry
        self._index(entry)
        if not self.pool.fits(entry.level):
            self.misfits.append(entry)
            return
        if update_pool:
            index = self.pool.rank(entry.level)
            if entry.state == "allocated":
                self.pool.take(index)
            else:
                self.pool.quarantine(index, entry.at.timestamp())

    def drop_label(self, level: Level, revision: int = 0) -> None:
        old = self.labels.get(level)
        if old is None or old.revision > revision:
            return
        self._unindex(old)
        del self.labels[level]
        if self.pool.fits(level):
            self.pool.release(self.pool.rank(level))

    def set_ns(self, entry: NsEntry) -> None:
        old = self.ns.get(entry.uid)
        if old is not None and old.revision > entry.revision:
            return
        self.ns[entry.uid] = entry

    def drop_ns(self, uid: str, revision: int = 0) -> None:
        old = self.ns.get(uid)
        if old is not None and old.revision <= revision:
            del self.ns[uid]

    def apply(self, key: str, value: bytes | None, revision: int) -> None:
        """One KV change (value None: deleted or purged)."""
        try:
            if key.startswith(LABEL_PREFIX):
                if value:
                    self.set_label(LabelEntry.decode(key, value, revision))
                else:
                    self.drop_label(from_key_token(key.removeprefix(LABEL_PREFIX)), revision)
            elif key.startswith(NS_PREFIX):
                if value:
                    self.set_ns(NsEntry.decode(key, value, revision))
                else:
                    self.drop_ns(key.removeprefix(NS_PREFIX), revision)
        except (ValueError, KeyError, TypeError) as err:
            log.error("unreadable ledger entry %s: %s", key, err)

    @classmethod
    def build(
        cls,
        categories: int,
        per_label: int,
        quarantine_seconds: float,
        entries: Iterable[tuple[str, bytes, int]],
    ) -> LedgerView:
        """The mirror from a full read of the bucket, with the pool built in one pass."""
        # Half a million new objects and no cycles among them: the cyclic GC would walk
        # them again and again for nothing.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return cls._build(categories, per_label, quarantine_seconds, entries)
        finally:
            if collecting:
                gc.enable()

    @classmethod
    def _build(
        cls,
        categories: int,
        per_label: int,
        quarantine_seconds: float,
        entries: Iterable[tuple[str, bytes, int]],
    ) -> LedgerView:
        """Start-up decodes every key of the ledger (half a million labels when full), so the
        common case is inlined here: a two-category key, a canonical value. Anything else
        takes the general `decode` path.
        """
        labels: list[LabelEntry] = []
        bindings: list[NsEntry] = []
        make_label, make_ns = LabelEntry._make, NsEntry._make
        scan, fromiso = _scan, datetime.fromisoformat
        cut, nscut = len(LABEL_PREFIX), len(NS_PREFIX)
        for key, value, revision in entries:
            try:
                if key.startswith(LABEL_PREFIX):
                    parts = key[cut:].split("_")
                    data = scan(value.decode(), 0)[0]
                    a = b = -1
                    if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                        a, b = int(parts[0]), int(parts[1])
                    if not 0 <= a < b:
                        labels.append(LabelEntry.decode(key, value, revision))
                        continue
                    state = data["state"]
                    if state not in _STATES:
                        raise ValueError(f"unknown state {state!r}")
                    labels.append(
                        make_label(
                            (
                                Level((a, b)),
                                state,
                                str(data.get("namespace", "")),
                                str(data.get("uid", "")),
                                fromiso(str(data["at"])),
                                str(data.get("replica", "")),
                                revision,
                            )
                        )
                    )
                elif key.startswith(NS_PREFIX):
                    data = scan(value.decode(), 0)[0]
                    text = str(data["level"])
                    bound = _fast_level(text)
                    bindings.append(
                        make_ns(
                            (
                                key[nscut:],
                                str(data.get("namespace", "")),
                                parse(text, 1 << 20, None) if bound is None else bound,
                                bool(data.get("written", False)),
                                fromiso(str(data["at"])),
                                revision,
                            )
                        )
                    )
            except (ValueError, KeyError, TypeError, AttributeError, StopIteration) as err:
                log.error("unreadable ledger entry %s: %s", key, err)
        return cls.assemble(categories, per_label, quarantine_seconds, labels, bindings)

    @classmethod
    def assemble(
        cls,
        categories: int,
        per_label: int,
        quarantine_seconds: float,
        labels: Iterable[LabelEntry],
        bindings: Iterable[NsEntry],
    ) -> LedgerView:
        """The mirror from decoded entries (a full read, or a snapshot), the pool built in
        one pass. Indexing is inlined: at start-up it runs once per label of a full ledger.
        """
        pool = Pool(categories, per_label)
        view = cls(pool, quarantine_seconds)
        labels = list(labels)
        view.labels = by_level = dict(zip([e.level for e in labels], labels, strict=True))
        if len(by_level) != len(labels):  # a key seen twice (not from one read): last stands
            labels = list(by_level.values())
        view.ns = {b.uid: b for b in bindings}
        taken: list[int] = []
        quarantined: list[tuple[int, float]] = []
        by_uid, more, by_name = view._by_uid, view._more, view._by_name
        tables = pool._tables
        t1, t2 = tables[1], tables[2]
        fast2 = per_label == 2
        for entry in labels:
            level = entry.level
            cats = level.categories
            allocated = entry.state == "allocated"
            if allocated:
                uid = entry.uid
                first = by_uid.get(uid)
                if first is None:
                    by_uid[uid] = level
                elif first != level:
                    more.setdefault(uid, set()).add(level)
                by_name[entry.namespace] = uid
            if fast2 and len(cats) == 2 and cats[1] < categories:
                index = t1[cats[0]] + t2[cats[1]]
            elif pool.fits(level):
                index = pool.rank(level)
            else:
                view.misfits.append(entry)
                continue
            if allocated:
                taken.append(index)
            else:
                quarantined.append((index, entry.at.timestamp()))
        view.pool = Pool.build(categories, per_label, taken, quarantined, rng=pool.rng)
        return view


def _fast_level(text: str) -> Level | None:
    """`s0:cA,cB` in canonical spelling (A < B, no leading zeros), else None."""
    if not text.startswith("s0:c"):
        return None
    parts = text[4:].split(",c")
    if len(parts) != 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    a, b = int(parts[0]), int(parts[1])
    if not a < b or text != f"s0:c{a},c{b}":
        return None
    return Level((a, b))


class Ledger:
    """Compare-and-set operations on the bucket. `None` results mean "lost the race"."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def create(self, key: str, value: bytes) -> int | None:
        try:
            return await self.kv.create(key, value)
        except KeyWrongLastSequenceError:
            return None

    async def update(self, key: str, value: bytes, last: int) -> int | None:
        try:
            return await self.kv.update(key, value, last=last)
        except KeyWrongLastSequenceError:
            return None

    async def delete(self, key: str, last: int | None = None) -> bool:
        try:
            return await self.kv.delete(key, last=last)
        except KeyWrongLastSequenceError:
            return False
        except APIError as err:
            # delete() does not translate "wrong last sequence" as create/update do.
            if err.err_code in _WRONG_LAST:
                return False
            raise

    async def get(self, key: str) -> tuple[bytes | None, int]:
        """The value and revision; (None, revision or 0) when deleted or never written."""
        try:
            entry = await self.kv.get(key)
        except KeyDeletedError as err:
            return None, int(err.entry.revision or 0) if err.entry else 0
        except KeyNotFoundError:
            return None, 0
        return entry.value, int(entry.revision or 0)

    async def claim(self, entry: LabelEntry) -> LabelEntry | None:
        rev = await self.create(label_key(entry.level), entry.encode())
        return None if rev is None else entry._replace(revision=rev)

    async def change(self, entry: LabelEntry, last: int) -> LabelEntry | None:
        rev = await self.update(label_key(entry.level), entry.encode(), last)
        return None if rev is None else entry._replace(revision=rev)

    async def bind(self, entry: NsEntry) -> NsEntry | None:
        rev = await self.create(ns_key(entry.uid), entry.encode())
        return None if rev is None else entry._replace(revision=rev)

    async def mark_written(self, entry: NsEntry) -> NsEntry | None:
        new = entry._replace(written=True)
        rev = await self.update(ns_key(entry.uid), new.encode(), entry.revision)
        return None if rev is None else new._replace(revision=rev)
