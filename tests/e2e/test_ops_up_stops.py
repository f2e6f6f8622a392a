"""`cedar up --sandbox` stops everything it started on every way out (issue 16).

Each test starts the real sandbox (embedded nats-server, docker-registry, a private dockerd,
the simulated Kubernetes API, and `cedar watcher`, `cedar puller`, `cedar mcs-allocator`
as child processes in sessions of their own), takes one way out, and then checks that no
process of its state directory is left: none naming it in its command line or in its
environment (the services name it through KUBECONFIG), and none of the PIDs the banner
listed. The ways out: Ctrl-C with the output going through `tee` (as `make up 2>&1 | tee
up.log`), SIGTERM, the terminal closed (a pty hung up: SIGHUP, then EIO on every write),
a signal while still starting, stdout's reader killed (EPIPE), errors after servers were
started, and SIGKILL of `cedar up` itself (the kernel's parent-death signal).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cedar.sandbox.procs import kill_pid, pid_alive
from tests.e2e.test_ops_support import REPO_ROOT

STARTED_WITHIN = 180.0  # seconds; a generous bound, so a loaded machine does not fail
STOPPED_WITHIN = 90.0  # the services' 20 s grace, then the servers'


@pytest.fixture
def state() -> Iterator[Path]:
    # The private dockerd's unix sockets live under it: keep the path short.
    path = Path(tempfile.mkdtemp(prefix="cedar-stop-", dir="/tmp"))
    try:
        yield path
    finally:
        for pid in _processes_of(path):  # only after a failed test
            kill_pid(pid, grace=2.0)
        shutil.rmtree(path, ignore_errors=True)


def _env(state: Path, path_prefix: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "CEDAR_NATS_URL")}
    # No Docker engine and no NATS answer: cedar up starts its own of both.
    env["DOCKER_HOST"] = f"unix://{state}/no-such.sock"
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env.get('PATH', '')}"
    return env


def _up_command(state: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cedar.cli",
        "up",
        "--sandbox",
        "--interval",
        "0.5",
        "--state-dir",
        str(state),
        *extra,
    ]


def _processes_of(state: Path) -> list[int]:
    """Live processes (not this one) that name `state` in their command line or environment."""
    needle = str(state).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            named = needle in (entry / "cmdline").read_bytes()
            named = named or needle in (entry / "environ").read_bytes()
        except OSError:
            continue
        if named and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _banner_pids(text: str) -> list[int]:
    pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
    # nats-server, docker-registry, dockerd, watcher, puller, mcs-allocator
    assert len(pids) == 6, text
    return pids


BANNER = r"services: watcher \(pid \d+\), puller \(pid \d+\)"
ALL_READY = r"watcher: ready  puller: ready  mcs-allocator: ready"


def _wait_for_banner(
    read: Callable[[], str], proc: subprocess.Popen[bytes], until: str = BANNER
) -> str:
    """Until the banner lists the services (all six processes running), or `until` shows in
    the live view; the text so far."""
    deadline = time.monotonic() + STARTED_WITHIN
    text = ""
    while time.monotonic() < deadline:
        text = read()
        if re.search(BANNER, text) and re.search(until, text):
            pids = _banner_pids(text)
            assert all(pid_alive(p) for p in pids), text
            return text
        assert proc.poll() is None, f"cedar up exited with {proc.returncode}:\n{text}"
        time.sleep(0.2)
    raise AssertionError(f"no {until!r} within {STARTED_WITHIN:.0f}s:\n{text}")


def _wait(proc: subprocess.Popen[bytes], what: str) -> int:
    try:
        return proc.wait(STOPPED_WITHIN)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} still running {STOPPED_WITHIN:.0f}s after") from None


def _assert_nothing_left(state: Path, pids: list[int]) -> None:
    assert [p for p in pids if pid_alive(p)] == []
    assert _processes_of(state) == []


@contextlib.contextmanager
def _default_sigint() -> Iterator[None]:
    """Children started in here get SIGINT's default action, as from a terminal, even when
    this test process ignores it (started in the background by a non-interactive shell)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_with_output_through_tee_stops_everything(state: Path) -> None:
    """`make up 2>&1 | tee up.log`, then Ctrl-C: SIGINT reaches the whole foreground process
    group at once, so `tee` is gone before `cedar up` writes "stopping"; the services are
    in sessions of their own and hear nothing. cedar up must stop them all; Ctrl-C is how
    its live view is ended, so it then exits 0 (130 when it was still starting, below)."""
    log, code = state / "up.log", state / "up.code"
    up = shlex.join(_up_command(state))
    script = f'{{ {up}; echo "$?" > {code}; }} 2>&1 | tee {log} > /dev/null'
    log.touch()
    with _default_sigint():
        shell = subprocess.Popen(
            ["bash", "-c", script],
            env=_env(state),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    try:
        text = _wait_for_banner(lambda: log.read_text(errors="replace"), shell)
        pids = _banner_pids(text)
        os.killpg(shell.pid, signal.SIGINT)  # the terminal's Ctrl-C
        _wait(shell, "the pipeline")
        # bash waits for every command of the pipeline: cedar up has exited, and with 0.
        assert code.read_text().strip() == "0"
        # tee had died long before: cedar up stopped everything while its writes failed.
        assert "cedar up: stopped" not in log.read_text(errors="replace")
        _assert_nothing_left(state, pids)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()


def _start_with_output_in(state: Path, out: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as sink:
        return subprocess.Popen(
            _up_command(state),
            env=_env(state),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.parametrize(
    ("signum", "when", "code"),
    [
        (signal.SIGTERM, "running", 143),
        (signal.SIGTERM, "starting", 143),
        (signal.SIGINT, "starting", 130),
    ],
    ids=["SIGTERM-running", "SIGTERM-starting", "SIGINT-starting"],
)
def test_signal_stops_everything(state: Path, signum: int, when: str, code: int) -> None:
    out = state / "up.out"
    proc = _start_with_output_in(state, out)
    try:
        if when == "running":
            pids = _banner_pids(_wait_for_banner(lambda: out.read_text(errors="replace"), proc))
        else:
            # Cut the start short as soon as its first server runs: what was started by
            # then is stopped, and nothing is started after.
            deadline = time.monotonic() + STARTED_WITHIN
            while not (state / "logs" / "nats-server.log").exists():
                assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
                time.sleep(0.05)
            pids = []
        proc.send_signal(signum)
        assert _wait(proc, "cedar up") == code, out.read_text()
        text = out.read_text(errors="replace")
        if signum == signal.SIGTERM:
            assert "cedar up: SIGTERM received" in text
        assert text.rstrip().endswith("cedar up: stopped"), text
        if when == "starting":
            assert "services:" not in text  # the start was cut short, not waited for
        _assert_nothing_left(state, pids)
    finally:
        if proc.poll() is None:
            kill_pid(proc.pid, grace=2.0)


def test_terminal_closed_stops_everything_and_exits_129(state: Path) -> None:
    """The terminal goes away: its pty is hung up, cedar up (the session's leader, with the
    pty as its controlling terminal) gets SIGHUP and every later write fails with EIO."""
    master, slave = os.openpty()
    try:
        # setsid -c: a session of its own with the pty as its controlling terminal.
        proc = subprocess.Popen(
            ["setsid", "-c", *_up_command(state)],
            env=_env(state),
            cwd=REPO_ROOT,
            stdin=slave,
            stdout=slave,
            stderr=slave,
        )
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    seen = bytearray()

    def read() -> str:
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(master, 65536):
                seen.extend(chunk)
        return seen.decode(errors="replace")

    try:
        pids = _banner_pids(_wait_for_banner(read, proc))
        os.close(master)  # the terminal window is closed
        master = -1
        assert _wait(proc, "cedar up") == 129
        _assert_nothing_left(state, pids)
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            kill_pid(proc.pid, grace=2.0)


def test_stdout_reader_killed_stops_everything_and_exits_141(state: Path) -> None:
    """`cedar up | tee up.log` and tee is killed: the next write (or the view's check of
    its stdout) finds no reader, and cedar up stops quietly rather than die on EPIPE."""
    out, err = state / "up.out", state / "up.err"
    with out.open("wb") as out_sink:
        reader = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=out_sink)
    assert reader.stdin is not None
    with err.open("wb") as err_sink:
        proc = subprocess.Popen(
            _up_command(state),
            env=_env(state),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=reader.stdin,
            stderr=err_sink,
        )
    reader.stdin.close()  # cedar up holds the only write end
    try:
        pids = _banner_pids(_wait_for_banner(lambda: out.read_text(errors="replace"), proc))
        reader.kill()
        reader.wait()
        assert _wait(proc, "cedar up") == 141, err.read_text()
        text = err.read_text(errors="replace")
        assert "cedar up: stdout is closed (its reader is gone); stopping" in text
        assert text.rstrip().endswith("cedar up: stopped"), text
        assert "Traceback" not in text and "BrokenPipeError" not in text, text
        _assert_nothing_left(state, pids)
    finally:
        for p in (proc, reader):
            if p.poll() is None:
                kill_pid(p.pid, grace=2.0)


def test_sigkill_of_cedar_up_leaves_nothing_behind(state: Path) -> None:
    """The last resort: cedar up cannot stop anything, so the kernel tells each process it
    started (PR_SET_PDEATHSIG: SIGTERM), and each shuts down on its own."""
    out = state / "up.out"
    proc = _start_with_output_in(state, out)
    try:
        # Ready: each service has its SIGTERM handler, and logs what the kernel sends it.
        text = _wait_for_banner(lambda: out.read_text(errors="replace"), proc, ALL_READY)
        pids = _banner_pids(text)
        proc.kill()
        assert proc.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + STOPPED_WITHIN
        while _processes_of(state) and time.monotonic() < deadline:
            time.sleep(0.2)
        _assert_nothing_left(state, pids)
        for service in ("watcher", "puller", "mcs-allocator"):
            log = (state / "logs" / f"{service}.log").read_text(errors="replace")
            assert "received SIGTERM" in log, f"{service}:\n{log}"
    finally:
        if proc.poll() is None:
            kill_pid(proc.pid, grace=2.0)


def _broken_dockerd(state: Path) -> tuple[Path, str]:
    bin_dir = state / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dockerd"
    fake.write_text("#!/bin/sh\necho 'dockerd: this engine cannot start' >&2\nexit 1\n")
    fake.chmod(0o755)
    return bin_dir, "dockerd exited with code 1"


def _examples_with_bad_sizes(state: Path) -> tuple[Path, str]:
    examples = state / "examples"
    shutil.copytree(Path(REPO_ROOT) / "examples", examples)
    (examples / "images.txt").write_text("tenants/web:v1  4MB\n")
    return examples, "images.txt: line 1: size '4MB' is not a number of bytes"


@pytest.mark.parametrize(
    ("failure", "code"),
    [("no examples directory", 2), ("examples with a bad size", 2), ("dockerd fails", 1)],
)
def test_error_after_servers_started_stops_them(state: Path, failure: str, code: int) -> None:
    """An error once NATS (and, for the last two, the registry) runs: a clear message, the
    exit status of its kind, and everything started so far stopped."""
    extra: list[str] = []
    path_prefix = None
    if failure == "no examples directory":
        extra, message = ["--examples", str(state / "missing")], "no examples directory at"
    elif failure == "examples with a bad size":
        examples, message = _examples_with_bad_sizes(state)
        extra = ["--examples", str(examples)]
    else:
        path_prefix, message = _broken_dockerd(state)
    proc = subprocess.run(
        _up_command(state, *extra),
        env=_env(state, path_prefix),
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=STARTED_WITHIN,
        check=False,
    )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, err
    assert message in err
    assert (state / "logs" / "nats-server.log").stat().st_size > 0  # NATS had been started
    assert err.rstrip().endswith("cedar up: stopped"), err
    _assert_nothing_left(state, [])
