"""The watcher's pure state (messages, outbox, watch state): what to publish, coalescing,
revisions, relist diffs."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

from cedar.proto.models import NamespaceEvent, WorkloadImageSet
from cedar.watcher.messages import DELETED_DIGEST, Outgoing, live_workload, parse_subject
from cedar.watcher.outbox import Outbox, StoredRecord
from cedar.watcher.watch_state import WatchState

NOW = datetime(2026, 1, 1, tzinfo=UTC)
_uids = itertools.count(1)


def deploy(
    name: str,
    image: str = "nginx:1",
    *,
    uid: str | None = None,
    gen: int = 1,
    rv: str = "1",
    ns: str = "t",
    replicas: int = 1,
) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": uid or f"d-{name}",
            "generation": gen,
            "resourceVersion": rv,
        },
        "spec": {
            "replicas": replicas,
            "template": {"spec": {"containers": [{"name": "c", "image": image}]}},
        },
    }


def rs(
    name: str, revision: int, owner: str | None = "d-web", image: str = "nginx:1", gen: int = 1
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "t",
        "uid": f"r-{name}",
        "generation": gen,
        "resourceVersion": str(next(_uids)),
        "creationTimestamp": f"2026-01-01T00:00:{revision:02d}Z",
        "annotations": {"deployment.kubernetes.io/revision": str(revision)},
    }
    if owner:
        meta["ownerReferences"] = [
            {"kind": "Deployment", "name": "web", "uid": owner, "controller": True}
        ]
    return {
        "kind": "ReplicaSet",
        "metadata": meta,
        "spec": {
            "replicas": 0,
            "template": {"spec": {"containers": [{"name": "c", "image": image}]}},
        },
    }


def new_state(previous: int = 1) -> WatchState:
    return WatchState(
        Outbox(), previous_revisions=previous, marker_ttl=60.0, clock=lambda: NOW, wall=lambda: 1.0
    )


def publish_all(outbox: Outbox) -> list[Outgoing]:
    """What a publisher with a perfect connection would store, in order."""
    stored: list[Outgoing] = []
    while outbox.pending:
        for out in outbox.take(1000):
            outbox.ack(out)
            stored.append(out)
    return stored


def model(out: Outgoing) -> WorkloadImageSet:
    return WorkloadImageSet.model_validate_json(out.body)


def test_status_only_updates_publish_nothing() -> None:
    state = new_state()
    state.apply("Deployment", "ADDED", deploy("web"))
    (first,) = publish_all(state.outbox)
    assert model(first).references() == {"docker.io/library/nginx:1"}
    # Status update: new resourceVersion, same generation.
    state.apply("Deployment", "MODIFIED", deploy("web", rv="2"))
    # Spec change that does not touch the image set (generation bumps, content equal).
    state.apply("Deployment", "MODIFIED", deploy("web", rv="3", gen=2))
    assert publish_all(state.outbox) == []


def test_msg_id_is_content_derived_and_tells_aba_apart() -> None:
    a1 = new_state()
    a2 = new_state()
    a1.apply("Deployment", "ADDED", deploy("web"))
    a2.apply("Deployment", "ADDED", deploy("web", rv="5"))  # same change seen later
    (x,) = publish_all(a1.outbox)
    (y,) = publish_all(a2.outbox)
    assert x.msg_id == y.msg_id
    assert x.body != y.body  # observed resourceVersion differs; the id does not

    state = new_state()
    ids = []
    for gen, image in ((1, "a:1"), (2, "b:1"), (3, "a:1")):
        state.apply("Deployment", "MODIFIED", deploy("web", image, gen=gen, rv=str(gen)))
        (out,) = publish_all(state.outbox)
        ids.append(out.msg_id)
    assert len(set(ids)) == 3


def test_body_is_a_valid_model_with_volatile_fields() -> None:
    item = WorkloadImageSet(
        kind="Deployment", namespace="t", name="w", uid="u", resource_version="42", observed_at=NOW
    )
    out = live_workload(item)
    assert WorkloadImageSet.model_validate_json(out.body) == item


def test_scale_to_zero_and_delete() -> None:
    state = new_state()
    state.apply("Deployment", "ADDED", deploy("web"))
    state.apply("Deployment", "MODIFIED", deploy("web", gen=2, replicas=0))
    (out,) = publish_all(state.outbox)  # coalesced: only the latest is stored
    assert model(out).replicas == 0
    state.apply("Deployment", "DELETED", deploy("web", gen=2, replicas=0))
    (marker,) = publish_all(state.outbox)
    assert marker.deleted and marker.ttl == 60.0
    assert model(marker).deleted and model(marker).containers == ()


def test_delete_of_never_published_add_is_dropped() -> None:
    state = new_state()
    state.apply("Deployment", "ADDED", deploy("web"))
    state.apply("Deployment", "DELETED", deploy("web"))
    assert publish_all(state.outbox) == []


def test_delete_while_add_in_flight_is_kept() -> None:
    state = new_state()
    state.apply("Deployment", "ADDED", deploy("web"))
    (inflight,) = state.outbox.take(10)
    state.apply("Deployment", "DELETED", deploy("web"))
    assert state.outbox.take(10) == []  # waits for the in-flight one
    state.outbox.ack(inflight)
    (marker,) = publish_all(state.outbox)
    assert marker.deleted


def test_failed_publish_is_retried_unless_superseded() -> None:
    state = new_state()
    state.apply("Deployment", "ADDED", deploy("web", "a:1"))
    (first,) = state.outbox.take(10)
    state.outbox.fail(first, uncertain=True)
    assert "cedar.workloads.Deployment.t.web" in state.outbox.uncertain
    (again,) = state.outbox.take(10)
    assert again is first
    state.apply("Deployment", "MODIFIED", deploy("web", "b:1", gen=2))
    state.outbox.fail(again, uncertain=True)
    (latest,) = publish_all(state.outbox)
    assert model(latest).references() == {"docker.io/library/b:1"}
    assert not state.outbox.uncertain


def test_outage_coalesces_per_workload() -> None:
    state = new_state()
    for gen in range(1, 50):
        state.apply("Deployment", "MODIFIED", deploy("web", f"img:{gen}", gen=gen))
    for i in range(10):
        state.apply("Deployment", "ADDED", deploy(f"other{i}"))
    assert len(state.outbox.pending) == 11
    stored = publish_all(state.outbox)
    assert model(stored[0]).references() == {"docker.io/library/img:49"}


def test_back_to_what_is_stored_cancels_the_pending_change() -> None:
    state = new_state()
    state.apply("Deployment", "ADDED", deploy("web", "a:1"))
    publish_all(state.outbox)
    state.apply("Deployment", "MODIFIED", deploy("web", "b:1", gen=2))
    state.apply("Deployment", "MODIFIED", deploy("web", "a:1", gen=3))
    assert publish_all(state.outbox) == []


def test_rollout_keeps_previous_revisions() -> None:
    state = new_state(previous=1)
    state.apply("Deployment", "ADDED", deploy("web"))
    state.apply("ReplicaSet", "ADDED", rs("web-1", 1, image="app:1"))
    state.apply("ReplicaSet", "ADDED", rs("web-2", 2, image="app:2"))
    stored = {o.subject: o for o in publish_all(state.outbox)}
    assert set(stored) == {
        "cedar.workloads.Deployment.t.web",
        "cedar.workloads.ReplicaSet.t.web-1",
        "cedar.workloads.ReplicaSet.t.web-2",
    }
    rev2 = model(stored["cedar.workloads.ReplicaSet.t.web-2"])
    assert rev2.owner is not None and rev2.owner.kind == "Deployment" and rev2.revision == 2
    state.apply("ReplicaSet", "ADDED", rs("web-3", 3, image="app:3"))
    changes = {o.subject: o for o in publish_all(state.outbox)}
    assert changes["cedar.workloads.ReplicaSet.t.web-1"].deleted  # dropped
    assert not changes["cedar.workloads.ReplicaSet.t.web-3"].deleted
    assert "cedar.workloads.ReplicaSet.t.web-2" not in changes  # still kept, unchanged
    # The current revision deleted: the dropped one comes back. Its message was not kept
    # in memory, so the informer is asked to read it again.
    state.apply("ReplicaSet", "DELETED", rs("web-3", 3, image="app:3"))
    assert state.refetch == {("t", "web-1")}
    state.refetch.clear()
    state.apply("ReplicaSet", "MODIFIED", rs("web-1", 1, image="app:1"))
    changes = {o.subject: o for o in publish_all(state.outbox)}
    assert changes["cedar.workloads.ReplicaSet.t.web-3"].deleted
    assert not changes["cedar.workloads.ReplicaSet.t.web-1"].deleted


def test_initial_list_keeps_only_kept_revisions_in_memory() -> None:
    state = new_state(previous=1)
    state.begin_list("ReplicaSet")
    for revision in range(1, 6):
        state.apply("ReplicaSet", "LISTED", rs(f"web-{revision}", revision))
    state.end_list("ReplicaSet")
    members = state.groups["d-web"]
    assert sorted(m.info.name for m in members.values() if m.out is not None) == [
        "web-4",
        "web-5",
    ]
    assert {o.subject for o in publish_all(state.outbox)} == {
        "cedar.workloads.ReplicaSet.t.web-4",
        "cedar.workloads.ReplicaSet.t.web-5",
    }
    assert not state.refetch


def test_zero_previous_revisions_and_standalone() -> None:
    state = new_state(previous=0)
    state.apply("ReplicaSet", "ADDED", rs("web-1", 1))
    state.apply("ReplicaSet", "ADDED", rs("web-2", 2))
    state.apply("ReplicaSet", "ADDED", rs("solo", 1, owner=None))
    stored = {o.subject for o in publish_all(state.outbox)}
    assert stored == {"cedar.workloads.ReplicaSet.t.web-2", "cedar.workloads.ReplicaSet.t.solo"}


def test_cronjob_jobs_are_folded() -> None:
    state = new_state()
    job = deploy("run-1")
    job["kind"] = "Job"
    job["metadata"]["ownerReferences"] = [
        {"kind": "CronJob", "name": "nightly", "uid": "c1", "controller": True}
    ]
    state.apply("Job", "ADDED", job)
    standalone = deploy("adhoc")
    standalone["kind"] = "Job"
    state.apply("Job", "ADDED", standalone)
    assert {o.subject for o in publish_all(state.outbox)} == {"cedar.workloads.Job.t.adhoc"}


def test_relist_emits_deletions_for_the_gap() -> None:
    state = new_state()
    state.begin_list("Deployment")
    for name in ("a", "b", "c"):
        state.apply("Deployment", "LISTED", deploy(name))
    state.end_list("Deployment")
    publish_all(state.outbox)
    state.begin_list("Deployment")
    state.apply("Deployment", "LISTED", deploy("a"))
    state.apply("Deployment", "LISTED", deploy("c", "new:1", gen=2))
    state.end_list("Deployment")
    changes = {o.subject: o for o in publish_all(state.outbox)}
    assert changes["cedar.workloads.Deployment.t.b"].deleted
    assert not changes["cedar.workloads.Deployment.t.c"].deleted
    assert len(changes) == 2


def test_first_list_retires_what_a_previous_run_stored() -> None:
    outbox = Outbox()
    outbox.seed("cedar.workloads.Deployment.t.gone", StoredRecord("Deployment", "u9", "x", False))
    outbox.seed(
        "cedar.workloads.Deployment.t.old", StoredRecord("Deployment", "u8", DELETED_DIGEST, True)
    )
    state = WatchState(outbox, clock=lambda: NOW)
    state.begin_list("Deployment")
    state.apply("Deployment", "LISTED", deploy("kept"))
    state.end_list("Deployment")
    changes = {o.subject: o for o in publish_all(outbox)}
    gone = changes["cedar.workloads.Deployment.t.gone"]
    assert gone.deleted and gone.uid == "u9"
    assert "cedar.workloads.Deployment.t.old" not in changes
    assert "cedar.workloads.Deployment.t.kept" in changes


def test_restart_does_not_republish_unchanged() -> None:
    first = new_state()
    first.apply("Deployment", "ADDED", deploy("web"))
    (out,) = publish_all(first.outbox)
    outbox = Outbox()
    outbox.seed(out.subject, StoredRecord("Deployment", out.uid, out.digest, False))
    second = WatchState(outbox, clock=lambda: NOW)
    second.begin_list("Deployment")
    second.apply("Deployment", "LISTED", deploy("web", rv="99"))
    second.end_list("Deployment")
    assert publish_all(outbox) == []


def test_bad_objects_reported_and_stream_continues() -> None:
    state = new_state()
    reports = state.apply("Deployment", "ADDED", {"metadata": {"name": "x", "namespace": "t"}})
    assert [r.reason for r in reports] == ["missing_uid"]
    bad = deploy("bad", "UPPER/case")
    reports = state.apply("Deployment", "ADDED", bad)
    assert [r.reason for r in reports] == ["invalid_image"]
    assert reports[0].identity == "Deployment/t/bad"
    (out,) = publish_all(state.outbox)
    (container,) = model(out).containers
    assert container.reference is None and container.error


def test_too_large_is_reported_and_not_published() -> None:
    state = WatchState(Outbox(), max_body=2000, clock=lambda: NOW)
    obj = deploy("huge")
    obj["spec"]["template"]["spec"]["containers"] = [
        {"name": f"c{i}", "image": f"img{i}:1"} for i in range(100)
    ]
    reports = state.apply("Deployment", "ADDED", obj)
    assert [r.reason for r in reports] == ["too_large"]
    assert publish_all(state.outbox) == []


def test_namespaces() -> None:
    state = new_state()
    ns = {
        "metadata": {"name": "a.b", "uid": "n1", "resourceVersion": "1"},
        "status": {"phase": "Active"},
    }
    state.apply("Namespace", "ADDED", ns)
    (out,) = publish_all(state.outbox)
    assert out.subject == "cedar.namespaces.a_b"
    assert NamespaceEvent.model_validate_json(out.body).name == "a.b"
    ns2 = {**ns, "metadata": {**ns["metadata"], "resourceVersion": "2", "annotations": {"x": "y"}}}
    state.apply("Namespace", "MODIFIED", ns2)
    (changed,) = publish_all(state.outbox)
    assert changed.msg_id != out.msg_id
    state.apply("Namespace", "DELETED", ns2)
    (marker,) = publish_all(state.outbox)
    assert NamespaceEvent.model_validate_json(marker.body).deleted
    assert parse_subject(marker.subject) == ("Namespace", "", "a.b")
