"""A real ``nats-server`` with JetStream on 127.0.0.1, for tests and ``cedar up --sandbox``.

I/O: runs ``nats-server`` as a child process with its store under ``store_dir``, and asks
its monitoring port whether JetStream is up.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from cedar.sandbox.procs import ManagedProcess, find_binary, free_port

__all__ = ["NatsServer"]


class NatsServer(ManagedProcess):
    """``nats-server -js`` with its JetStream store in ``store_dir``.

    Ports are chosen once (at construction) and kept across :meth:`restart`, as is the
    store, so JetStream streams and KV buckets survive an outage.
    """

    name = "nats-server"
    start_timeout = 20.0
    stop_grace = 10.0

    def __init__(
        self,
        store_dir: str | Path,
        port: int | None = None,
        *,
        monitor_port: int | None = None,
        log_path: str | Path | None = None,
        binary: str | None = None,
        server_name: str = "cedar-sandbox",
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port if port is not None else free_port()
        self.monitor_port = monitor_port if monitor_port is not None else free_port()
        self.server_name = server_name
        self._binary = binary
        super().__init__(
            Path(log_path) if log_path is not None else self.store_dir / "nats-server.log"
        )

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    def command(self) -> list[str]:
        binary = self._binary or find_binary("nats-server")
        return [
            binary,
            "-js",
            "-sd",
            str(self.store_dir),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            # The monitor binds to the same host as the client port (-a).
            "-m",
            str(self.monitor_port),
            "-n",
            self.server_name,
        ]

    def prepare(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)

    def is_ready(self) -> bool:
        # js-enabled-only: healthy once JetStream is up, which is what tests need; the
        # full check would also wait for every stream to be current.
        url = f"{self.monitor_url}/healthz?js-enabled-only=true"
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            raw = resp.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return False
        return isinstance(body, dict) and body.get("status") == "ok"
