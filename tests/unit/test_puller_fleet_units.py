"""Fleet pacing and the warm-up gate in the puller, without servers: the settings and their
options, the lease bucket's configuration, the gate's bookkeeping when there is no API to
patch, that nothing is sent to NATS while it is away, and the node's load in the lease
order (its rank, its stored form, and how the puller counts it from its runtime)."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from prometheus_client import REGISTRY
from pydantic import ValidationError

from cedar.proto import subjects
from cedar.proto.scheduling import NodeInfo, Taint
from cedar.puller import cli
from cedar.puller.cri import api_pb2 as pb
from cedar.puller.cri import runtime_service_pb2_grpc as runtime_grpc
from cedar.puller.cri_engine import CriImageEngine
from cedar.puller.errors import EngineError
from cedar.puller.lease_codec import (
    decode_request,
    encode_request,
)
from cedar.puller.pacing import (
    DEFAULT_LEASE_TTL,
    FleetPullsError,
    Grant,
    Lease,
    LeaseTable,
    PullPriority,
    Request,
    Wait,
    decide,
    parse_fleet_pulls,
)
from cedar.puller.plan import ImageRecord
from cedar.puller.pulls import NodeLoad
from cedar.puller.settings import PullerSettings
from cedar.puller.status import StatusPublisher
from cedar.puller.warm_gate import WarmGate, _timestamp
from cedar.puller.warmup import WARMING_TAINT_KEY
from cedar.runtime.topology import (
    FLEET_MAX_CONSUMERS,
    fleet_leases_stream,
    kv_stream,
    kv_subject,
)

WARMING = Taint(WARMING_TAINT_KEY, "NoSchedule")
A, B = "reg.example.com/a:1", "reg.example.com/b:1"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = PullerSettings(node_name="n")
    assert not plain.fleet_budget.enabled
    assert plain.fleet_lease_ttl == timedelta(seconds=DEFAULT_LEASE_TTL)
    assert plain.warm_timeout == timedelta(minutes=10)
    monkeypatch.setenv("CEDAR_REGISTRY_FLEET_PULLS", "Harbor.Example.com=40,*=100")
    monkeypatch.setenv("CEDAR_FLEET_LEASE_TTL", "45s")
    monkeypatch.setenv("CEDAR_WARM_TIMEOUT", "5m")
    settings = PullerSettings(node_name="n")
    assert settings.fleet_budget.limit_for("harbor.example.com") == 40
    assert settings.fleet_budget.limit_for("quay.io") == 100
    assert settings.fleet_lease_ttl == timedelta(seconds=45)
    assert settings.warm_timeout == timedelta(minutes=5)


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("CEDAR_REGISTRY_FLEET_PULLS", "harbor.example.com", "CEDAR_REGISTRY_FLEET_PULLS"),
        ("CEDAR_REGISTRY_FLEET_PULLS", "https://h/x=3", "not a registry host"),
        ("CEDAR_REGISTRY_FLEET_PULLS", "*=0", "must be 1 to"),
        ("CEDAR_FLEET_LEASE_TTL", "0.5s", "CEDAR_FLEET_LEASE_TTL"),
        ("CEDAR_WARM_TIMEOUT", "0s", "CEDAR_WARM_TIMEOUT"),
    ],
)
def test_bad_values_are_refused_with_their_name(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=named):
        PullerSettings(node_name="n")
    monkeypatch.setenv("CEDAR_NODE_NAME", "n")
    assert cli.main(parse()) == 2  # a clear error at start, not a crash later


def test_options_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEDAR_REGISTRY_FLEET_PULLS", "a.example.com=1")
    settings = cli.build_settings(
        parse(
            "--node-name",
            "n",
            "--registry-fleet-pulls",
            "b.example.com=2",
            "--fleet-lease-ttl",
            "12s",
            "--warm-timeout",
            "90s",
        )
    )
    assert settings.fleet_budget.limit_for("b.example.com") == 2
    assert settings.fleet_budget.limit_for("a.example.com") is None
    assert settings.fleet_lease_ttl == timedelta(seconds=12)
    assert settings.warm_timeout == timedelta(seconds=90)
    assert cli.__doc__ is not None
    for variable in ("CEDAR_REGISTRY_FLEET_PULLS", "CEDAR_FLEET_LEASE_TTL", "CEDAR_WARM_TIMEOUT"):
        assert variable in cli.__doc__


def test_the_lease_bucket_is_a_kv_bucket_with_its_own_consumer_limit() -> None:
    config = fleet_leases_stream(PullerSettings(node_name="n", nats_replicas=3))
    assert config.name == kv_stream(subjects.KV_FLEET_LEASES) == "KV_cedar-fleet-leases"
    assert config.subjects == [kv_subject(subjects.KV_FLEET_LEASES, ">")]
    # What nats-py's key_value() needs and what a bucket's writes rely on.
    assert config.max_msgs_per_subject == 1
    assert config.allow_rollup_hdrs and config.allow_msg_ttl and config.deny_delete
    assert config.num_replicas == 3
    # A fleet of more than 1,000 pullers each follows it (NATS 2.15's default limit).
    assert config.max_consumers is not None and config.max_consumers == FLEET_MAX_CONSUMERS
    assert FLEET_MAX_CONSUMERS > 10_000
    assert config.max_age is not None and config.max_age > 10 * DEFAULT_LEASE_TTL


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


def gate(taints: tuple[Taint, ...], timeout: float = 600.0) -> tuple[WarmGate, list[int]]:
    done: list[int] = []
    g = WarmGate(
        node="n1",
        client=None,
        timeout=timeout,
        initial=NodeInfo(name="n1", taints=taints),
        on_done=lambda: done.append(1),
    )
    return g, done


async def test_an_untainted_node_has_no_gate() -> None:
    g, _ = gate(())
    await g.start()
    assert not g.warming
    assert g.check(loaded=True, desired=[A], present=set(), unpullable=set()) is None
    assert g.next_due() is None
    assert sample("cedar_puller_warming") == 0


async def test_without_the_api_the_gate_opens_in_the_pullers_bookkeeping() -> None:
    g, done = gate((WARMING,))
    await g.start()
    assert g.warming and sample("cedar_puller_warming") == 1
    cold = g.check(loaded=True, desired=[A, B], present={A}, unpullable=set())
    assert cold is not None and cold.reason == "cold" and cold.missing == (B,)
    due = g.next_due()
    assert due is not None and due > time.monotonic() + 500  # the deadline, 10 minutes out
    warm = g.check(loaded=True, desired=[A, B], present={A}, unpullable={B})
    assert warm is not None and warm.reason == "warm" and warm.remove
    await asyncio.wait_for(g.close(), 5)  # the removal attempt ends...
    assert g.lifted and not g.warming and done == [1]  # ...and asks for a pass
    assert sample("cedar_puller_warming") == 0
    assert g.check(loaded=True, desired=[A], present=set(), unpullable=set()) is None


async def test_the_timeout_counts_from_the_start_when_the_node_is_unknown() -> None:
    g, _ = gate((WARMING,), timeout=60.0)
    await g.start()
    assert g.since == g.started  # no API: no creationTimestamp
    g.since = time.time() - 61.0
    decision = g.check(loaded=False, desired=[], present=set(), unpullable=set())
    assert decision is not None and decision.reason == "timeout"
    await g.close()


async def test_a_taint_added_later_starts_its_own_clock() -> None:
    g, _ = gate(())
    await g.start()
    g.since = time.time() - 3600.0  # the node is an hour old
    g.node_changed(NodeInfo(name="n1", taints=(WARMING,)))
    assert g.warming
    assert g.since is not None and g.since > time.time() - 5  # not an hour ago: no timeout
    decision = g.check(loaded=True, desired=[A], present=set(), unpullable=set())
    assert decision is not None and decision.reason == "cold"
    g.node_changed(NodeInfo(name="n1"))
    assert not g.warming and not g.tainted


def test_creation_timestamps_are_read_as_the_api_writes_them() -> None:
    assert _timestamp("2026-01-01T00:00:00Z") == 1767225600.0
    assert _timestamp("not a time") is None
    assert _timestamp(None) is None
    assert _timestamp("") is None


async def test_nothing_is_sent_while_nats_is_away() -> None:
    # js and kv would raise on any use: while disconnected they must not be touched.
    nothing: Any = None
    status = StatusPublisher("n1", nothing, nothing, connected=lambda: False)
    record = ImageRecord(A, state="present")
    await status.publish_image(record, ("Deployment/t/w",))
    await status.forget_image(A)
    await status.decision(A, "pull", "", workloads=("Deployment/t/w",))


# --- the node's load in the lease order ----------------------------------------------------

H = "harbor.example.com"


def _request(
    token: str,
    *,
    since: float,
    share: int = 0,
    load: int = 0,
    want: float = 0.0,
    holder: str = "",
) -> Request:
    return Request(
        H,
        holder or token,
        token,
        PullPriority.MISSING,
        since,
        1e9,
        share=share,
        load=load,
        want=want,
    )


def test_within_a_priority_the_least_loaded_node_goes_first() -> None:
    busy_early = _request("busy", since=1.0, load=7)
    idle_late = _request("idle", since=5.0, load=1)
    idle_second = _request("idle-2nd", since=0.5, share=1, load=1, holder="idle")
    cold_busy = replace(busy_early, token="cold", priority=PullPriority.COLD, load=30)
    waiting = [busy_early, idle_late, idle_second, cold_busy]
    order = [r.token for r in sorted(waiting, key=Request.rank)]
    # Priority first, then the load (an idle node's second pull before a busy node's
    # first), then its first pull before its second; `since` only breaks ties.
    assert order == ["cold", "idle", "idle-2nd", "busy"]
    assert decide(idle_late, limit=2, leases=[], waiting=waiting, now=6.0) == Grant(
        slot=1, reason="slot 1 of 2"
    )
    assert decide(busy_early, limit=2, leases=[], waiting=waiting, now=6.0) == Wait(ahead=3, free=2)
    same_load = [_request("a", since=2.0, load=3), _request("b", since=1.0, load=3)]
    assert [r.token for r in sorted(same_load, key=Request.rank)] == ["b", "a"]


def test_within_a_load_the_image_more_of_a_nodes_workloads_use_goes_first() -> None:
    narrow = _request("narrow", since=1.0, want=0.01)
    wide_second = _request("wide-2nd", since=2.0, share=1, want=0.25, holder="wide")
    wide_first = _request("wide-1st", since=3.0, want=0.25, holder="wide")
    old_puller = _request("old", since=0.0)  # stored without `want`: reads as 0
    busy_wide = _request("busy", since=0.0, load=2, want=1.0)
    waiting = [narrow, wide_second, wide_first, old_puller, busy_wide]
    order = [r.token for r in sorted(waiting, key=Request.rank)]
    # The share then separates one node's pulls of alike images.
    assert order == ["wide-1st", "wide-2nd", "narrow", "old", "busy"]


def test_a_waiting_request_takes_its_nodes_new_load_and_want_and_keeps_its_share() -> None:
    table = LeaseTable(parse_fleet_pulls(f"{H}=1"), ttl=30.0)
    assert isinstance(table.request(H, "holder", "h", PullPriority.MISSING, 0.0), Lease)
    assert table.request(H, "a", "a", PullPriority.MISSING, 1.0, load=2) is None
    assert table.request(H, "b", "b", PullPriority.MISSING, 2.0, load=4) is None
    assert table.request(H, "c", "c", PullPriority.MISSING, 2.5, load=0, want=0.1) is None
    # b's pods ended, a got a launch, and a release moved tenants to b's image: asked
    # again (as a waiting puller writes its request again), b now goes first, then c
    # (as idle, a smaller share), then a; since and share stay those of the first ask.
    assert table.request(H, "b", "b", PullPriority.MISSING, 3.0, load=0, want=0.6) is None
    assert table.request(H, "a", "a", PullPriority.MISSING, 3.0, load=3) is None
    requests = {r.token: r for r in table.requests()}
    b = requests["b"]
    assert (b.since, b.share, b.load, b.want) == (2.0, 0, 0, 0.6)
    assert [g.token for g in table.release("h", 4.0)] == ["b"]
    assert [g.token for g in table.release("b", 5.0)] == ["c"]
    assert [g.token for g in table.release("c", 6.0)] == ["a"]


def test_a_request_stored_without_a_load_reads_as_an_idle_node() -> None:
    """Pullers of the release before this field write requests without it; they must
    still be read (else their pulls would be invisible to every newer puller's order)."""
    request = _request("tok", since=2.0, share=1, load=12)
    assert decode_request(encode_request(request)) == request
    old = json.loads(encode_request(request))
    del old["load"]
    assert decode_request(json.dumps(old).encode()) == replace(request, load=0)
    old["load"] = -1
    with pytest.raises(FleetPullsError, match="load must be a non-negative integer"):
        decode_request(json.dumps(old).encode())


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True, float("nan")])
def test_a_stored_want_outside_zero_to_one_is_refused(bad: object) -> None:
    request = _request("tok", since=2.0, want=0.25)
    assert decode_request(encode_request(request)) == request
    stored = json.loads(encode_request(request))
    del stored["want"]
    assert decode_request(json.dumps(stored).encode()) == replace(request, want=0.0)
    stored["want"] = bad
    with pytest.raises(FleetPullsError, match="want must be a number from 0 to 1"):
        decode_request(json.dumps(stored).encode())


class CountingEngine:
    """`running_containers` answers from `counts`, one a call (an EngineError is raised),
    once `gate` is open."""

    def __init__(self, *counts: int | EngineError) -> None:
        self.counts = list(counts)
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def running_containers(self) -> int:
        self.calls += 1
        await self.gate.wait()
        answer = self.counts.pop(0)
        if isinstance(answer, EngineError):
            raise answer
        return answer


async def test_node_load_lists_at_most_every_few_seconds_and_survives_a_failed_listing() -> None:
    clock = [100.0]
    engine = CountingEngine(3, EngineError("engine_error", "cannot list containers"), 5)
    load = NodeLoad(engine, max_age=5.0, clock=lambda: clock[0])
    assert await load.current() == 3
    clock[0] += 4.9
    assert await load.current() == 3 and engine.calls == 1  # young enough: no listing
    clock[0] += 0.1
    assert await load.current() == 3 and engine.calls == 2  # failed: the last count stays
    assert await load.current() == 3 and engine.calls == 2  # ...and is not asked at once
    clock[0] += 5.0
    engine.gate.clear()
    both = asyncio.gather(load.current(), load.current())  # two waiting pulls, one listing
    await asyncio.sleep(0)
    engine.gate.set()
    assert list(await both) == [5, 5] and engine.calls == 3


@dataclass
class _Listed:
    containers: list[pb.Container]
    requests: list[pb.ListContainersRequest] = field(default_factory=list)


class _Runtime(runtime_grpc.RuntimeServiceServicer):
    """A CRI runtime that lists every container whatever the filter (the engine must not
    rely on a runtime's filtering)."""

    def __init__(self, listed: _Listed) -> None:
        self.listed = listed

    async def ListContainers(self, request: Any, context: Any) -> pb.ListContainersResponse:
        self.listed.requests.append(request)
        return pb.ListContainersResponse(containers=self.listed.containers)


async def test_the_cri_engine_counts_running_containers_not_exited_ones() -> None:
    folder = Path(tempfile.mkdtemp(prefix="cedar-load-", dir="/tmp"))
    listed = _Listed(
        [
            pb.Container(id="running-1", state=pb.CONTAINER_RUNNING),
            pb.Container(id="exited", state=pb.CONTAINER_EXITED),
            pb.Container(id="created", state=pb.CONTAINER_CREATED),
            pb.Container(id="unknown", state=pb.CONTAINER_UNKNOWN),
            pb.Container(id="running-2", state=pb.CONTAINER_RUNNING),
        ]
    )
    server = aio.server()
    # The stubs' servicer declares every call; the engine makes only this one here.
    runtime = _Runtime(listed)  # type: ignore[abstract]
    runtime_grpc.add_RuntimeServiceServicer_to_server(runtime, server)
    server.add_insecure_port(f"unix://{folder / 'cri.sock'}")
    await server.start()
    engine = CriImageEngine(f"unix://{folder / 'cri.sock'}", node="n", call_timeout=5.0)
    try:
        assert await engine.running_containers() == 2
        (request,) = listed.requests
        assert request.filter.state.state == pb.CONTAINER_RUNNING  # the runtime may filter
        listed.containers = []
        assert await NodeLoad(engine).current() == 0
    finally:
        await engine.close()
        await server.stop(None)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_store_failure_warning_is_given_again_after_the_store_came_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from cedar.puller.fleet_leases import LeaseStore
    from cedar.runtime.errors import BusError

    store = LeaseStore(
        bus=None,  # type: ignore[arg-type]
        kv=None,  # type: ignore[arg-type]
        budget=parse_fleet_pulls(f"{H}=1"),
        holder="n1",
        ttl=3,
    )
    caplog.set_level("INFO", logger="cedar.puller.fleet")

    def warnings() -> int:
        return sum("store unavailable" in r.getMessage() for r in caplog.records)

    store._store_failed("claim", BusError("down"))
    store._store_failed("claim", BusError("down"))
    assert warnings() == 1  # once per outage, not once per failed write
    store._store_back()
    assert any("available again" in r.getMessage() for r in caplog.records)
    store._store_failed("claim", BusError("down again"))
    assert warnings() == 2
