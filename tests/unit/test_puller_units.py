"""Engine error classes, the registry probe URL, settings and the command line."""

from __future__ import annotations

import argparse
from datetime import timedelta

import pytest

from cedar.puller import cli
from cedar.puller.engine import classify
from cedar.puller.registry import RegistryProbe, probe_url
from cedar.puller.settings import PullerSettings


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (
            "manifest for 127.0.0.1:5000/x:1 not found: manifest unknown: manifest unknown",
            "not_found",
        ),
        (
            'Head "http://127.0.0.1:5000/v2/x/manifests/1": no basic auth credentials',
            "unauthorized",
        ),
        ("unauthorized: authentication required", "unauthorized"),
        (
            "pull access denied for x, repository does not exist or may require 'docker login'",
            "unauthorized",
        ),
        ("invalid reference format", "invalid_reference"),
        (
            'Get "http://127.0.0.1:1/v2/": dial tcp 127.0.0.1:1: connect: connection refused',
            "registry_down",
        ),
        ("net/http: TLS handshake timeout", "timeout"),
        ("write /var/lib/docker/tmp/x: no space left on device", "low_disk"),
        ("something odd happened", "engine_error"),
    ],
)
def test_classify(message: str, reason: str) -> None:
    assert classify(message) == reason


def test_probe_scheme() -> None:
    assert probe_url("127.0.0.1:5000") == "http://127.0.0.1:5000/v2/"
    assert probe_url("localhost:5000") == "http://localhost:5000/v2/"
    assert probe_url("registry-1.docker.io") == "https://registry-1.docker.io/v2/"
    assert probe_url("reg.lan:5000", ["reg.lan:5000"]) == "http://reg.lan:5000/v2/"


async def test_breaker_opens_and_backs_off() -> None:
    clock = [0.0]
    probe = RegistryProbe(ttl=10, timeout=0.5, clock=lambda: clock[0])
    # Nothing listens on port 1: the probe fails fast and the breaker opens.
    assert not await probe.is_up("127.0.0.1:1", "127.0.0.1:1")
    assert probe.open_breakers() == {"127.0.0.1:1"}
    probes = probe.probes
    assert not await probe.is_up("127.0.0.1:1", "127.0.0.1:1")
    assert probe.probes == probes  # cached while the breaker is open
    clock[0] += 10
    assert probe.open_breakers() == set()
    assert not await probe.is_up("127.0.0.1:1", "127.0.0.1:1")
    assert probe.probes == probes + 1
    await probe.close()


def test_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEDAR_NODE_NAME", "node-7")
    monkeypatch.setenv("DOCKER_HOST", "unix:///tmp/x.sock")
    monkeypatch.setenv("CEDAR_PRUNE_AFTER", "3d")
    monkeypatch.setenv("CEDAR_PRUNE_REPOSITORIES", "a/, b/ ,")
    monkeypatch.setenv("CEDAR_NODE_FROM_API", "false")
    s = PullerSettings()
    assert s.node == "node-7"
    assert s.docker_host == "unix:///tmp/x.sock"
    assert s.prune_after == timedelta(days=3)
    assert s.prune_prefixes == ("a/", "b/")
    assert s.metrics_port == 9102
    assert s.max_concurrent_pulls == 3
    assert s.refresh_interval == timedelta(hours=1)
    assert not s.node_from_api


def test_node_name_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CEDAR_NODE_NAME", raising=False)
    with pytest.raises(ValueError, match="CEDAR_NODE_NAME"):
        _ = PullerSettings().node


def test_cli_options_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEDAR_NODE_NAME", "from-env")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        ["--node-name", "n1", "--max-concurrent-pulls", "5", "--dry-run", "--from-subject", "x.>"]
    )
    s = cli.build_settings(args)
    assert s.node == "n1" and s.max_concurrent_pulls == 5
    assert s.dry_run and s.from_subject == "x.>"
    assert s.docker_host  # untouched default


def test_help_lists_variables() -> None:
    assert cli.__doc__ is not None
    for var in ("CEDAR_NODE_NAME", "DOCKER_HOST", "CEDAR_PRUNE_LABEL", "CEDAR_NODE_TAINTS"):
        assert var in cli.__doc__


def test_present_index_matches_tags_and_digests() -> None:
    from cedar.puller.plan import lookup, present_index
    from cedar.puller.prune import LocalImage

    digest = "sha256:" + "c" * 64
    images = [
        LocalImage("id1", ("nginx:latest",), (f"nginx@{digest}",)),
        LocalImage("id2", (), (f"127.0.0.1:5000/team/app@{digest}",)),
    ]
    index = present_index(images)
    assert lookup(index, "docker.io/library/nginx:latest") == ("id1", digest)
    assert lookup(index, f"127.0.0.1:5000/team/app@{digest}") == ("id2", digest)
    assert lookup(index, f"127.0.0.1:5000/team/app:1@{digest}") == ("id2", digest)
    assert lookup(index, "127.0.0.1:5000/team/app:1") is None
    assert lookup(index, "Not Valid") is None
