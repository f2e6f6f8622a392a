"""The processes `cedar up` starts, and every way out of it (I/O: processes, stdout).

`Child` is one service run as `python -m cedar.cli NAME` in a session of its own, stopped
by `cedar up` itself (and by the kernel should `cedar up` be SIGKILLed). `Console` keeps a
gone reader or a closed terminal from breaking the stop; `Outcome` is why it stopped, and
so its exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

EXIT_STDOUT_CLOSED = 128 + signal.SIGPIPE  # what a shell shows for a writer whose reader left


@dataclass
class Child:
    name: str
    env: dict[str, str]
    log_path: Path
    metrics_port: int
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from cedar.sandbox.procs import exit_with_parent

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "cedar.cli", self.name],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: the terminal's Ctrl-C reaches `cedar up` only, which then
                # stops the services in order instead of all at once ...
                start_new_session=True,
                # ... and SIGTERM from the kernel should `cedar up` be SIGKILLed. Started
                # from the event loop's thread, which lives as long as `cedar up`.
                preexec_fn=exit_with_parent(signal.SIGTERM),  # noqa: PLW1509 - see its doc
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1.0
            ) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _signal_session(self, sig: int) -> None:
        # Not yet reaped, so its PID (= its session's process group) is still its own.
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def terminate(self) -> None:
        self._signal_session(signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> None:
        if self.popen is None:
            return
        try:
            self.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._signal_session(signal.SIGKILL)
            self.popen.wait(5)


class Console:
    """`cedar up`'s stdout and stderr, which a gone reader or a closed terminal cannot break.

    A write that fails (EPIPE: the pipe's reader is gone, such as `tee` killed by the same
    Ctrl-C; EIO: the terminal was closed) points that stream at /dev/null, so that nothing
    after it (the next line, the interpreter's last flush) fails on it again and the stop
    goes on quietly.
    """

    def __init__(self) -> None:
        self.stdout_lost = False

    def out(self, text: str) -> None:
        if not _write(sys.stdout, text):
            self.stdout_lost = True

    def err(self, text: str) -> None:
        _write(sys.stderr, text)

    def stdout_gone(self) -> bool:
        """Whether stdout's reader is gone, noticed without writing (the view may be quiet)."""
        if not self.stdout_lost and sys.stdout is not None and _reader_gone(sys.stdout):
            _to_devnull(sys.stdout)
            self.stdout_lost = True
        return self.stdout_lost


def _write(stream: TextIO | None, text: str) -> bool:
    if stream is None:  # started with that descriptor closed
        return False
    try:
        stream.write(text + "\n")
        stream.flush()
    except (OSError, ValueError):
        _to_devnull(stream)
        return False
    return True


def _to_devnull(stream: TextIO) -> None:
    with contextlib.suppress(OSError, ValueError):
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    with contextlib.suppress(OSError, ValueError):
        stream.flush()  # what could not be written goes to /dev/null now


def _reader_gone(stream: TextIO) -> bool:
    """A pipe without a reader polls POLLERR, a socket without a peer POLLHUP; a file never."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), 0)  # errors and hang-ups are always reported
        events = poller.poll(0)
    except (OSError, ValueError):
        return False
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in events)


@dataclass
class Outcome:
    """Why `cedar up` stops, and so its exit status: the first cause wins, except that a
    signal wins over a closed stdout."""

    code: int | None = None
    why: str = ""

    def first(self, code: int, why: str) -> None:
        if self.code is None:
            self.code, self.why = code, why

    def signalled(self, code: int, why: str) -> None:
        # The same Ctrl-C that kills `tee` may be seen after its pipe is: the signal wins.
        if self.code in (None, EXIT_STDOUT_CLOSED):
            self.code, self.why = code, why


async def unless_stopped(coro: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run `coro` to its end unless `stop` is set first, which cancels it: whether it ended.

    Its exception, if any, is raised. A cancelled start leaves nothing unstopped: each piece
    is registered for `Up.stop()` before it starts (see `Up._start_server`).
    """
    work = asyncio.ensure_future(coro)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        return False
    work.result()
    return True
