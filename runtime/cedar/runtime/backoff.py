"""Exponential backoff with full jitter (pure; the caller sleeps)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base: float = 0.5
    cap: float = 30.0
    attempts: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        """The next wait: uniform in [0, min(cap, base * 2**attempts)]; at least 10% of it."""
        ceiling = min(self.cap, self.base * float(2 ** min(self.attempts, 32)))
        self.attempts += 1
        return ceiling * (0.1 + 0.9 * self.rng.random())

    def reset(self) -> None:
        self.attempts = 0
