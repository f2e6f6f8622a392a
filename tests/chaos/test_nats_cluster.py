"""A three-server NATS cluster under Cedar's load: its ledger leader killed, a server cut off.

Cedar's streams and buckets at R3 (CEDAR_NATS_REPLICAS=3) on three real nats-server
processes with routes and JetStream. During a burst of namespaces (two real allocators)
and continuous workload churn (a real watcher, three real pullers) against the simulated
API: SIGKILL the server that leads the ledger stream (`KV_cedar-mcs-ledger`), restart it;
then cut one server off (every route into and out of it, at the TCP level) and heal it.

The run happens once (module fixture); each test asserts one promise on its outcome.
Default size: 200 namespaces; `CEDAR_CHAOS_FULL=1`: 1,000 and longer faults.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from cedar.proto.levels import parse
from cedar.runtime.topology import kv_stream
from cedar.sandbox.dockerd import DockerEngine
from tests.chaos import churn
from tests.chaos.stage import FULL, Outcome, Stage

NAMESPACES = 1000 if FULL else 200
BURST_PER_SECOND = 40.0 if FULL else 12.0
OUTAGE_SECONDS = 10.0 if FULL else 5.0
PARTITION_SECONDS = 15.0 if FULL else 8.0
LEDGER = kv_stream("cedar-mcs-ledger")


@pytest.fixture(scope="module")
async def outcome(
    tmp_path_factory: pytest.TempPathFactory,
    docker_engine: DockerEngine,
    builder_engine: DockerEngine,
) -> AsyncIterator[Outcome]:
    log_dir = tmp_path_factory.mktemp("chaos-cluster")
    stage = Stage(log_dir, docker_engine, builder_engine)
    faults: dict[str, object] = {}
    stop = asyncio.Event()
    try:
        await stage.up()
        load = asyncio.create_task(stage.load.run(stop))
        names = [f"tenant-{i:04d}" for i in range(NAMESPACES)]
        burst = asyncio.create_task(
            churn.namespace_burst(stage.kube, names, BURST_PER_SECOND, stage.tenants)
        )

        # 1. SIGKILL the server leading the ledger stream, mid-burst; restart it.
        await stage.wait(lambda: stage.labelled() >= NAMESPACES // 10, 120, "a tenth labelled")
        leader = await stage.leader_of(LEDGER)
        index = stage.cluster.index_of(leader)
        faults["killed"] = leader
        faults["labelled_at_kill"] = stage.labelled()
        stage.cluster.kill(index)
        stage.scrape()
        await asyncio.sleep(OUTAGE_SECONDS)
        await asyncio.to_thread(stage.cluster.restart, index)
        await asyncio.to_thread(stage.cluster.wait_formed, 60)
        faults["ledger_leader_after"] = await stage.leader_of(LEDGER)

        # 2. Cut the (new) ledger leader off from the other two, then heal.
        target = await stage.leader_of(LEDGER)
        index = stage.cluster.index_of(target)
        faults["partitioned"] = target
        faults["labelled_at_partition"] = stage.labelled()
        stage.cluster.partition(index)
        await stage.wait(lambda: stage.cluster.isolated(index), 10, f"{target} isolated")
        await asyncio.sleep(PARTITION_SECONDS / 2)
        faults["isolated_midway"] = stage.cluster.isolated(index)
        stage.scrape()
        await asyncio.sleep(PARTITION_SECONDS / 2)
        stage.cluster.heal(index)
        await asyncio.to_thread(stage.cluster.wait_formed, 60)

        await burst
        stop.set()
        await load
        result = await stage.outcome(within=240 if FULL else 120)
        result.counts["faults"] = faults
        (log_dir / "outcome.json").write_text(json.dumps(result.counts, indent=2, default=str))
        print(f"\nchaos cluster: {json.dumps(result.counts, default=str)}")
        yield result
    finally:
        stop.set()
        await stage.down()


def _explain(outcome: Outcome) -> str:
    return f"\n{json.dumps(outcome.counts, default=str)[:3000]}\n{outcome.logs[-6000:]}"


def test_the_faults_happened_and_cedar_settled(outcome: Outcome) -> None:
    faults = outcome.counts["faults"]
    assert faults["isolated_midway"] is True
    assert faults["labelled_at_kill"] < len(outcome.tenant_namespaces)
    assert outcome.settled, f"did not settle: {outcome.counts['problems_at_deadline']}" + _explain(
        outcome
    )


def test_no_service_crashed(outcome: Outcome) -> None:
    assert outcome.dead_services == [], _explain(outcome)
    assert outcome.unexpected_exits == {}
    assert outcome.crash_lines == []


def test_every_namespace_labelled_exactly_once(outcome: Outcome) -> None:
    assert len(outcome.tenant_namespaces) == NAMESPACES + 5
    unlabelled = [n for n, v in outcome.annotations.items() if not v]
    assert unlabelled == []
    # Every value the annotation ever took: one, never changed, never removed.
    assert outcome.relabelled == {}
    values = list(outcome.annotations.values())
    assert len(set(values)) == len(values), "two namespaces share a level"
    for value in values:
        assert value is not None and str(parse(value)) == value


def test_the_ledger_equals_the_annotations(outcome: Outcome) -> None:
    allocated: dict[str, list[str]] = {}
    for key, value in outcome.ledger.items():
        if key.startswith("label.") and value["state"] == "allocated":
            allocated.setdefault(value["uid"], []).append(value["level"])
    by_uid = {outcome.uids[n]: [v] for n, v in outcome.annotations.items()}
    assert allocated == by_uid
    for name, value in outcome.annotations.items():
        bound = outcome.ledger[f"ns.{outcome.uids[name]}"]
        assert bound["level"] == value and bound["written"] is True, (name, bound)


def test_each_pullers_desired_set_is_what_the_api_holds(outcome: Outcome) -> None:
    assert any(outcome.desired_expected.values())
    for node, wanted in outcome.desired_expected.items():
        reported = outcome.desired_reported.get(node, set())
        assert reported == wanted, (node, sorted(reported - wanted), sorted(wanted - reported))
    assert outcome.workload_mismatches == []


def test_every_publish_of_the_watcher_is_in_the_history(outcome: Outcome) -> None:
    assert outcome.counts["tapped_messages"] > 0
    assert outcome.unstored_publishes == []
    assert outcome.history_duplicates == []


def test_no_message_lost_from_the_history_and_the_last_values_are_its_own(
    outcome: Outcome,
) -> None:
    """CEDAR_HISTORY takes the watcher's subjects, so every change it acknowledged stays
    (before, it sourced the last-value streams and lost changes replaced while its source
    lagged: finding 3 of docs/reliability.md, tests/chaos/test_history_sourcing.py); the
    last-value streams hold, per subject, the history's last message."""
    check = outcome.history_check
    assert check.last_seq > 0
    assert check.missing == [], f"{check.lost} of {check.last_seq} messages gone from the history"
    assert check.stale == [], check.stale[:10]


def test_no_credential_in_any_log_metric_or_message(outcome: Outcome) -> None:
    assert outcome.counts["tapped_messages"] > 0
    assert outcome.secret_hits == []
