"""The watcher's outbox forgets a subject once its deletion marker is stored: no record per
subject ever stored (the soak's slow growth, docs/reliability.md "Soak", item 1), and
offer / retire / live behave as they did when the deleted record was kept."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

from cedar.watcher.messages import DELETED_DIGEST, Outgoing
from cedar.watcher.outbox import Outbox, StoredRecord
from cedar.watcher.watch_state import WatchState
from tests.unit.test_watcher_state import publish_all

NOW = datetime(2026, 1, 1, tzinfo=UTC)
WEB = "cedar.workloads.Deployment.t.web"


def deploy(name: str, image: str = "nginx:1", *, uid: str = "", gen: int = 1) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": "t",
            "uid": uid or f"d-{name}",
            "generation": gen,
            "resourceVersion": str(gen),
        },
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": image}]}}},
    }


def replica_set(name: str, revision: int, *, owner: str = "d-web", rv: int = 1) -> dict[str, Any]:
    """A revision of Deployment `web`. Kubernetes names it after the template's hash
    (kubernetes/kubernetes pkg/controller/deployment/sync.go, getNewReplicaSet:
    `deployment.Name + "-" + podTemplateSpecHash`), so every rollout is a new subject."""
    return {
        "kind": "ReplicaSet",
        "metadata": {
            "name": name,
            "namespace": "t",
            "uid": f"r-{name}",
            "generation": 1,
            "resourceVersion": str(rv),
            "creationTimestamp": f"2026-01-01T00:{revision // 60 % 60:02d}:{revision % 60:02d}Z",
            "annotations": {"deployment.kubernetes.io/revision": str(revision)},
            "ownerReferences": [
                {"kind": "Deployment", "name": "web", "uid": owner, "controller": True}
            ],
        },
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": name}]}}},
    }


def namespace(name: str, uid: str = "") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "uid": uid or f"ns-{name}", "resourceVersion": "1"},
        "status": {"phase": "Active"},
    }


def new_state(outbox: Outbox | None = None, previous: int = 1) -> WatchState:
    return WatchState(
        outbox if outbox is not None else Outbox(),
        previous_revisions=previous,
        marker_ttl=60.0,
        clock=lambda: NOW,
        wall=lambda: 1.0,
    )


class KeepsDeletedRecords(Outbox):
    """The outbox as it was before this fix: a stored or seeded marker keeps its record.
    The oracle for "offer, retire and live behave as before"."""

    def ack(self, out: Outgoing) -> None:
        super().ack(out)
        self.stored[out.subject] = StoredRecord(out.kind, out.uid, out.digest, out.deleted)

    def seed(self, subject: str, record: StoredRecord) -> None:
        super().seed(subject, record)
        self.stored[subject] = record


# ------------------------------------------------------------ (1) no record after a marker


def test_acked_deletion_marker_leaves_no_record() -> None:
    state = new_state()
    state.apply("Deployment", "ADDED", deploy("web"))
    publish_all(state.outbox)
    assert state.outbox.records == 1
    state.apply("Deployment", "DELETED", deploy("web"))
    (marker,) = publish_all(state.outbox)
    assert marker.deleted and marker.subject == WEB
    assert state.outbox.records == 0
    assert state.outbox.live("Deployment") == []


def test_acked_namespace_marker_leaves_no_record() -> None:
    state = new_state()
    state.apply("Namespace", "ADDED", namespace("t"))
    publish_all(state.outbox)
    assert state.outbox.records == 1
    state.apply("Namespace", "DELETED", namespace("t"))
    (marker,) = publish_all(state.outbox)
    assert marker.deleted and marker.kind == "Namespace"
    assert state.outbox.records == 0


def test_acked_marker_of_a_dropped_revision_leaves_no_record() -> None:
    # The ReplicaSet still exists in Kubernetes; only its message is taken back.
    state = new_state(previous=1)
    for revision in (1, 2):
        state.apply("ReplicaSet", "ADDED", replica_set(f"web-{revision}", revision))
    publish_all(state.outbox)
    assert state.outbox.records == 2
    state.apply("ReplicaSet", "ADDED", replica_set("web-3", 3))
    changes = {o.subject: o for o in publish_all(state.outbox)}
    assert changes["cedar.workloads.ReplicaSet.t.web-1"].deleted
    assert not changes["cedar.workloads.ReplicaSet.t.web-3"].deleted
    assert state.outbox.records == 2  # web-2 and web-3; none for web-1


# ------------------------------------------------------------ (2) bounded over many cycles


def test_create_delete_cycles_of_distinct_subjects_leave_no_records() -> None:
    state = new_state()
    for i in range(500):
        state.apply("Deployment", "ADDED", deploy(f"w{i}", uid=f"u{i}"))
        (live,) = publish_all(state.outbox)
        assert not live.deleted
        state.apply("Deployment", "DELETED", deploy(f"w{i}", uid=f"u{i}"))
        (marker,) = publish_all(state.outbox)
        assert marker.deleted
        assert state.outbox.records == 0, f"cycle {i}"
    assert len(state.outbox) == 0


def test_rollouts_keep_records_bounded_by_the_kept_revisions() -> None:
    # Each rollout names a new ReplicaSet; the controller deletes those beyond its history
    # limit (3 here). With one previous revision kept, the outbox needs records for the
    # Deployment and two ReplicaSets, however many rollouts there were.
    state = new_state(previous=1)
    state.apply("Deployment", "ADDED", deploy("web"))
    existing: list[str] = []
    for revision in range(1, 301):
        name = f"web-{revision:x}"
        state.apply("ReplicaSet", "ADDED", replica_set(name, revision))
        existing.append(name)
        if len(existing) > 3:
            gone = existing.pop(0)
            state.apply("ReplicaSet", "DELETED", replica_set(gone, 0))
        publish_all(state.outbox)
        assert state.outbox.records <= 3, f"rollout {revision}: {state.outbox.records}"
    for name in existing:
        state.apply("ReplicaSet", "DELETED", replica_set(name, 0))
    state.apply("Deployment", "DELETED", deploy("web"))
    publish_all(state.outbox)
    assert state.outbox.records == 0


# ------------------------------------------------------------ (3) behaviour as before


def test_second_deletion_after_the_marker_publishes_nothing() -> None:
    state = new_state()
    state.apply("Deployment", "ADDED", deploy("web"))
    publish_all(state.outbox)
    state.apply("Deployment", "DELETED", deploy("web"))
    (marker,) = publish_all(state.outbox)
    assert marker.deleted
    # The same deletion seen again (a watch replayed after a reconnect), and a relist
    # without the object: the marker is stored already, nothing more to take back.
    state.apply("Deployment", "DELETED", deploy("web"))
    state.begin_list("Deployment")
    state.end_list("Deployment")
    assert publish_all(state.outbox) == []
    assert state.outbox.records == 0


def test_deletion_of_something_never_stored_publishes_nothing() -> None:
    state = new_state()
    state.apply("Deployment", "DELETED", deploy("never"))
    assert publish_all(state.outbox) == []
    assert state.outbox.records == 0


def test_recreate_after_the_marker_publishes_the_new_object() -> None:
    state = new_state()
    state.apply("Deployment", "ADDED", deploy("web", uid="u1"))
    (first,) = publish_all(state.outbox)
    state.apply("Deployment", "DELETED", deploy("web", uid="u1"))
    publish_all(state.outbox)
    # Same name and same spec, new uid (a new object); then even the identical content
    # again: with no record there is nothing to compare to, so it is published.
    state.apply("Deployment", "ADDED", deploy("web", uid="u2"))
    (again,) = publish_all(state.outbox)
    assert not again.deleted and again.uid == "u2" and again.subject == first.subject
    assert state.outbox.records == 1
    assert state.outbox.live("Deployment") == [(WEB, "u2")]


def test_revision_kept_again_after_its_marker_is_published_again() -> None:
    state = new_state(previous=1)
    for revision in (1, 2, 3):
        state.apply("ReplicaSet", "ADDED", replica_set(f"web-{revision}", revision))
    publish_all(state.outbox)  # web-1 dropped: its marker is stored
    # Rollback to web-1: the controller gives it the next revision number.
    state.apply("ReplicaSet", "MODIFIED", replica_set("web-1", 4, rv=9))
    changes = {o.subject: o for o in publish_all(state.outbox)}
    back = changes["cedar.workloads.ReplicaSet.t.web-1"]
    assert not back.deleted and back.uid == "r-web-1"
    assert changes["cedar.workloads.ReplicaSet.t.web-2"].deleted
    assert state.outbox.records == 2


def test_recreate_while_the_marker_is_in_flight_survives_its_ack() -> None:
    state = new_state()
    state.apply("Deployment", "ADDED", deploy("web", uid="u1"))
    publish_all(state.outbox)
    state.apply("Deployment", "DELETED", deploy("web", uid="u1"))
    (marker,) = state.outbox.take(10)
    state.apply("Deployment", "ADDED", deploy("web", uid="u2"))
    state.outbox.ack(marker)
    assert state.outbox.records == 0
    (live,) = publish_all(state.outbox)
    assert not live.deleted and live.uid == "u2"
    assert state.outbox.records == 1


def test_uncertain_marker_keeps_the_live_record_until_stored() -> None:
    # Its ack lost, the marker may or may not be stored: the outbox still holds what it
    # knows was stored (the live message), so the marker is retried, not dropped.
    state = new_state()
    state.apply("Deployment", "ADDED", deploy("web"))
    publish_all(state.outbox)
    state.apply("Deployment", "DELETED", deploy("web"))
    (marker,) = state.outbox.take(10)
    state.outbox.fail(marker, uncertain=True)
    assert state.outbox.records == 1
    assert WEB in state.outbox.uncertain
    state.apply("Deployment", "DELETED", deploy("web"))  # seen again meanwhile
    (retried,) = publish_all(state.outbox)
    assert retried.deleted and retried.msg_id == marker.msg_id
    assert state.outbox.records == 0
    assert not state.outbox.uncertain


def _snapshot(outbox: Outbox) -> tuple[object, ...]:
    """What the outbox will publish and reports as live. Unordered: the order of distinct
    subjects is not part of the behaviour (each subject is its own stream of changes)."""
    return (
        dict(outbox.pending),
        dict(outbox.inflight),
        set(outbox.uncertain),
        {kind: set(outbox.live(kind)) for kind in ("Deployment", "ReplicaSet", "Namespace")},
    )


def test_same_behaviour_as_keeping_deleted_records() -> None:
    """The same seeded random churn (creates, re-creates, edits, deletions, missed deletions
    and relists, rollouts, lost and refused acks) through an outbox that keeps deleted
    records and one that does not: the same messages, per subject, at every step."""
    rng = random.Random(20260101)
    seeds = {
        "cedar.workloads.Deployment.t.w0": StoredRecord("Deployment", "old-0", "x", False),
        "cedar.workloads.Deployment.t.w1": StoredRecord(
            "Deployment", "old-1", DELETED_DIGEST, True
        ),
        "cedar.workloads.Deployment.t.w9": StoredRecord(
            "Deployment", "old-9", DELETED_DIGEST, True
        ),
    }
    outboxes = (KeepsDeletedRecords(), Outbox())
    for outbox in outboxes:
        for subject, record in seeds.items():
            outbox.seed(subject, record)
    states = [new_state(outbox, previous=1) for outbox in outboxes]
    stored: list[dict[str, list[Outgoing]]] = [{}, {}]
    cluster: dict[str, dict[str, Any]] = {}  # name -> object, Deployments and ReplicaSets
    serial = 0

    def both(kind: str, type_: str, obj: dict[str, Any]) -> None:
        for state in states:
            state.apply(kind, type_, obj)

    def publish_step() -> None:
        fates = {}
        for i, outbox in enumerate(outboxes):
            batch = sorted(outbox.take(1000), key=lambda o: o.subject)
            if i == 0:
                fates = {
                    o.subject: rng.choice(("ack", "ack", "ack", "lost", "refused")) for o in batch
                }
            assert [o.subject for o in batch] == sorted(fates)
            for out in batch:
                fate = fates[out.subject]
                if fate == "ack":
                    outbox.ack(out)
                    stored[i].setdefault(out.subject, []).append(out)
                else:
                    outbox.fail(out, uncertain=fate == "lost")

    for step in range(4000):
        op = rng.random()
        name = f"w{rng.randrange(10)}"
        if op < 0.25:  # create, or re-create under a new uid
            serial += 1
            obj = deploy(name, f"img:{rng.randrange(3)}", uid=f"u{serial}")
            kind_event = "MODIFIED" if name in cluster else "ADDED"
            cluster[name] = obj
            both("Deployment", kind_event, obj)
        elif op < 0.40 and name in cluster:  # edit: maybe back to an image it had
            obj = cluster[name]
            gen = obj["metadata"]["generation"] + 1
            obj = deploy(name, f"img:{rng.randrange(3)}", uid=obj["metadata"]["uid"], gen=gen)
            cluster[name] = obj
            both("Deployment", "MODIFIED", obj)
        elif op < 0.55 and name in cluster:  # deleted; now and then the event is missed
            obj = cluster.pop(name)
            if rng.random() < 0.8:
                both("Deployment", "DELETED", obj)
        elif op < 0.60 and name not in cluster:  # a deletion seen twice, or never seen
            both("Deployment", "DELETED", deploy(name, uid=f"stale-{name}"))
        elif op < 0.75:  # a rollout of `web`, or a rollback to one of its revisions
            revision = step + 1
            rs_names = sorted(n for n in cluster if n.startswith("web-"))
            if rs_names and rng.random() < 0.3:
                rs_name = rng.choice(rs_names)
            else:
                rs_name = f"web-{revision:x}"
            kind_event = "MODIFIED" if rs_name in cluster else "ADDED"
            cluster[rs_name] = replica_set(rs_name, revision, rv=revision)
            both("ReplicaSet", kind_event, cluster[rs_name])
            rs_names = sorted(
                (n for n in cluster if n.startswith("web-")),
                key=lambda n: int(
                    cluster[n]["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
                ),
            )
            for gone in rs_names[:-3]:  # the controller's history limit
                both("ReplicaSet", "DELETED", cluster.pop(gone))
        elif op < 0.80:  # a relist (after a watch gap)
            for kind in ("Deployment", "ReplicaSet"):
                for state in states:
                    state.begin_list(kind)
                    for obj in cluster.values():
                        if obj["kind"] == kind:
                            state.apply(kind, "LISTED", obj)
                    state.end_list(kind)
        else:
            publish_step()
        assert _snapshot(outboxes[0]) == _snapshot(outboxes[1]), f"step {step}"
        assert stored[0] == stored[1], f"step {step}"
    for _ in range(50):
        publish_step()
    assert stored[0] == stored[1]
    assert not outboxes[1].pending and not outboxes[1].inflight
    # Keeping deleted records or not, the same subjects are live in the end.
    assert outboxes[1].records == sum(
        len(outboxes[1].live(k)) for k in ("Deployment", "ReplicaSet")
    )
    assert outboxes[1].records < outboxes[0].records


# ------------------------------------------------------------ (4) seeding


def test_seeding_a_deleted_subject_keeps_no_record() -> None:
    outbox = Outbox()
    outbox.seed(WEB, StoredRecord("Deployment", "u1", DELETED_DIGEST, True))
    outbox.seed("cedar.workloads.Deployment.t.db", StoredRecord("Deployment", "u2", "x", False))
    assert outbox.records == 1
    assert outbox.live("Deployment") == [("cedar.workloads.Deployment.t.db", "u2")]


def test_seeding_again_forgets_a_subject_deleted_meanwhile() -> None:
    # `Publisher.seed` reads everything again when NATS went away half-way: a subject read
    # live the first time may hold a marker the second time.
    outbox = Outbox()
    outbox.seed(WEB, StoredRecord("Deployment", "u1", "x", False))
    outbox.seed(WEB, StoredRecord("Deployment", "u1", DELETED_DIGEST, True))
    assert outbox.records == 0
    assert outbox.live("Deployment") == []


def test_seeded_deleted_subject_behaves_as_never_stored() -> None:
    outbox = Outbox()
    outbox.seed(WEB, StoredRecord("Deployment", "u1", DELETED_DIGEST, True))
    state = new_state(outbox)
    state.begin_list("Deployment")
    state.end_list("Deployment")
    assert publish_all(outbox) == []  # its marker is stored: nothing to retire
    state.apply("Deployment", "ADDED", deploy("web", uid="u3"))
    (live,) = publish_all(outbox)
    assert not live.deleted and live.uid == "u3"
    assert outbox.records == 1
