"""A minimal service on the shared runtime, run as a subprocess by test_runtime.py.

Its main loop takes one unit of work at a time (1 s each) and, on SIGTERM, finishes the
unit in flight before returning — the contract every Cedar service follows.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from cedar.runtime.service import Runtime, run
from cedar.runtime.settings import CommonSettings


def note(journal: Path, line: str) -> None:
    with journal.open("a") as out:
        out.write(line + "\n")


async def main(rt: Runtime[CommonSettings]) -> None:
    journal = Path(sys.argv[1])
    rt.health.set("work", True)
    unit = 0
    while not rt.stop.is_set():
        unit += 1
        note(journal, f"start {unit}")
        await asyncio.sleep(1.0)  # in-flight work that must not be cut short
        note(journal, f"done {unit}")


if __name__ == "__main__":
    raise SystemExit(run("demo", CommonSettings(), main))
