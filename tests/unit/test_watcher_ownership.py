"""Which objects are workloads of their own, and which Deployment revisions are kept."""

from __future__ import annotations

from cedar.proto.models import OwnerRef
from cedar.watcher import ownership


def test_roles() -> None:
    deployment = OwnerRef(kind="Deployment", name="d", uid="1")
    cronjob = OwnerRef(kind="CronJob", name="c", uid="2")
    assert ownership.role_of("ReplicaSet", deployment) == ownership.REVISION
    assert ownership.role_of("ReplicaSet", None) == ownership.OWN
    assert ownership.role_of("Job", cronjob) == ownership.FOLDED
    assert ownership.role_of("Job", None) == ownership.OWN
    assert ownership.role_of("ReplicaSet", cronjob) == ownership.OWN


def test_kept_revisions() -> None:
    infos = [
        ownership.RevisionInfo(uid=f"u{r}", revision=r, created=f"2026-01-0{r}", name=f"rs{r}")
        for r in (1, 2, 3, 4)
    ]
    assert ownership.kept_revisions(infos, 1) == {"u4", "u3"}
    assert ownership.kept_revisions(infos, 0) == {"u4"}
    assert ownership.kept_revisions(infos, 10) == {"u1", "u2", "u3", "u4"}
    unnumbered = ownership.RevisionInfo(uid="x", revision=None, created="2027", name="x")
    assert ownership.kept_revisions([*infos, unnumbered], 1) == {"u4", "u3"}
