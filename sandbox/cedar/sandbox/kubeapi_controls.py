"""Pure: the simulated Kubernetes API's test controls: request counts, open watches, faults.

Tests inject faults (a verb answered 403 until allowed, the next N requests failing with a
status) and read what the server saw (requests per verb and resource, open watches). Every
method is thread-safe: the server's thread and the tests' threads share one instance.
Resources are named by their URL plural here (`deployments`, `deployments/status`); the
façade (kubeapi.py) resolves the loose names tests use. No I/O.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from cedar.sandbox.errors import ApiError

_REASONS = {
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


@dataclass
class _Failure:
    verb: str
    plural: str
    remaining: int
    status: int


class Controls:
    """Counters and injected faults, consulted by the HTTP handlers on every request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the fields below, touched from any thread
        self._counts: Counter[tuple[str, str]] = Counter()
        self._open: Counter[str] = Counter()
        self._forbidden: dict[str, set[str]] = {}
        self._failures: list[_Failure] = []

    def admit(self, verb: str, plural: str, group: str) -> None:
        """Count the request, then apply the injected forbids and failures (raise ApiError)."""
        with self._lock:
            self._counts[verb, plural] += 1
            if verb in self._forbidden.get(plural, ()):
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
                        code, _REASONS.get(code, "InternalError"), f"injected failure of {verb}"
                    )

    def reset(self) -> None:
        """Forget the counts, forbids and failures (open watches stay counted)."""
        with self._lock:
            self._counts.clear()
            self._forbidden.clear()
            self._failures.clear()

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

    def watch_opened(self, plural: str) -> None:
        with self._lock:
            self._open[plural] += 1

    def watch_closed(self, plural: str) -> None:
        with self._lock:
            self._open[plural] -= 1

    def open_watches(self, plural: str | None = None) -> int:
        with self._lock:
            return sum(self._open.values()) if plural is None else self._open[plural]
