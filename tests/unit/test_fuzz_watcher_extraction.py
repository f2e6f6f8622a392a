"""Arbitrary JSON as workload and namespace objects, through the watcher's extraction.

Whatever the API returns (wrong types, missing and huge fields, deep nesting, unicode,
1 MB strings), `WatchState.apply` — the watcher's pure path from an object to a message
(cedar.proto.workloads) — must answer with messages and `Report`s only: a report is what
the informer logs and counts as `cedar_watcher_bad_objects_total{kind,reason}`. Anything
it raised instead would reach the informer's "undecodable response" handler, which relists:
one bad object would make the watcher relist forever.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cedar.proto.workloads import BadObject, extract_namespace, extract_workload
from cedar.watcher.messages import NAMESPACE
from cedar.watcher.outbox import Outbox
from cedar.watcher.watch_state import Report, WatchState

NOW = datetime(2026, 1, 1, tzinfo=UTC)
KINDS = ("Deployment", "ReplicaSet", "DaemonSet", "StatefulSet", "Job", "CronJob")
# A metric label value: short, fixed, no free text.
REASON = re.compile(r"^[a-z_]{3,40}$")

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["", "nginx", "Nginx:Latest", "a" * 300, "é/ü:ß", "127.0.0.1:1/x@sha256:z"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


def deep(depth: int) -> Any:
    value: Any = "leaf"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


hostile = (
    json_values | st.integers(1, 300).map(deep) | st.integers(500, 5000).map(lambda n: "x" * n)
)


def _maybe(field: str, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(st.just({}), strategy.map(lambda v: {field: v}))


@st.composite
def containers(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(hostile)
    entries = []
    for _ in range(draw(st.integers(0, 3))):
        entry: dict[str, Any] = {}
        entry |= draw(_maybe("name", st.text(max_size=20) | hostile))
        entry |= draw(_maybe("image", st.sampled_from(["nginx:1.25", "bad image", ""]) | hostile))
        entry |= draw(_maybe("imagePullPolicy", st.sampled_from(["Always", "Sometimes"]) | hostile))
        entries.append(entry if draw(st.integers(0, 9)) else draw(hostile))
    return entries


@st.composite
def pod_specs(draw: st.DrawFn) -> Any:
    if not draw(st.integers(0, 9)):
        return draw(hostile)
    pod: dict[str, Any] = {}
    pod |= draw(_maybe("containers", containers()))
    pod |= draw(_maybe("initContainers", containers()))
    pod |= draw(_maybe("nodeSelector", hostile | st.dictionaries(st.text(max_size=8), hostile)))
    pod |= draw(_maybe("tolerations", hostile | st.lists(hostile, max_size=3)))
    affinity = st.fixed_dictionaries(
        {
            "nodeAffinity": st.fixed_dictionaries(
                {
                    "requiredDuringSchedulingIgnoredDuringExecution": st.fixed_dictionaries(
                        {"nodeSelectorTerms": hostile | st.lists(hostile, max_size=3)}
                    )
                }
            )
        }
    )
    pod |= draw(_maybe("affinity", affinity | hostile))
    return pod


@st.composite
def objects(draw: st.DrawFn, kind: str) -> Any:
    if not draw(st.integers(0, 7)):
        return draw(hostile)
    meta: dict[str, Any] = {}
    meta |= draw(_maybe("name", st.sampled_from(["web", "a.b", "ü"]) | hostile))
    meta |= draw(_maybe("namespace", st.sampled_from(["t", "t.x"]) | hostile))
    meta |= draw(_maybe("uid", st.sampled_from(["u1", "u2"]) | hostile))
    meta |= draw(_maybe("resourceVersion", hostile))
    meta |= draw(_maybe("generation", st.integers() | hostile))
    meta |= draw(_maybe("labels", hostile))
    meta |= draw(
        _maybe(
            "annotations",
            hostile
            | st.dictionaries(
                st.sampled_from(
                    ["deployment.kubernetes.io/revision", "x", "cedar.io/selinux-level"]
                ),
                hostile | st.sampled_from(["3", "-1", "1e400", "٣", "9" * 5000]),
            ),
        )
    )
    meta |= draw(
        _maybe(
            "ownerReferences",
            hostile
            | st.lists(
                st.fixed_dictionaries(
                    {
                        "controller": st.booleans() | hostile,
                        "kind": st.just("Deployment") | hostile,
                        "name": st.just("web") | hostile,
                        "uid": st.just("d1") | hostile,
                    }
                ),
                max_size=2,
            ),
        )
    )
    obj: dict[str, Any] = {"metadata": meta if draw(st.integers(0, 9)) else draw(hostile)}
    template = st.fixed_dictionaries({"spec": pod_specs()}) | hostile
    spec: dict[str, Any] = {}
    spec |= draw(_maybe("template", template))
    spec |= draw(_maybe("replicas", st.integers() | hostile))
    spec |= draw(_maybe("parallelism", st.integers() | hostile))
    spec |= draw(_maybe("suspend", hostile))
    spec |= draw(
        _maybe(
            "jobTemplate",
            st.fixed_dictionaries({"spec": st.fixed_dictionaries({"template": template})})
            | hostile,
        )
    )
    obj |= draw(_maybe("spec", st.just(spec) | hostile))
    obj |= draw(_maybe("status", hostile))
    return obj


def _check(reports: list[Report]) -> None:
    for report in reports:
        assert isinstance(report, Report)
        assert REASON.match(report.reason), report.reason


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_workload_object_gives_a_message_or_a_counted_report(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(KINDS))
    state = WatchState(Outbox(), max_body=900_000)
    for event in ("LISTED", "MODIFIED", "DELETED"):
        obj = data.draw(objects(kind))
        _check(state.apply(kind, event, obj))
    # Extraction itself raises its own error only, and only for an unidentifiable object.
    obj = data.draw(objects(kind))
    try:
        item, problems = extract_workload(kind, obj, NOW)
    except BadObject as err:
        assert REASON.match(err.reason)
    else:
        assert all(REASON.match(p.reason) for p in problems)
        assert item.kind == kind


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_namespace_object_gives_an_event_or_a_counted_report(data: st.DataObject) -> None:
    state = WatchState(Outbox())
    for event in ("LISTED", "MODIFIED", "DELETED"):
        _check(state.apply(NAMESPACE, event, data.draw(objects(NAMESPACE))))
    obj = data.draw(objects(NAMESPACE))
    try:
        event_, problems = extract_namespace(obj, NOW)
    except BadObject as err:
        assert REASON.match(err.reason)
    else:
        assert all(REASON.match(p.reason) for p in problems)
        assert all(isinstance(v, str) for v in event_.annotations.values())


HUGE = "x" * 1_000_000


def test_one_megabyte_fields_are_reported_not_raised() -> None:
    state = WatchState(Outbox(), max_body=900_000)
    base = {"metadata": {"name": "web", "namespace": "t", "uid": "u1", "generation": 1}}
    huge_image = {
        **base,
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": HUGE}]}}},
    }
    reports = state.apply("Deployment", "LISTED", huge_image)
    assert {r.reason for r in reports} >= {"too_large"}
    huge_name = {"metadata": {"name": HUGE, "namespace": "t", "uid": "u2"}, "spec": HUGE}
    _check(state.apply("Deployment", "LISTED", huge_name))
    huge_labels = {"metadata": {"name": "ns", "uid": "u3", "annotations": {"a": HUGE}}}
    _check(state.apply(NAMESPACE, "LISTED", huge_labels))
