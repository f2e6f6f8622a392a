"""`cedar up --sandbox` run as a user runs it, for the end-to-end tests: a state directory
with a short path, the process with its output in a file, waiting for that output, and a
kill by PID on any way out."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from cedar.sandbox.procs import kill_pid

REPO_ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def short_state_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory under /tmp: the private engines' unix sockets live under it, and a
    socket path has at most 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def sandbox_up(
    state_dir: Path, env: dict[str, str], *args: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path]]:
    """`cedar up --sandbox ARGS` refreshing every 0.5 s, its output (stderr too) in
    `state_dir/up.out`; killed by PID at the end if it is still running."""
    out_path = state_dir / "up.out"
    with out_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "cedar.cli", "up", "--sandbox", *args, "--interval", "0.5"),
            *("--state-dir", str(state_dir)),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
        )
    try:
        yield proc, out_path
    finally:
        if proc.returncode is None:
            kill_pid(proc.pid)
            await proc.wait()


async def wait_for_output(
    proc: asyncio.subprocess.Process,
    out_path: Path,
    ready: Callable[[str], object],
    within: float,
    what: str,
) -> str:
    """The output once `ready(output)` holds; fails at once if the process ended, and with
    `what` and the output after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    text = ""
    while loop.time() < deadline:
        text = await asyncio.to_thread(out_path.read_text, errors="replace")
        if ready(text):
            return text
        assert proc.returncode is None, text
        await asyncio.sleep(0.3)
    raise AssertionError(f"{what}:\n{text}")
