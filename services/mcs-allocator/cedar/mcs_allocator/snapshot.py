"""A compact image of the ledger mirror, so that a replica starts fast. Pure: no I/O.

A full ledger is half a million `label.*` keys and as many `ns.*` bindings; read one message
at a time, that takes seconds per hundred thousand keys. A snapshot holds the same entries
in columns (integer arrays, newline-joined strings, zlib-compressed), tagged with the ledger
stream sequence it reflects. Loading one is decoding a few large buffers; the ledger stream
is then replayed from that sequence, so the snapshot never needs to be current, only valid.

Layout (format 1)::

    MAGIC  u32 big-endian header length  header (JSON)  zlib(body)

The header names the stream sequence, the stream it belongs to (its creation time: a
bucket deleted and made again starts its sequences over), the entry counts, and the byte
length of each body section, in the order of `_LABEL_COLUMNS` then `_NS_COLUMNS`. Integer
arrays are little-endian.

`cedar.mcs_allocator.snapshot_store` stores it in the object store bucket
`cedar-mcs-snapshots`; `cedar.mcs_allocator.snapshot_keeper` decides when one is used and
when a new one is written.
"""

from __future__ import annotations

import json
import sys
import zlib
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from typing import NamedTuple, TypeVar

from cedar.mcs_allocator.errors import SnapshotError
from cedar.mcs_allocator.ledger_view import LedgerView
from cedar.proto.ledger import LabelEntry, NsEntry
from cedar.proto.levels import Level

FORMAT = 1
MAGIC = b"CEDAR-MCS-LEDGER-SNAPSHOT\n"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LITTLE = sys.byteorder == "little"
_STATES = ("allocated", "quarantined")
T = TypeVar("T")

_LABEL_COLUMNS = (
    "widths",
    "categories",
    "states",
    "at",
    "revisions",
    "namespaces",
    "uids",
    "replicas",
)
# A binding that repeats its label's namespace, uid and level (nearly all) names the label by
# its position in "refs" instead; the rest ("loose") carry their own.
_NS_COLUMNS = ("refs", "written", "at", "revisions", "widths", "categories", "namespaces", "uids")


@dataclass(frozen=True)
class Header:
    seq: int  # the ledger stream sequence the image reflects
    stream_created: str  # the ledger stream's creation time, as the server reports it
    labels: int
    bindings: int
    written_at: str
    replica: str


class Image(NamedTuple):
    """A decoded snapshot: its header and every entry."""

    header: Header
    labels: list[LabelEntry]
    bindings: list[NsEntry]


# -- columns -------------------------------------------------------------------------------


def _ints(code: str, values: Iterable[int]) -> bytes:
    arr = array(code, values)
    if not _LITTLE:
        arr.byteswap()
    return arr.tobytes()


def _read_ints(code: str, raw: memoryview, count: int, what: str) -> array[int]:
    arr = array(code)
    if len(raw) != count * arr.itemsize:
        raise SnapshotError(f"{what}: {len(raw)} bytes for {count} entries")
    arr.frombytes(raw)
    if not _LITTLE:
        arr.byteswap()
    return arr


def _strings(values: Sequence[str], what: str) -> bytes:
    text = "\n".join(values)
    # A newline inside a value would shift every later entry; such a value is no
    # Kubernetes name or uid, but the ledger's JSON could hold one.
    if text.count("\n") != max(len(values) - 1, 0):
        raise SnapshotError(f"a {what} value holds a newline; it cannot be put in a snapshot")
    return text.encode()


def _read_strings(raw: memoryview, count: int, what: str) -> list[str]:
    values = str(raw, "utf-8").split("\n") if count else []
    if len(values) != count:
        raise SnapshotError(f"{what}: {len(values)} values for {count} entries")
    return values


def _micros(at: datetime) -> int:
    delta = at - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _levels(levels: Iterable[Level]) -> tuple[bytes, bytes]:
    widths = bytearray()
    flat: list[int] = []
    for level in levels:
        widths.append(len(level.categories))
        flat.extend(level.categories)
    return bytes(widths), _ints("I", flat)


def _read_levels(column: memoryview, raw: memoryview, count: int, what: str) -> list[Level]:
    widths = bytes(column)
    if len(widths) != count:
        raise SnapshotError(f"{what} widths: {len(widths)} for {count} entries")
    flat = _read_ints("I", raw, sum(widths), f"{what} categories")
    if widths.count(2) == count:  # the common case, without a per-entry slice
        it = iter(flat)
        return [Level(pair) for pair in zip(it, it, strict=True)]
    out: list[Level] = []
    pos = 0
    for width in widths:
        cats = tuple(flat[pos : pos + width])
        pos += width
        if not 0 < width <= 3 or any(a >= b for a, b in pairwise(cats)):
            raise SnapshotError(f"{what}: {cats} is not a label")
        out.append(Level(cats))
    return out


# -- encode --------------------------------------------------------------------------------


def encode(
    labels: Sequence[LabelEntry],
    bindings: Sequence[NsEntry],
    *,
    seq: int,
    stream_created: str,
    replica: str,
    now: datetime,
) -> bytes:
    """The snapshot of these entries (the mirror at ledger stream sequence `seq`)."""
    replicas: dict[str, int] = {}
    label_widths, label_cats = _levels(e.level for e in labels)
    sections = [
        label_widths,
        label_cats,
        bytes(0 if e.state == "allocated" else 1 for e in labels),
        _ints("q", (_micros(e.at) for e in labels)),
        _ints("Q", (e.revision for e in labels)),
        _strings([e.namespace for e in labels], "namespace"),
        _strings([e.uid for e in labels], "uid"),
        _ints("I", (replicas.setdefault(e.replica, len(replicas)) for e in labels)),
    ]
    position = {e.level: i for i, e in enumerate(labels)}
    refs: list[int] = []
    loose: list[NsEntry] = []
    for b in bindings:
        i = position.get(b.level, -1)
        if i >= 0 and (labels[i].uid != b.uid or labels[i].namespace != b.namespace):
            i = -1
        refs.append(i)
        if i < 0:
            loose.append(b)
    ns_widths, ns_cats = _levels(b.level for b in loose)
    sections += [
        _ints("i", refs),
        bytes(1 if b.written else 0 for b in bindings),
        _ints("q", (_micros(b.at) for b in bindings)),
        _ints("Q", (b.revision for b in bindings)),
        ns_widths,
        ns_cats,
        _strings([b.namespace for b in loose], "namespace"),
        _strings([b.uid for b in loose], "uid"),
    ]
    header = {
        "format": FORMAT,
        "seq": seq,
        "stream_created": stream_created,
        "labels": len(labels),
        "bindings": len(bindings),
        "written_at": now.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "replica": replica,
        "replicas": list(replicas),
        "sections": [len(s) for s in sections],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    body = zlib.compress(b"".join(sections), 1)
    return MAGIC + len(head).to_bytes(4, "big") + head + body


# -- decode --------------------------------------------------------------------------------


def _split(data: bytes) -> tuple[dict[str, object], memoryview]:
    if not data.startswith(MAGIC):
        raise SnapshotError("not a Cedar ledger snapshot")
    start = len(MAGIC) + 4
    size = int.from_bytes(data[len(MAGIC) : start], "big")
    try:
        head = json.loads(data[start : start + size])
    except ValueError as err:
        raise SnapshotError(f"unreadable header: {err}") from err
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        found = head.get("format") if isinstance(head, dict) else None
        raise SnapshotError(f"snapshot format {found!r}; this version reads {FORMAT}")
    return head, memoryview(data)[start + size :]


def read_header(data: bytes) -> Header:
    """The header of a snapshot; raises SnapshotError."""
    return _refusing(lambda: _header(_split(data)[0]))


def _header(head: dict[str, object]) -> Header:
    try:
        return Header(
            seq=int(head["seq"]),  # type: ignore[call-overload]
            stream_created=str(head["stream_created"]),
            labels=int(head["labels"]),  # type: ignore[call-overload]
            bindings=int(head["bindings"]),  # type: ignore[call-overload]
            written_at=str(head.get("written_at", "")),
            replica=str(head.get("replica", "")),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise SnapshotError(f"incomplete header: {err}") from err


def _refusing(read: Callable[[], T]) -> T:
    """`read()`, with any sign of a damaged snapshot as SnapshotError: a snapshot is only
    ever a shortcut, and a damaged one must send the allocator to the ledger, not stop it."""
    try:
        return read()
    except SnapshotError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as err:
        raise SnapshotError(f"damaged snapshot ({err.__class__.__name__}: {err})") from err


def decode(data: bytes) -> Image:
    """The header and every entry of a snapshot; raises SnapshotError."""
    return _refusing(lambda: _decode(data))


def _decode(data: bytes) -> Image:
    head, compressed = _split(data)
    header = _header(head)
    sizes = head.get("sections")
    replicas = head.get("replicas")
    if (
        not isinstance(sizes, list)
        or len(sizes) != len(_LABEL_COLUMNS) + len(_NS_COLUMNS)
        or not all(type(size) is int and size >= 0 for size in sizes)
    ):
        raise SnapshotError("the header does not list the body's sections")
    if not isinstance(replicas, list):
        raise SnapshotError("the header does not list the replicas")
    expected = sum(sizes)
    inflate = zlib.decompressobj()
    try:
        # Never more than the header announces (and one byte to tell): a damaged body
        # must not inflate to gigabytes first.
        body = inflate.decompress(compressed, expected + 1)
    except zlib.error as err:
        raise SnapshotError(f"corrupt body: {err}") from err
    if len(body) > expected or inflate.unconsumed_tail:
        raise SnapshotError(f"corrupt body: it inflates past the {expected} bytes the header says")
    if not inflate.eof:
        raise SnapshotError("corrupt body: incomplete or truncated stream")
    if len(body) != expected:
        raise SnapshotError(f"body is {len(body)} bytes, the header says {expected}")
    # Views, not copies: the body is the biggest buffer of the load.
    whole = memoryview(body)
    parts: list[memoryview] = []
    pos = 0
    for size in sizes:
        parts.append(whole[pos : pos + size])
        pos += size
    labels = _labels(parts[: len(_LABEL_COLUMNS)], header.labels, [str(r) for r in replicas])
    return Image(header, labels, _bindings(parts[len(_LABEL_COLUMNS) :], header.bindings, labels))


def _times(raw: memoryview, count: int, what: str) -> list[datetime]:
    # Exact: a double holds a time since 1970 to well under half a microsecond.
    at = datetime.fromtimestamp
    return [at(us / 1e6, UTC) for us in _read_ints("q", raw, count, what)]


def _labels(parts: list[memoryview], n: int, replica_names: list[str]) -> list[LabelEntry]:
    widths, cats, states, at, revisions, names, uids, replicas = parts
    if len(states) != n or any(s > 1 for s in states):
        raise SnapshotError("label states: wrong count or unknown state")
    replica_ids = _read_ints("I", replicas, n, "label replicas")
    if n and max(replica_ids) >= len(replica_names):
        raise SnapshotError("label replicas: index past the replica list")
    make = LabelEntry._make
    return list(
        map(
            make,
            zip(
                _read_levels(widths, cats, n, "label"),
                [_STATES[s] for s in states],
                _read_strings(names, n, "label namespaces"),
                _read_strings(uids, n, "label uids"),
                _times(at, n, "label times"),
                [replica_names[i] for i in replica_ids],
                _read_ints("Q", revisions, n, "label revisions"),
                strict=True,
            ),
        )
    )


def _bindings(parts: list[memoryview], n: int, labels: list[LabelEntry]) -> list[NsEntry]:
    refs_raw, written, at, revisions, widths, cats, names, uids = parts
    if len(written) != n:
        raise SnapshotError("binding flags: wrong count")
    refs = _read_ints("i", refs_raw, n, "binding refs")
    if n and max(refs) >= len(labels):
        raise SnapshotError("binding refs: index past the labels")
    nloose = refs.count(-1)
    loose = zip(
        _read_strings(uids, nloose, "binding uids"),
        _read_strings(names, nloose, "binding namespaces"),
        _read_levels(widths, cats, nloose, "binding"),
        strict=True,
    )
    make = NsEntry._make
    out: list[NsEntry] = []
    append = out.append
    for ref, flag, when, revision in zip(
        refs,
        written,
        _times(at, n, "binding times"),
        _read_ints("Q", revisions, n, "binding revisions"),
        strict=True,
    ):
        if ref >= 0:
            label = labels[ref]
            append(make((label.uid, label.namespace, label.level, flag == 1, when, revision)))
        elif ref == -1:
            uid, name, level = next(loose)
            append(make((uid, name, level, flag == 1, when, revision)))
        else:
            raise SnapshotError(f"binding refs: {ref} is no position")
    return out


def of_view(view: LedgerView) -> tuple[list[LabelEntry], list[NsEntry]]:
    """The mirror's entries, copied at once (the entries are immutable), for `encode`."""
    return list(view.labels.values()), list(view.ns.values())
