"""Pure: the watcher's outbox, what is still to be stored in JetStream, per subject. No I/O.

Per NATS subject it knows what was last stored (digest of the content, uid, deleted or
not), what is in flight, and what is pending. Pending changes are coalesced per subject
(latest wins), so a NATS outage costs memory proportional to the number of changed
workloads, not to the number of events. A deletion of something that was never stored (nor
is in flight) is simply dropped. The publisher takes from it and reports back each result.

Only live messages keep a record: a subject whose deletion marker is stored (or read back)
is forgotten, since a deleted record and no record mean the same to `offer`, `retire` and
`live`. Otherwise the watcher would keep one record per subject it ever stored, and every
rollout names a new ReplicaSet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cedar.watcher.messages import Outgoing


@dataclass(slots=True)
class StoredRecord:
    """What the last message stored on a subject was (read from its headers, or acked)."""

    kind: str
    uid: str
    digest: str
    deleted: bool


class Outbox:
    """Stored / in flight / pending, per subject."""

    def __init__(self) -> None:
        self.stored: dict[str, StoredRecord] = {}
        self.pending: dict[str, Outgoing] = {}  # insertion order = publish order
        self.inflight: dict[str, Outgoing] = {}
        # Subjects whose last publish may or may not have been stored (ack lost).
        self.uncertain: set[str] = set()
        # Bumped whenever something is queued: tells the caller whether to wake the publisher.
        self.queued = 0

    def __len__(self) -> int:
        return len(self.pending) + len(self.inflight)

    @property
    def records(self) -> int:
        """How many subjects the outbox holds a stored record for (what its memory grows with)."""
        return len(self.stored)

    def seed(self, subject: str, record: StoredRecord) -> None:
        """What a previous run (or another replica) stored, read back from the stream."""
        if record.deleted:
            # Popped, not skipped: a retried seed may find a marker where it read a live one.
            self.stored.pop(subject, None)
        else:
            self.stored[subject] = record

    def _committed(self, subject: str) -> StoredRecord | Outgoing | None:
        return self.inflight.get(subject) or self.stored.get(subject)

    def offer(self, out: Outgoing) -> None:
        """Queue `out` unless it is what is (or will be) stored already."""
        committed = self._committed(out.subject)
        self.pending.pop(out.subject, None)  # latest wins
        if (
            committed is not None
            and not committed.deleted
            and committed.digest == out.digest
            and not out.deleted
            # After a lost ack the subject may hold the newer change: publish it again.
            and out.subject not in self.uncertain
        ):
            return  # back to what is stored
        self.pending[out.subject] = out
        self.queued += 1

    def retire(self, subject: str, build: Callable[[], Outgoing]) -> None:
        """The subject should hold nothing live. `build` makes the marker, if one is needed."""
        committed = self._committed(subject)
        self.pending.pop(subject, None)
        if (committed is None or committed.deleted) and subject not in self.uncertain:
            # Never stored (nor on its way): nothing to take back, and nothing to publish.
            return
        self.pending[subject] = build()
        self.queued += 1

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
        """`out` is stored: it is what its subject holds now."""
        if self.inflight.get(out.subject) is out:
            del self.inflight[out.subject]
        self.uncertain.discard(out.subject)
        if out.deleted:
            self.stored.pop(out.subject, None)  # the subject holds nothing live now
        else:
            self.stored[out.subject] = StoredRecord(out.kind, out.uid, out.digest, False)

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
