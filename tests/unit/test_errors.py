"""One exception tree: every error Cedar raises is a CedarError, and client libraries'
errors are translated at the module that talks to them (docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import BadRequestError, ServiceUnavailableError

from cedar.runtime.bus import bus_errors
from cedar.runtime.errors import (
    BusError,
    BusUnavailable,
    CedarError,
    ConfigError,
    KubeConfigError,
    KubeError,
    StalledRead,
)
from cedar.runtime.kube import load_config


@pytest.mark.parametrize(
    "raised",
    [
        NatsTimeoutError(),
        NoRespondersError(),
        ConnectionClosedError(),
        ServiceUnavailableError(),
        TimeoutError(),
    ],
)
def test_nats_being_away_becomes_bus_unavailable(raised: Exception) -> None:
    expected = pytest.raises(BusUnavailable, match="publishing status: NATS is unavailable")
    with expected as info, bus_errors("publishing status"):
        raise raised
    assert info.value.__cause__ is raised
    assert isinstance(info.value, ConnectionError)


def test_a_refused_request_becomes_bus_error_not_unavailable() -> None:
    refused = BadRequestError(code=400, err_code=10058, description="stream name in use")
    with pytest.raises(BusError) as info, bus_errors("creating a stream"):
        raise refused
    assert not isinstance(info.value, BusUnavailable)
    assert "creating a stream" in str(info.value)


def test_cedar_errors_and_other_exceptions_pass_through_unchanged() -> None:
    own = StalledRead("stalled")
    with pytest.raises(StalledRead) as info, bus_errors("reading"):
        raise own
    assert info.value is own
    with pytest.raises(KeyError), bus_errors("reading"):
        raise KeyError("not a NATS error")


def test_the_tree_has_one_root() -> None:
    for cls in (ConfigError, BusError, BusUnavailable, StalledRead, KubeError, KubeConfigError):
        assert issubclass(cls, CedarError)
    assert issubclass(ConfigError, ValueError)


def test_an_unusable_kubeconfig_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "kubeconfig"
    broken.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    with pytest.raises(KubeConfigError, match=str(broken)):
        load_config(str(broken))
