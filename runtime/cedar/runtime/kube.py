"""Asynchronous access to the Kubernetes API, on raw JSON. I/O: the API server.

Requests go through aiohttp so that every service stays on one event loop and reads only
the fields it needs from plain dicts, never the client library's typed models (which cost
~20x more per object at list time). In a pod, the service account is read here directly,
as client-go's rest.InClusterConfig does; a kubeconfig file is parsed by the official
`kubernetes` library, imported only then (it costs ~14 MiB of memory per process).

When the server pushes back (429 with `Retry-After`, 5xx, no answer, a response that
stalls), every request of the client waits (`Pushback`: jittered backoff, never sooner than
`Retry-After`, one probe at a time until the server serves again), and the error says how
long the server asked for (`Unavailable.retry_after`). No read waits forever: a response
that sends nothing for CEDAR_KUBE_READ_TIMEOUT seconds (a watch: CEDAR_KUBE_WATCH_IDLE_TIMEOUT,
longer than the server's bookmark interval) raises `Stalled`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from cedar.runtime.backoff import Pass, Pushback, retry_after_seconds
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
    "Stalled",
    "Unavailable",
    "in_cluster_config",
    "load_config",
    "resource_path",
]

log = logging.getLogger("cedar.runtime.kube")

# The longest wait for any read of a response other than a watch (its headers or its body).
READ_TIMEOUT = 30.0
# A watch that sends nothing for this long is given up as stalled. The API server sends a
# watch that allows bookmarks one about every minute and 2 s before its timeout
# (staging/src/k8s.io/apiserver/pkg/storage/cacher/cache_watcher.go, nextBookmarkTime), so
# a healthy idle watch is never cut; a server that sends none (no watch cache) costs a
# re-watch from the last resourceVersion, never a relist.
WATCH_IDLE_TIMEOUT = 90.0
# The longest Retry-After honoured. The API server's priority and fairness asks for 1 to 32
# seconds (staging/src/k8s.io/apiserver/pkg/util/flowcontrol/dropped_requests_tracker.go);
# a larger value (a proxy's) is capped so that a service is not silent for an hour.
RETRY_AFTER_MAX = 60.0
# A watch that ends normally this soon, having sent nothing, is an error (see `watch`).
SHORT_WATCH = 1.0
# The environment variables that change the two timeouts (seconds), read by `load_config`.
READ_TIMEOUT_ENV = "CEDAR_KUBE_READ_TIMEOUT"
WATCH_IDLE_TIMEOUT_ENV = "CEDAR_KUBE_WATCH_IDLE_TIMEOUT"


class Unavailable(KubeError):
    """The API did not serve the request now: throttled (429), failing (5xx), unreachable or
    broken (status 0). Retry later, no sooner than `retry_after` seconds when it is set
    (the server's Retry-After, capped at RETRY_AFTER_MAX)."""

    def __init__(
        self, status: int, reason: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(status, reason, message)
        self.retry_after = retry_after


class Stalled(Unavailable):
    """A response sent nothing for longer than the read timeout (the headers, or the rest
    of a body, or a watch's next line)."""


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
    "TokenReview": ("/apis/authentication.k8s.io/v1", "tokenreviews", False),
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


def _retry_after(headers: Any, body: Any) -> float | None:
    """The header, as client-go reads it (rest/request.go checkWait), else the Status's
    details.retryAfterSeconds (which responsewriters.ErrorNegotiated copies into it)."""
    details = body.get("details") if isinstance(body, dict) else None
    return retry_after_seconds(
        headers.get("Retry-After") if headers is not None else None,
        details.get("retryAfterSeconds") if isinstance(details, dict) else None,
        RETRY_AFTER_MAX,
    )


def _error_for(status: int, body: Any, headers: Any = None) -> KubeError:
    reason = body.get("reason", "") if isinstance(body, dict) else ""
    message = body.get("message", "") if isinstance(body, dict) else str(body)[:500]
    if status == 429 or status >= 500:
        reason = reason or ("TooManyRequests" if status == 429 else "ServerError")
        return Unavailable(status, reason, message, _retry_after(headers, body))
    cls = {410: Gone, 403: Forbidden, 404: NotFound, 409: Conflict}.get(status, KubeError)
    return cls(status, reason or "Error", message)


def _payload(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace").strip()


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
    read_timeout: float = READ_TIMEOUT
    watch_idle_timeout: float = WATCH_IDLE_TIMEOUT

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
        # The library keeps a kubeconfig's token under "BearerToken" (older releases:
        # "authorization"), already prefixed with "Bearer ".
        token: str | None = cfg.get_api_key_with_prefix(
            "BearerToken"
        ) or cfg.get_api_key_with_prefix("authorization")
        return token

    return KubeConfig(
        server=cfg.host.rstrip("/"),
        authorization=authorization,
        ca_file=cfg.ssl_ca_cert,
        cert_file=cfg.cert_file,
        key_file=cfg.key_file,
        verify=bool(cfg.verify_ssl),
    )


def _seconds(env: dict[str, str] | os._Environ[str], name: str, default: float) -> float:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not math.isfinite(seconds) or seconds <= 0:
        raise KubeConfigError(f"{name} must be a number of seconds above 0, not {value!r}")
    return seconds


def load_config(kubeconfig: str | None = None) -> KubeConfig:
    """KUBECONFIG or ~/.kube/config when present, else the pod's service account; the read
    timeouts from CEDAR_KUBE_READ_TIMEOUT and CEDAR_KUBE_WATCH_IDLE_TIMEOUT."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if Path(path.split(os.pathsep)[0]).exists():
        config = _kubeconfig_file(path)
    else:
        try:
            config = in_cluster_config()
        except KubeConfigError as err:
            raise KubeConfigError(
                f"no Kubernetes configuration: {path} does not exist and this is not a pod "
                f"({err}); set KUBECONFIG"
            ) from err
    config.read_timeout = _seconds(os.environ, READ_TIMEOUT_ENV, READ_TIMEOUT)
    config.watch_idle_timeout = _seconds(os.environ, WATCH_IDLE_TIMEOUT_ENV, WATCH_IDLE_TIMEOUT)
    return config


def _held_back(wait: float | None) -> Unavailable:
    said = f"{wait:.1f}s more" if wait else "for the probe request"
    return Unavailable(0, "HeldBack", f"the API server pushed back; not waiting {said}", wait)


class _Gate:
    """Makes a client's requests wait as its `Pushback` says (one probe at a time)."""

    def __init__(self, pushback: Pushback) -> None:
        self.pushback = pushback
        self._settled = asyncio.Event()  # set (and replaced) whenever a probe settles

    async def enter(self, patience: float | None) -> Pass:
        """Wait for this request's turn; with `patience`, raise Unavailable rather than
        wait longer than that many seconds."""
        give_up = math.inf if patience is None else time.monotonic() + patience
        while True:
            now = time.monotonic()
            admitted = self.pushback.admit(now)
            if isinstance(admitted, Pass):
                return admitted
            if now + admitted > give_up:
                raise _held_back(admitted)
            if admitted > 0:
                await asyncio.sleep(admitted)
                continue
            settled = self._settled  # a probe is out: wait until it is answered
            try:
                await asyncio.wait_for(
                    settled.wait(), max(give_up - now, 0.0) if patience is not None else None
                )
            except TimeoutError:
                raise _held_back(None) from None

    def _wake(self, passed: Pass) -> None:
        if passed.probe:
            settled, self._settled = self._settled, asyncio.Event()
            settled.set()

    def served(self, passed: Pass) -> None:
        if not passed.settled:
            self.pushback.served(passed)
            self._wake(passed)

    def failed(self, passed: Pass, err: Unavailable) -> None:
        if passed.settled:
            return
        if self.pushback.failed(time.monotonic(), passed, err.retry_after):
            log.warning(
                "the Kubernetes API pushed back (%s); holding this client's requests for %.1fs",
                err,
                self.pushback.wait(time.monotonic()),
                extra={"status": err.status, "retry_after": err.retry_after},
            )
        self._wake(passed)

    def abandoned(self, passed: Pass) -> None:
        if not passed.settled:
            self.pushback.release(passed)
            self._wake(passed)


class KubeClient:
    """A thin JSON client. One per service; call `close()` at the end.

    `timeout` bounds a whole request other than a watch; `pushback` is shared by every
    request of this client (one user to the API server's flow control).
    """

    def __init__(
        self, config: KubeConfig, timeout: float = 30.0, pushback: Pushback | None = None
    ) -> None:
        self.config = config
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self.gate = _Gate(pushback or Pushback(retry_after_max=RETRY_AFTER_MAX))

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
        patience: float | None = None,
    ) -> JSON:
        """One request; raises KubeError (Unavailable when it may be retried later).

        It waits while the server pushes back; with `patience`, at most that many seconds
        (then Unavailable, reason HeldBack), for callers that must answer quickly.
        """
        passed = await self.gate.enter(patience)
        try:
            result = await self._send(method, path, params, body, content_type)
        except Unavailable as err:
            self.gate.failed(passed, err)
            raise
        except KubeError:
            self.gate.served(passed)
            raise
        except BaseException:
            self.gate.abandoned(passed)  # cancelled, or an undecodable body: no verdict
            raise
        self.gate.served(passed)
        return result

    async def _send(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        body: Any,
        content_type: str,
    ) -> JSON:
        headers = self.config.headers() | {"Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        timeout = aiohttp.ClientTimeout(
            total=self._timeout, sock_read=min(self.config.read_timeout, self._timeout)
        )
        try:
            async with self.session.request(
                method,
                self.config.server + path,
                params=params,
                data=data,
                headers=headers,
                timeout=timeout,
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise _error_for(resp.status, _payload(raw), resp.headers)
        except aiohttp.ServerTimeoutError as err:
            raise Stalled(0, "Stalled", f"{method} {path}: {err!r}") from err
        except TimeoutError as err:
            raise Unavailable(0, "Timeout", f"{method} {path}: over {self._timeout}s") from err
        except aiohttp.ClientError as err:
            raise Unavailable(0, "Unreachable", f"{method} {path}: {err!r}") from err
        result: JSON = json.loads(raw) if raw else {}
        return result

    async def get(self, path: str, *, patience: float | None = None) -> JSON:
        return await self.request("GET", path, patience=patience)

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
        A stream that sends nothing for the config's `watch_idle_timeout` raises `Stalled`
        (re-watch from the last resourceVersion); one that breaks raises Unavailable
        (reason StreamBroken), and so does one that ends within SHORT_WATCH seconds
        having sent nothing (reason ShortWatch). Lines are split by hand: one object may be
        larger than aiohttp's line limit.
        """
        query = dict(params or {}) | {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        headers = self.config.headers() | {"Accept": "application/json"}
        idle = self.config.watch_idle_timeout
        passed = await self.gate.enter(None)
        try:
            async with self.session.get(
                self.config.server + path,
                params=query,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=idle),
            ) as resp:
                if resp.status >= 400:
                    raise _error_for(resp.status, _payload(await resp.read()), resp.headers)
                self.gate.served(passed)
                opened, delivered = time.monotonic(), False
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
                        delivered = True
                        yield event
            if not delivered and time.monotonic() - opened < SHORT_WATCH:
                # As client-go's reflector (tools/cache/reflector.go, watchHandler: "very
                # short watch"): an error, so that the caller backs off instead of looping.
                raise Unavailable(0, "ShortWatch", f"watch {path} ended at once, empty")
        except aiohttp.ServerTimeoutError as err:
            stalled = Stalled(0, "Stalled", f"watch {path}: nothing for {idle:g}s ({err!r})")
            self.gate.failed(passed, stalled)
            raise stalled from err
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as err:
            reason = "StreamBroken" if passed.settled else "Unreachable"
            broken = Unavailable(0, reason, f"watch {path}: {err!r}")
            self.gate.failed(passed, broken)
            raise broken from err
        except Unavailable as err:
            self.gate.failed(passed, err)
            raise
        except KubeError:
            self.gate.served(passed)
            raise
        finally:
            self.gate.abandoned(passed)

    async def patch(self, path: str, body: JSON, *, merge: str = "merge") -> JSON:
        content_type = {
            "merge": "application/merge-patch+json",
            "strategic": "application/strategic-merge-patch+json",
            "json": "application/json-patch+json",
        }[merge]
        return await self.request("PATCH", path, body=body, content_type=content_type)

    async def create(self, path: str, body: JSON) -> JSON:
        return await self.request("POST", path, body=body)
