"""`cedar watcher`'s command line: flags override the environment; help lists the variables."""

from __future__ import annotations

import argparse

import pytest

from cedar.watcher import cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEDAR_WATCH_PREVIOUS_REVISIONS", "5")
    monkeypatch.setenv("KUBECONFIG", "/from/env")
    settings = cli.build_settings(parse("--previous-revisions", "2", "--kinds", "jobs,cronjob"))
    assert settings.watch_previous_revisions == 2
    assert settings.kinds == ("Job", "CronJob")
    assert settings.kubeconfig == "/from/env"
    assert cli.build_settings(parse("--kubeconfig", "/flag")).kubeconfig == "/flag"


def test_invalid_settings_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEDAR_WATCH_KINDS", "Pod")
    assert cli.main(parse()) == 2


def test_help_lists_every_variable() -> None:
    assert cli.__doc__ is not None
    for variable in (
        "CEDAR_NATS_URL",
        "KUBECONFIG",
        "CEDAR_WATCH_KINDS",
        "CEDAR_WATCH_PREVIOUS_REVISIONS",
        "CEDAR_WATCH_NAMESPACE",
        "CEDAR_WATCH_PAGE_SIZE",
        "CEDAR_HISTORY_RETENTION",
        "CEDAR_METRICS_PORT",
    ):
        assert variable in cli.__doc__
