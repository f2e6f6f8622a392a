"""Registry credentials from a .dockerconfigjson."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

from cedar.puller.credentials import CredentialStore, parse_dockerconfig


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_parse_auth_forms_and_hub_aliases() -> None:
    creds = parse_dockerconfig(
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": b64("hub:hubpw")},
                "Registry.Example.com:5000": {"username": "u", "password": "p"},
                "token.example.com": {"identitytoken": "tok"},
                "broken.example.com": {"auth": "%%%"},
                "empty.example.com": {},
            }
        }
    )
    assert creds["docker.io"].username == "hub"
    assert creds["docker.io"].engine_auth() == {"username": "hub", "password": "hubpw"}
    assert creds["registry.example.com:5000"].password == "p"
    assert creds["token.example.com"].engine_auth() == {"identitytoken": "tok"}
    assert "broken.example.com" not in creds
    assert "empty.example.com" not in creds


def test_store_matches_by_host_and_reloads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {"registry-1.docker.io": {"auth": b64("a:s3cret-one")}}}))
    store = CredentialStore(str(path))
    caplog.set_level(logging.DEBUG)
    hub = store.for_registry("index.docker.io")
    assert hub is not None and hub.username == "a"
    assert store.for_registry("quay.io") is None
    path.write_text(json.dumps({"auths": {"quay.io": {"auth": b64("b:s3cret-two-longer")}}}))
    quay = store.for_registry("quay.io")
    assert quay is not None and quay.password == "s3cret-two-longer"
    assert "s3cret" not in caplog.text
    assert "s3cret" not in repr(quay)


def test_missing_or_broken_file_means_no_credentials(tmp_path: Path) -> None:
    assert CredentialStore(str(tmp_path / "nope")).for_registry("docker.io") is None
    broken = tmp_path / "broken.json"
    broken.write_text('{"auths": {"x": {"auth": "c2VjcmV0"')
    assert CredentialStore(str(broken)).for_registry("x") is None
    assert CredentialStore(None).for_registry("docker.io") is None
