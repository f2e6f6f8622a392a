"""The MCS allocator's Kubernetes calls under each API fault, on a real NATS.

One stage for the module: the simulated API, a private NATS server, a watcher (app.main, as
tests/integration/test_watcher_service.py runs it) publishing namespace events, and one
`cedar mcs-allocator` process with the watchdog on, so that besides its namespace reads and
annotation patches it keeps its namespace cache and pod reflector (list and watch). Each
test injects one fault kind for the allocator's client only (a crash or restart takes the
whole server down) while new namespaces arrive, clears it, and checks: the allocator's
requests during the fault (from the API's request log; a throttle's Retry-After honoured
between every two waves), that it is still running with no traceback, and that the labels
catch up: every namespace annotated, all levels distinct, the ledger equal to the
annotations.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

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
from tests.harness.nats_server import start_or_fail
from tests.integration.test_mcs_allocator import (
    ANN,
    Replicas,
    ledger_settles,
    namespace,
    wait_until,
)
from tests.integration.test_watcher_service import RunningWatcher, watcher

CLIENT = "allocator"
NEW_PER_FAULT = 4
# Attempts the fault answered in any one second, for the whole allocator (aiohttp's
# re-sends of a reset left out: test_kube_faults_support.attempts; per caller: a handler's
# read or patch of one namespace, the namespace cache's or the watchdog's list or watch:
# MAX_PER_CALLER_PER_SECOND).
MAX_REFUSED_PER_SECOND = 8


class Stage:
    def __init__(self, api: KubeAPI, nats: NatsServer, allocator: Replicas) -> None:
        self.api = api
        self.nats = nats
        self.allocator = allocator

    def logs(self) -> str:
        return self.allocator.log(0)[-4000:]


@pytest.fixture(scope="module")
def api() -> Iterator[KubeAPI]:
    server = KubeAPI(bookmark_interval=BOOKMARK_INTERVAL).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = start_or_fail(NatsServer(tmp_path_factory.mktemp("kf-nats") / "store"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def running_watcher(
    api: KubeAPI, nats: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningWatcher]:
    kubeconfig = api.write_kubeconfig(tmp_path_factory.mktemp("kf-w") / "kubeconfig", "watcher")
    async with watcher(nats, kubeconfig, watch_kinds="Namespace") as w:
        await w.wait_ready()
        yield w


@pytest.fixture(scope="module")
async def stage(
    api: KubeAPI,
    nats: NatsServer,
    running_watcher: RunningWatcher,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stage]:
    tmp = tmp_path_factory.mktemp("kf-alloc")
    kubeconfig = api.write_kubeconfig(tmp / "kubeconfig", CLIENT)
    allocator = Replicas(tmp, nats.url, kubeconfig, CEDAR_MCS_WATCHDOG="true", **ENV)
    allocator.start(1)
    try:
        api.create(namespace("warm-up"))

        def logs() -> str:
            return allocator.log(0)

        await wait_until(lambda: allocator.metric_ok(0), 30, "allocator up", logs)
        await wait_until(lambda: bool(levels(api).get("warm-up")), 30, "first label", logs)
        await asyncio.sleep(1.0)  # its watches are established: a fault comes mid-watch
        yield Stage(api, nats, allocator)
    finally:
        allocator.stop()


def levels(api: KubeAPI) -> dict[str, str | None]:
    """Every namespace's level annotation (None: none yet)."""
    return {
        ns["metadata"]["name"]: (ns["metadata"].get("annotations") or {}).get(ANN)
        for ns in api.list("namespaces")
    }


def labels_agree(api: KubeAPI) -> bool:
    values = list(levels(api).values())
    return all(values) and len(set(values)) == len(values)


@pytest.mark.parametrize("kind", kinds_for("allocator"))
async def test_allocator_rides_out(
    *, kind: str, stage: Stage, capsys: pytest.CaptureFixture[str]
) -> None:
    api = stage.api
    names = [f"{kind}-{i}" for i in range(NEW_PER_FAULT)]

    async def arrive() -> None:
        for name in names:
            api.create(namespace(name))
            await asyncio.sleep(0.2)

    window = await fault_window(api, kind, CLIENT, FAULT_SECONDS, arrive, narrow=True)
    caught_up = await settle(
        lambda: _const(labels_agree(api)), 60, f"labels after {kind}", stage.logs
    )
    await ledger_settles(stage.nats.url, api)
    after = api.request_log(client=CLIENT, since=window.end, until=window.end + 1.0)
    assert stage.allocator.procs[0].poll() is None, stage.logs()  # no crash
    assert "Traceback" not in stage.allocator.log(0), stage.logs()
    with capsys.disabled():
        print(
            f"\n[allocator] {window.summary()}; first second after: {len(after)} requests; "
            f"labels caught up {caught_up:.1f}s after the fault"
        )
    assert window.refused_peak <= MAX_REFUSED_PER_SECOND, window.summary()
    assert max(window.peak_per_caller().values(), default=0) <= MAX_PER_CALLER_PER_SECOND, (
        window.summary()
    )
    if kind == "throttle":
        gaps = gaps_after_throttling(window.requests)
        assert gaps and min(gaps) >= RETRY_AFTER, gaps
    if kind not in ("crash", "restart"):  # down: nothing reaches it, nothing to count
        assert window.refused, "the fault met no request: the test did not test it"


async def _const(value: Any) -> Any:
    return value
