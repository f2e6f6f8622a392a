"""Liveness and readiness state, shared by a service's parts and served over HTTP."""

from __future__ import annotations


class Health:
    """Readiness is the AND of named checks; a check not yet reported counts as not ready."""

    def __init__(self, *checks: str) -> None:
        self._checks: dict[str, bool] = dict.fromkeys(checks, False)
        self._reasons: dict[str, str] = {}
        self.alive = True

    def require(self, name: str) -> None:
        self._checks.setdefault(name, False)

    def set(self, name: str, ok: bool, reason: str = "") -> None:
        self._checks[name] = ok
        if ok:
            self._reasons.pop(name, None)
        elif reason:
            self._reasons[name] = reason

    @property
    def ready(self) -> bool:
        return self.alive and all(self._checks.values())

    def report(self) -> dict[str, object]:
        return {
            "ready": self.ready,
            "checks": dict(self._checks),
            "reasons": dict(self._reasons),
        }
