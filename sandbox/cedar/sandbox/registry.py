"""A real image registry (Debian's ``docker-registry``, CNCF distribution) on 127.0.0.1.

I/O: runs ``docker-registry`` as a child process, writes its config, htpasswd file and
storage under ``base_dir``, and asks its HTTP API whether it is up. The Docker engine
treats 127.0.0.0/8 registries as insecure (plain HTTP) by default, so no TLS or daemon
configuration is needed to push to or pull from it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from cedar.sandbox.errors import PackageNotFoundError
from cedar.sandbox.procs import ManagedProcess, find_binary, free_port

__all__ = ["Registry", "htpasswd_line"]

# bcrypt cost of the htpasswd entries. The registry checks the password on every request
# (a pull is several), so a low cost keeps tests fast; this is a sandbox, not a vault.
_BCRYPT_ROUNDS = 5


def htpasswd_line(user: str, password: str, rounds: int = _BCRYPT_ROUNDS) -> str:
    """One ``user:bcrypt-hash`` line, the only htpasswd format the registry accepts."""
    try:
        import bcrypt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PackageNotFoundError(
            "a registry with htpasswd auth needs the `bcrypt` package; run `make test`"
        ) from exc
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()
    return f"{user}:{hashed}"


class Registry(ManagedProcess):
    """``docker-registry`` with filesystem storage under ``base_dir``.

    With ``htpasswd`` (user -> password) every request needs basic auth. The port and
    the storage are kept across :meth:`restart`, so pushed images survive an outage.
    """

    name = "docker-registry"
    start_timeout = 20.0
    stop_grace = 10.0

    def __init__(
        self,
        base_dir: str | Path,
        port: int | None = None,
        htpasswd: dict[str, str] | None = None,
        *,
        binary: str | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.port = port if port is not None else free_port()
        self.users: dict[str, str] = dict(htpasswd or {})
        self._binary = binary
        super().__init__(self.base_dir / "registry.log")

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry part of image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """(user, password) of the first htpasswd user; ``None`` for an open registry."""
        return next(iter(self.users.items()), None)

    @property
    def config_path(self) -> Path:
        return self.base_dir / "config.yml"

    @property
    def storage_dir(self) -> Path:
        return self.base_dir / "storage"

    @property
    def htpasswd_path(self) -> Path:
        return self.base_dir / "htpasswd"

    def config(self) -> dict[str, object]:
        cfg: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                # Tests delete manifests (prune, refresh); no blob cache, so a restarted
                # registry and a running one answer the same.
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": self.host,
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.users:
            cfg["auth"] = {"htpasswd": {"realm": "cedar-sandbox", "path": str(self.htpasswd_path)}}
        return cfg

    def prepare(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        if self.users:
            lines = [htpasswd_line(u, p) for u, p in self.users.items()]
            self.htpasswd_path.write_text("\n".join(lines) + "\n")
        # JSON is YAML, and it spares a YAML dependency.
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n")

    def command(self) -> list[str]:
        return [self._binary or find_binary("docker-registry"), "serve", str(self.config_path)]

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1.0) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError as exc:
            # 401 is the auth registry saying it is up and wants credentials.
            return exc.code == 401
