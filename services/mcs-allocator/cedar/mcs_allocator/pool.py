"""The free-label chooser. Pure: no I/O.

Labels are numbered by the combinatorial number system: the k-subset
`c1 < c2 < ... < ck` of `0..N-1` has the colex rank `C(c1,1) + C(c2,2) + ... + C(ck,k)`,
a bijection onto `0..C(N,k)-1` (`rank`/`unrank`). Which numbers are taken is a bitmap in
blocks of 256 labels (one Python int per block) under a Fenwick tree of per-block free
counts. A pseudo-random choice draws `r` uniformly from the free count, descends the tree
to the block that holds the r-th free label and selects the bit inside the block by
popcount bisection: O(log n) whatever the fill, so the pool is as fast at 99% full as
empty, with no blind random retries.

Quarantined labels are taken in the bitmap and also kept in a heap by release time. Fresh
labels are preferred; only when none is left are labels whose quarantine is over reused,
oldest-released first, which keeps a label's time off any tenant as long as possible.

The pool is only a hint: uniqueness is enforced by the ledger's compare-and-set, and a
label the pool offers that turns out taken is simply marked and another is drawn.
"""

from __future__ import annotations

import heapq
import random
from bisect import bisect_right
from collections.abc import Iterable
from math import comb

from cedar.proto.levels import InvalidLevel, Level

BLOCK_BITS = 8
BLOCK = 1 << BLOCK_BITS
_FULL = (1 << BLOCK) - 1


def _select_zero(mask: int, r: int) -> int:
    """The position of the r-th (0-based) zero bit of a BLOCK-bit mask."""
    free = ~mask & _FULL
    lo, hi = 0, BLOCK - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        if (free & ((2 << mid) - 1)).bit_count() > r:
            hi = mid
        else:
            lo = mid + 1
    return lo


class Pool:
    """Label numbers `0..total-1`: taken or free, plus a quarantine queue."""

    def __init__(self, categories: int, per_label: int, rng: random.Random | None = None) -> None:
        if per_label not in (2, 3):
            raise ValueError("categories per label must be 2 or 3")
        if categories < per_label:
            raise ValueError(f"{categories} categories cannot make labels of {per_label}")
        self.categories = categories
        self.per_label = per_label
        self.total = comb(categories, per_label)
        self.rng = rng or random.Random()
        self._tables = [[comb(c, i) for c in range(categories)] for i in range(per_label + 1)]
        self._nblocks = (self.total + BLOCK - 1) // BLOCK
        self._masks = [0] * self._nblocks
        pad = self._nblocks * BLOCK - self.total
        if pad:  # bits past the last label are never free
            self._masks[-1] = _FULL ^ ((1 << (BLOCK - pad)) - 1)
        self._taken = 0
        self._tree: list[int] = []
        self._quarantined: dict[int, float] = {}
        self._heap: list[tuple[float, int]] = []
        self._build_tree()

    # -- numbering -------------------------------------------------------------------

    def fits(self, level: Level) -> bool:
        cats = level.categories  # sorted ascending by construction
        return len(cats) == self.per_label and cats[0] >= 0 and cats[-1] < self.categories

    def rank(self, level: Level) -> int:
        if not self.fits(level):
            raise InvalidLevel(str(level), "does not fit this pool's settings")
        tables = self._tables
        index = 0
        for i, c in enumerate(level.categories, 1):
            index += tables[i][c]
        return index

    def unrank(self, index: int) -> Level:
        if not 0 <= index < self.total:
            raise IndexError(index)
        cats: list[int] = []
        for i in range(self.per_label, 0, -1):
            table = self._tables[i]
            c = bisect_right(table, index) - 1
            index -= table[c]
            cats.append(c)
        cats.reverse()
        return Level(tuple(cats))

    # -- state -----------------------------------------------------------------------

    @property
    def free(self) -> int:
        """Labels never used or fully released (quarantine-expired ones not counted)."""
        return self.total - self._taken

    def _build_tree(self) -> None:
        n = self._nblocks
        tree = [0] * (n + 1)
        for b, mask in enumerate(self._masks):
            tree[b + 1] += BLOCK - mask.bit_count()
        for i in range(1, n + 1):
            j = i + (i & -i)
            if j <= n:
                tree[j] += tree[i]
        self._tree = tree

    def _add(self, block: int, delta: int) -> None:
        i, n, tree = block + 1, self._nblocks, self._tree
        while i <= n:
            tree[i] += delta
            i += i & -i

    def take(self, index: int) -> bool:
        """Mark taken (allocated); False if it already was. Leaves any quarantine."""
        self._quarantined.pop(index, None)
        block, bit = index >> BLOCK_BITS, 1 << (index & (BLOCK - 1))
        if self._masks[block] & bit:
            return False
        self._masks[block] |= bit
        self._taken += 1
        self._add(block, -1)
        return True

    def release(self, index: int) -> bool:
        """Mark free (a ledger key deleted); False if it already was."""
        self._quarantined.pop(index, None)
        block, bit = index >> BLOCK_BITS, 1 << (index & (BLOCK - 1))
        if not self._masks[block] & bit:
            return False
        self._masks[block] &= ~bit
        self._taken -= 1
        self._add(block, 1)
        return True

    def quarantine(self, index: int, released_at: float) -> None:
        """Taken, and reusable once `released_at + quarantine` has passed."""
        self.take(index)
        self._quarantined[index] = released_at
        heapq.heappush(self._heap, (released_at, index))

    def next_quarantine_end(self, quarantine: float) -> float | None:
        """When the oldest quarantined label becomes reusable."""
        self._drop_stale()
        return self._heap[0][0] + quarantine if self._heap else None

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._quarantined.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)

    def choose(self, now: float, quarantine: float) -> int | None:
        """Reserve a label: a random fresh one, else the oldest past quarantine; else None.

        The label is marked taken at once so that concurrent choices never coincide; give it
        back with `release` (fresh) or `quarantine` (reused) if the claim fails for a reason
        other than the label being taken.
        """
        free = self.total - self._taken
        if free > 0:
            r = self.rng.randrange(free)
            pos, tree, n = 0, self._tree, self._nblocks
            step = 1 << n.bit_length()
            while step:
                nxt = pos + step
                if nxt <= n and tree[nxt] <= r:
                    pos = nxt
                    r -= tree[nxt]
                step >>= 1
            index = (pos << BLOCK_BITS) | _select_zero(self._masks[pos], r)
            self.take(index)
            return index
        self._drop_stale()
        if self._heap and self._heap[0][0] + quarantine <= now:
            _, index = heapq.heappop(self._heap)
            del self._quarantined[index]
            return index
        return None

    @classmethod
    def build(
        cls,
        categories: int,
        per_label: int,
        taken: Iterable[int] = (),
        quarantined: Iterable[tuple[int, float]] = (),
        rng: random.Random | None = None,
    ) -> Pool:
        """A pool from a ledger's contents in one pass (start-up)."""
        pool = cls(categories, per_label, rng)
        masks = pool._masks
        count = 0
        for index in taken:
            block, bit = index >> BLOCK_BITS, 1 << (index & (BLOCK - 1))
            if not masks[block] & bit:
                masks[block] |= bit
                count += 1
        for index, at in quarantined:
            block, bit = index >> BLOCK_BITS, 1 << (index & (BLOCK - 1))
            if not masks[block] & bit:
                masks[block] |= bit
                count += 1
            pool._quarantined[index] = at
        pool._heap = [(at, i) for i, at in pool._quarantined.items()]
        heapq.heapify(pool._heap)
        pool._taken = count
        pool._build_tree()
        return pool
