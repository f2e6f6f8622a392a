"""Where the Events Cedar records live, by the API server's rule.

kubernetes/kubernetes pkg/apis/core/validation/events.go (legacyValidateEvent): with no
eventTime set, an Event whose involvedObject has no namespace must have namespace "" or
"default"; one whose involvedObject has a namespace must be in that namespace.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cedar.proto.events import core_event, event_namespace

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_an_event_about_a_cluster_scoped_object_is_in_default() -> None:
    event = core_event(
        {"apiVersion": "v1", "kind": "Namespace", "name": "tenant-a", "uid": "u1"},
        reason="MCSLevelTampered",
        message="restored",
        event_type="Warning",
        component="cedar-mcs-allocator",
        instance="pod-1",
        now=NOW,
    )
    assert event["metadata"]["namespace"] == "default"
    assert "namespace" not in event["involvedObject"]
    assert event["metadata"]["name"].startswith("tenant-a.")
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2026-12-01T12:00:00Z"
    assert "eventTime" not in event  # the legacy rule above is the one that applies


def test_an_event_about_a_namespaced_object_is_in_its_namespace() -> None:
    involved = {"apiVersion": "v1", "kind": "Pod", "name": "web-1", "namespace": "team-a"}
    event = core_event(
        involved,
        reason="MCSLevelMismatch",
        message="m",
        event_type="Warning",
        component="c",
        instance="i",
        now=NOW,
    )
    assert event["metadata"]["namespace"] == "team-a"
    assert event["involvedObject"]["namespace"] == "team-a"
    assert event_namespace(None) == event_namespace("") == "default"
