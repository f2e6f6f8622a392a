"""Every service SIGKILLed at random points of its work, again and again, under load.

The same stage as the NATS-cluster test (three-server cluster at R3, simulated API, one
watcher, two allocators, three pullers as real processes, a burst of namespaces and
continuous workload churn). One service at a time, in a shuffled order, is SIGKILLed after
a random while (so at a random point of listing, publishing, claiming, patching, pulling or
writing status) and started again at once; each service is killed `KILLS` times.
Afterwards the same end state is required as after the NATS faults.

Default: 5 kills per service (30 kills); `CEDAR_CHAOS_FULL=1`: 20 per service (120 kills)
and 1,000 namespaces.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from cedar.proto.levels import parse
from cedar.sandbox.dockerd import DockerEngine
from tests.chaos import churn
from tests.chaos.stage import FULL, Outcome, Stage

KILLS = 20 if FULL else 5
NAMESPACES = 1000 if FULL else 150
# Spread the burst over the kills: namespaces keep arriving while services die.
KILL_GAP = (0.3, 2.0)


@pytest.fixture(scope="module")
async def outcome(
    tmp_path_factory: pytest.TempPathFactory,
    docker_engine: DockerEngine,
    builder_engine: DockerEngine,
) -> AsyncIterator[Outcome]:
    log_dir = tmp_path_factory.mktemp("chaos-kills")
    stage = Stage(log_dir, docker_engine, builder_engine)
    stop = asyncio.Event()
    try:
        await stage.up()
        procs = list(stage.fleet)
        schedule = [p for p in procs for _ in range(KILLS)]
        stage.rng.shuffle(schedule)
        mean_gap = sum(KILL_GAP) / 2
        per_second = NAMESPACES / (len(schedule) * mean_gap)
        load = asyncio.create_task(stage.load.run(stop))
        names = [f"tenant-{i:04d}" for i in range(NAMESPACES)]
        burst = asyncio.create_task(
            churn.namespace_burst(stage.kube, names, per_second, stage.tenants)
        )
        killed_while: dict[str, list[str]] = {}
        for proc in schedule:
            await asyncio.sleep(stage.rng.uniform(*KILL_GAP))
            if not proc.alive:
                proc.reap()  # died on its own: recorded as an unexpected exit
            else:
                killed_while.setdefault(proc.name, []).append(_doing(proc))
                proc.kill()
            proc.start()
            if stage.rng.random() < 0.2:
                stage.scrape()
        await burst
        stop.set()
        await load
        await stage.wait(stage.fleet.all_ready, 90, "every service ready after the kills")
        result = await stage.outcome(within=240 if FULL else 120)
        result.counts["killed_while"] = {k: _tally(v) for k, v in killed_while.items()}
        (log_dir / "outcome.json").write_text(json.dumps(result.counts, indent=2, default=str))
        print(f"\nchaos kills: {json.dumps(result.counts, default=str)}")
        yield result
    finally:
        stop.set()
        await stage.down()


def _doing(proc: object) -> str:
    """What the service was busy with when killed, from its last log line (roughly)."""
    tail = proc.log_tail(1)
    try:
        return str(json.loads(tail).get("msg", "?"))[:40]
    except ValueError:
        return "starting"


def _tally(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _explain(outcome: Outcome) -> str:
    return f"\n{json.dumps(outcome.counts, default=str)[:3000]}\n{outcome.logs[-6000:]}"


def test_every_service_was_killed_repeatedly_and_cedar_settled(outcome: Outcome) -> None:
    kills = outcome.counts["kills"]
    assert set(kills) == {"watcher", "allocator-0", "allocator-1"} | {
        f"puller-node-{i}" for i in range(3)
    }
    assert all(n >= KILLS for n in kills.values()), kills
    assert outcome.settled, f"did not settle: {outcome.counts['problems_at_deadline']}" + _explain(
        outcome
    )


def test_no_service_died_but_by_our_hand(outcome: Outcome) -> None:
    assert outcome.unexpected_exits == {}, _explain(outcome)
    assert outcome.dead_services == []
    assert outcome.crash_lines == []


def test_every_namespace_labelled_exactly_once(outcome: Outcome) -> None:
    assert len(outcome.tenant_namespaces) == NAMESPACES + 5
    assert [n for n, v in outcome.annotations.items() if not v] == []
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
    assert allocated == {outcome.uids[n]: [v] for n, v in outcome.annotations.items()}
    for name, value in outcome.annotations.items():
        bound = outcome.ledger[f"ns.{outcome.uids[name]}"]
        assert bound["level"] == value and bound["written"] is True, (name, bound)


def test_each_pullers_desired_set_is_what_the_api_holds(outcome: Outcome) -> None:
    for node, wanted in outcome.desired_expected.items():
        reported = outcome.desired_reported.get(node, set())
        assert reported == wanted, (node, sorted(reported - wanted), sorted(wanted - reported))
    assert outcome.workload_mismatches == []


def test_every_publish_of_the_watcher_is_in_the_history(outcome: Outcome) -> None:
    assert outcome.unstored_publishes == []
    assert outcome.history_duplicates == []


def test_no_message_lost_from_the_history(outcome: Outcome) -> None:
    check = outcome.history_check
    assert check.last_seq > 0
    assert check.missing == [], f"{check.lost} of {check.last_seq} messages gone from the history"
    assert check.stale == [], check.stale[:10]


def test_no_credential_in_any_log_metric_or_message(outcome: Outcome) -> None:
    assert outcome.counts["tapped_messages"] > 0
    assert outcome.secret_hits == []
