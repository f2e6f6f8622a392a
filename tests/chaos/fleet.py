"""Cedar's services as real child processes (`python -m cedar.cli ...`), for the fault suite.

Each service runs with its own log file and metrics port, and is stopped by PID: SIGKILL
for a crash, SIGTERM at the end. Every exit is recorded with its code, so a test can tell
the kills it made from a crash it did not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cedar.sandbox.procs import free_port

# Variables of the test's own environment that would point a service elsewhere.
_FOREIGN = ("KUBECONFIG", "DOCKER_HOST", "DOCKER_CONTEXT")


def clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CEDAR_") and k not in _FOREIGN}


@dataclass
class ServiceProc:
    """One `cedar <service>` process, restartable with the same settings and port."""

    name: str  # e.g. "puller-node-1"
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    port: int
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    # Exit codes of every run that ended other than by our SIGKILL or SIGTERM.
    unexpected_exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        if self.alive:
            return
        self.reap()
        log = self.log_path.open("ab")
        log.write(f"--- chaos: start #{self.starts + 1}\n".encode())
        log.flush()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "cedar.cli", *self.argv],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def reap(self) -> None:
        """Record how the last run ended, if it ended on its own."""
        if self.popen is not None and self.popen.poll() is not None:
            code = self.popen.returncode
            if code not in (-signal.SIGKILL, -signal.SIGTERM, 0):
                self.unexpected_exits.append(code)
            self.popen = None

    def kill(self) -> None:
        """SIGKILL by PID (a crash: no shutdown code runs) and reap it."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(15)
            self.kills += 1
        self.reap()

    def terminate(self, grace: float = 25.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self.reap()

    def get(self, path: str, timeout: float = 2.0) -> str:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body: bytes = resp.read()
        return body.decode()

    def ready(self) -> bool:
        try:
            self.get("/readyz")
        except OSError:  # 503 (HTTPError is an OSError) or not listening yet
            return False
        return True

    def metric(self, name: str) -> float:
        """Sum of every sample of `name` (all label values)."""
        total = 0.0
        for line in self.get("/metrics").splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, value = line.rsplit(" ", 1)
            if head == name or head.startswith(name + "{"):
                total += float(value)
        return total

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class Fleet:
    """The watcher, allocators and pullers of one test, against one NATS and one API."""

    def __init__(
        self,
        log_dir: Path,
        *,
        nats_url: str,
        kubeconfig: Path,
        replicas: int = 3,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.common = {
            **clean_environment(),
            "CEDAR_NATS_URL": nats_url,
            "CEDAR_NATS_REPLICAS": str(replicas),
            "KUBECONFIG": str(kubeconfig),
            "CEDAR_LOG_LEVEL": "INFO",
            "CEDAR_METRICS_HOST": "127.0.0.1",
            **(env or {}),
        }
        self.procs: dict[str, ServiceProc] = {}

    def add(self, name: str, argv: list[str], **env: str) -> ServiceProc:
        port = free_port()
        proc = ServiceProc(
            name=name,
            argv=argv,
            env={
                **self.common,
                "CEDAR_METRICS_PORT": str(port),
                "CEDAR_POD_NAME": name,
                **env,
            },
            log_path=self.log_dir / f"{name}.log",
            port=port,
        )
        self.procs[name] = proc
        return proc

    def watcher(self, name: str = "watcher", **env: str) -> ServiceProc:
        return self.add(name, ["watcher"], CEDAR_PUBLISH_ACK_TIMEOUT="2", **env)

    def allocator(self, name: str, **env: str) -> ServiceProc:
        return self.add(
            name,
            ["mcs-allocator"],
            CEDAR_MCS_RESYNC_INTERVAL="5s",
            CEDAR_MCS_SNAPSHOT_INTERVAL="5s",
            **env,
        )

    def puller(self, node: str, docker_host: str, auth_file: Path, **env: str) -> ServiceProc:
        return self.add(
            f"puller-{node}",
            ["puller"],
            CEDAR_NODE_NAME=node,
            DOCKER_HOST=docker_host,
            CEDAR_REGISTRY_AUTH_FILE=str(auth_file),
            CEDAR_RESYNC_INTERVAL="2s",
            CEDAR_REGISTRY_PROBE_TTL="1s",
            CEDAR_BACKOFF_BASE="0.2s",
            CEDAR_BACKOFF_MAX="2s",
            **env,
        )

    def __iter__(self) -> Iterator[ServiceProc]:
        return iter(self.procs.values())

    def of_kind(self, prefix: str) -> list[ServiceProc]:
        return [p for name, p in self.procs.items() if name.startswith(prefix)]

    def start(self) -> None:
        for proc in self.procs.values():
            proc.start()

    def all_ready(self) -> bool:
        return all(p.alive and p.ready() for p in self.procs.values())

    def dead(self) -> list[str]:
        """Services that are not running although nobody stopped them."""
        return [p.name for p in self.procs.values() if not p.alive]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.popen is not None and proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 25
        for proc in self.procs.values():
            proc.terminate(max(1.0, deadline - time.monotonic()))

    def logs(self) -> str:
        return "\n".join(f"=== {p.name}\n{p.log_tail(25)}" for p in self.procs.values())
