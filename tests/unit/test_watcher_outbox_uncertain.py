"""A publish whose ack was lost may have been stored: the outbox must not take the
shortcuts that assume it was not (found in review: `a` stored, `b` published with its
ack lost, the object back to `a` -> nothing was published, and the stream kept `b`)."""

from __future__ import annotations

from cedar.watcher.messages import DELETED_DIGEST, Outgoing
from cedar.watcher.outbox import Outbox, StoredRecord

SUBJECT = "cedar.workloads.Deployment.t.web"


def change(digest: str, msg_id: str) -> Outgoing:
    return Outgoing("Deployment", SUBJECT, "Deployment/t/web", "u1", digest, msg_id, b"{}")


def marker() -> Outgoing:
    return Outgoing(
        "Deployment", SUBJECT, "Deployment/t/web", "u1", DELETED_DIGEST, "m", b"{}", deleted=True
    )


def lose_the_ack(outbox: Outbox, out: Outgoing) -> None:
    outbox.offer(out)
    (taken,) = outbox.take(10)
    outbox.fail(taken, uncertain=True)


def test_back_to_the_stored_content_after_a_lost_ack_is_published() -> None:
    outbox = Outbox()
    outbox.seed(SUBJECT, StoredRecord("Deployment", "u1", "a", False))
    lose_the_ack(outbox, change("b", "b1"))
    outbox.offer(change("a", "a3"))  # the object went back to `a`
    assert [o.msg_id for o in outbox.take(10)] == ["a3"]


def test_back_to_the_stored_content_with_every_ack_in_is_not_published() -> None:
    outbox = Outbox()
    outbox.seed(SUBJECT, StoredRecord("Deployment", "u1", "a", False))
    outbox.offer(change("b", "b1"))
    outbox.ack(*outbox.take(10))
    outbox.offer(change("a", "a3"))
    outbox.ack(*outbox.take(10))
    outbox.offer(change("a", "a4"))  # the same content again: nothing to store
    assert outbox.take(10) == []


def test_deleted_after_a_lost_ack_of_its_first_publish_gets_a_marker() -> None:
    outbox = Outbox()
    lose_the_ack(outbox, change("a", "a1"))  # maybe stored, maybe not
    outbox.retire(SUBJECT, marker)
    assert [o.deleted for o in outbox.take(10)] == [True]


def test_deleted_when_never_published_gets_no_marker() -> None:
    outbox = Outbox()
    outbox.offer(change("a", "a1"))  # still pending: never sent
    outbox.retire(SUBJECT, marker)
    assert outbox.take(10) == []
