"""A reconcile pass that awaits NATS while the desired set changes under it (found by the
fault suite, test_nats_cluster.py: `cedar puller` died of a KeyError).

The pass forgets the images nobody wants any more, one status delete at a time; each delete
awaits NATS, which is slow exactly when NATS is in trouble. An image that is wanted again
while an earlier delete awaits must keep its record, or the pass that follows plans a pull
for an image it has no record of, and the service stops on the error.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from cedar.proto.imageref import normalize
from cedar.proto.models import ContainerImage, WorkloadImageSet
from cedar.proto.scheduling import NodeInfo
from cedar.puller.credentials import CredentialStore
from cedar.puller.desired import DesiredSet
from cedar.puller.disk import DiskGuard
from cedar.puller.engine import DryRunEngine
from cedar.puller.plan import Policy
from cedar.puller.prune import Scope
from cedar.puller.prune_state import PruneClocks
from cedar.puller.pruner import Pruner
from cedar.puller.pulls import Pulls
from cedar.puller.reconcile import Reconciler
from cedar.puller.registry import RegistryProbe
from cedar.runtime.health import Health


class SlowStatus:
    """Stands in for the status publisher: deleting a status waits until released."""

    def __init__(self) -> None:
        self.forgetting = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.forgotten: list[str] = []
        self.decisions: list[Any] = []

    async def publish_image(self, record: Any, workloads: tuple[str, ...]) -> None:
        return None

    async def forget_image(self, image: str) -> bool:
        self.forgetting.set()
        await self.release.wait()
        self.forgotten.append(image)
        return True

    async def stored_images(self) -> set[str]:
        return set()

    async def decision(self, image: str, action: str, reason: str = "", **_: Any) -> None:
        self.decisions.append((image, action))


def wanting(name: str, image: str, *, deleted: bool = False) -> WorkloadImageSet:
    return WorkloadImageSet(
        kind="Deployment",
        namespace="t",
        name=name,
        uid=f"uid-{name}",
        containers=() if deleted else (ContainerImage(container="c", image=image),),
        observed_at=datetime.now(UTC),
        deleted=deleted,
    )


def reconciler(status: SlowStatus) -> tuple[Reconciler, DesiredSet, Pulls]:
    desired = DesiredSet(NodeInfo("n"))
    engine = DryRunEngine()
    policy = Policy(
        refresh_interval=3600,
        refresh_jitter=0.1,
        backoff_base=0.1,
        backoff_max=1.0,
        permanent_retry=3600,
        node="n",
    )
    rng = random.Random(1)
    synced, dirty = asyncio.Event(), asyncio.Event()
    probe = RegistryProbe(ttl=1.0, timeout=1.0)
    pulls = Pulls(
        engine=engine,
        probe=probe,
        credentials=CredentialStore(None),
        status=status,  # type: ignore[arg-type]
        desired=desired,
        policy=policy,
        rng=rng,
        pull_timeout=5.0,
        dry_run=True,
        dirty=dirty,
    )
    pruner = Pruner(
        scope=Scope.from_settings(None, ()),
        desired=desired,
        engine=engine,
        clocks=PruneClocks("n", None, dry_run=True),  # type: ignore[arg-type]
        status=status,  # type: ignore[arg-type]
        prune_after=timedelta(hours=1),
        prune_interval=timedelta(hours=1),
    )
    rec = Reconciler(
        desired=desired,
        engine=engine,
        pulls=pulls,
        pruner=pruner,
        probe=probe,
        disk=DiskGuard(None, 0),
        status=status,  # type: ignore[arg-type]
        health=Health(),
        policy=policy,
        rng=rng,
        max_concurrent_pulls=3,
        resync_interval=60.0,
        synced=synced,
        dirty=dirty,
        started=0.0,
    )
    synced.set()
    return rec, desired, pulls


async def test_an_image_wanted_again_while_an_earlier_status_delete_awaits_keeps_its_record() -> (
    None
):
    status = SlowStatus()
    rec, desired, pulls = reconciler(status)
    x, y = normalize("registry.test/x:v1"), normalize("registry.test/y:v1")
    now = datetime.now(UTC)
    rec.note_change(desired.apply(wanting("wx", x), now))
    rec.note_change(desired.apply(wanting("wy", y), now))
    await rec.reconcile()
    await asyncio.gather(*pulls.in_flight.values())
    assert set(rec.records) == {x, y}

    # Nobody wants either; the pass deletes x's status first, and while that awaits NATS
    # a workload wants y again.
    rec.note_change(desired.apply(wanting("wx", x, deleted=True), now))
    rec.note_change(desired.apply(wanting("wy", y, deleted=True), now))
    status.release.clear()
    status.forgetting.clear()
    passing = asyncio.create_task(rec.reconcile())
    await asyncio.wait_for(status.forgetting.wait(), 5)
    rec.note_change(desired.apply(wanting("wy2", y), now))
    status.release.set()
    await asyncio.wait_for(passing, 5)

    assert y in rec.records, "an image wanted again lost its record"
    assert status.forgotten == [x]
    await asyncio.gather(*pulls.in_flight.values())
