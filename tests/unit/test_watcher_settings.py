"""The watcher's settings from the environment: kinds, KUBECONFIG, defaults."""

from __future__ import annotations

import pytest

from cedar.watcher.settings import WatcherSettings


def test_settings_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEDAR_WATCH_KINDS", "namespaces, deployment,ReplicaSet")
    monkeypatch.setenv("KUBECONFIG", "/tmp/kc")
    settings = WatcherSettings()
    assert settings.kinds == ("Deployment", "ReplicaSet", "Namespace")
    assert settings.kubeconfig == "/tmp/kc"
    assert settings.metrics_port == 9101
    assert settings.watch_previous_revisions == 1
    monkeypatch.setenv("CEDAR_WATCH_KINDS", "Pods")
    with pytest.raises(ValueError, match="unknown kind"):
        WatcherSettings()
