"""Fleet simulation of issue 15: tenant launches that find their image warm, per strategy.

A discrete-event simulation of a day of a multi-tenant fleet that drives Cedar's own code
for every node (bench/fleet/README.md says what is Cedar's and what is modelled), on a
seeded trace, for five strategies: none, original, fledged, cedar, cedar-paced.

    .venv/bin/python bench/fleet/run.py [--trace FILE] [--nodes N] [--tenants M] [--hours H]
        [--seed S] [--json OUT] [--write-trace FILE] [--strategies a,b] [--jobs J]
        [--details OUT] [--plot PNG] [--markdown OUT]

Without --trace it generates the trace of the issue from --nodes/--tenants/--hours/--seed
(1,000 nodes, 10,000 tenants, 24 h, seed 1). Not run by `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleetsim import generate as generator
from fleetsim import trace as tracefile
from fleetsim.runner import STRATEGIES, markdown_table, run_one, table

_COST = {"cedar-paced": 5, "cedar": 4, "fledged": 3, "original": 2, "none": 1}


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--trace", type=Path, help="replay this trace file instead of generating one"
    )
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--tenants", type=int, default=10000)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--prepull-lead",
        type=float,
        default=0.0,
        metavar="S",
        help="generated trace: a `cedar prepull` of each release S seconds before it",
    )
    parser.add_argument(
        "--fleet-pulls",
        metavar="BUDGET",
        help="cedar-paced's CEDAR_REGISTRY_FLEET_PULLS (default harbor.example.com=40,*=20)",
    )
    parser.add_argument("--json", type=Path, help="write the issue's JSON summary here")
    parser.add_argument("--details", type=Path, help="write every measure and the time series here")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument(
        "--plot", type=Path, help="draw hit ratio and registry load (needs matplotlib)"
    )
    parser.add_argument("--write-trace", type=Path, help="keep the generated trace in this file")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="strategies simulated in parallel processes",
    )
    args = parser.parse_args(argv)
    for name in args.strategies.split(","):
        if name not in STRATEGIES:
            parser.error(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    if args.fleet_pulls is not None:
        from cedar.puller.pacing import FleetPullsError, parse_fleet_pulls

        try:
            parse_fleet_pulls(args.fleet_pulls)
        except FleetPullsError as err:
            parser.error(str(err))
    if args.trace is None and (args.nodes < 3 or args.tenants < 3 or args.hours <= 0):
        parser.error("--nodes and --tenants must be at least 3 and --hours positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    started = time.perf_counter()
    if args.trace is not None:
        path = args.trace
        try:
            trace = tracefile.read(path)
        except tracefile.TraceError as err:
            print(f"run.py: {err}", file=sys.stderr)
            return 2
    else:
        params = generator.Params(
            nodes=args.nodes,
            tenants=args.tenants,
            hours=args.hours,
            seed=args.seed,
            prepull_lead_s=args.prepull_lead,
        )
        path = args.write_trace or Path(tempfile.mkdtemp(prefix="cedar-fleet-")) / "trace.jsonl.gz"
        count = tracefile.write(path, generator.generate(params))
        print(f"trace: {count:,} records in {path}", file=sys.stderr)
        trace = tracefile.read(path)
    names = args.strategies.split(",")
    seed = int(trace.header.get("seed", args.seed))
    results: dict[str, dict[str, Any]] = {}
    if args.jobs > 1 and len(names) > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            # The slowest first, so that the processes finish together.
            order = sorted(names, key=lambda n: -_COST.get(n, 0))
            futures = {
                name: pool.submit(run_one, path, name, seed, False, args.fleet_pulls)
                for name in order
            }
            for name in names:
                results[name] = futures[name].result()
                print(f"  {name}: {results[name]['seconds']} s", file=sys.stderr)
    else:
        for name in names:
            results[name] = run_one(trace, name, seed, False, args.fleet_pulls)
            print(f"  {name}: {results[name]['seconds']} s", file=sys.stderr)
    total = time.perf_counter() - started

    header = trace.header
    start_nodes = sum(1 for e in trace.events if e["type"] == "node" and e["t"] == 0)
    print(
        f"fleet: {start_nodes} nodes at start, "
        f"{len(trace.tenants):,} tenants, {trace.hours:g} h, seed {seed}; "
        f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"wall {total:.0f} s with {args.jobs} process(es)"
    )
    print(table(results))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"strategies": {n: r["summary"] for n, r in results.items()}}, indent=2)
            + "\n"
        )
    if args.details is not None:
        args.details.write_text(
            json.dumps(
                {
                    "trace": {"path": str(path), "header": header},
                    "wall_seconds": round(total, 1),
                    "strategies": {
                        n: {**r["summary"], **r["details"], "sim_seconds": r["seconds"]}
                        for n, r in results.items()
                    },
                },
                indent=1,
            )
            + "\n"
        )
    if args.markdown is not None:
        args.markdown.write_text(markdown_table(results) + "\n")
    if args.plot is not None:
        from fleetsim.plot import plot

        plot(results, args.plot, trace.hours)
    return 0


if __name__ == "__main__":
    sys.exit(main())
