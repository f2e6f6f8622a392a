"""Pure parts of the operator commands: windows, tables, records, desired set, progress."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest

from cedar.ops import window
from cedar.ops.desired import current_workloads, desired_images, summarize
from cedar.ops.progress import Progress
from cedar.ops.records import Filters, decode, parse_workload
from cedar.ops.tables import render
from cedar.proto.models import (
    ContainerImage,
    McsAuditRecord,
    NodeImageStatus,
    OwnerRef,
    PullerDecision,
    WorkloadImageSet,
)

NOW = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)


def wis(kind: str, ns: str, name: str, *refs: str, **kw: object) -> WorkloadImageSet:
    return WorkloadImageSet.model_validate(
        {
            "kind": kind,
            "namespace": ns,
            "name": name,
            "uid": "u",
            "containers": [
                ContainerImage(container=f"c{i}", image=r, reference=r) for i, r in enumerate(refs)
            ],
            "observed_at": NOW,
            **kw,
        }
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", NOW - timedelta(hours=2)),
        ("90s", NOW - timedelta(seconds=90)),
        ("1d", NOW - timedelta(days=1)),
        ("now", NOW),
        ("2026-11-23T08:30:00Z", datetime(2026, 11, 23, 8, 30, tzinfo=UTC)),
        ("2026-11-23T09:30:00+01:00", datetime(2026, 11, 23, 8, 30, tzinfo=UTC)),
        ("2026-11-23 08:30", datetime(2026, 11, 23, 8, 30, tzinfo=UTC)),
    ],
)
def test_parse_instant(text: str, expected: datetime) -> None:
    assert window.parse_instant(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "2h ago", "-5m"])
def test_parse_instant_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        window.parse_instant(text, NOW)


def test_window() -> None:
    w = window.parse_window("2h", "1h", NOW)
    assert w.contains(NOW - timedelta(minutes=90))
    assert not w.contains(NOW - timedelta(minutes=30))
    assert window.parse_window("2h", None, NOW).contains(NOW + timedelta(days=1))
    with pytest.raises(ValueError, match="before"):
        window.parse_window("1h", "2h", NOW)
    assert window.format_time(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)) == (
        "2026-01-02T03:04:05.678Z"
    )


def test_render_aligns_and_cuts() -> None:
    out = render(
        ("A", "LONGER", "LAST"), [("x", None, "tail"), ("yyyy", "z" * 50, "t")], max_width=10
    )
    lines = out.splitlines()
    assert lines[0] == "A     LONGER      LAST"
    assert lines[1] == "x     -           tail"
    assert lines[2] == "yyyy  zzzzzzzzz…  t"


def test_decode_and_filter_records() -> None:
    rs = wis(
        "ReplicaSet",
        "team-a",
        "web-1",
        "r/app:v1",
        owner=OwnerRef(kind="Deployment", name="web", uid="d"),
    )
    rec = decode(1, NOW, "cedar.workloads.ReplicaSet.team-a.web-1", rs.model_dump_json().encode())
    assert rec.type == "workload" and rec.error is None
    assert rec.matches(Filters(namespace="team-a", name="web"))  # by its owner
    assert rec.matches(Filters(kind="replicaset", name="web-1"))
    assert rec.matches(Filters(kind="workload"))
    assert not rec.matches(Filters(kind="Deployment", name="web-1"))  # one identity at a time
    assert not rec.matches(Filters(namespace="team-b"))
    assert rec.matches(Filters(image="r/app:v1"))
    assert not rec.matches(Filters(node="node-1"))
    assert "owner=Deployment/web" in rec.summary()

    dec = PullerDecision(
        node="n1",
        image="r/app:v1",
        action="skip",
        reason="node_mismatch",
        workloads=("Deployment/team-a/web",),
        at=NOW,
    )
    rec = decode(2, NOW, "cedar.decisions.n1", dec.model_dump_json().encode())
    assert rec.matches(Filters(kind="Deployment", namespace="team-a", name="web", node="n1"))
    assert rec.matches(Filters(kind="decision"))
    assert not rec.matches(Filters(node="n2"))
    assert rec.summary() == "skip r/app:v1 (node_mismatch) for Deployment/team-a/web"

    audit = McsAuditRecord(
        action="tamper",
        namespace="team-a",
        namespace_uid="u",
        level="s0:c1,c2",
        previous="s0:c0,c0",
        replica="a-0",
        at=NOW,
    )
    rec = decode(3, NOW, "cedar.audit.mcs.tamper", audit.model_dump_json().encode())
    assert rec.matches(Filters(namespace="team-a"))
    assert rec.matches(Filters(kind="Namespace", name="team-a"))
    assert "found=s0:c0,c0" in rec.summary()


def test_decode_keeps_what_it_cannot_read() -> None:
    rec = decode(4, NOW, "cedar.decisions.n1", b'{"nope": 1}')
    assert rec.payload is None and rec.error and "PullerDecision" in rec.error
    assert rec.as_json()["data"] == '{"nope": 1}'
    assert decode(5, NOW, "other.subject", b"x").type == "unknown"
    assert decode(6, NOW, "cedar.workloads.Deployment.a.b", b"").error == "empty message (marker)"


def test_decisions_for_prepull_entries_match_the_workload() -> None:
    dec = PullerDecision(
        node="n1",
        image="r/app:v1",
        action="pulled",
        workloads=("Prepull/a/deployment-web",),
        at=NOW,
    )
    rec = decode(1, NOW, "cedar.decisions.n1", dec.model_dump_json().encode())
    assert rec.matches(Filters(kind="Deployment", namespace="a", name="web"))
    assert rec.matches(Filters(kind="Prepull", name="deployment-web"))
    assert not rec.matches(Filters(name="deployment"))


def test_parse_workload() -> None:
    assert parse_workload("Deployment/a/b").name == "b"
    assert parse_workload("Node/n1").namespace == ""


def test_desired_set_and_summary() -> None:
    msgs = [
        wis("Deployment", "a", "web", "r/app:v1"),
        wis("Deployment", "a", "web", "r/app:v2"),  # the newer message wins
        wis("Deployment", "a", "gone", "r/old:v1"),
        wis("Deployment", "a", "gone", deleted=True),
        wis("Prepull", "ci", "release", "r/old:v1", expires_at=NOW - timedelta(seconds=1)),
        wis("Prepull", "ci", "next", "r/new:v1", expires_at=NOW + timedelta(hours=1)),
        wis("DaemonSet", "b", "agent", "r/app:v2"),
    ]
    current = current_workloads(msgs, NOW)
    assert sorted(current) == ["DaemonSet/b/agent", "Deployment/a/web", "Prepull/ci/next"]
    desired = desired_images(current.values())
    assert sorted(desired) == ["r/app:v2", "r/new:v1"]
    assert [w.identity for w in desired["r/app:v2"]] == ["DaemonSet/b/agent", "Deployment/a/web"]

    def st(node: str, image: str, state: str, reason: str | None = None) -> NodeImageStatus:
        return NodeImageStatus.model_validate(
            {"node": node, "image": image, "state": state, "reason": reason, "updated_at": NOW}
        )

    summaries = summarize(
        desired,
        [
            st("n1", "r/app:v2", "present"),
            st("n2", "r/app:v2", "failed", "not_found"),
            st("n3", "r/app:v2", "desired"),
            st("n1", "r/unwanted:v1", "present"),
        ],
    )
    app = summaries[0]
    assert app.image == "r/app:v2"
    assert app.reporting == 3
    assert {k: len(v) for k, v in app.nodes.items()} == {
        "present": 1,
        "pulling": 0,
        "missing": 1,
        "failed": 1,
    }
    assert app.reasons == {"not_found": 1}
    assert summaries[1].reporting == 0


def test_progress_plain_lines_when_not_a_tty() -> None:
    out = io.StringIO()
    p = Progress(4, "prepull", stream=out, interval=3600)
    p.update(0)
    p.update(0)  # unchanged: nothing printed
    p.update(2, "2 images")
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "prepull [..............................] 0/4 (0%)",
        "prepull [###############...............] 2/4 (50%) 2 images",
    ]
