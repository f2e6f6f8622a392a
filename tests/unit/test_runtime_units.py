"""Pure parts of the shared runtime: durations, backoff, health, settings, logs."""

from __future__ import annotations

import json
import logging
import random
from datetime import timedelta

import pytest
from pydantic import ValidationError

from cedar.runtime.backoff import Backoff
from cedar.runtime.durations import parse_duration
from cedar.runtime.health import Health
from cedar.runtime.logs import JsonFormatter
from cedar.runtime.settings import CommonSettings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("72h", 72 * 3600),
        ("7d", 7 * 86400),
        ("10m", 600),
        ("1h30m", 5400),
        ("90s", 90),
        ("250ms", 0.25),
        ("1w", 604800),
        ("15", 15),
        ("2.5", 2.5),
        (30, 30),
    ],
)
def test_durations_parse(text: object, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "h", "10x", "5 m", "1h-3m", "-5m", "m10"])
def test_durations_reject_junk_with_a_hint(text: str) -> None:
    with pytest.raises(ValueError, match="use a number of seconds or units"):
        parse_duration(text)


def test_backoff_grows_stays_under_cap_and_resets() -> None:
    backoff = Backoff(base=1.0, cap=8.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(12)]
    assert all(0 < d <= 8.0 for d in delays)
    # The ceiling doubles: the 4th and later draws may reach past the first ceiling.
    assert max(delays[:1]) <= 1.0
    assert max(delays[4:]) > 1.0
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_backoff_is_jittered() -> None:
    draws = {Backoff(base=1.0, cap=60.0, attempts=5).next_delay() for _ in range(20)}
    assert len(draws) > 15


def test_health_is_ready_only_when_every_check_is() -> None:
    health = Health("nats")
    assert not health.ready
    health.set("nats", True)
    assert health.ready
    health.require("kubernetes")
    assert not health.ready
    health.set("kubernetes", False, "first sync not done")
    assert health.report()["reasons"] == {"kubernetes": "first sync not done"}
    health.set("kubernetes", True)
    assert health.ready
    health.alive = False
    assert not health.ready


def test_settings_read_cedar_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEDAR_NATS_URL", "nats://a:4222, nats://b:4222")
    monkeypatch.setenv("CEDAR_HISTORY_RETENTION", "36h")
    monkeypatch.setenv("CEDAR_NODE_NAME", "worker-1")
    monkeypatch.setenv("CEDAR_LOG_LEVEL", "debug")
    settings = CommonSettings()
    assert settings.nats_servers == ["nats://a:4222", "nats://b:4222"]
    assert settings.history_retention == timedelta(hours=36)
    assert settings.node_name == "worker-1"
    assert settings.log_level == "DEBUG"


def test_settings_reject_bad_values_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEDAR_HISTORY_RETENTION", "a week")
    with pytest.raises(ValidationError, match="history_retention"):
        CommonSettings()


def test_json_logs_are_one_line_with_service_and_node() -> None:
    formatter = JsonFormatter("puller", "worker-1")
    record = logging.LogRecord(
        "cedar.x", logging.WARNING, __file__, 1, "pull failed\n%s", ("x",), None
    )
    record.image = "docker.io/library/nginx:latest"
    line = formatter.format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["service"] == "puller"
    assert data["node"] == "worker-1"
    assert data["level"] == "WARNING"
    assert data["msg"] == "pull failed\nx"
    assert data["image"] == "docker.io/library/nginx:latest"
