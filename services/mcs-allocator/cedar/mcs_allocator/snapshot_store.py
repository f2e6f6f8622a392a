"""The ledger snapshot's place: one object in the object store bucket `cedar-mcs-snapshots`.

The object's headers repeat the snapshot header's sequence, stream and time, so a replica
can tell whether a new snapshot is due without downloading the current one. Chunks are read
with `read_to_end` (nats-py's `ObjectStore.get` concatenates chunk by chunk, quadratic in the
size, and waits forever if a concurrent write has purged the chunks it was about to read);
the size and SHA-256 digest are checked as `get` would.

I/O: the object store bucket and its stream through nats-py; its errors leave as
`BusError` or `BusUnavailable` (`cedar.runtime.bus.bus_errors`).
"""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime

from nats.js import JetStreamContext
from nats.js.api import ObjectMeta, ObjectMetaOptions
from nats.js.errors import ObjectNotFoundError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_STREAM_TEMPLATE, ObjectStore

from cedar.mcs_allocator.errors import SnapshotUnavailable
from cedar.mcs_allocator.snapshot import Header
from cedar.proto import subjects
from cedar.runtime.bus import bus_errors, read_to_end
from cedar.runtime.errors import StalledRead

log = logging.getLogger("cedar.mcs_allocator.snapshot")

SEQ_HEADER = "Cedar-Ledger-Seq"
STREAM_HEADER = "Cedar-Ledger-Stream-Created"
WRITTEN_HEADER = "Cedar-Written-At"
CHUNK_SIZE = 512 * 1024  # under NATS's default 1 MiB max_payload
READ_STALL = 5.0
_DIGEST = "SHA-256="


@dataclass(frozen=True)
class Stored:
    """What the object's headers say of the stored snapshot."""

    seq: int
    stream_created: str
    written_at: datetime | None
    size: int


def _first(headers: dict[str, object], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, list):  # Go's nats.Header: a list of values per name
        value = value[0] if value else None
    return None if value is None else str(value)


class SnapshotStore:
    """The stored snapshot: its headers, its bytes, its replacement, and leftover chunks."""

    def __init__(self, store: ObjectStore, js: JetStreamContext) -> None:
        self.store = store
        self.js = js
        self.name = subjects.MCS_SNAPSHOT_OBJECT
        self.bucket = subjects.OBJ_MCS_SNAPSHOTS
        self.stream = OBJ_STREAM_TEMPLATE.format(bucket=self.bucket)

    async def stored(self) -> Stored | None:
        """The current snapshot's headers; None if there is none (or no readable headers)."""
        with bus_errors("read the ledger snapshot's headers"):
            try:
                info = await self.store.get_info(self.name)
            except ObjectNotFoundError:
                return None
        headers = info.headers or {}
        seq, created = _first(headers, SEQ_HEADER), _first(headers, STREAM_HEADER)
        if seq is None or created is None or not seq.isdigit():
            return None
        written = _first(headers, WRITTEN_HEADER)
        try:
            at = datetime.fromisoformat(written) if written else None
        except ValueError:
            at = None
        return Stored(int(seq), created, at, int(info.size or 0))

    async def read(self) -> bytes | None:
        """The current snapshot's bytes; None if there is none. Raises SnapshotUnavailable."""
        for attempt in (1, 2):
            with bus_errors("read the ledger snapshot's headers"):
                try:
                    info = await self.store.get_info(self.name)
                except ObjectNotFoundError:
                    return None
            if not info.nuid or not info.size:
                raise SnapshotUnavailable("the object has no content")
            chunks = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=info.nuid)
            try:
                with bus_errors("read the ledger snapshot"):
                    msgs = await read_to_end(self.js, self.stream, chunks, stall=READ_STALL)
            except StalledRead:
                # A replica wrote a newer snapshot and purged these chunks: read that one.
                log.info("snapshot changed while being read (attempt %d)", attempt)
                continue
            data = b"".join(m.data for m in msgs)
            if len(data) != info.size:
                log.info("snapshot changed while being read (attempt %d)", attempt)
                continue
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
            stored = (info.digest or "").removeprefix(_DIGEST).removeprefix(_DIGEST.lower())
            if stored != digest:
                raise SnapshotUnavailable("the snapshot's digest does not match its content")
            return data
        raise SnapshotUnavailable("the snapshot kept changing while being read")

    async def orphans(self) -> set[str]:
        """Chunk sets (by nuid) that the current snapshot does not use: another replica's
        write in progress, or one that lost a race (two writers at once each purge only
        the chunks they saw as current, so the loser's stay behind)."""
        prefix = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj="")
        with bus_errors("list the ledger snapshot's chunks"):
            info = await self.js.stream_info(self.stream, subjects_filter=prefix + ">")
            found = {subject[len(prefix) :] for subject in (info.state.subjects or {})}
            try:
                current = (await self.store.get_info(self.name)).nuid
            except ObjectNotFoundError:
                current = None
        return found - {current}

    async def purge(self, nuid: str) -> None:
        subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=nuid)
        with bus_errors("purge abandoned ledger snapshot chunks"):
            await self.js.purge_stream(self.stream, subject=subject)

    async def write(self, data: bytes, header: Header) -> None:
        """Replace the stored snapshot (the old chunks are purged once the new are in)."""
        meta = ObjectMeta(
            name=self.name,
            description=(
                f"Cedar MCS ledger snapshot: {header.labels} labels, {header.bindings} "
                f"bindings at ledger sequence {header.seq}"
            ),
            headers={
                SEQ_HEADER: [str(header.seq)],
                STREAM_HEADER: [header.stream_created],
                WRITTEN_HEADER: [header.written_at],
            },
            options=ObjectMetaOptions(max_chunk_size=CHUNK_SIZE),
        )
        with bus_errors("write the ledger snapshot"):
            await self.store.put(self.name, data, meta=meta)
