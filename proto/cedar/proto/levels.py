"""SELinux MCS levels as Cedar hands them out, `s0:cA,cB` (or `s0:cA,cB,cC`). Pure: no I/O.

A level is a sensitivity (always `s0` here) and a set of categories. Two spellings of the
same set are the same label, so levels are compared through `Level`, which holds the
categories sorted; `str(level)` is the canonical spelling, lowest category first.

Refused: out-of-range categories, ranges (`c0.c1023`, `s0-s0:c1`), a bare `s0`, repeated
categories (`c5,c5` is the one-category label `c5`, which this pool never hands out), and a
category count other than the pool's categories-per-label.

Part of the contracts: the allocator hands levels out, `cedar status` reads them back from
the ledger (`cedar.proto.ledger`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CATEGORY = re.compile(r"c(0|[1-9][0-9]{0,5})")


class InvalidLevel(ValueError):
    """The text is not a level this pool could have handed out."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"invalid MCS level {text!r}: {reason}")
        self.text = text
        self.reason = reason


@dataclass(frozen=True, order=True, slots=True)
class Level:
    """A category set, kept sorted so that equal sets compare and hash equal."""

    categories: tuple[int, ...]

    def __str__(self) -> str:
        return "s0:" + ",".join(f"c{c}" for c in self.categories)

    @property
    def key_token(self) -> str:
        """The label's part of a ledger key: `5_9` for `s0:c5,c9`."""
        return "_".join(str(c) for c in self.categories)

    @classmethod
    def of(cls, *categories: int) -> Level:
        return cls(tuple(sorted(categories)))


def parse(text: str, categories: int = 1024, per_label: int | None = 2) -> Level:
    """Parse and validate `text`; raises InvalidLevel.

    `per_label=None` accepts 2 or 3 categories (reading a ledger written under other settings).
    """
    raw = text.strip()
    sensitivity, sep, rest = raw.partition(":")
    if sensitivity != "s0":
        raise InvalidLevel(text, "the sensitivity must be s0 (no ranges like s0-s0)")
    if not sep or not rest:
        raise InvalidLevel(text, "a bare sensitivity has no categories")
    if "." in rest:
        raise InvalidLevel(text, "category ranges (cA.cB) are not single labels")
    found: list[int] = []
    for part in rest.split(","):
        match = _CATEGORY.fullmatch(part.strip())
        if match is None:
            raise InvalidLevel(text, f"{part!r} is not a category like c12")
        found.append(int(match.group(1)))
    if len(set(found)) != len(found):
        raise InvalidLevel(text, "a category is repeated")
    allowed = (2, 3) if per_label is None else (per_label,)
    if len(found) not in allowed:
        wanted = " or ".join(map(str, allowed))
        raise InvalidLevel(text, f"{len(found)} categories; this pool's labels have {wanted}")
    out_of_range = [c for c in found if c >= categories]
    if out_of_range:
        raise InvalidLevel(text, f"category c{out_of_range[0]} is outside c0..c{categories - 1}")
    return Level(tuple(sorted(found)))


def try_parse(text: str | None, categories: int = 1024, per_label: int | None = 2) -> Level | None:
    if text is None:
        return None
    try:
        return parse(text, categories, per_label)
    except InvalidLevel:
        return None


def canonical(text: str, categories: int = 1024, per_label: int | None = 2) -> str:
    return str(parse(text, categories, per_label))


def from_key_token(token: str) -> Level:
    """The inverse of `Level.key_token`; raises InvalidLevel."""
    try:
        cats = tuple(map(int, token.split("_")))
    except ValueError as err:
        raise InvalidLevel(token, "not a ledger key token") from err
    if len(cats) not in (2, 3) or cats[0] < 0:
        raise InvalidLevel(token, "not a ledger key token")
    ascending = cats[0] < cats[1] and (len(cats) == 2 or cats[1] < cats[2])
    if not ascending:
        ordered = tuple(sorted(cats))
        if len(set(ordered)) != len(ordered):
            raise InvalidLevel(token, "not a ledger key token")
        cats = ordered
    return Level(cats)
