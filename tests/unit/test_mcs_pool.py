from __future__ import annotations

import random
from math import comb

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cedar.mcs_allocator.pool import Pool
from cedar.proto.levels import Level


@pytest.fixture(scope="module")
def big() -> Pool:
    return Pool(1024, 2)


def test_sizes() -> None:
    assert Pool(1024, 2).total == 523_776
    assert Pool(4, 2).total == 6
    assert Pool(1024, 3).total == comb(1024, 3)


@given(st.integers(0, 523_775))
def test_rank_unrank_bijection(big: Pool, index: int) -> None:
    level = big.unrank(index)
    assert list(level.categories) == sorted(set(level.categories))
    assert all(0 <= c < 1024 for c in level.categories)
    assert big.rank(level) == index


@given(st.sets(st.integers(0, 63), min_size=3, max_size=3))
def test_three_per_label_bijection(cats: set[int]) -> None:
    pool = Pool(64, 3)
    level = Level(tuple(sorted(cats)))
    assert pool.unrank(pool.rank(level)) == level


def test_small_pool_enumerates_every_label_once() -> None:
    pool = Pool(4, 2, random.Random(7))
    got = [pool.choose(0, 0) for _ in range(6)]
    assert sorted(got) == list(range(6))  # type: ignore[type-var]
    assert pool.choose(0, 0) is None
    assert {str(pool.unrank(i)) for i in range(6)} == {
        "s0:c0,c1", "s0:c0,c2", "s0:c1,c2", "s0:c0,c3", "s0:c1,c3", "s0:c2,c3",
    }  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.randoms(use_true_random=False))
def test_choices_unique_and_never_taken(categories: int, rng: random.Random) -> None:
    categories += 2
    pool = Pool(categories, 2, rng)
    taken = set(rng.sample(range(pool.total), pool.total // 3))
    pool = Pool.build(categories, 2, taken, rng=rng)
    chosen = set()
    while (index := pool.choose(0, 0)) is not None:
        assert index not in taken and index not in chosen
        chosen.add(index)
    assert chosen | taken == set(range(pool.total))


def test_99_percent_full_still_finds_the_free_ones() -> None:
    rng = random.Random(1)
    total = comb(1024, 2)
    taken = rng.sample(range(total), int(total * 0.99))
    pool = Pool.build(1024, 2, taken, rng=rng)
    free = total - len(taken)
    assert pool.free == free
    taken_set = set(taken)
    chosen = {pool.choose(0, 0) for _ in range(free)}
    assert len(chosen) == free and not chosen & taken_set
    assert pool.choose(0, 0) is None


def test_release_returns_label_and_quarantine_oldest_first() -> None:
    pool = Pool(4, 2, random.Random(3))
    for _ in range(6):
        pool.choose(0, 0)
    pool.quarantine(4, released_at=200.0)
    pool.quarantine(2, released_at=100.0)
    assert pool.choose(now=150.0, quarantine=100.0) is None  # none has rested long enough
    assert pool.next_quarantine_end(100.0) == 200.0
    assert pool.choose(now=250.0, quarantine=100.0) == 2  # oldest released first
    assert pool.choose(now=250.0, quarantine=100.0) is None
    assert pool.choose(now=300.0, quarantine=100.0) == 4
    pool.release(5)
    assert pool.choose(0, 0) == 5


def test_fresh_labels_preferred_over_expired_quarantine() -> None:
    pool = Pool(4, 2, random.Random(3))
    pool.quarantine(0, released_at=0.0)
    got = {pool.choose(now=1e9, quarantine=1.0) for _ in range(5)}
    assert got == {1, 2, 3, 4, 5}
    assert pool.choose(now=1e9, quarantine=1.0) == 0


def test_take_and_release_idempotent() -> None:
    pool = Pool(8, 2)
    assert pool.take(3) and not pool.take(3)
    assert pool.free == pool.total - 1
    assert pool.release(3) and not pool.release(3)
    assert pool.free == pool.total
