"""Simulated Kubernetes API fixtures: a fresh server per test, its kubeconfig, a client.

Nothing global is touched: the `kubernetes` client gets its own Configuration from the
kubeconfig file, never `kubernetes.config.load_kube_config()` into the default one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest

from cedar.sandbox.kubeapi import KubeAPI

__all__ = ["kube_api", "kube_client", "kubeconfig"]

# Short enough that a test sees a bookmark quickly, long enough not to flood the streams.
TEST_BOOKMARK_INTERVAL = 1.0


@pytest.fixture
def kube_api() -> Iterator[KubeAPI]:
    """A running simulated API server with empty state, private to the test.

    Starting one costs a few milliseconds (a thread and a socket), so each test gets its
    own instead of sharing one with a reset: no watch of a previous test can leak in.
    """
    api = KubeAPI(bookmark_interval=TEST_BOOKMARK_INTERVAL).start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def kubeconfig(kube_api: KubeAPI, tmp_path: Path) -> Path:
    """A kubeconfig file pointing at `kube_api` (plain HTTP, dummy token)."""
    return kube_api.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def kube_client(kubeconfig: Path) -> Iterator[kubernetes.client.ApiClient]:
    """An official-client ApiClient for `kube_api`, configured from `kubeconfig` only."""
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(
        config_file=str(kubeconfig), client_configuration=configuration
    )
    client = kubernetes.client.ApiClient(configuration)
    try:
        yield client
    finally:
        client.close()
