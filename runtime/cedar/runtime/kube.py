"""Asynchronous access to the Kubernetes API, on raw JSON. I/O: the API server.

Requests go through aiohttp so that every service stays on one event loop and reads only
the fields it needs from plain dicts, never the client library's typed models (which cost
~20x more per object at list time). In a pod, the service account is read here directly,
as client-go's rest.InClusterConfig does; a kubeconfig file is parsed by the official
`kubernetes` library, imported only then (it costs ~14 MiB of memory per process).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from cedar.runtime.errors import (
    Conflict,
    Forbidden,
    Gone,
    KubeConfigError,
    KubeError,
    NotFound,
)

JSON = dict[str, Any]

__all__ = [
    "JSON",
    "Conflict",
    "Forbidden",
    "Gone",
    "KubeClient",
    "KubeConfig",
    "KubeConfigError",
    "KubeError",
    "NotFound",
    "in_cluster_config",
    "load_config",
    "resource_path",
]

# Where each resource Cedar touches lives in the API.
RESOURCES: dict[str, tuple[str, str, bool]] = {
    # kind: (api prefix, plural, namespaced)
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "ReplicaSet": ("/apis/apps/v1", "replicasets", True),
    "DaemonSet": ("/apis/apps/v1", "daemonsets", True),
    "StatefulSet": ("/apis/apps/v1", "statefulsets", True),
    "Job": ("/apis/batch/v1", "jobs", True),
    "CronJob": ("/apis/batch/v1", "cronjobs", True),
    "Namespace": ("/api/v1", "namespaces", False),
    "Node": ("/api/v1", "nodes", False),
    "Event": ("/api/v1", "events", True),
    "Pod": ("/api/v1", "pods", True),
    "PersistentVolume": ("/api/v1", "persistentvolumes", False),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims", True),
}


def resource_path(kind: str, namespace: str | None = None, name: str | None = None) -> str:
    prefix, plural, namespaced = RESOURCES[kind]
    path = prefix
    if namespaced and namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name:
        path += f"/{name}"
    return path


def _error_for(status: int, body: Any) -> KubeError:
    reason = body.get("reason", "") if isinstance(body, dict) else ""
    message = body.get("message", "") if isinstance(body, dict) else str(body)[:500]
    cls = {410: Gone, 403: Forbidden, 404: NotFound, 409: Conflict}.get(status, KubeError)
    return cls(status, reason or "Error", message)


# The pod's service account, where the kubelet mounts it.
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Bound service account tokens rotate; client-go re-reads the file at most once a minute.
TOKEN_REREAD_SECONDS = 60.0


@dataclass
class KubeConfig:
    """Where the API server is and how to authenticate to it."""

    server: str
    # The Authorization header's value, asked before every request (tokens rotate).
    authorization: Callable[[], str | None] = field(default=lambda: None)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    def headers(self) -> dict[str, str]:
        token = self.authorization()
        return {"Authorization": token} if token else {}

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https") or not self.verify:
            return False
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


class _TokenFile:
    """A bearer token read from a file, re-read once a minute (it rotates)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._value = ""
        self._read_at = -TOKEN_REREAD_SECONDS
        self()  # fail at start, not at the first request, when it cannot be read

    def __call__(self) -> str | None:
        now = time.monotonic()
        if now - self._read_at >= TOKEN_REREAD_SECONDS:
            try:
                self._value = self.path.read_text().strip()
            except OSError as err:
                if not self._value:
                    raise KubeConfigError(f"cannot read the service account token: {err}") from err
                # Keep the last token: the kubelet swaps the file atomically, so this passes.
            self._read_at = now
        return f"Bearer {self._value}" if self._value else None


def in_cluster_config(environ: dict[str, str] | None = None) -> KubeConfig:
    """The pod's service account (client-go rest.InClusterConfig's rules)."""
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise KubeConfigError(
            "not in a pod: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set"
        )
    if ":" in host:  # IPv6
        host = f"[{host}]"
    ca = SERVICE_ACCOUNT_DIR / "ca.crt"
    return KubeConfig(
        server=f"https://{host}:{port}",
        authorization=_TokenFile(SERVICE_ACCOUNT_DIR / "token"),
        ca_file=str(ca) if ca.exists() else None,
    )


def _kubeconfig_file(path: str) -> KubeConfig:
    """A kubeconfig file, parsed by the `kubernetes` library (exec plugins, contexts, ...)."""
    from kubernetes import config as kube_config
    from kubernetes.client import Configuration

    cfg = Configuration()
    try:
        kube_config.load_kube_config(config_file=path, client_configuration=cfg)  # type: ignore[no-untyped-call]
    except (kube_config.ConfigException, OSError, ValueError) as err:
        raise KubeConfigError(f"cannot use kubeconfig {path}: {err}") from err

    def authorization() -> str | None:
        if cfg.refresh_api_key_hook is not None:  # exec plugins' tokens expire
            cfg.refresh_api_key_hook(cfg)
        token: str | None = cfg.get_api_key_with_prefix("authorization")
        return token

    return KubeConfig(
        server=cfg.host.rstrip("/"),
        authorization=authorization,
        ca_file=cfg.ssl_ca_cert,
        cert_file=cfg.cert_file,
        key_file=cfg.key_file,
        verify=bool(cfg.verify_ssl),
    )


def load_config(kubeconfig: str | None = None) -> KubeConfig:
    """KUBECONFIG or ~/.kube/config when present, else the pod's service account."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if Path(path.split(os.pathsep)[0]).exists():
        return _kubeconfig_file(path)
    try:
        return in_cluster_config()
    except KubeConfigError as err:
        raise KubeConfigError(
            f"no Kubernetes configuration: {path} does not exist and this is not a pod "
            f"({err}); set KUBECONFIG"
        ) from err


class KubeClient:
    """A thin JSON client. One per service; call `close()` at the end."""

    def __init__(self, config: KubeConfig, timeout: float = 30.0) -> None:
        self.config = config
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.config.ssl_context(), limit=32),
                json_serialize=json.dumps,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> JSON:
        headers = self.config.headers() | {"Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        try:
            async with self.session.request(
                method,
                self.config.server + path,
                params=params,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    try:
                        payload = json.loads(raw)
                    except ValueError:
                        payload = raw.decode(errors="replace")
                    raise _error_for(resp.status, payload)
                result: JSON = json.loads(raw) if raw else {}
                return result
        except (aiohttp.ClientError, TimeoutError) as err:
            raise KubeError(0, "Unreachable", f"{method} {path}: {err!r}") from err

    async def get(self, path: str) -> JSON:
        return await self.request("GET", path)

    async def list_pages(
        self, path: str, *, limit: int = 500, params: dict[str, str] | None = None
    ) -> AsyncIterator[tuple[list[JSON], str]]:
        """Yield (items, list resourceVersion) per page of a paginated list."""
        query = dict(params or {}) | {"limit": str(limit)}
        while True:
            page = await self.request("GET", path, params=query)
            meta = page.get("metadata") or {}
            yield page.get("items") or [], str(meta.get("resourceVersion", ""))
            token = meta.get("continue")
            if not token:
                return
            query["continue"] = token

    async def watch(
        self,
        path: str,
        resource_version: str,
        *,
        timeout_seconds: int = 300,
        params: dict[str, str] | None = None,
    ) -> AsyncIterator[JSON]:
        """Yield watch events until the server ends the stream.

        An ERROR event with code 410 raises `Gone`; other ERROR events raise KubeError.
        Lines are split by hand: one object may be larger than aiohttp's line limit.
        """
        query = dict(params or {}) | {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        headers = self.config.headers() | {"Accept": "application/json"}
        try:
            async with self.session.get(
                self.config.server + path,
                params=query,
                headers=headers,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=10, sock_read=timeout_seconds + 30
                ),
            ) as resp:
                if resp.status >= 400:
                    raw = await resp.read()
                    try:
                        payload = json.loads(raw)
                    except ValueError:
                        payload = raw.decode(errors="replace")
                    raise _error_for(resp.status, payload)
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        event: JSON = json.loads(line)
                        if event.get("type") == "ERROR":
                            status = event.get("object") or {}
                            raise _error_for(int(status.get("code", 500)), status)
                        yield event
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as err:
            raise KubeError(0, "StreamBroken", f"watch {path}: {err!r}") from err

    async def patch(self, path: str, body: JSON, *, merge: str = "merge") -> JSON:
        content_type = {
            "merge": "application/merge-patch+json",
            "strategic": "application/strategic-merge-patch+json",
            "json": "application/json-patch+json",
        }[merge]
        return await self.request("PATCH", path, body=body, content_type=content_type)

    async def create(self, path: str, body: JSON) -> JSON:
        return await self.request("POST", path, body=body)
