from __future__ import annotations

import pytest

from cedar.mcs_allocator.errors import InvalidSelector
from cedar.mcs_allocator.scope import parse_selector
from cedar.mcs_allocator.settings import AllocatorSettings


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("", {}, True),
        ("tier=tenant", {"tier": "tenant"}, True),
        ("tier==tenant", {"tier": "other"}, False),
        ("tier!=system", {}, True),
        ("tier!=system", {"tier": "system"}, False),
        ("env in (prod, staging)", {"env": "prod"}, True),
        ("env in (prod,staging)", {"env": "dev"}, False),
        ("env notin (dev)", {"env": "prod"}, True),
        ("env notin (dev)", {}, True),
        ("tenant", {"tenant": ""}, True),
        ("!legacy", {"legacy": "x"}, False),
        ("tenant,env in (a,b),!legacy", {"tenant": "t", "env": "b"}, True),
        ("example.com/tenant=yes", {"example.com/tenant": "yes"}, True),
    ],
)
def test_selector(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(selector)(labels) is expected


@pytest.mark.parametrize("selector", ["a in (", "a in ()", "=x", "a,,b", "a b"])
def test_bad_selector(selector: str) -> None:
    with pytest.raises(InvalidSelector):
        parse_selector(selector)


def test_default_exclusions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEDAR_NAMESPACE", "cedar")
    settings = AllocatorSettings()
    scope = settings.scope()
    for name in ("kube-system", "kube-public", "kube-node-lease", "default", "cedar"):
        assert not scope.includes(name, {})
    assert scope.includes("tenant-a", {})
    assert settings.metrics_port == 9103
    assert settings.mcs_quarantine.days == 7


def test_settings_refuse_bad_selector() -> None:
    with pytest.raises(ValueError, match="selector"):
        AllocatorSettings(mcs_selector="a in (")
