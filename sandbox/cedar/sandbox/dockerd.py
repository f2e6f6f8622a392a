"""A private Docker engine (Debian's ``dockerd``) under one short directory, and its CLI.

I/O: runs ``dockerd`` and the docker CLI as child processes, talks HTTP to an engine's
socket (``/_ping``), reads ``/proc`` and unmounts what a killed daemon left under its
directories. Everything the daemon owns lives under ``base_dir``: socket, data root
(unless given a ``data_root`` of its own), exec root (where the ``containerd`` it starts
keeps its socket and state), pid file, daemon config and a docker CLI config dir. Nothing
touches a system daemon or ``/var/lib/docker``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from cedar.sandbox.errors import DockerCommandError, SocketPathTooLongError
from cedar.sandbox.procs import ManagedProcess, find_binary, kill_pid

__all__ = ["DockerCli", "DockerEngine", "docker_engine_reachable"]

# sun_path is 108 bytes including the NUL; containerd adds ".ttrpc" to its socket name.
_MAX_SOCKET_PATH = 100

# Variables that would point the docker CLI somewhere else than this engine.
_FOREIGN_DOCKER_VARS = ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_TLS")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def docker_engine_reachable(host: str, timeout: float = 2.0) -> bool:
    """Whether the Docker engine at ``host`` (``unix://PATH`` or ``tcp://H:P``) answers /_ping."""
    parts = urlsplit(host)
    conn: http.client.HTTPConnection
    if parts.scheme == "unix":
        conn = _UnixHTTPConnection(parts.path, timeout)
    elif parts.scheme in ("tcp", "http"):
        conn = http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port, timeout=timeout
        )
    else:
        return False
    try:
        conn.request("GET", "/_ping")
        resp = conn.getresponse()
        return resp.status == 200 and resp.read().strip() == b"OK"
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class DockerCli:
    """The docker CLI pointed at one engine, with a private DOCKER_CONFIG.

    `DockerEngine` is one (an engine it runs itself); `DockerCli(host, config_dir)` alone
    drives an engine someone else runs, such as the one `cedar up` finds already there.
    """

    def __init__(self, host: str, config_dir: str | Path, cli: str | None = None) -> None:
        self._host = host
        self._config_dir = Path(config_dir)
        self._cli = cli

    @property
    def host(self) -> str:
        return self._host

    @property
    def config_dir(self) -> Path:
        return self._config_dir

    @property
    def cli(self) -> str:
        return self._cli or find_binary("docker")

    def env(self, config_dir: str | Path | None = None) -> dict[str, str]:
        """Our environment pointed at this engine, ready for ``subprocess`` and the docker CLI."""
        env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_DOCKER_VARS}
        env["DOCKER_HOST"] = self.host
        env["DOCKER_CONFIG"] = str(config_dir if config_dir is not None else self.config_dir)
        return env

    def docker(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float | None = 300.0,
        config_dir: str | Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this engine; on failure the error carries its output."""
        cmd = [self.cli, *args]
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            env=self.env(config_dir),
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise DockerCommandError(
                f"`docker {' '.join(args)}` failed with code {proc.returncode}: "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc


class DockerEngine(DockerCli, ManagedProcess):
    """``dockerd`` with a private socket, data root and exec root under ``base_dir``.

    Keep ``base_dir`` short (for example ``tempfile.mkdtemp(prefix="cedar-", dir="/tmp")``):
    unix socket paths are limited to about 100 bytes. ``data_root`` puts the data root
    (images, layers) elsewhere, e.g. on a small filesystem of its own to run out of space;
    by default it is ``base_dir/data``.
    """

    name = "dockerd"
    start_timeout = 60.0
    # dockerd stops running containers on SIGTERM (--shutdown-timeout below) before exiting.
    stop_grace = 20.0

    def __init__(
        self,
        base_dir: str | Path,
        *,
        storage_driver: str | None = None,
        log_level: str = "info",
        shutdown_timeout: int = 5,
        binary: str | None = None,
        data_root: str | Path | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self._data_root = Path(data_root).absolute() if data_root is not None else None
        probe = self.exec_root / "containerd" / "containerd.sock.ttrpc"
        if len(str(probe).encode()) > _MAX_SOCKET_PATH:
            raise SocketPathTooLongError(
                f"base_dir {self.base_dir} is too long for unix socket paths "
                f"({probe} > {_MAX_SOCKET_PATH} bytes); use a short directory such as "
                "tempfile.mkdtemp(prefix='cedar-', dir='/tmp')"
            )
        self.storage_driver = storage_driver
        self.log_level = log_level
        self.shutdown_timeout = shutdown_timeout
        self._binary = binary
        ManagedProcess.__init__(self, self.base_dir / "dockerd.log")

    # --- paths --------------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return self.base_dir / "docker.sock"

    @property
    def data_root(self) -> Path:
        return self._data_root if self._data_root is not None else self.base_dir / "data"

    @property
    def exec_root(self) -> Path:
        return self.base_dir / "exec"

    @property
    def pidfile(self) -> Path:
        return self.base_dir / "docker.pid"

    @property
    def daemon_config(self) -> Path:
        return self.base_dir / "daemon.json"

    @property
    def config_dir(self) -> Path:
        """The docker CLI's DOCKER_CONFIG (credentials of `docker login`), private to us."""
        return self.base_dir / "cli"

    @property
    def host(self) -> str:
        """The DOCKER_HOST value of this engine."""
        return f"unix://{self.socket_path}"

    @property
    def cli(self) -> str:
        """The docker CLI installed with this dockerd (Debian: /usr/sbin -> /usr/bin).

        Preferring it over PATH keeps client and daemon versions matched, as on a
        machine where `make test` installed docker.io.
        """
        daemon = Path(self._binary or find_binary("dockerd"))
        return find_binary("docker", extra_dirs=[daemon.parent.parent / "bin", daemon.parent])

    # --- ManagedProcess -----------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [
            self._binary or find_binary("dockerd"),
            "--host",
            self.host,
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.pidfile),
            # An empty config of our own, so /etc/docker/daemon.json never applies.
            "--config-file",
            str(self.daemon_config),
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--log-level",
            self.log_level,
            "--shutdown-timeout",
            str(self.shutdown_timeout),
        ]
        if self.storage_driver:
            cmd += ["--storage-driver", self.storage_driver]
        return cmd

    def prepare(self) -> None:
        for d in (self.base_dir, self.data_root, self.exec_root, self.config_dir):
            d.mkdir(parents=True, exist_ok=True)
        if not self.daemon_config.exists():
            self.daemon_config.write_text("{}\n")
        # A pid file left by a killed daemon makes the next one refuse to start.
        self.after_stop()
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()

    def is_ready(self) -> bool:
        return docker_engine_reachable(self.host, timeout=1.0)

    def environment(self) -> Mapping[str, str] | None:
        env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_DOCKER_VARS}
        env.pop("DOCKER_HOST", None)
        return env

    def after_stop(self) -> None:
        # dockerd starts containerd in a session of its own, and containerd's shims
        # detach as well, so the process group of dockerd does not cover them. Every such
        # process names our exec root on its command line; stop those by PID.
        for pid in _pids_mentioning(str(self.exec_root)):
            kill_pid(pid, grace=self.stop_grace)
        _unmount_under(self.base_dir)
        if not self.data_root.is_relative_to(self.base_dir):
            _unmount_under(self.data_root)  # what the daemon mounted, never the root itself


def _pids_mentioning(fragment: str) -> list[int]:
    me = os.getpid()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if fragment.encode() in cmdline:
            found.append(int(entry.name))
    return found


def _unmount_under(base: Path) -> None:
    """Lazily unmount what a killed daemon left mounted under ``base`` (deepest first)."""
    prefix = str(base).rstrip("/") + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = []
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            point = fields[4].replace("\\040", " ")
            if point.startswith(prefix):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
