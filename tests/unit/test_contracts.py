"""Message contracts: committed JSON Schemas match the models; versions are enforced."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from cedar.proto import schemas, subjects
from cedar.proto.models import (
    ContainerImage,
    NamespaceEvent,
    NodeSelectorRequirement,
    NodeSelectorTerm,
    PodScheduling,
    Toleration,
    WorkloadImageSet,
)

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "proto" / "schemas"


def test_committed_schemas_match_the_models() -> None:
    rendered = schemas.render()
    committed = {p.name: p.read_text() for p in SCHEMA_DIR.glob("*.json")}
    assert set(committed) == set(rendered), "run `make schemas` and commit proto/schemas/"
    for name, text in rendered.items():
        assert committed[name] == text, f"{name} drifted from the model: run `make schemas`"


def _workload() -> WorkloadImageSet:
    return WorkloadImageSet(
        kind="Deployment",
        namespace="tenant-a",
        name="web.v2",
        uid="7d1c",
        containers=(
            ContainerImage(
                container="init",
                init=True,
                image="busybox",
                reference="docker.io/library/busybox:latest",
            ),
            ContainerImage(container="app", image="Bad Ref", error="contains whitespace"),
        ),
        scheduling=PodScheduling(
            node_selector={"kubernetes.io/os": "linux"},
            required_node_affinity=(
                NodeSelectorTerm(
                    match_expressions=(
                        NodeSelectorRequirement(key="pool", operator="In", values=("a", "b")),
                    )
                ),
            ),
            tolerations=(Toleration(key="dedicated", operator="Exists", effect="NoSchedule"),),
        ),
        replicas=0,
        resource_version="42",
        generation=3,
        observed_at=datetime(2026, 11, 23, tzinfo=UTC),
    )


def test_workload_round_trips_through_json() -> None:
    workload = _workload()
    again = WorkloadImageSet.model_validate_json(workload.model_dump_json())
    assert again == workload
    assert again.references() == {"docker.io/library/busybox:latest"}
    assert again.identity == "Deployment/tenant-a/web.v2"


def test_unknown_schema_version_and_fields_are_rejected() -> None:
    data = json.loads(_workload().model_dump_json())
    with pytest.raises(ValidationError, match="schema_version"):
        WorkloadImageSet.model_validate({**data, "schema_version": 2})
    with pytest.raises(ValidationError, match="surprise"):
        WorkloadImageSet.model_validate({**data, "surprise": 1})


def test_namespace_event_defaults() -> None:
    event = NamespaceEvent(name="t", uid="u", observed_at=datetime.now(UTC))
    assert event.schema_version == 1
    assert not event.deleted


def test_subjects_map_names_one_to_one() -> None:
    assert subjects.workload_subject("ReplicaSet", "ns", "web.v2-abc") == (
        "cedar.workloads.ReplicaSet.ns.web_v2-abc"
    )
    assert subjects.untoken(subjects.token("a.b.c")) == "a.b.c"
    assert subjects.node_status_key("node.1", "docker.io/library/x:1").startswith("node_1.")
    assert subjects.image_key("a") != subjects.image_key("b")
