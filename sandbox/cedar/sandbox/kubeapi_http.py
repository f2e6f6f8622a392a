"""The simulated Kubernetes API's HTTP handlers: list, get, watch, create, update, patch, delete.

I/O: answers aiohttp requests on the server's event loop (kubeapi_server.py) from the store
(kubeapi_store.py), after the test controls (kubeapi_controls.py) have counted the request
and applied any injected fault (a fault mode is answered by kubeapi_faults.py). Errors go
out as `kind: Status` bodies, as from the real server; a watch streams chunked JSON lines
with bookmarks and a 410 ERROR event once its resourceVersion is compacted away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from typing import Any

from aiohttp import web

from cedar.sandbox.errors import ApiError
from cedar.sandbox.kubeapi_auth import TOKEN_REVIEWS, TokenReviews
from cedar.sandbox.kubeapi_controls import Controls
from cedar.sandbox.kubeapi_faults import enact
from cedar.sandbox.kubeapi_objects import dump
from cedar.sandbox.kubeapi_openapi import document, index
from cedar.sandbox.kubeapi_ops import (
    MERGE_PATCH,
    JsonObj,
    ResourceTable,
    ResourceType,
    WatchFilter,
    apply_patch,
    parse_field_selector,
    parse_label_selector,
)
from cedar.sandbox.kubeapi_requests import (
    accepts_json,
    check_query,
    decode_body,
    scaled_replicas,
    strict_error,
    to_scale,
    unknown_fields,
)
from cedar.sandbox.kubeapi_routes import Route, is_true, route, verb_of
from cedar.sandbox.kubeapi_server import OpenWatch, Serving
from cedar.sandbox.kubeapi_store import Store
from cedar.sandbox.kubeapi_tables import table, wants_table

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
        self.token_reviews: TokenReviews | None = None  # kubeapi_auth.py, set by KubeAPI

    async def handle(self, serving: Serving, request: web.Request) -> web.StreamResponse:
        try:
            if not accepts_json(request.headers.get("Accept", "")):
                raise ApiError(
                    406,
                    "NotAcceptable",
                    "the sandbox's simulated API answers in application/json only",
                )
            if request.path.startswith("/openapi/"):
                return self._openapi(request)
            if request.path == TOKEN_REVIEWS and self.token_reviews is not None:
                return await self.token_reviews.handle(request, self.controls)
            found = route(self.table, request.path)
            if isinstance(found, dict):
                if request.method != "GET":
                    raise ApiError(405, "MethodNotAllowed", "discovery is read-only")
                return _json(dump(found))
            verb = verb_of(request.method, request.query.get("watch"), found)
            fault = self.controls.admit(
                verb,
                found.plural,
                found.res.group,
                client_of(request),
                (found.namespace, found.name),
            )
            if fault is not None:
                return await enact(fault, serving, request, verb)
            return await self._dispatch(serving, request, found, verb)
        except ApiError as e:
            return _json(dump(e.status()), e.code)
        except Exception as e:
            log.exception("simulated Kubernetes API failed on %s %s", request.method, request.path)
            return _json(dump(ApiError(500, "InternalError", repr(e)).status()), 500)

    def _openapi(self, request: web.Request) -> web.Response:
        if request.method != "GET":
            raise ApiError(405, "MethodNotAllowed", "the OpenAPI documents are read-only")
        path = request.path.rstrip("/")
        if path == "/openapi/v3":
            return _json(dump(index(self.table)))
        if path.startswith("/openapi/v3/"):
            return _json(dump(document(self.table, path.removeprefix("/openapi/v3/"))))
        raise ApiError(
            404,
            "NotFound",
            f"{path} is not served by the sandbox's simulated API (it serves /openapi/v3)",
        )

    async def _dispatch(
        self, serving: Serving, request: web.Request, found: Route, verb: str
    ) -> web.StreamResponse:
        res, ns, name, store = found.res, found.namespace, found.name, self.store
        if found.subresource == "scale":
            return await self._scale(request, found, verb)
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
            if wants_table(request.headers.get("Accept", "")):
                page = json.loads(body)
                return _json(dump(table(res.kind, page["items"], page["metadata"])))
            return _json(body)
        assert name is not None or verb == "create"
        if verb == "get":
            assert name is not None
            if wants_table(request.headers.get("Accept", "")):
                one = store.get(res, ns, name)
                meta = {"resourceVersion": one["metadata"]["resourceVersion"]}
                return _json(dump(table(res.kind, [one], meta)))
            return _json(store.get_raw(res, ns, name))
        if verb == "delete":
            assert name is not None
            deleted = store.delete(res, ns, name)
            if res.kind == "Namespace":  # the Namespace REST returns it, now Terminating
                return _json(dump(deleted))
            return _json(dump(_success(res, deleted)))
        directive = check_query(request.query)
        body = decode_body(await request.read(), request.headers.get("Content-Type", ""), verb)
        headers: dict[str, str] = {}
        problems = [] if verb == "patch" or directive == "Ignore" else unknown_fields(res, body)
        if problems and directive == "Strict":
            raise strict_error(problems)
        if problems:
            headers["Warning"] = ", ".join(f'299 - "{p}"' for p in problems)
        if verb == "create":
            if res.namespaced and ns is None:
                raise ApiError(405, "MethodNotAllowed", "create namespaced objects in a namespace")
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the body must be an object")
            return _json(dump(store.create(res, body, ns)), 201, headers)
        assert name is not None
        if verb == "update":
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the body must be an object")
            result = store.replace(res, ns, name, body, subresource=found.subresource)
        else:
            content_type = request.headers.get("Content-Type", "")
            result = store.patch(res, ns, name, content_type, body, subresource=found.subresource)
        return _json(dump(result), 200, headers)

    async def _scale(self, request: web.Request, found: Route, verb: str) -> web.Response:
        """GET, PUT and PATCH of a workload's autoscaling/v1 Scale."""
        res, ns, name, store = found.res, found.namespace, found.name, self.store
        assert name is not None
        current = store.get(res, ns, name)
        if verb == "get":
            return _json(dump(to_scale(current)))
        if verb not in ("update", "patch"):
            raise ApiError(405, "MethodNotAllowed", f"{verb} is not supported on /scale")
        check_query(request.query)
        content_type = request.headers.get("Content-Type", "")
        body = decode_body(await request.read(), content_type, verb)
        scale = to_scale(current)
        wanted = body if verb == "update" else apply_patch(scale, content_type, body)
        sent_rv = ((wanted or {}).get("metadata") or {}).get("resourceVersion")
        write: JsonObj = {"spec": {"replicas": scaled_replicas(wanted)}}
        if sent_rv:
            write["metadata"] = {"resourceVersion": sent_rv}
        updated = store.patch(res, ns, name, MERGE_PATCH, write)
        return _json(dump(to_scale(updated)))

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
                lines, since, due = got
                if lines:
                    await response.write(b"".join(lines))
                now = loop.time()
                if now >= deadline:
                    break
                if bookmarks and now >= next_bookmark:
                    await response.write(_bookmark(res, since))
                    next_bookmark = now + self.bookmark_interval
                wait = min(deadline, next_bookmark if bookmarks else math.inf) - now
                if due is not None:  # held-back events: look again when they are due
                    wait = min(wait, max(due - time.monotonic(), 0.0))
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


def client_of(request: web.Request) -> str:
    """Who is asking: the bearer token (the sandbox takes any token as its own user, as
    the API's flow control tells clients apart by user), else "anonymous"."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else "anonymous"


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def _int_param(query: Any, name: str) -> int | None:
    value = query.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, "BadRequest", f"invalid {name} {value!r}") from None


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
