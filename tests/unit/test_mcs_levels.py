from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cedar.proto.levels import InvalidLevel, Level, canonical, from_key_token, parse


def test_canonical_form_and_set_equality() -> None:
    assert parse("s0:c9,c5") == parse("s0:c5,c9")
    assert canonical("s0:c9,c5") == "s0:c5,c9"
    assert str(Level.of(1023, 0)) == "s0:c0,c1023"
    assert parse(" s0:c5, c9 ") == Level((5, 9))


@pytest.mark.parametrize(
    "text",
    [
        "s0",  # bare sensitivity
        "s0:",
        "s0:c0.c1023",  # a range
        "s0-s0:c0,c1",
        "s1:c0,c1",
        "s0:c5,c5",  # duplicates: a one-category label
        "s0:c5",  # too few
        "s0:c1,c2,c3",  # too many for 2 per label
        "s0:c1024,c1",  # out of range
        "s0:c01,c2",  # not canonical digits
        "s0:c-1,c2",
        "s0:x1,c2",
        "",
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidLevel):
        parse(text)


def test_per_label_and_range_settings() -> None:
    assert parse("s0:c1,c2,c3", per_label=3) == Level((1, 2, 3))
    assert parse("s0:c3,c1,c2", per_label=None) == Level((1, 2, 3))
    with pytest.raises(InvalidLevel):
        parse("s0:c1,c5", categories=4)
    assert parse("s0:c3,c1", categories=4) == Level((1, 3))


@given(st.sets(st.integers(0, 1023), min_size=2, max_size=2))
def test_roundtrip_any_order(cats: set[int]) -> None:
    spelled = "s0:" + ",".join(f"c{c}" for c in sorted(cats, reverse=True))
    level = parse(spelled)
    assert str(level) == "s0:" + ",".join(f"c{c}" for c in sorted(cats))
    assert parse(str(level)) == level
    assert from_key_token(level.key_token) == level
