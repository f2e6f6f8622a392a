"""Shared fixtures. Each real server's fixture lives in tests/harness/."""

pytest_plugins = [
    "tests.harness.nats_server",
    "tests.harness.docker_engine",
    "tests.harness.registry",
    "tests.harness.kube_api",
]
