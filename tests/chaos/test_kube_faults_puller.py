"""The puller's node source (cedar.puller.node: a get, then a watch, of its own Node) under
each Kubernetes API fault.

The node source is the puller's only Kubernetes caller; it runs here as the puller's app
runs it (`initial`, then `follow` until stopped), with its own client and token. While a
fault lasts, the Node's labels and taints change; afterwards the node source must hold
exactly what the API holds (what decides which workloads the puller may pull), having made
no more than a few attempts a second, and for a throttle never sooner than Retry-After.

Attempts, not arrivals: aiohttp sends a reset GET a second time by itself at once
(test_kube_faults_support.attempts, citing aiohttp/client.py), which is no retry of
Cedar's and no sign of a hot loop. The node source makes one request at a time (its get or
its watch), so the whole of it is held to one caller's limit.
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
from cedar.sandbox.kubeapi_controls import Request
from tests.chaos.test_kube_faults_support import (
    BOOKMARK_INTERVAL,
    ENV,
    FAULT_SECONDS,
    MAX_PER_CALLER_PER_SECOND,
    RETRY_AFTER,
    attempts,
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


def test_attempts_leave_out_only_aiohttps_resend() -> None:
    def arrival(at: float, verb: str = "get", name: str = NODE, outcome: str = "reset") -> Request:
        return Request(at, CLIENT, verb, "nodes", outcome, None, name)

    resent = [arrival(0.0), arrival(0.001)]
    assert attempts(resent) == [resent[0]]
    # aiohttp re-sends once: a third copy is an attempt of the caller's.
    assert len(attempts([*resent, arrival(0.002)])) == 2
    assert len(attempts([arrival(0.0), arrival(0.3)])) == 2  # the push-back's retry
    assert len(attempts([arrival(0.0, "patch"), arrival(0.001, "patch")])) == 2  # not re-sent
    assert len(attempts([arrival(0.0), arrival(0.001, name="node-b")])) == 2
    assert len(attempts([arrival(0.0, outcome="fail"), arrival(0.001)])) == 2  # answered


async def _const(value: bool) -> bool:
    return value
