"""The simulated Kubernetes API's HTTP handlers: list, get, watch, create, update, patch, delete.

I/O: answers aiohttp requests on the server's event loop (kubeapi_server.py) from the store
(kubeapi_store.py), after the test controls (kubeapi_controls.py) have counted the request
and applied any injected fault. Errors go out as `kind: Status` bodies, as from the real
server; a watch streams chunked JSON lines with bookmarks and a 410 ERROR event once its
resourceVersion is compacted away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from typing import Any

from aiohttp import web

from cedar.sandbox.errors import ApiError
from cedar.sandbox.kubeapi_controls import Controls
from cedar.sandbox.kubeapi_objects import dump
from cedar.sandbox.kubeapi_ops import (
    JsonObj,
    ResourceTable,
    ResourceType,
    WatchFilter,
    parse_field_selector,
    parse_label_selector,
)
from cedar.sandbox.kubeapi_routes import Route, is_true, route, verb_of
from cedar.sandbox.kubeapi_server import OpenWatch, Serving
from cedar.sandbox.kubeapi_store import Store

log = logging.getLogger(__name__)


class ApiHandler:
    """Every request of the simulated API; `bookmark_interval` is in seconds."""

    def __init__(
        self, table: ResourceTable, store: Store, controls: Controls, bookmark_interval: float
    ) -> None:
        self.table = table
        self.store = store
        self.controls = controls
        self.bookmark_interval = bookmark_interval

    async def handle(self, serving: Serving, request: web.Request) -> web.StreamResponse:
        try:
            found = route(self.table, request.path)
            if isinstance(found, dict):
                if request.method != "GET":
                    raise ApiError(405, "MethodNotAllowed", "discovery is read-only")
                return _json(dump(found))
            verb = verb_of(request.method, request.query.get("watch"), found)
            self.controls.admit(verb, found.plural, found.res.group)
            return await self._dispatch(serving, request, found, verb)
        except ApiError as e:
            return _json(dump(e.status()), e.code)
        except Exception as e:
            log.exception("simulated Kubernetes API failed on %s %s", request.method, request.path)
            return _json(dump(ApiError(500, "InternalError", repr(e)).status()), 500)

    async def _dispatch(
        self, serving: Serving, request: web.Request, found: Route, verb: str
    ) -> web.StreamResponse:
        res, ns, name, store = found.res, found.namespace, found.name, self.store
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
                return await self._watch(serving, request, res, flt)
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
            result = store.replace(res, ns, name, body, subresource=found.subresource)
        else:
            content_type = request.headers.get("Content-Type", "")
            result = store.patch(res, ns, name, content_type, body, subresource=found.subresource)
        return _json(dump(result))

    async def _watch(
        self, serving: Serving, request: web.Request, res: ResourceType, flt: WatchFilter
    ) -> web.StreamResponse:
        query = request.query
        rv_param = query.get("resourceVersion", "")
        timeout = _int_param(query, "timeoutSeconds")
        bookmarks = is_true(query.get("allowWatchBookmarks"))
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
        watch = OpenWatch()
        serving.watches.add(watch)
        self.controls.watch_opened(res.plural)
        try:
            if since is None:
                lines, since = self.store.initial_events(res, flt)
                if lines:
                    await response.write(b"".join(lines))
            next_bookmark = loop.time() + self.bookmark_interval
            while not watch.cut:
                wakeup = serving.wakeup
                got = (
                    None if self.store.epoch != epoch else self.store.events_since(res, since, flt)
                )
                if got is None:
                    status = _expired_status(f"too old resource version: {since}")
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
            serving.watches.discard(watch)
            self.controls.watch_closed(res.plural)
        if watch.abrupt and request.transport is not None:
            request.transport.abort()
            return response
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response


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


def _expired_status(message: str) -> JsonObj:
    return ApiError(410, "Expired", message).status()


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
