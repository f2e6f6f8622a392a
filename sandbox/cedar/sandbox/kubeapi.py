"""A simulated Kubernetes API server for tests and `cedar up --sandbox`.

It speaks HTTP like the real one (list with pagination and selectors, watch with
resourceVersion, bookmarks and 410 Expired, create/update/patch/delete, Status errors), so the
official `kubernetes` client and raw aiohttp clients run unchanged against it. The server runs
in its own thread and event loop; the control methods (`create`, `expire_watches`, `forbid`,
...) are plain thread-safe calls, usable from sync tests, async tests and service threads.

Bookkeeping lives in kubeapi_store.py and pure rules in kubeapi_ops.py; this module is only
the HTTP layer and the control surface.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from cedar.sandbox.kubeapi_ops import (
    MERGE_PATCH,
    RESOURCES,
    ApiError,
    JsonObj,
    ResourceTable,
    ResourceType,
    parse_field_selector,
    parse_label_selector,
)
from cedar.sandbox.kubeapi_store import Store, WatchFilter, dump, expired_status

__all__ = ["ApiError", "KubeAPI", "ResourceType"]

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "True")

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclass
class _Failure:
    verb: str
    plural: str
    remaining: int
    status: int


@dataclass(eq=False)
class _Watch:
    plural: str
    request: web.BaseRequest
    cut: bool = False
    abrupt: bool = False


@dataclass(frozen=True)
class _Route:
    res: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None

    @property
    def plural(self) -> str:
        return f"{self.res.plural}/{self.subresource}" if self.subresource else self.res.plural


@dataclass
class _Served:
    """State that exists only while the server runs (recreated by every start)."""

    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    runner: web.AppRunner | None = None
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    watches: set[_Watch] = field(default_factory=set)


class KubeAPI:
    """The simulated API server plus its test-control surface.

    `bookmark_interval` is how often a watch that allows bookmarks gets one (seconds);
    `history_limit` is how many events per resource a watch can resume across.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bookmark_interval: float = 60.0,
        history_limit: int = 10_000,
        resources: Iterable[ResourceType] = RESOURCES,
    ) -> None:
        self.host = host
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.table = ResourceTable(resources)
        self.store = Store(self.table, history_limit=history_limit, on_change=self._on_change)
        self._control = threading.Lock()  # guards the fields below, touched from any thread
        self._counts: Counter[tuple[str, str]] = Counter()
        self._open: Counter[str] = Counter()
        self._forbidden: dict[str, set[str]] = {}
        self._failures: list[_Failure] = []
        self._served: _Served | None = None

    # ================================================================ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._served is not None

    def start(self) -> KubeAPI:
        if self._served is not None:
            return self
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._run_loop, args=(loop,), name="cedar-kubeapi", daemon=True
        )
        thread.start()
        try:
            served = asyncio.run_coroutine_threadsafe(self._serve(loop, thread), loop).result(30)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            raise
        self._served = served
        return self

    def stop(self) -> None:
        served, self._served = self._served, None
        if served is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(served), served.loop).result(30)
        served.loop.call_soon_threadsafe(served.loop.stop)
        served.thread.join(30)

    def restart(self) -> None:
        """Like an API server restart: open connections are cut, the state and the port stay."""
        self.stop()
        self.start()

    def __enter__(self) -> KubeAPI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _serve(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> _Served:
        served = _Served(loop=loop, thread=thread)
        app = web.Application(client_max_size=64 * 1024 * 1024)

        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._handle(served, request)

        app.router.add_route("*", "/{tail:.*}", handle)
        # handler_cancellation: a watch whose client went away ends at once, not at its timeout.
        runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = int(runner.addresses[0][1])
        served.runner = runner
        return served

    async def _shutdown(self, served: _Served) -> None:
        self._cut(served, abrupt=False)
        await asyncio.sleep(0)
        if served.runner is not None:
            await served.runner.cleanup()

    # ================================================================ test control

    def write_kubeconfig(self, path: str | Path) -> Path:
        """A kubeconfig (JSON is valid YAML) for this server: plain HTTP, a dummy token."""
        path = Path(path)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "cedar-sandbox", "cluster": {"server": self.url}}],
            "users": [{"name": "cedar-sandbox", "user": {"token": "cedar-sandbox-token"}}],
            "contexts": [
                {
                    "name": "cedar-sandbox",
                    "context": {"cluster": "cedar-sandbox", "user": "cedar-sandbox"},
                }
            ],
            "current-context": "cedar-sandbox",
            "preferences": {},
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    @property
    def resource_version(self) -> str:
        return str(self.store.resource_version)

    def resource(self, kind_or_plural: str | ResourceType) -> ResourceType:
        """`"deployments"`, `"Deployment"` or `"apps/v1/deployments"`."""
        return self.table.lookup(kind_or_plural)

    def _resource_of(self, obj: JsonObj) -> ResourceType:
        return self.table.by_kind(obj.get("apiVersion", ""), obj.get("kind", ""))

    def create(self, obj: JsonObj) -> JsonObj:
        """Create from a full object (`apiVersion`, `kind`, `metadata.name`/`namespace`)."""
        res = self._resource_of(obj)
        return self.store.create(res, obj, (obj.get("metadata") or {}).get("namespace"))

    def load(self, objects: Iterable[JsonObj]) -> int:
        """Create many objects quickly (benchmarks); returns how many."""
        by_res: dict[ResourceType, list[JsonObj]] = {}
        for obj in objects:
            by_res.setdefault(self._resource_of(obj), []).append(obj)
        return sum(self.store.load(res, objs) for res, objs in by_res.items())

    def update(self, obj: JsonObj) -> JsonObj:
        """Replace the whole object, status included; bumps generation if `spec` changed."""
        res = self._resource_of(obj)
        meta = obj.get("metadata") or {}
        body = {**obj, "metadata": {k: v for k, v in meta.items() if k != "resourceVersion"}}
        return self.store.replace(res, meta.get("namespace"), meta["name"], body, keep_status=False)

    def update_status(
        self, kind_or_plural: str, namespace: str | None, name: str, status: JsonObj
    ) -> JsonObj:
        """A status-only write: resourceVersion changes, generation does not."""
        res = self.resource(kind_or_plural)
        return self.store.replace(res, namespace, name, {"status": status}, subresource="status")

    def patch(
        self,
        kind_or_plural: str,
        namespace: str | None,
        name: str,
        patch: Any,
        content_type: str = MERGE_PATCH,
    ) -> JsonObj:
        return self.store.patch(self.resource(kind_or_plural), namespace, name, content_type, patch)

    def delete(self, kind_or_plural: str, namespace: str | None, name: str) -> JsonObj:
        return self.store.delete(self.resource(kind_or_plural), namespace, name)

    def get(self, kind_or_plural: str, namespace: str | None, name: str) -> JsonObj | None:
        try:
            return self.store.get(self.resource(kind_or_plural), namespace, name)
        except ApiError as e:
            if e.code == 404:
                return None
            raise

    def list(
        self,
        kind_or_plural: str,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> builtins.list[JsonObj]:
        flt = WatchFilter(namespace=namespace, labels=parse_label_selector(label_selector))
        return self.store.list_objects(self.resource(kind_or_plural), flt)

    def events_for(self, namespace: str | None = None) -> builtins.list[JsonObj]:
        """Recorded Kubernetes Events (core v1 and events.k8s.io/v1), oldest first."""
        events: builtins.list[JsonObj] = []
        for res in self.table.all:
            if res.kind == "Event":
                events += self.store.list_objects(res, WatchFilter(namespace=namespace))
        events.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
        return events

    def reset(self) -> None:
        """Fresh state: no objects, counters, failures or forbids; open watches get 410."""
        self.store.reset()
        with self._control:
            self._counts.clear()
            self._forbidden.clear()
            self._failures.clear()

    def expire_watches(self) -> None:
        """Compact history: open watches get a 410 ERROR event, re-watching an old RV too."""
        self.store.expire()

    def break_watches(self, *, abrupt: bool = False) -> None:
        """Cut open watch connections without an error event (abrupt: reset, no final chunk)."""
        served = self._served
        if served is not None:
            served.loop.call_soon_threadsafe(self._cut, served, abrupt)

    def forbid(self, plural: str, verbs: Iterable[str] = ("list", "watch")) -> None:
        """Answer these verbs on this resource with 403 Forbidden until `allow`."""
        with self._control:
            self._forbidden.setdefault(self.resource(plural).plural, set()).update(verbs)

    def allow(self, plural: str) -> None:
        with self._control:
            self._forbidden.pop(self.resource(plural).plural, None)

    def fail_next(self, verb: str, plural: str, count: int = 1, status: int = 500) -> None:
        """The next `count` requests of `verb` (get, list, watch, create, update, patch,
        delete) on `plural` (e.g. "namespaces", "deployments/status") fail with `status`."""
        base, _, sub = plural.partition("/")
        name = self.resource(base).plural + (f"/{sub}" if sub else "")
        with self._control:
            self._failures.append(_Failure(verb.lower(), name, count, status))

    def requests(self, verb: str | None = None, plural: str | None = None) -> int:
        """How many requests the server got, optionally only of one verb and/or resource."""
        with self._control:
            return sum(
                n
                for (v, p), n in self._counts.items()
                if (verb is None or v == verb) and (plural is None or p == plural)
            )

    def request_counts(self) -> dict[tuple[str, str], int]:
        with self._control:
            return dict(self._counts)

    def open_watches(self, plural: str | None = None) -> int:
        with self._control:
            if plural is None:
                return sum(self._open.values())
            return self._open[self.resource(plural).plural]

    def _watches_reached(self, plural: str, count: int, exactly: bool) -> bool:
        current = self.open_watches(plural)
        return current == count if exactly else current >= count

    def wait_for_watches(
        self, plural: str, count: int = 1, timeout: float = 10.0, *, exactly: bool = False
    ) -> None:
        """Block until at least (or exactly) `count` watches of `plural` are open.

        A test's sync point: a write made before the watch is open would not be streamed live.
        """
        deadline = time.monotonic() + timeout
        while not self._watches_reached(plural, count, exactly):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.open_watches(plural)} open watches of {plural}")
            time.sleep(0.01)

    async def await_watches(
        self, plural: str, count: int = 1, within: float = 10.0, *, exactly: bool = False
    ) -> None:
        """`wait_for_watches` for async tests: yields to the caller's event loop."""
        deadline = time.monotonic() + within
        while not self._watches_reached(plural, count, exactly):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.open_watches(plural)} open watches of {plural}")
            await asyncio.sleep(0.01)

    # ================================================================ wakeups

    def _on_change(self) -> None:
        served = self._served
        if served is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                served.loop.call_soon_threadsafe(self._wake, served)

    @staticmethod
    def _wake(served: _Served) -> None:
        # Watchers hold the Event they saw before reading the store, so no write is missed.
        event, served.wakeup = served.wakeup, asyncio.Event()
        event.set()

    def _cut(self, served: _Served, abrupt: bool) -> None:
        for watch in served.watches:
            watch.cut = True
            watch.abrupt = abrupt
        self._wake(served)

    # ================================================================ HTTP

    async def _handle(self, served: _Served, request: web.Request) -> web.StreamResponse:
        try:
            route = self._route(request.path)
            if isinstance(route, dict):
                if request.method != "GET":
                    raise ApiError(405, "MethodNotAllowed", "discovery is read-only")
                return _json(dump(route))
            verb = self._verb(request, route)
            self._admit(verb, route)
            return await self._dispatch(served, request, route, verb)
        except ApiError as e:
            return _json(dump(e.status()), e.code)
        except Exception as e:
            log.exception("simulated Kubernetes API failed on %s %s", request.method, request.path)
            return _json(dump(ApiError(500, "InternalError", repr(e)).status()), 500)

    def _admit(self, verb: str, route: _Route) -> None:
        """Count the request, then apply the injected forbids and failures."""
        plural = route.plural
        with self._control:
            self._counts[verb, plural] += 1
            if verb in self._forbidden.get(plural, ()):
                raise ApiError(
                    403,
                    "Forbidden",
                    f'{plural} is forbidden: User "cedar-sandbox" cannot {verb} resource '
                    f'"{plural}" in API group "{route.res.group}"',
                    {"group": route.res.group, "kind": plural},
                )
            for failure in self._failures:
                if failure.verb == verb and failure.plural == plural and failure.remaining > 0:
                    failure.remaining -= 1
                    self._failures = [f for f in self._failures if f.remaining > 0]
                    code = failure.status
                    raise ApiError(
                        code, _REASONS.get(code, "InternalError"), f"injected failure of {verb}"
                    )

    def _route(self, path: str) -> _Route | JsonObj:
        parts = [p for p in path.split("/") if p]
        if not parts:
            return {"paths": ["/api", "/api/v1", "/apis", "/version"]}
        if parts == ["version"]:
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.0-cedar-sandbox"}
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if parts == ["apis"]:
            return self._group_list()
        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        elif parts[0] == "apis":
            return self._group(parts[1])
        else:
            raise ApiError(404, "NotFound", f"the server could not find {path}")
        if not rest:
            return self._resource_list(group, version)
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            scoped = self.table.by_url(group, version, rest[2])
            if scoped is not None and scoped.namespaced:
                namespace, rest = rest[1], rest[2:]
        res = self.table.by_url(group, version, rest[0])
        if res is None or len(rest) > 3:
            raise ApiError(404, "NotFound", f"the server could not find {path}")
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if subresource not in (None, "status"):
            raise ApiError(404, "NotFound", f"the server could not find {path}")
        if name is not None and res.namespaced and namespace is None:
            raise ApiError(404, "NotFound", f"the server could not find {path}")
        return _Route(res, namespace, name, subresource)

    @staticmethod
    def _verb(request: web.Request, route: _Route) -> str:
        method = request.method
        if method == "GET":
            if request.query.get("watch") in _TRUE:
                return "watch"
            return "get" if route.name else "list"
        verbs = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
        verb = verbs.get(method)
        if verb is None or (verb == "create") == (route.name is not None):
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
        return verb

    async def _dispatch(
        self, served: _Served, request: web.Request, route: _Route, verb: str
    ) -> web.StreamResponse:
        res, ns, name, store = route.res, route.namespace, route.name, self.store
        if verb in ("list", "watch"):
            query = request.query
            fields = query.get("fieldSelector")
            if name is not None:  # the old watch-by-name URL
                fields = f"metadata.name={name}" + (f",{fields}" if fields else "")
            flt = WatchFilter(
                namespace=ns,
                labels=parse_label_selector(query.get("labelSelector")),
                fields=parse_field_selector(fields),
            )
            if verb == "watch":
                return await self._watch(served, request, res, flt)
            limit = _int_param(query, "limit")
            body = store.list_page(
                res, flt, limit=limit or None, continue_token=query.get("continue") or None
            )
            return _json(body)
        assert name is not None or verb == "create"
        if verb == "get":
            assert name is not None
            return _json(store.get_raw(res, ns, name))
        if verb == "delete":
            assert name is not None
            deleted = store.delete(res, ns, name)
            return _json(dump(_success(res, deleted)))
        body = await _read_json(request)
        if verb == "create":
            if res.namespaced and ns is None:
                raise ApiError(405, "MethodNotAllowed", "create namespaced objects in a namespace")
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the body must be an object")
            return _json(dump(store.create(res, body, ns)), 201)
        assert name is not None
        if verb == "update":
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the body must be an object")
            result = store.replace(res, ns, name, body, subresource=route.subresource)
        else:
            content_type = request.headers.get("Content-Type", "")
            result = store.patch(res, ns, name, content_type, body, subresource=route.subresource)
        return _json(dump(result))

    async def _watch(
        self, served: _Served, request: web.Request, res: ResourceType, flt: WatchFilter
    ) -> web.StreamResponse:
        query = request.query
        rv_param = query.get("resourceVersion", "")
        timeout = _int_param(query, "timeoutSeconds")
        bookmarks = query.get("allowWatchBookmarks") in _TRUE
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else math.inf
        epoch = self.store.epoch
        try:
            since = int(rv_param) if rv_param not in ("", "0") else None
        except ValueError:
            raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv_param!r}") from None

        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        watch = _Watch(res.plural, request)
        served.watches.add(watch)
        with self._control:
            self._open[res.plural] += 1
        try:
            if since is None:
                lines, since = self.store.initial_events(res, flt)
                if lines:
                    await response.write(b"".join(lines))
            next_bookmark = loop.time() + self.bookmark_interval
            while not watch.cut:
                wakeup = served.wakeup
                got = (
                    None if self.store.epoch != epoch else self.store.events_since(res, since, flt)
                )
                if got is None:
                    status = expired_status(f"too old resource version: {since}")
                    await response.write(b'{"type":"ERROR","object":' + dump(status) + b"}\n")
                    break
                lines, since = got
                if lines:
                    await response.write(b"".join(lines))
                now = loop.time()
                if now >= deadline:
                    break
                if bookmarks and now >= next_bookmark:
                    await response.write(_bookmark(res, since))
                    next_bookmark = now + self.bookmark_interval
                wait = min(deadline, next_bookmark if bookmarks else math.inf) - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), None if math.isinf(wait) else wait)
        except (ConnectionError, RuntimeError):
            return response  # the client went away
        finally:
            served.watches.discard(watch)
            with self._control:
                self._open[res.plural] -= 1
        if watch.abrupt and request.transport is not None:
            request.transport.abort()
            return response
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response

    # ---------------------------------------------------------------- discovery

    def _group_list(self) -> JsonObj:
        groups: dict[str, list[str]] = {}
        for res in self.table.all:
            if res.group and res.version not in groups.setdefault(res.group, []):
                groups[res.group].append(res.version)
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [self._group(name) for name in groups],
        }

    def _group(self, name: str) -> JsonObj:
        versions = sorted({r.version for r in self.table.all if r.group == name})
        if not versions:
            raise ApiError(404, "NotFound", f"no API group {name}")
        entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": name,
            "versions": entries,
            "preferredVersion": entries[0],
        }

    def _resource_list(self, group: str, version: str) -> JsonObj:
        found = [r for r in self.table.all if r.group == group and r.version == version]
        if not found:
            raise ApiError(404, "NotFound", f"no API {group}/{version}")
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        resources: list[JsonObj] = []
        for r in found:
            resources.append(
                {
                    "name": r.plural,
                    "singularName": r.kind.lower(),
                    "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": verbs,
                }
            )
            if r.has_status:
                resources.append(
                    {
                        "name": f"{r.plural}/status",
                        "singularName": "",
                        "namespaced": r.namespaced,
                        "kind": r.kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": found[0].api_version,
            "resources": resources,
        }


# ==================================================================== helpers


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def _int_param(query: Any, name: str) -> int | None:
    value = query.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, "BadRequest", f"invalid {name} {value!r}") from None


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        raise ApiError(400, "BadRequest", "the body is not valid JSON") from None


def _bookmark(res: ResourceType, rv: int) -> bytes:
    obj = {
        "kind": res.kind,
        "apiVersion": res.api_version,
        "metadata": {"resourceVersion": str(rv)},
    }
    return b'{"type":"BOOKMARK","object":' + dump(obj) + b"}\n"


def _success(res: ResourceType, deleted: JsonObj) -> JsonObj:
    meta = deleted.get("metadata") or {}
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {
            "name": meta.get("name"),
            "group": res.group,
            "kind": res.plural,
            "uid": meta.get("uid"),
        },
    }
