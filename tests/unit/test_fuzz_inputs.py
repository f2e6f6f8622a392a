"""Bad input Cedar reads, fuzzed: the registry auth file, hostile namespace annotations,
and message bodies of any bytes or schema version.

- `.dockerconfigjson` (CEDAR_REGISTRY_AUTH_FILE, mounted from a Secret someone else edits):
  whatever the file holds, the puller pulls without the unreadable credentials, logs why
  without echoing any of the file, and never raises.
- The level annotation (`cedar.io/selinux-level`) is written by anyone who may patch a
  namespace: whatever it holds, the allocator decides without raising, never adopts a level
  that is not a valid one of its pool, and restores the held label when it differs.
- Message bodies: the consumers (puller feed, allocator intake) decode with the contract
  models and skip what raises `ValidationError`; nothing else may come out of a decode.
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cedar.mcs_allocator import decide as D
from cedar.mcs_allocator.ledger_view import LedgerView
from cedar.mcs_allocator.scope import Scope
from cedar.proto.ledger import LabelEntry, NsEntry
from cedar.proto.levels import Level, try_parse
from cedar.proto.models import NamespaceEvent, NodeImageStatus, PullerDecision, WorkloadImageSet
from cedar.puller.credentials import Credential, CredentialStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SECRET = "s3cr3t-Pa55"
ANN = "cedar.io/selinux-level"
POLICY = D.Policy(Scope.of({"kube-system"}, ""), (ANN,), 1024, 2)
HELD = Level((5, 9))
DEEP = "[" * 50_000 + "]" * 50_000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=15,
)
auth_values = (
    st.sampled_from(
        [
            base64.b64encode(f"user:{SECRET}".encode()).decode(),
            base64.b64encode(SECRET.encode()).decode(),  # no ':'
            base64.b64encode(b"\xff\xfe" + SECRET.encode()).decode(),  # not UTF-8
            f"{SECRET}!!",  # not base64
            "é" + SECRET,  # not even ASCII
            "",
        ]
    )
    | json_values
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "auth": auth_values,
        "username": st.just("user") | json_values,
        "password": st.just(SECRET) | json_values,
        "identitytoken": st.just(SECRET) | json_values,
    },
)
registries = st.sampled_from(
    ["127.0.0.1:5000", "https://index.docker.io/v1/", "[::1]:5000", "", "é.example", "a/b/c"]
) | st.text(max_size=12)
configs = st.one_of(
    st.dictionaries(registries, entries | json_values, max_size=4).map(lambda a: {"auths": a}),
    st.dictionaries(registries, entries, max_size=3),  # the legacy .dockercfg shape
    json_values.map(lambda v: {"auths": v}),
    json_values,
)
files = (
    configs.map(lambda c: json.dumps(c).encode())
    | st.binary(max_size=100)
    | st.just(b'{"auths": {"r": {"auth": "x"}}')  # cut off
    | st.just(json.dumps({"auths": {"r": {"password": SECRET}}}).encode("utf-16"))
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(content=files, registry=registries)
def test_any_registry_auth_file_leaves_the_puller_pulling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, registry: str
) -> None:
    path = tmp_path / "dockerconfig.json"
    path.write_bytes(content)
    store = CredentialStore(str(path))
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="cedar.puller.credentials"):
        found = store.for_registry(registry)
        store.for_registry("127.0.0.1:5000")
    assert found is None or isinstance(found, Credential)
    for record in caplog.records:
        text = record.getMessage() + json.dumps(record.__dict__, default=str)
        assert SECRET not in text, "a log line carries the secret"
        assert base64.b64encode(f"user:{SECRET}".encode()).decode() not in text
    if found is not None:
        assert SECRET not in repr(found)


def test_a_registry_auth_file_nested_too_deep_is_unreadable_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "dockerconfig.json"
    path.write_text('{"auths": ' + DEEP + "}")
    assert CredentialStore(str(path)).for_registry("127.0.0.1:5000") is None


hostile_annotations = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "s0:c5,c9",
            "s0:c9,c5",
            "s0:c05,c9",
            "s0:c5,c5",
            "s0:c1023,c1024",
            "s0:c-1,c2",
            "s0:c\u0665,c\u0669",  # Arabic-Indic digits 5 and 9
            "s0:c5,c9 ",
            "\u200bs0:c5,c9",
            "s0:c5,c9,c12",
            "s0:c5,c9\n",
            "s0:c" + "9" * 5000 + ",c1",
            "s0-s0:c0.c1023",
            "s0",
            "",
        ]
    ),
    st.integers(0, 1100).flatmap(lambda a: st.integers(0, 1100).map(lambda b: f"s0:c{a},c{b}")),
)


def _view(held: bool, written: bool) -> LedgerView:
    view = LedgerView.build(1024, 2, 3600.0, [])
    if held:
        view.set_label(LabelEntry(HELD, "allocated", "t", "u1", NOW, revision=1))
        view.set_ns(NsEntry("u1", "t", HELD, written, NOW, revision=2))
    return view


@settings(max_examples=300, deadline=None)
@given(value=hostile_annotations, held=st.booleans(), written=st.booleans())
def test_a_hostile_annotation_is_decided_on_never_raised_or_adopted_unchecked(
    value: str, held: bool, written: bool
) -> None:
    obj = D.NsObject("t", "u1", {}, {ANN: value}, "7")
    actions = D.decide(obj, _view(held, written), POLICY)
    valid = try_parse(value, POLICY.categories, POLICY.per_label)
    for action in actions:
        if isinstance(action, D.Write):
            assert action.level == HELD  # only ever the label the ledger holds
        if isinstance(action, D.Adopt):
            assert valid is not None and action.level == valid
    if held and valid != HELD:
        assert any(isinstance(a, D.Write) and a.level == HELD for a in actions), actions


message_models = (WorkloadImageSet, NamespaceEvent, NodeImageStatus, PullerDecision)


def _good(model: type) -> dict[str, object]:
    if model is WorkloadImageSet:
        return {
            "kind": "Deployment",
            "namespace": "t",
            "name": "w",
            "uid": "u",
            "observed_at": "2026-01-01T00:00:00Z",
        }
    if model is NamespaceEvent:
        return {"name": "t", "uid": "u", "observed_at": "2026-01-01T00:00:00Z"}
    if model is NodeImageStatus:
        return {"node": "n", "image": "i", "state": "present", "updated_at": "2026-01-01T00:00:00Z"}
    return {"node": "n", "image": "i", "action": "pull", "at": "2026-01-01T00:00:00Z"}


@st.composite
def bodies(draw: st.DrawFn, model: type) -> bytes:
    how = draw(st.integers(0, 3))
    if how == 0:
        return draw(st.binary(max_size=200))
    if how == 1:
        return json.dumps(draw(json_values)).encode()
    if how == 2:  # another schema version, or a field of another type
        body = _good(model)
        field = draw(st.sampled_from([*body, "schema_version", "extra"]))
        body[field] = draw(json_values | st.sampled_from([0, 2, "1", 1.0, True]))
        return json.dumps(body).encode()
    return draw(st.sampled_from([DEEP.encode(), b"\xff" * 10, b"", b"null", b"{" * 3]))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
@example(data=None)
def test_any_message_body_decodes_or_raises_validation_error(data: st.DataObject | None) -> None:
    for model in message_models:
        body = DEEP.encode() if data is None else data.draw(bodies(model))
        try:
            decoded = model.model_validate_json(body)
        except ValidationError:
            continue
        assert decoded.schema_version == 1


def test_a_message_of_another_schema_version_is_refused() -> None:
    for model in message_models:
        body = {**_good(model), "schema_version": 2}
        with pytest.raises(ValidationError):
            model.model_validate_json(json.dumps(body))
        assert model.model_validate_json(json.dumps(_good(model))).schema_version == 1
