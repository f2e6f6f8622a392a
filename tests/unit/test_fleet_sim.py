"""The fleet simulation of bench/fleet on a tiny fleet: its invariants, not its results.

A few dozen nodes for a few simulated hours, each strategy in well under a second. What is
checked holds for any trace: every launch is accounted for, bytes served are bytes that
landed on nodes or were lost to cut pulls, Cedar's fleet budget is never exceeded, no
tenant is scheduled onto a warming node, the same seed gives the same day, the shared
desired sets give exactly what one set per node gives, and bad trace files are refused
with the line that is wrong.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "fleet"))

from fleetsim import generate as generator  # noqa: E402
from fleetsim import trace as tracefile  # noqa: E402
from fleetsim.cedar_parts import PACED  # noqa: E402
from fleetsim.runner import STRATEGIES, run_one  # noqa: E402

from cedar.puller.pacing import parse_fleet_pulls  # noqa: E402

PARAMS = generator.Params(nodes=24, tenants=240, hours=6.0, seed=7, logins_per_tenant_day=24.0)


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fleet") / "trace.jsonl.gz"
    tracefile.write(path, generator.generate(PARAMS))
    return path


@pytest.fixture(scope="module")
def results(trace_path: Path) -> dict[str, dict[str, Any]]:
    return {name: run_one(trace_path, name, PARAMS.seed) for name in STRATEGIES}


def test_the_trace_is_the_issues_fleet_in_small(trace_path: Path) -> None:
    trace = tracefile.read(trace_path)
    nodes = [e for e in trace.events if e["type"] == "node"]
    initial = [e for e in nodes if e["t"] == 0]
    assert len(initial) == 24
    assert {e["pool"] for e in initial} == {"general", "gpu", "highmem"}
    assert len(trace.tenants) == 240
    added = [e for e in nodes if e["t"] > 0 and e["action"] == "add"]
    removed = [e for e in nodes if e["action"] == "remove"]
    assert len(added) == round(24 * 0.1) and {e["name"] for e in removed} == {
        e["name"] for e in added
    }
    apps = {ref for ref in trace.images if "/tenants/" in ref and ref.endswith(":r0")}
    assert len(apps) == 30
    sizes = [sum(s for _, s in trace.images[ref]["layers"]) / 1e9 for ref in apps]
    assert min(sizes) >= 1.0 and max(sizes) <= 12.0
    base = {tuple(trace.images[ref]["layers"][0]) for ref in apps}
    assert len(base) == 1  # every application shares the OS base layer
    releases = [e for e in trace.events if e["type"] == "release"]
    per_hour: dict[int, int] = {}
    for release in releases:
        hour = int(release["t"] // 3600)
        per_hour[hour] = per_hour.get(hour, 0) + len(release["namespaces"])
    assert sorted(per_hour) == list(range(6))
    assert all(moved == 24 for moved in per_hour.values())  # 10% of 240 every hour
    assert [e["duration_s"] for e in trace.events if e["type"] == "outage"] == [600.0]
    logins = [e["t"] for e in trace.events if e["type"] == "login"]
    assert logins == sorted(logins) and len(logins) > 100


def test_the_trace_is_determined_by_its_seed() -> None:
    one = list(generator.generate(PARAMS))
    assert one == list(generator.generate(PARAMS))
    other = list(generator.generate(generator.Params(**{**vars(PARAMS), "seed": 8})))
    assert one != other


def test_every_launch_is_accounted_for(results: dict[str, dict[str, Any]]) -> None:
    for name, result in results.items():
        d = result["details"]
        assert d["launches"] > 50, name
        assert d["hits"] + d["misses"] == d["launches"]
        waited = d["misses"] - d["launches_waiting_at_end"] - d["launches_abandoned"]
        assert waited >= 0, name
        assert result["summary"]["launch_hit_ratio"] == pytest.approx(d["hits"] / d["launches"])
        if waited:
            assert result["summary"]["wait_p50_s"] is not None
            assert (
                d["wait_max_s"]
                >= result["summary"]["wait_p99_s"]
                >= result["summary"]["wait_p50_s"]
                > 0
            )
        assert d["unschedulable_launches"] == 0
        assert d["launches_on_warming_nodes"] == 0, name


def test_bytes_served_are_bytes_landed_or_lost(results: dict[str, dict[str, Any]]) -> None:
    for name, result in results.items():
        d = result["details"]
        served = sum(d["registry_gb_by_host"].values()) * 1e9
        assert served == pytest.approx(d["bytes_landed"] + d["bytes_lost"], rel=1e-3, abs=2e8), name
        hours = PARAMS.hours
        assert result["summary"]["registry_gb_per_hour"] == pytest.approx(
            served / 1e9 / hours, rel=1e-2
        )


def test_the_fleet_budget_is_never_exceeded(results: dict[str, dict[str, Any]]) -> None:
    budget = parse_fleet_pulls(PACED)
    paced = results["cedar-paced"]["details"]
    assert paced["fleet_lease_peak"], "no lease was taken"
    for host, peak in paced["fleet_lease_peak"].items():
        limit = budget.limit_for(host)
        assert limit is not None and 0 < peak <= limit
    # Without pacing the same day goes over it: the budget is what held it.
    unpaced = results["cedar"]["details"]["registry_peak_pulls_by_host"]["harbor.example.com"]
    assert unpaced > (budget.limit_for("harbor.example.com") or 0)


def test_the_warm_up_gate_keeps_tenants_off_cold_nodes(results: dict[str, dict[str, Any]]) -> None:
    paced = results["cedar-paced"]["details"]
    cedar = paced["cedar"]
    assert cedar["gate_lifted_warm"] + cedar["gate_lifted_timeout"] == round(24 * 0.1)
    assert paced["misses_on_new_nodes"] <= results["cedar"]["details"]["misses_on_new_nodes"]


def test_releases_are_tracked_to_warm(results: dict[str, dict[str, Any]]) -> None:
    for name in ("cedar", "cedar-paced", "fledged"):
        d = results[name]["details"]
        assert d["releases"] > 6
        assert d["releases_reaching_99pct"] >= d["releases"] - 2, name
        assert results[name]["summary"]["release_to_warm_p99_s"] > 0
    assert (
        results["none"]["details"]["releases_reaching_99pct"]
        < results["cedar"]["details"]["releases"]
    )


def test_json_summary_has_exactly_the_issues_keys(results: dict[str, dict[str, Any]]) -> None:
    keys = {
        "launch_hit_ratio",
        "wait_p50_s",
        "wait_p99_s",
        "release_to_warm_p99_s",
        "registry_peak_pulls",
        "registry_gb_per_hour",
        "disk_gb_p99",
    }
    assert set(results) == {"none", "original", "fledged", "cedar", "cedar-paced"}
    for result in results.values():
        assert set(result["summary"]) == keys
        assert json.loads(json.dumps(result["summary"])) == result["summary"]
        disk = result["summary"]["disk_gb_p99"]
        assert disk is not None and 0 < disk < 500


def test_the_same_seed_gives_the_same_day(
    trace_path: Path, results: dict[str, dict[str, Any]]
) -> None:
    again = run_one(trace_path, "cedar-paced", PARAMS.seed)
    first = results["cedar-paced"]
    assert again["summary"] == first["summary"]
    assert again["details"]["series"] == first["details"]["series"]
    assert again["details"]["cedar"] == first["details"]["cedar"]


def test_shared_desired_sets_are_exactly_one_set_per_node(
    trace_path: Path, results: dict[str, dict[str, Any]]
) -> None:
    per_node = run_one(trace_path, "cedar", PARAMS.seed, per_node_desired=True)
    shared = results["cedar"]
    assert per_node["summary"] == shared["summary"]
    assert per_node["details"]["cedar"] == shared["details"]["cedar"]


def _lines(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rs: rs[1:], "line 1: the first record must be the cedar-fleet-trace header"),
        (lambda rs: [{**rs[0], "version": 9}, *rs[1:]], "trace version 9"),
        (
            lambda rs: [*rs, {"type": "login", "t": 1e9, "namespace": "nobody", "session_s": 1}],
            "login of unknown tenant",
        ),
        (lambda rs: [*rs, {"type": "bogus"}], "unknown record type 'bogus'"),
        (
            lambda rs: [*rs, {"type": "outage", "t": 1e9, "host": "h"}],
            "outage record lacks duration_s",
        ),
        (
            lambda rs: [*rs, {"type": "login", "t": -1, "namespace": "t-00000", "session_s": 1}],
            "non-negative",
        ),
        (
            lambda rs: [*rs, {"type": "login", "t": 1.0, "namespace": "t-00000", "session_s": 1}],
            "time order",
        ),
    ],
)
def test_bad_traces_are_refused_with_the_line(tmp_path: Path, mutate: Any, message: str) -> None:
    records = list(generator.generate(generator.Params(nodes=3, tenants=3, hours=1.0)))
    path = _lines(tmp_path / "bad.jsonl", mutate(records))
    with pytest.raises(tracefile.TraceError, match=message.replace("(", r"\(")):
        tracefile.read(path)


def test_unreadable_trace_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(tracefile.TraceError, match="cannot read"):
        tracefile.read(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(tracefile.TraceError, match="not a trace file"):
        tracefile.read(broken)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    with pytest.raises(tracefile.TraceError, match="line 1: not JSON"):
        tracefile.read(garbage)
    empty = tmp_path / "empty.jsonl.gz"
    with gzip.open(empty, "wt") as out:
        out.write("")
    with pytest.raises(tracefile.TraceError, match="no header"):
        tracefile.read(empty)


def test_written_traces_read_back(tmp_path: Path) -> None:
    records = list(generator.generate(generator.Params(nodes=3, tenants=5, hours=1.0)))
    for name in ("t.jsonl", "t.jsonl.gz"):
        path = tmp_path / name
        assert tracefile.write(path, records) == len(records)
        trace = tracefile.read(path)
        assert len(trace.tenants) == 5
        assert math.isclose(trace.hours, 1.0)
