"""The replica's in-memory mirror of the ledger, and the pool built from it. Pure: no I/O.

`cedar.mcs_allocator.mirror` loads it and keeps it current; the decisions
(`cedar.mcs_allocator.decide`) read it; the snapshot (`cedar.mcs_allocator.snapshot`) is
an image of it. The key schema and the entries are `cedar.proto.ledger`'s.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable
from datetime import datetime

from cedar.mcs_allocator.pool import Pool
from cedar.proto.ledger import (
    LABEL_PREFIX,
    NS_PREFIX,
    LabelEntry,
    NsEntry,
    decode_all,
    level_of_key,
    uid_of_key,
)
from cedar.proto.levels import Level

log = logging.getLogger("cedar.mcs_allocator.ledger")


class LedgerView:
    """One replica's in-memory mirror of the ledger, kept current from the ledger's stream.

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
                    self.drop_label(level_of_key(key), revision)
            elif key.startswith(NS_PREFIX):
                if value:
                    self.set_ns(NsEntry.decode(key, value, revision))
                else:
                    self.drop_ns(uid_of_key(key), revision)
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
            decoded = decode_all(entries)
            for key, err in decoded.unreadable:
                log.error("unreadable ledger entry %s: %s", key, err)
            return cls.assemble(
                categories, per_label, quarantine_seconds, decoded.labels, decoded.bindings
            )
        finally:
            if collecting:
                gc.enable()

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
