"""Fleet pacing and the warm-up gate in the puller, without servers: the settings and their
options, the lease bucket's configuration, the gate's bookkeeping when there is no API to
patch, and that nothing is sent to NATS while it is away."""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from cedar.proto import subjects
from cedar.proto.scheduling import NodeInfo, Taint
from cedar.puller import cli
from cedar.puller.pacing import DEFAULT_LEASE_TTL
from cedar.puller.plan import ImageRecord
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
