"""Compare-and-set writes and single reads of the ledger, the NATS KV bucket `cedar-mcs-ledger`.

I/O: the ledger bucket through nats-py's KeyValue; its errors leave as `BusError` or
`BusUnavailable` (`cedar.runtime.bus.bus_errors`). The keys and values are
`cedar.proto.ledger`'s.
"""

from __future__ import annotations

from nats.js.errors import (
    APIError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from cedar.proto.ledger import LabelEntry, NsEntry, label_key, ns_key
from cedar.runtime.bus import bus_errors

# JetStream's "wrong last sequence" codes, which `KeyValue.delete` does not translate.
_WRONG_LAST = (10071, 10164)


class LedgerStore:
    """The ledger's keys, written only by compare-and-set. `None` (or False) results mean
    "lost the race": the key exists, or changed since the revision given."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def create(self, key: str, value: bytes) -> int | None:
        with bus_errors(f"create ledger key {key}"):
            try:
                return await self.kv.create(key, value)
            except KeyWrongLastSequenceError:
                return None

    async def update(self, key: str, value: bytes, last: int) -> int | None:
        with bus_errors(f"update ledger key {key}"):
            try:
                return await self.kv.update(key, value, last=last)
            except KeyWrongLastSequenceError:
                return None

    async def delete(self, key: str, last: int | None = None) -> bool:
        with bus_errors(f"delete ledger key {key}"):
            try:
                return await self.kv.delete(key, last=last)
            except KeyWrongLastSequenceError:
                return False
            except APIError as err:
                if err.err_code in _WRONG_LAST:
                    return False
                raise

    async def get(self, key: str) -> tuple[bytes | None, int]:
        """The value and revision; (None, revision or 0) when deleted or never written."""
        with bus_errors(f"read ledger key {key}"):
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
