"""Time windows of `cedar replay`: `--since 2h`, `--until 2026-11-23T10:05:00Z`. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cedar.runtime.durations import parse_duration


def parse_instant(text: str, now: datetime) -> datetime:
    """An RFC 3339 time (UTC when no offset is given), or a duration meaning that long ago."""
    value = text.strip()
    if not value:
        raise ValueError("empty time")
    if value.lower() == "now":
        return now
    try:
        ago = parse_duration(value)
    except ValueError:
        ago = None
    if isinstance(ago, timedelta):
        return now - ago
    try:
        # fromisoformat takes "Z" from 3.11 on, and a space instead of "T".
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"invalid time {text!r}: use RFC 3339 (2026-11-23T10:02:00Z) "
            "or a duration ago (90s, 10m, 2h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class Window:
    since: datetime
    until: datetime | None = None

    def contains(self, moment: datetime) -> bool:
        return moment >= self.since and (self.until is None or moment <= self.until)


def parse_window(since: str, until: str | None, now: datetime) -> Window:
    start = parse_instant(since, now)
    end = parse_instant(until, now) if until else None
    if end is not None and end < start:
        raise ValueError(f"--until ({end.isoformat()}) is before --since ({start.isoformat()})")
    return Window(start, end)


def format_time(moment: datetime) -> str:
    """UTC, millisecond precision, with a Z: what the tables print."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
