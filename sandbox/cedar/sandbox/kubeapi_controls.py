"""Pure: the simulated Kubernetes API's test controls: request counts, open watches, faults.

Tests inject faults (a verb answered 403 until allowed, the next N requests failing with a
status, or a fault mode on every matching request until cleared: `Fault`) and read what the
server saw (requests per verb and resource, open watches, and a log of every request with
its time, client and outcome, so a test can count a client's requests per second). Every
method is thread-safe: the server's thread and the tests' threads share one instance.
Resources are named by their URL plural here (`deployments`, `deployments/status`); the
façade (kubeapi.py) resolves the loose names tests use. No I/O.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cedar.sandbox.errors import ApiError

REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


# What a fault mode does to each request it matches (kubeapi_faults.py enacts them):
FAULT_KINDS = {
    "throttle": "429 Too Many Requests with Retry-After (the API's flow control)",
    "fail": "an error Status (500 unless another status is given)",
    "reset": "the connection is reset before any answer",
    "stall": "the headers and part of the body are sent, the rest never",
    "expire": "a watch gets one ERROR event with 410 Expired and ends (other verbs: served)",
}
# How many requests the log keeps (the oldest go first).
LOG_LIMIT = 200_000


@dataclass(frozen=True)
class Fault:
    """A fault mode, on every request it matches until cleared.

    `verbs`, `plurals` and `clients` narrow it (None: all). `retry_after` is the seconds a
    throttle (or a failure, when set) asks for; `body` is how a throttle answers: "apf" as
    the priority-and-fairness filter does (plain text), "status" as an API error Status
    with details.retryAfterSeconds.
    """

    kind: str
    status: int = 0
    retry_after: int | None = None
    body: str = "apf"
    verbs: frozenset[str] | None = None
    plurals: frozenset[str] | None = None
    clients: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; one of {', '.join(FAULT_KINDS)}")
        if self.body not in ("apf", "status"):
            raise ValueError(f"a throttle answers as 'apf' or 'status', not {self.body!r}")

    def matches(self, verb: str, plural: str, client: str) -> bool:
        if self.kind == "expire" and verb != "watch":
            return False
        return (
            (self.verbs is None or verb in self.verbs)
            and (self.plurals is None or plural in self.plurals)
            and (self.clients is None or client in self.clients)
        )


@dataclass(frozen=True)
class Request:
    """One request as the server saw it: when (monotonic seconds), from whom (the bearer
    token, or "anonymous"), what (the object's namespace and name, when it names one), and
    how it was answered ("served", "forbidden", "failed" for `fail_next`, or the fault
    kind)."""

    at: float
    client: str
    verb: str
    plural: str
    outcome: str
    namespace: str | None = None
    name: str | None = None


@dataclass
class _Failure:
    verb: str
    plural: str
    remaining: int
    status: int


class Controls:
    """Counters and injected faults, consulted by the HTTP handlers on every request."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # guards the fields below, touched from any thread
        self._counts: Counter[tuple[str, str]] = Counter()
        self._open: Counter[str] = Counter()
        self._forbidden: dict[str, set[str]] = {}
        self._failures: list[_Failure] = []
        self._faults: list[Fault] = []
        self._log: deque[Request] = deque(maxlen=LOG_LIMIT)

    def admit(
        self,
        verb: str,
        plural: str,
        group: str,
        client: str = "anonymous",
        target: tuple[str | None, str | None] = (None, None),
    ) -> Fault | None:
        """Count and log the request (`target`: the namespace and name it names), apply the
        injected forbids and failures (raise ApiError), and return the fault mode that
        matches it, if any."""
        with self._lock:
            self._counts[verb, plural] += 1
            fault = next((f for f in self._faults if f.matches(verb, plural, client)), None)
            outcome = fault.kind if fault is not None else "served"
            if verb in self._forbidden.get(plural, ()):
                outcome = "forbidden"
            elif any(f.verb == verb and f.plural == plural for f in self._failures):
                outcome = "failed"
            self._log.append(Request(self._clock(), client, verb, plural, outcome, *target))
            if outcome == "forbidden":
                raise ApiError(
                    403,
                    "Forbidden",
                    f'{plural} is forbidden: User "cedar-sandbox" cannot {verb} resource '
                    f'"{plural}" in API group "{group}"',
                    {"group": group, "kind": plural},
                )
            for failure in self._failures:
                if failure.verb == verb and failure.plural == plural and failure.remaining > 0:
                    failure.remaining -= 1
                    self._failures = [f for f in self._failures if f.remaining > 0]
                    code = failure.status
                    raise ApiError(
                        code, REASONS.get(code, "InternalError"), f"injected failure of {verb}"
                    )
            return fault

    def reset(self) -> None:
        """Forget the counts, the log, forbids, failures and faults (open watches stay
        counted)."""
        with self._lock:
            self._counts.clear()
            self._forbidden.clear()
            self._failures.clear()
            self._faults.clear()
            self._log.clear()

    # ------------------------------------------------------------ faults

    def forbid(self, plural: str, verbs: Iterable[str]) -> None:
        with self._lock:
            self._forbidden.setdefault(plural, set()).update(verbs)

    def allow(self, plural: str) -> None:
        with self._lock:
            self._forbidden.pop(plural, None)

    def fail_next(self, verb: str, plural: str, count: int, status: int) -> None:
        with self._lock:
            self._failures.append(_Failure(verb.lower(), plural, count, status))

    def inject(self, fault: Fault) -> None:
        """Apply `fault` to every request it matches until `clear` (the first injected
        fault that matches a request wins)."""
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        """End every fault mode (forbids and `fail_next` failures stay)."""
        with self._lock:
            self._faults.clear()

    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    # ------------------------------------------------------------ observations

    def requests(self, verb: str | None = None, plural: str | None = None) -> int:
        with self._lock:
            return sum(
                n
                for (v, p), n in self._counts.items()
                if (verb is None or v == verb) and (plural is None or p == plural)
            )

    def request_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)

    def log(
        self,
        *,
        client: str | None = None,
        verb: str | None = None,
        plural: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[Request]:
        """The logged requests that match, oldest first (times: monotonic seconds)."""
        with self._lock:
            entries = list(self._log)
        return [
            r
            for r in entries
            if (client is None or r.client == client)
            and (verb is None or r.verb == verb)
            and (plural is None or r.plural == plural)
            and (since is None or r.at >= since)
            and (until is None or r.at <= until)
        ]

    def watch_opened(self, plural: str) -> None:
        with self._lock:
            self._open[plural] += 1

    def watch_closed(self, plural: str) -> None:
        with self._lock:
            self._open[plural] -= 1

    def open_watches(self, plural: str | None = None) -> int:
        with self._lock:
            return sum(self._open.values()) if plural is None else self._open[plural]


def peak_rate(requests: Iterable[Request], window: float = 1.0) -> int:
    """The most requests that fall in any `window` seconds (a sliding window): what a test
    compares with a hot loop's rate."""
    times = sorted(r.at for r in requests)
    peak = 0
    for i, start in enumerate(times):
        peak = max(peak, bisect.bisect_right(times, start + window) - i)
    return peak


def per_second(requests: Iterable[Request], since: float, until: float) -> list[int]:
    """How many requests fell in each whole second from `since` to `until`."""
    buckets = [0] * max(1, int(until - since + 0.999999))
    for r in requests:
        if since <= r.at < since + len(buckets):
            buckets[int(r.at - since)] += 1
    return buckets
