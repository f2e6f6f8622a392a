"""Asynchronous access to the Kubernetes API, on raw JSON.

Configuration (kubeconfig, or the in-cluster service account) is loaded by the official
`kubernetes` client; requests go through aiohttp so that every service stays on one
event loop and reads only the fields it needs from plain dicts, never the client's
typed models (which cost ~20x more per object at list time).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes import config as kube_config
from kubernetes.client import Configuration

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


@dataclass
class KubeConfig:
    server: str
    configuration: Configuration

    def headers(self) -> dict[str, str]:
        cfg = self.configuration
        if cfg.refresh_api_key_hook is not None:  # in-cluster tokens rotate
            cfg.refresh_api_key_hook(cfg)
        token = cfg.get_api_key_with_prefix("authorization")
        return {"Authorization": token} if token else {}

    def ssl_context(self) -> ssl.SSLContext | bool:
        cfg = self.configuration
        if not self.server.startswith("https"):
            return False
        if not cfg.verify_ssl:
            return False
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        return context


def load_config(kubeconfig: str | None = None) -> KubeConfig:
    """KUBECONFIG or ~/.kube/config when present, else the pod's service account."""
    cfg = Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if Path(path.split(os.pathsep)[0]).exists():
        try:
            kube_config.load_kube_config(config_file=path, client_configuration=cfg)  # type: ignore[no-untyped-call]
        except (kube_config.ConfigException, OSError, ValueError) as err:
            raise KubeConfigError(f"cannot use kubeconfig {path}: {err}") from err
    else:
        try:
            kube_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except kube_config.ConfigException as err:
            raise KubeConfigError(
                f"no Kubernetes configuration: {path} does not exist and this is not a pod "
                f"({err}); set KUBECONFIG"
            ) from err
    return KubeConfig(server=cfg.host.rstrip("/"), configuration=cfg)


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
