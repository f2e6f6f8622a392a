"""The warm-up gate against the simulated Kubernetes API, with real NATS, engine and registry.

A Node registered with `cedar.io/warming:NoSchedule` keeps it while an image desired there
is still missing; its puller removes it (and nothing else, and only on its own Node) once
every desired image is present, or once CEDAR_WARM_TIMEOUT has passed since the Node was
created. A patch that lost a race (422) is retried after reading the Node again; a refusal
(403) is retried slowly, and the taint goes once the puller may patch.

The patch's `test` operation is what keeps a concurrent change of the taints from being
overwritten; the simulated API answers a failed `test` as the real one does (first test).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from cedar.proto.imageref import normalize
from cedar.proto.models import Toleration
from cedar.puller.app import Puller, assemble
from cedar.puller.settings import PullerSettings
from cedar.puller.warmup import WARMING_TAINT_KEY
from cedar.runtime.bus import Bus
from cedar.runtime.health import Health
from cedar.runtime.kube import KubeClient, KubeError, load_config, resource_path
from cedar.sandbox.dockerd import DockerEngine
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.registry import Registry
from tests.harness.registry import ImageMaker
from tests.harness.waiting import eventually
from tests.integration.test_puller_fleet_pacing import SlowProxy, has_image, publish, workload

pytestmark = pytest.mark.integration

WARMING = {"key": WARMING_TAINT_KEY, "effect": "NoSchedule"}
DEDICATED = {"key": "dedicated", "value": "tenants", "effect": "NoSchedule"}


def node_object(name: str, pool: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "pool": pool},
            "annotations": {"example.com/owner": "platform"},
        },
        "spec": {"taints": [DEDICATED, WARMING], "podCIDR": "10.0.1.0/24"},
    }


def taints(api: KubeAPI, name: str) -> list[dict[str, Any]]:
    node = api.get("nodes", None, name)
    assert node is not None
    return list((node.get("spec") or {}).get("taints") or [])


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


def tolerating(name: str, pool: str, *images: str) -> Any:
    wis = workload(name, pool, *images)
    scheduling = wis.scheduling.model_copy(
        update={"tolerations": (Toleration(key="dedicated", operator="Equal", value="tenants"),)}
    )
    return wis.model_copy(update={"scheduling": scheduling})


@dataclass
class Cluster:
    """The simulated API and what a node's puller needs on this machine."""

    api: KubeAPI
    kubeconfig: Path
    nats_url: str
    engine: DockerEngine


@pytest.fixture
def cluster(
    kube_api: KubeAPI, kubeconfig: Path, nats_url: str, fresh_docker_engine: DockerEngine
) -> Cluster:
    return Cluster(kube_api, kubeconfig, nats_url, fresh_docker_engine)


@contextlib.asynccontextmanager
async def puller_on(
    node: str, url: str, kubeconfig: Path, engine: DockerEngine, **overrides: Any
) -> AsyncIterator[Puller]:
    settings = PullerSettings(
        **{
            "node_name": node,
            "nats_url": url,
            "runtime": "docker",
            "docker_host": engine.host,
            "kubeconfig": str(kubeconfig),
            "registry_probe_ttl": "1s",
            "resync_interval": "1s",
            **overrides,
        }
    )
    health = Health()
    bus = Bus(settings, "test-puller", health)
    assert await bus.connect()
    stop = asyncio.Event()
    puller = await asyncio.wait_for(assemble(settings, bus, health, stop), 30)
    assert puller is not None
    task = asyncio.create_task(puller.run(stop))
    try:
        await eventually(lambda: puller.feed.synced.is_set() or task.done(), 30, "synced")
        yield puller
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await bus.close()


async def test_the_simulated_api_refuses_a_stale_json_patch_test(
    kube_api: KubeAPI, kubeconfig: Path
) -> None:
    # staging/src/k8s.io/apiserver/pkg/endpoints/handlers/patch.go (jsonPatcher.applyJSPatch):
    # a JSON patch whose Apply fails, a failed `test` among them, is answered
    # NewGenericServerResponse(http.StatusUnprocessableEntity, ...): 422, nothing written.
    kube_api.create(node_object("n1", "a"))
    before = kube_api.get("nodes", None, "n1")
    assert before is not None
    client = KubeClient(load_config(str(kubeconfig)))
    stale = [
        {"op": "test", "path": "/spec/taints", "value": [WARMING]},
        {"op": "replace", "path": "/spec/taints", "value": []},
    ]
    try:
        with pytest.raises(KubeError) as refused:
            await client.request(
                "PATCH",
                resource_path("Node", name="n1"),
                body=stale,
                content_type="application/json-patch+json",
            )
    finally:
        await client.close()
    assert refused.value.status == 422
    after = kube_api.get("nodes", None, "n1")
    assert after is not None and after["spec"]["taints"] == before["spec"]["taints"]


async def test_the_taint_goes_once_every_desired_image_is_present_and_nothing_else_changes(
    cluster: Cluster, registry: Registry, make_images: ImageMaker
) -> None:
    kube_api, kubeconfig, nats_url = cluster.api, cluster.kubeconfig, cluster.nats_url
    fresh_docker_engine = cluster.engine
    fast, slow = await make_images.make(2, 512 * 1024)
    node, other = f"gate-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    async with SlowProxy(registry, 128 * 1024) as proxy:
        slow = proxy.ref(slow)
        kube_api.create(node_object(node, "a"))
        kube_api.create(node_object(other, "a"))  # tainted too: not this puller's business
        lifted = metric("cedar_puller_warm_gate_lifted_total", reason="warm")
        await publish(nats_url, tolerating("app", "a", fast, slow))
        async with puller_on(node, nats_url, kubeconfig, fresh_docker_engine) as puller:
            assert puller.gate.warming
            await eventually(lambda: has_image(fresh_docker_engine, fast), 30, "fast image")
            # One desired image is still on its way: the node stays out of service.
            assert not await has_image(fresh_docker_engine, slow)
            assert WARMING in taints(kube_api, node)
            assert puller.gate.last is not None and puller.gate.last.reason == "cold"
            await eventually(
                lambda: WARMING not in taints(kube_api, node), 60, "taint removed", interval=0.2
            )
            assert await has_image(fresh_docker_engine, slow)  # ...only once it was there
            assert puller.reconciler.records[normalize(slow)].state == "present"
            assert metric("cedar_puller_warm_gate_lifted_total", reason="warm") == lifted + 1
            await eventually(lambda: not puller.gate.tainted, 10, "the watch saw it go")
    after = kube_api.get("nodes", None, node)
    assert after is not None
    assert DEDICATED in after["spec"]["taints"]
    assert after["spec"]["podCIDR"] == "10.0.1.0/24"
    assert after["metadata"]["labels"]["pool"] == "a"
    assert after["metadata"]["annotations"] == {"example.com/owner": "platform"}
    # The puller's only write to the API was that one patch: the other node keeps its taint.
    assert kube_api.requests("patch", "nodes") == 1
    assert WARMING in taints(kube_api, other)


async def test_the_timeout_lifts_it_whatever_is_missing(
    cluster: Cluster, registry: Registry, make_images: ImageMaker
) -> None:
    kube_api, kubeconfig, nats_url = cluster.api, cluster.kubeconfig, cluster.nats_url
    fresh_docker_engine = cluster.engine
    (ref,) = await make_images.make(1, 4 * 1024 * 1024)
    node = f"gate-{uuid.uuid4().hex[:6]}"
    async with SlowProxy(registry, 64 * 1024) as proxy:  # over a minute for this image
        ref = proxy.ref(ref)
        kube_api.create(node_object(node, "a"))
        lifted = metric("cedar_puller_warm_gate_lifted_total", reason="timeout")
        await publish(nats_url, tolerating("big", "a", ref))
        async with puller_on(
            node, nats_url, kubeconfig, fresh_docker_engine, warm_timeout="3s"
        ) as puller:
            await eventually(
                lambda: WARMING not in taints(kube_api, node), 30, "taint removed", interval=0.2
            )
            assert not await has_image(fresh_docker_engine, ref)  # still missing
            assert puller.gate.last is not None and puller.gate.last.reason == "timeout"
            assert metric("cedar_puller_warm_gate_lifted_total", reason="timeout") == lifted + 1
            assert DEDICATED in taints(kube_api, node)


async def test_a_lost_race_is_retried_and_a_refusal_waits_for_the_permission(
    cluster: Cluster,
) -> None:
    kube_api, kubeconfig, nats_url = cluster.api, cluster.kubeconfig, cluster.nats_url
    fresh_docker_engine = cluster.engine
    node = f"gate-{uuid.uuid4().hex[:6]}"
    kube_api.create(node_object(node, "empty"))  # no workload wants anything here: warm
    kube_api.forbid("nodes", ["patch"])
    forbidden = metric("cedar_puller_warm_gate_errors_total", reason="forbidden")
    conflicts = metric("cedar_puller_warm_gate_errors_total", reason="conflict")
    await publish(nats_url)
    async with puller_on(node, nats_url, kubeconfig, fresh_docker_engine) as puller:
        await eventually(
            lambda: metric("cedar_puller_warm_gate_errors_total", reason="forbidden") > forbidden,
            30,
            "the refusal is counted",
        )
        assert WARMING in taints(kube_api, node)
        assert puller.gate.warming  # still held out, still first in line for leases
        kube_api.allow("nodes")
        kube_api.fail_next("patch", "nodes", status=422)  # as if the taints had just changed
        await eventually(lambda: WARMING not in taints(kube_api, node), 30, "taint removed")
        assert metric("cedar_puller_warm_gate_errors_total", reason="conflict") == conflicts + 1
        assert taints(kube_api, node).count(DEDICATED) == 1
