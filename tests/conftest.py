"""Shared fixtures and markers. Each real server's fixture lives in tests/harness/.

Markers are applied here, by one rule, so that no test file has to remember them:
`integration` for every test that talks to a real server (it lives in tests/integration/ or
tests/e2e/, or uses a server fixture), `e2e` for the operator commands run end to end, and
`deploy` for the checks of deploy/ (kubectl, checkov, promtool, docker, nats-server), and
`soak` for tests/soak/ (20 minutes) and `chaos` for the fault suite in tests/chaos/ (real
NATS clusters, killed processes, a full disk: minutes), both run by `make long-tests`, not
`make test`. A test that is long for another reason marks itself `long`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = [
    "tests.harness.nats_server",
    "tests.harness.docker_engine",
    "tests.harness.containerd",
    "tests.harness.registry",
    "tests.harness.kube_api",
]

# Fixtures that start (or hand out) a real server.
SERVER_FIXTURES = frozenset(
    {
        "nats_server",
        "nats_url",
        "fresh_nats",
        "docker_engine",
        "builder_engine",
        "docker_host",
        "docker_engine_factory",
        "fresh_docker_engine",
        "containerd",
        "cri_endpoint",
        "containerd_factory",
        "fresh_containerd",
        "registry",
        "auth_registry",
        "fresh_registry",
        "make_images",
        "kube_api",
        "kubeconfig",
        "kube_client",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.path)).parent.name
        if folder in ("e2e", "deploy", "soak", "chaos"):
            item.add_marker(folder)
        uses_server = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if folder in ("integration", "e2e", "chaos", "soak") or uses_server:
            item.add_marker("integration")
