"""The puller's node source (cedar.puller.node: a get, then a watch, of its own Node) under
each Kubernetes API fault.

The node source is the puller's only Kubernetes caller; it runs here as the puller's app
runs it (`initial`, then `follow` until stopped), with its own client and token. While a
fault lasts, the Node's labels and taints change; afterwards the node source must hold
exactly what the API holds (what decides which workloads the puller may pull), having sent
no more than a few requests a second, and for a throttle never sooner than Retry-After.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from cedar.proto.scheduling import NodeInfo, node_from_object
from cedar.puller.node import NodeSource
from cedar.puller.settings import PullerSettings
from cedar.sandbox.kubeapi import KubeAPI
from tests.chaos.test_kube_faults_support import (
    BOOKMARK_INTERVAL,
    ENV,
    FAULT_SECONDS,
    MAX_PER_CALLER_PER_SECOND,
    RETRY_AFTER,
    fault_window,
    gaps_after_throttling,
    kinds_for,
    settle,
)

CLIENT = "puller"
NODE = "node-a"


@pytest.fixture
def api() -> Iterator[KubeAPI]:
    server = KubeAPI(bookmark_interval=BOOKMARK_INTERVAL).start()
    server.create(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE, "labels": {"zone": "a", "disk": "hdd"}},
            "spec": {},
        }
    )
    try:
        yield server
    finally:
        server.stop()


def node_in_api(api: KubeAPI) -> NodeInfo:
    obj = api.get("nodes", None, NODE)
    assert obj is not None
    return node_from_object(obj)


@pytest.mark.parametrize("kind", kinds_for("puller"))
async def test_node_source_rides_out(
    *,
    kind: str,
    api: KubeAPI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", CLIENT)
    settings = PullerSettings(node_name=NODE, kubeconfig=str(kubeconfig), node_from_api=True)
    source = NodeSource(settings)
    assert source.from_api
    stop = asyncio.Event()
    changes: list[NodeInfo] = []
    initial = await source.initial(stop)
    assert initial is not None and initial[0] == node_in_api(api)
    follower = asyncio.create_task(source.follow(stop, initial[1], changes.append))
    try:
        await api.await_watches("nodes")
        await asyncio.sleep(1.0)  # the watch is established: the fault comes mid-watch

        async def change() -> None:
            api.patch("nodes", None, NODE, {"metadata": {"labels": {"disk": "ssd"}}})
            taint = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
            api.patch("nodes", None, NODE, {"spec": {"taints": [taint]}})

        window = await fault_window(api, kind, CLIENT, FAULT_SECONDS, change)
        caught_up = await settle(
            lambda: _const(source.current == node_in_api(api)),
            30,
            f"the node after {kind}",
            lambda: f"{source.current} != {node_in_api(api)}; {window.summary()}",
        )
        assert not follower.done()  # no crash
        assert changes and changes[-1] == node_in_api(api)
    finally:
        stop.set()
        await asyncio.wait_for(follower, 30)
        await source.close()
    with capsys.disabled():
        print(f"\n[puller] {window.summary()}; caught up {caught_up:.1f}s after the fault")
    assert window.refused_peak <= MAX_PER_CALLER_PER_SECOND, window.summary()
    if kind == "throttle":
        gaps = gaps_after_throttling(window.requests)
        assert gaps and min(gaps) >= RETRY_AFTER, gaps
    if kind not in ("crash", "restart"):
        assert window.refused, "the fault met no request: the test did not test it"


async def _const(value: bool) -> bool:
    return value
