"""Cedar's Kubernetes client (cedar.runtime.kube) against the simulated API's fault modes.

What every service gets from it: no request sooner than the server's Retry-After (from the
header or a Status's details.retryAfterSeconds), one probe at a time while the server
fails, however many callers retry at once; no read that waits forever (a stalled body, a
stalled watch), while a healthy idle watch, kept alive by bookmarks, is never cut; a watch
that ends at once with nothing is an error (client-go's "very short watch"), so no caller
loops on it. Counts come from the API's request log; bounds on gaps are lower bounds the
client itself enforces, not durations of work.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cedar.runtime.backoff import Backoff, Pass, Pushback
from cedar.runtime.kube import (
    KubeClient,
    KubeConfig,
    KubeConfigError,
    Stalled,
    Unavailable,
    load_config,
    resource_path,
)
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.kubeapi_controls import peak_rate
from tests.chaos.test_kube_faults_support import gaps_after_throttling, waves

NS = resource_path("Namespace")
ONE = resource_path("Namespace", None, "tenant-a")
CALLERS = 12


@pytest.fixture
def api() -> Iterator[KubeAPI]:
    server = KubeAPI(bookmark_interval=0.3).start()
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tenant-a"}})
    try:
        yield server
    finally:
        server.stop()


def client_for(api: KubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KubeClient:
    monkeypatch.setenv("CEDAR_KUBE_READ_TIMEOUT", "0.8")
    monkeypatch.setenv("CEDAR_KUBE_WATCH_IDLE_TIMEOUT", "1.2")
    return KubeClient(load_config(str(api.write_kubeconfig(tmp_path / "kc", "client"))))


async def hammer(client: KubeClient, stop: asyncio.Event) -> int:
    """A caller with no backoff of its own: retries at once until it is served after
    `stop`. Returns how many times it was refused."""
    refused = 0
    while True:
        try:
            await client.get(ONE)
            if stop.is_set():
                return refused
        except Unavailable:
            refused += 1
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def callers(client: KubeClient, count: int) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(hammer(client, stop)) for _ in range(count)]
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


# As the flow-control filters answer (plain text), in `make test`; as an API error Status
# with details.retryAfterSeconds (and the header from it), in `make long-tests`.
@pytest.mark.parametrize("body", ["apf", pytest.param("status", marks=pytest.mark.long)])
async def test_retry_after_holds_every_caller(
    *,
    api: KubeAPI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    body: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = client_for(api, tmp_path, monkeypatch)
    try:
        async with callers(client, CALLERS):
            await asyncio.sleep(0.3)  # served, at full speed
            start = time.monotonic()
            api.fault("throttle", retry_after=2, body=body)
            await asyncio.sleep(4.5)
            end = time.monotonic()
            api.clear_faults()
        during = api.request_log(client="client", since=start, until=end)
        throttled = waves(during)
        # One wave answered 429 (the callers that were in flight), then one probe per
        # Retry-After: never a request sooner than the server said.
        gaps = gaps_after_throttling(during)
        with capsys.disabled():
            print(
                f"\n[client] throttle ({body}), {CALLERS} callers retrying at once: "
                f"{len(during)} requests in {end - start:.1f}s, "
                f"waves {[len(w) for w in throttled]}, "
                f"gaps after a 429 {[round(g, 2) for g in gaps]}s"
            )
        assert gaps and min(gaps) >= 2.0, gaps
        assert all(len(wave) == 1 for wave in throttled[1:]), [len(w) for w in throttled]
        assert len(throttled) <= 4  # 4.5 s at one probe per 2 s (plus the first wave)
        after = api.request_log(client="client", since=end)
        assert any(r.outcome == "served" for r in after)  # every caller got through again
    finally:
        await client.close()


async def test_failures_let_one_probe_through(
    api: KubeAPI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = client_for(api, tmp_path, monkeypatch)
    try:
        async with callers(client, CALLERS):
            await asyncio.sleep(0.3)
            start = time.monotonic()
            api.fault("fail", status=500)
            await asyncio.sleep(3.0)
            end = time.monotonic()
            api.clear_faults()
        during = api.request_log(client="client", since=start, until=end)
        failed = [r for r in during if r.outcome == "fail"]
        # The callers in flight when it began (one request each) fail together; after them
        # only probes, with a growing jittered wait: far from 12 callers looping.
        probes = failed[CALLERS:]
        with capsys.disabled():
            print(
                f"\n[client] 500s, {CALLERS} callers retrying at once: {len(failed)} requests "
                f"in {end - start:.1f}s ({CALLERS} in flight, then probes at "
                f"{[round(r.at - start, 2) for r in probes]}s), peak {peak_rate(failed)}/s"
            )
        assert len(probes) <= 10, [round(r.at - start, 2) for r in failed]
        assert peak_rate(probes) <= 4, [round(r.at - start, 2) for r in probes]
    finally:
        await client.close()


async def test_stalled_body_and_stalled_watch_raise(
    api: KubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(api, tmp_path, monkeypatch)
    try:
        api.fault("stall")
        with pytest.raises(Stalled):
            await client.request("GET", NS)  # headers and half a List, then nothing
        with pytest.raises(Stalled):
            async for _ in client.watch(NS, api.resource_version, timeout_seconds=30):
                pass
        api.clear_faults()
        page = await client.request("GET", NS)
        assert [i["metadata"]["name"] for i in page["items"]] == ["tenant-a"]
    finally:
        await client.close()


async def test_a_healthy_idle_watch_is_not_cut(
    api: KubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bookmarks every 0.3 s, idle timeout 1.2 s: a 3 s watch with no change runs to its
    end (the server's timeoutSeconds), as a real watch does with ~60 s bookmarks and the
    90 s default."""
    client = client_for(api, tmp_path, monkeypatch)
    try:
        types = [e["type"] async for e in client.watch(NS, api.resource_version, timeout_seconds=3)]
        assert types and set(types) == {"BOOKMARK"}
        assert api.requests("watch", "namespaces") == 1
    finally:
        await client.close()


async def test_a_watch_that_ends_at_once_is_an_error(
    api: KubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(api, tmp_path, monkeypatch)
    try:

        async def cut() -> None:
            await api.await_watches("namespaces")
            api.break_watches()  # a clean end, with nothing sent

        cutter = asyncio.create_task(cut())
        with pytest.raises(Unavailable) as exc:
            async for _ in client.watch(NS, api.resource_version, timeout_seconds=30):
                pass
        await cutter
        assert exc.value.reason == "ShortWatch"
    finally:
        await client.close()


async def test_patience_gives_up_without_sending(
    api: KubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(api, tmp_path, monkeypatch)
    try:
        api.fault("throttle", retry_after=30)
        with pytest.raises(Unavailable) as first:
            await client.get(ONE)
        assert (first.value.status, first.value.retry_after) == (429, 30.0)
        sent = api.requests()
        with pytest.raises(Unavailable) as held:
            await client.get(ONE, patience=0.5)
        assert held.value.reason == "HeldBack" and (held.value.retry_after or 0) > 25
        assert api.requests() == sent  # nothing reached the server
    finally:
        await client.close()


def test_retry_after_is_capped_and_timeouts_are_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, api: KubeAPI
) -> None:
    from cedar.runtime.kube import RETRY_AFTER_MAX, _error_for

    err = _error_for(429, "Too many requests", {"Retry-After": "3600"})
    assert isinstance(err, Unavailable) and err.retry_after == RETRY_AFTER_MAX
    status = {"kind": "Status", "code": 503, "details": {"retryAfterSeconds": 4}}
    err = _error_for(503, status, {})
    assert isinstance(err, Unavailable) and err.retry_after == 4.0
    assert _error_for(429, "x", {"Retry-After": "soon"}).retry_after is None  # type: ignore[attr-defined]
    kubeconfig = str(api.write_kubeconfig(tmp_path / "kc"))
    for bad in ("0", "-1", "nan", "forever"):
        monkeypatch.setenv("CEDAR_KUBE_READ_TIMEOUT", bad)
        with pytest.raises(KubeConfigError, match="CEDAR_KUBE_READ_TIMEOUT"):
            load_config(kubeconfig)
    monkeypatch.setenv("CEDAR_KUBE_READ_TIMEOUT", "7.5")
    config: KubeConfig = load_config(kubeconfig)
    assert (config.read_timeout, config.headers()) == (
        7.5,
        {"Authorization": "Bearer cedar-sandbox-token"},
    )


def test_pushback_counts_a_burst_once_and_trusts_only_fresh_successes() -> None:
    """The rules behind the gate, on a clock of our own (cedar.runtime.backoff.Pushback)."""
    rng = random.Random(3)
    pushback = Pushback(Backoff(base=0.5, cap=10.0, rng=rng, floor=0.5), retry_after_max=60.0)
    burst = [pushback.admit(0.0) for _ in range(5)]  # five requests out at once
    assert all(isinstance(p, Pass) and not p.probe for p in burst)
    for p in burst:
        assert isinstance(p, Pass)
        pushback.failed(0.1, p)
    assert pushback.backoff.attempts == 1  # the burst failed together: one step, not five
    assert 0.25 <= pushback.wait(0.1) <= 0.5
    assert pushback.admit(0.2) == pytest.approx(pushback.until - 0.2)  # wait first
    now = pushback.until
    probe = pushback.admit(now)
    assert isinstance(probe, Pass) and probe.probe
    assert pushback.admit(now) == 0.0  # one probe at a time
    pushback.failed(now, probe, retry_after=3600)  # capped at retry_after_max
    assert pushback.wait(now) == pytest.approx(60.0)
    stale = Pass(0)
    pushback.served(stale)  # a request from before the trouble: says nothing about now
    assert pushback.failing
    fresh = pushback.admit(pushback.until)
    assert isinstance(fresh, Pass)
    pushback.served(fresh)
    assert not pushback.failing and pushback.backoff.attempts == 0
    assert isinstance(pushback.admit(pushback.until), Pass)
