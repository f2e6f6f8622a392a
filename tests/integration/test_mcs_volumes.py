"""NFS PersistentVolumes and their tenant's mount context, against the simulated API.

A PV bound to a claim in a labelled namespace gets `context="system_u:object_r:
container_file_t:<level>"` in spec.mountOptions (in-tree nfs and a CSI NFS driver); one
whose context names another level is reported (Warning Event in `default`, gauge) and left
alone; anything else is not touched.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cedar.mcs_allocator.metrics import VOLUME_CONFLICTS
from cedar.mcs_allocator.nfs import VolumeRules
from cedar.mcs_allocator.nscache import NamespaceCache
from cedar.mcs_allocator.objectevents import EventRecorder
from cedar.mcs_allocator.scope import Scope
from cedar.mcs_allocator.volumes import REASON_CONFLICT, VolumeKeeper
from cedar.runtime.kube import KubeClient, load_config
from cedar.sandbox.kubeapi import KubeAPI
from tests.harness import waiting
from tests.unit.test_mcs_admission_table import ANNOTATION, EXCLUDED, LEVEL, OTHER

pytestmark = pytest.mark.integration

CONTEXT = f'context="system_u:object_r:container_file_t:{LEVEL}"'


def namespace(name: str, level: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if level:
        meta["annotations"] = {ANNOTATION: level}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def volume(
    name: str, source: dict[str, Any], *, options: list[str] | None = None, claim: str | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "capacity": {"storage": "1Gi"},
        "accessModes": ["ReadWriteMany"],
        "persistentVolumeReclaimPolicy": "Retain",
        **source,
    }
    if options is not None:
        spec["mountOptions"] = options
    if claim is not None:
        ns, claim_name = claim.split("/")
        spec["claimRef"] = {
            "kind": "PersistentVolumeClaim",
            "namespace": ns,
            "name": claim_name,
            "uid": f"claim-{name}",
        }
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": spec,
    }


NFS = {"nfs": {"server": "nfs.example", "path": "/export/a"}}
CSI = {"csi": {"driver": "nfs.csi.k8s.io", "volumeHandle": "nfs.example#export#b"}}
OTHER_CSI = {"csi": {"driver": "ebs.csi.aws.com", "volumeHandle": "vol-1"}}


def create_bound(api: KubeAPI, pv: dict[str, Any]) -> None:
    api.create(pv)
    if "claimRef" in pv["spec"]:
        api.update_status("persistentvolumes", None, pv["metadata"]["name"], {"phase": "Bound"})


@pytest.fixture
async def keeper(kube_api: KubeAPI, kubeconfig: Path) -> AsyncIterator[VolumeKeeper]:
    client = KubeClient(load_config(str(kubeconfig)))
    cache = NamespaceCache(client, Scope.of(EXCLUDED, ""), ANNOTATION)
    events = EventRecorder(client, "cedar-mcs-allocator", "r0")
    keeper = VolumeKeeper(client, cache, events, None, VolumeRules())
    stop = asyncio.Event()
    tasks = [asyncio.create_task(cache.run(stop)), asyncio.create_task(keeper.run(stop))]
    try:
        yield keeper
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()


def options(api: KubeAPI, name: str) -> list[str]:
    pv = api.get("persistentvolumes", None, name)
    assert pv is not None
    return list(pv["spec"].get("mountOptions") or [])


async def test_bound_nfs_volumes_get_the_tenant_context(
    kube_api: KubeAPI, keeper: VolumeKeeper
) -> None:
    kube_api.create(namespace("tenant-a", LEVEL))
    kube_api.create(namespace("tenant-new"))
    kube_api.create(namespace("kube-system"))
    create_bound(kube_api, volume("in-tree", NFS, options=["nfsvers=4.1"], claim="tenant-a/data"))
    create_bound(kube_api, volume("csi", CSI, claim="tenant-a/more"))
    create_bound(
        kube_api,
        volume(
            "same",
            NFS,
            options=['context="system_u:object_r:container_file_t:s0:c2,c1"'],
            claim="tenant-a/same",
        ),
    )
    create_bound(kube_api, volume("unbound", NFS))
    create_bound(kube_api, volume("block", OTHER_CSI, claim="tenant-a/db"))
    create_bound(kube_api, volume("system", NFS, claim="kube-system/x"))
    create_bound(kube_api, volume("later", NFS, claim="tenant-new/data"))

    await waiting.eventually(lambda: CONTEXT in options(kube_api, "in-tree"), 10, "in-tree nfs")
    assert options(kube_api, "in-tree") == ["nfsvers=4.1", CONTEXT]
    await waiting.eventually(lambda: options(kube_api, "csi") == [CONTEXT], 10, "csi nfs")
    # Not NFS, not bound, not in scope, already right: untouched.
    await waiting.eventually(keeper.cache.synced.is_set, 5, "namespaces")
    assert options(kube_api, "same") == ['context="system_u:object_r:container_file_t:s0:c2,c1"']
    assert options(kube_api, "unbound") == []
    assert options(kube_api, "block") == []
    assert options(kube_api, "system") == []
    assert options(kube_api, "later") == []

    # The namespace gets its level: its volume follows.
    kube_api.patch(
        "namespaces", None, "tenant-new", {"metadata": {"annotations": {ANNOTATION: OTHER}}}
    )
    expected = f'context="system_u:object_r:container_file_t:{OTHER}"'
    await waiting.eventually(lambda: options(kube_api, "later") == [expected], 10, "later")
    assert not keeper.conflicts
    assert not [e for e in kube_api.events_for() if e["reason"] == REASON_CONFLICT]


async def test_a_context_of_another_level_is_reported_never_changed(
    kube_api: KubeAPI, keeper: VolumeKeeper
) -> None:
    kube_api.create(namespace("tenant-a", LEVEL))
    foreign = f'context="system_u:object_r:container_file_t:{OTHER}"'
    create_bound(kube_api, volume("foreign", NFS, options=["hard", foreign], claim="tenant-a/data"))
    create_bound(kube_api, volume("odd", CSI, options=["defcontext=garbage"], claim="tenant-a/odd"))

    def reported() -> list[dict[str, Any]]:
        return [e for e in kube_api.events_for() if e["reason"] == REASON_CONFLICT]

    await waiting.eventually(lambda: len(reported()) == 2, 10, "two conflict Events")
    for event in reported():
        assert event["metadata"]["namespace"] == "default"  # a PV is cluster-scoped
        assert event["involvedObject"]["kind"] == "PersistentVolume"
        assert "namespace" not in event["involvedObject"]
        assert event["type"] == "Warning"
        assert LEVEL in event["message"]
    assert set(keeper.conflicts) == {"foreign", "odd"}
    assert VOLUME_CONFLICTS._value.get() == 2
    assert options(kube_api, "foreign") == ["hard", foreign]
    assert options(kube_api, "odd") == ["defcontext=garbage"]
    assert kube_api.requests("patch", "persistentvolumes") == 0

    # Fixed by an operator: no longer a conflict, and still not rewritten.
    kube_api.patch(
        "persistentvolumes", None, "foreign", {"spec": {"mountOptions": ["hard", CONTEXT]}}
    )
    await waiting.eventually(lambda: "foreign" not in keeper.conflicts, 10, "fixed")
    assert options(kube_api, "foreign") == ["hard", CONTEXT]
