"""Exponential backoff with full jitter, and a server's push-back (pure; the caller sleeps).

`Backoff` is one caller's retry delays. `Pushback` is what every caller of one server shares
when that server pushes back (429 with `Retry-After`, 5xx, no answer): a time before which
no request may start, grown with jitter per failure and never shorter than the server's
`Retry-After` (capped). The caller passes the clock's reading in; nothing here sleeps.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """`floor` is the smallest share of the ceiling a wait may be (0.1: full jitter, but
    never next to nothing; 0.5: "equal jitter", for waits that must not come quickly)."""

    base: float = 0.5
    cap: float = 30.0
    attempts: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)
    floor: float = 0.1

    def next_delay(self) -> float:
        """The next wait: uniform in [floor, 1] times min(cap, base * 2**attempts)."""
        ceiling = min(self.cap, self.base * float(2 ** min(self.attempts, 32)))
        self.attempts += 1
        return ceiling * (self.floor + (1.0 - self.floor) * self.rng.random())

    def reset(self) -> None:
        self.attempts = 0


def retry_after_seconds(header: object, details: object, cap: float) -> float | None:
    """A server's Retry-After in seconds (the header, else the Status's
    details.retryAfterSeconds), at most `cap`; None when neither is a number >= 0."""
    for value in (header, details):
        if value is None:
            continue
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        return min(seconds, cap) if math.isfinite(seconds) and seconds >= 0 else None
    return None


def after(delay: float, retry_after: float | None) -> float:
    """A retry's wait: `delay`, but never sooner than the server's `retry_after`."""
    return delay if retry_after is None else max(delay, retry_after)


@dataclass
class Pass:
    """One request's way through a `Pushback`: the generation it started in, whether it is
    the probe, and whether its outcome was recorded."""

    generation: int
    probe: bool = False
    settled: bool = False


@dataclass
class Pushback:
    """How long requests to one server must wait, shared by all its callers.

    A request takes a `Pass` (`admit`). Its failure grows the wait only if no other failure
    was counted since it started (a burst of requests that fail together counts once), and
    always pushes the wait out to the server's `Retry-After` (at most `retry_after_max`).
    Its success clears the trouble on the same condition (an old request that happened to
    succeed says nothing about now). While `failing`, one request at a time goes: a probe.
    """

    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.5, cap=10.0, floor=0.5))
    retry_after_max: float = 60.0
    until: float = 0.0
    failing: bool = False
    generation: int = 0
    probing: bool = False

    def wait(self, now: float) -> float:
        """Seconds from `now` before a request may start."""
        return max(0.0, self.until - now)

    def admit(self, now: float) -> Pass | float:
        """A pass for a request starting `now`, or the seconds to wait first (0.0: until
        the probe that is out is settled)."""
        wait = self.wait(now)
        if wait > 0:
            return wait
        if not self.failing:
            return Pass(self.generation)
        if self.probing:
            return 0.0
        self.probing = True
        return Pass(self.generation, probe=True)

    def failed(self, now: float, passed: Pass, retry_after: float | None = None) -> bool:
        """Record a request that failed; True when this grew the wait (a new failure)."""
        if passed.settled:
            return False
        grew = passed.generation == self.generation
        delay = 0.0
        if grew:
            self.generation += 1
            self.failing = True
            delay = self.backoff.next_delay()
        if retry_after is not None:
            delay = max(delay, min(max(retry_after, 0.0), self.retry_after_max))
        self.until = max(self.until, now + delay)
        self.release(passed)
        return grew

    def served(self, passed: Pass) -> None:
        """Record a request that the server served."""
        if not passed.settled and passed.generation == self.generation and self.failing:
            self.failing = False
            self.backoff.reset()
        self.release(passed)

    def release(self, passed: Pass) -> None:
        """Settle a pass with no verdict (the request was abandoned)."""
        if not passed.settled:
            passed.settled = True
            if passed.probe:
                self.probing = False
