"""The watcher (its informers' list and watch) under each Kubernetes API fault, on a real NATS.

For each fault kind (test_kube_faults_support.KINDS): a running `cedar watcher` (app.main,
as tests/integration/test_watcher_service.py runs it) follows Deployments and Namespaces;
the fault is injected for a few seconds while workloads are created, changed and deleted
and a namespace is created; then it is cleared. Checked: the watcher's requests during the
fault (no hot loop: a handful per second per informer at most, from the API's request
log; a throttle's Retry-After honoured between every two waves of requests), that it is
still running, and that what it published on NATS catches up with the API exactly (every
workload's image set, the deletion marker of the deleted one, the new namespace).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cedar.proto import subjects
from cedar.proto.imageref import normalize
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.nats import NatsServer
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
from tests.integration.test_watcher_service import (
    NS,
    last_msg,
    make,
    namespace,
    set_image,
    watcher,
    workload,
)

CLIENT = "watcher"
# Attempts the fault answered in any one second, for the whole watcher (aiohttp's re-sends
# of a reset left out: test_kube_faults_support.attempts): its two informers, each a caller
# (its list or watch) held to MAX_PER_CALLER_PER_SECOND.
INFORMERS = 2
MAX_REFUSED_PER_SECOND = INFORMERS * MAX_PER_CALLER_PER_SECOND


@pytest.fixture
def api() -> Iterator[KubeAPI]:
    server = KubeAPI(bookmark_interval=BOOKMARK_INTERVAL).start()
    try:
        yield server
    finally:
        server.stop()


async def published_equals_api(js: Any, api: KubeAPI, gone: set[str]) -> bool:
    for obj in api.list("deployments"):
        name = obj["metadata"]["name"]
        want = {normalize(c["image"]) for c in obj["spec"]["template"]["spec"]["containers"]}
        got = await workload(js, "Deployment", name)
        if got is None or got.deleted or got.references() != want:
            return False
    for name in gone:
        got = await workload(js, "Deployment", name)
        if got is None or not got.deleted:
            return False
    for obj in api.list("namespaces"):
        if await last_msg(js, subjects.namespace_subject(obj["metadata"]["name"])) is None:
            return False
    return True


@pytest.mark.parametrize("kind", kinds_for("watcher"))
async def test_watcher_rides_out(
    *,
    kind: str,
    api: KubeAPI,
    fresh_nats: NatsServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    api.create(namespace(NS))
    for i in range(4):
        api.create(make("Deployment", f"d{i}", f"registry.local/d{i}:1"))
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", CLIENT)
    async with watcher(fresh_nats, kubeconfig, watch_kinds="Deployment,Namespace") as w:
        await w.wait_ready()
        await settle(lambda: published_equals_api(w.js, api, set()), 20, "first sync", lambda: "")
        await asyncio.sleep(1.0)  # the watches are established: the fault comes mid-watch

        async def changes() -> None:
            api.create(make("Deployment", "d4", "registry.local/d4:1"))
            api.delete("Deployment", NS, "d1")
            current = api.get("Deployment", NS, "d2")
            assert current is not None
            api.update(set_image(current, "registry.local/d2:2"))
            api.create(namespace("tenant-new"))

        window = await fault_window(api, kind, CLIENT, FAULT_SECONDS, changes)
        caught_up = await settle(
            lambda: published_equals_api(w.js, api, {"d1"}),
            30,
            f"published state after {kind}",
            window.summary,
        )
        after = api.request_log(client=CLIENT, since=window.end, until=window.end + 1.0)
        assert w.task is not None and not w.task.done()  # no crash
    with capsys.disabled():
        import os

        if os.environ.get("KF_DEBUG"):
            for r in api.request_log(client=CLIENT, since=window.start - 8, until=window.end + 3):
                print(round(r.at - window.start, 3), r.verb, r.plural, r.outcome)
        print(
            f"\n[watcher] {window.summary()}; first second after: {len(after)} requests; "
            f"caught up {caught_up:.1f}s after the fault"
        )
    assert window.refused_peak <= MAX_REFUSED_PER_SECOND, window.summary()
    assert max(window.peak_per_caller().values(), default=0) <= MAX_PER_CALLER_PER_SECOND
    if kind == "throttle":
        gaps = gaps_after_throttling(window.requests)
        assert gaps and min(gaps) >= RETRY_AFTER, gaps
    if kind in ("crash", "restart"):
        # Down: nothing reached it. Back: one relist and one watch per informer, not a herd.
        assert len(after) <= MAX_REFUSED_PER_SECOND, after
    else:
        assert window.refused, "the fault met no request: the test did not test it"
