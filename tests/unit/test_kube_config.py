"""Finding the API server: the pod's service account read directly (as client-go's
rest.InClusterConfig does: staging/src/k8s.io/client-go/rest/config.go), a kubeconfig file
through the `kubernetes` library, which is then the only reason to import it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cedar.runtime import kube
from cedar.runtime.errors import KubeConfigError


@pytest.fixture
def service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "token").write_text("first-token\n")
    (tmp_path / "ca.crt").write_text("not read until a request")
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_DIR", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    return tmp_path


def test_in_a_pod_the_service_account_is_used(service_account: Path, tmp_path: Path) -> None:
    config = kube.load_config(str(tmp_path / "no-kubeconfig"))
    assert config.server == "https://10.96.0.1:443"
    assert config.headers() == {"Authorization": "Bearer first-token"}
    assert config.ca_file == str(service_account / "ca.crt")


def test_a_rotated_token_is_read_again(
    service_account: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = kube.load_config(str(tmp_path / "no-kubeconfig"))
    (service_account / "token").write_text("second-token")
    assert config.headers() == {"Authorization": "Bearer first-token"}  # within the minute
    monkeypatch.setattr(kube, "TOKEN_REREAD_SECONDS", 0.0)
    assert config.headers() == {"Authorization": "Bearer second-token"}
    (service_account / "token").unlink()  # mid-swap: the last token is kept
    assert config.headers() == {"Authorization": "Bearer second-token"}


def test_an_ipv6_service_address_is_bracketed(service_account: Path) -> None:
    config = kube.in_cluster_config(
        {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    )
    assert config.server == "https://[fd00::1]:443"


def test_outside_a_pod_without_a_kubeconfig_says_to_set_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    with pytest.raises(KubeConfigError, match="set KUBECONFIG"):
        kube.load_config(str(tmp_path / "missing"))


def test_an_unreadable_token_is_a_clear_error_at_start(service_account: Path) -> None:
    (service_account / "token").unlink()
    with pytest.raises(KubeConfigError, match="service account token"):
        kube.in_cluster_config({"KUBERNETES_SERVICE_HOST": "h", "KUBERNETES_SERVICE_PORT": "1"})


def test_the_services_do_not_load_the_kubernetes_library_until_a_kubeconfig_is_read() -> None:
    code = (
        "import sys, cedar.runtime.kube, cedar.puller.app, cedar.watcher.app, "
        "cedar.mcs_allocator.app; print('kubernetes' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
