"""The MCS allocation ledger's key schema and entry codecs. Pure: no I/O.

The ledger is the NATS KV bucket `cedar-mcs-ledger`. The allocator writes it; `cedar status
--namespaces` reads it. Values are JSON objects; times are RFC 3339 UTC.

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

Readers should read ``label.*`` for the truth about labels and ``ns.*`` for a namespace's
level.
"""

from __future__ import annotations

import json
import json.scanner
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

from cedar.proto.levels import Level, from_key_token, parse

LABEL_PREFIX = "label."
NS_PREFIX = "ns."

State = Literal["allocated", "quarantined"]

_decode = json.JSONDecoder().decode
# The C scanner without `decode`'s whitespace handling: ~2x faster on the ledger's own
# compact JSON (start-up decodes every key).
_scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
_STATES = frozenset(("allocated", "quarantined"))
# A binding's level is read whatever the pool's settings are now (the allocator refuses
# labels that do not fit, by their `label.*` key).
_ANY_CATEGORY = 1 << 20


def _object(raw: bytes) -> dict[str, Any]:
    """An entry's JSON object. Whatever else the value holds is an error of the kinds
    `decode` documents: not JSON (or JSON nested deeper than the interpreter's stack) a
    ValueError, another JSON type a TypeError; a damaged entry must never raise anything
    its readers do not catch."""
    try:
        data = _decode(raw.decode())
    except RecursionError as err:
        raise ValueError("the value is nested too deeply to be a ledger entry") from err
    if not isinstance(data, dict):
        raise TypeError(f"the value is a JSON {type(data).__name__}, not an object")
    return data


def label_key(level: Level) -> str:
    return LABEL_PREFIX + level.key_token


def level_of_key(key: str) -> Level:
    """The label a `label.*` key names; raises InvalidLevel."""
    return from_key_token(key[len(LABEL_PREFIX) :])


def ns_key(uid: str) -> str:
    return NS_PREFIX + uid


def uid_of_key(key: str) -> str:
    """The namespace uid an `ns.*` key names."""
    return key.removeprefix(NS_PREFIX)


def _ts(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)  # Python 3.11 reads the "Z" suffix


class LabelEntry(NamedTuple):
    """The value of a `label.*` key, with the key's revision."""

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
        """Raises ValueError (InvalidLevel included), KeyError or TypeError."""
        data = _object(raw)
        # The key is the label; the value's "level" is for readers only.
        level = level_of_key(key)
        state = data["state"]
        if state not in _STATES:
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
    """The value of an `ns.*` key (a namespace's binding to its label), with its revision."""

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
        """Raises ValueError (InvalidLevel included), KeyError or TypeError."""
        data = _object(raw)
        return cls(
            uid=uid_of_key(key),
            namespace=str(data.get("namespace", "")),
            level=parse(str(data["level"]), _ANY_CATEGORY, None),
            written=bool(data.get("written", False)),
            at=_parse_ts(str(data["at"])),
            revision=revision,
        )


class Decoded(NamedTuple):
    """A full read of the ledger, decoded."""

    labels: list[LabelEntry]
    bindings: list[NsEntry]
    unreadable: list[tuple[str, Exception]]  # (key, why) of the entries left out


def decode_all(entries: Iterable[tuple[str, bytes, int]]) -> Decoded:
    """Every (key, value, revision) of a full read, decoded; keys of neither kind ignored.

    Start-up decodes every key of the ledger (half a million labels when full), so the
    common case is inlined here: a two-category key, a canonical value. Anything else
    takes the general `decode` path.
    """
    labels: list[LabelEntry] = []
    bindings: list[NsEntry] = []
    unreadable: list[tuple[str, Exception]] = []
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
                            parse(text, _ANY_CATEGORY, None) if bound is None else bound,
                            bool(data.get("written", False)),
                            fromiso(str(data["at"])),
                            revision,
                        )
                    )
                )
        except (ValueError, KeyError, TypeError, AttributeError, StopIteration) as err:
            unreadable.append((key, err))
        except RecursionError as err:  # JSON nested deeper than the stack: damaged too
            unreadable.append((key, ValueError(f"nested too deeply: {err}")))
    return Decoded(labels, bindings, unreadable)


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
