"""The simulated Kubernetes API's fault modes, answered on the wire (kubeapi_controls.Fault).

I/O: writes (or refuses to finish) one aiohttp response on the server's event loop. Each
mode answers as the real API server does in that situation:

- throttle: 429 with `Retry-After`. The max-in-flight and priority-and-fairness filters
  answer with a plain-text body, "Too many requests, please try again later."
  (staging/src/k8s.io/apiserver/pkg/server/filters/maxinflight.go, tooManyRequests: header
  "1"; priority-and-fairness.go passes the tracker's 1 to 32 s,
  pkg/util/flowcontrol/dropped_requests_tracker.go). An API error built by
  `NewTooManyRequests` is a Status with details.retryAfterSeconds, which
  endpoints/handlers/responsewriters/writers.go (ErrorNegotiated) copies into the header.
- fail: an error Status (500 InternalError, or the status given), with Retry-After when one
  is given (responsewriters again).
- reset: the connection is aborted before any byte of an answer.
- stall: 200 and the headers, then part of the body, then nothing until the client gives up
  or the server stops; for a watch, nothing after the headers (no bookmark either).
- expire: a watch is answered 200 and one ERROR event carrying a 410 Expired Status, then
  ends: the watch cache answers a too-old resourceVersion that way rather than with an HTTP
  error (staging/src/k8s.io/apiserver/pkg/storage/cacher/cacher.go, Watch: "other errors
  must fail with a watch event of type ERROR"), and the handler streams it in a chunked 200
  (endpoints/handlers/watch.go, HandleHTTP).
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from cedar.sandbox.errors import ApiError
from cedar.sandbox.kubeapi_controls import REASONS, Fault
from cedar.sandbox.kubeapi_objects import dump
from cedar.sandbox.kubeapi_server import OpenWatch, Serving

# The body of the flow-control filters' 429 (http.Error adds the newline).
APF_BODY = "Too many requests, please try again later.\n"
# What a stalled list sends before it stops: a valid beginning of a List.
STALL_PREFIX = b'{"kind":"List","apiVersion":"v1","metadata":{"resourceVersion":"'


def status_body(code: int, message: str, retry_after: int | None = None) -> bytes:
    details = {} if retry_after is None else {"retryAfterSeconds": retry_after}
    reason = REASONS.get(code, "InternalError")
    return dump(ApiError(code, reason, message, details).status())


async def enact(
    fault: Fault, serving: Serving, request: web.Request, verb: str
) -> web.StreamResponse:
    """Answer `request` as `fault` says."""
    if fault.kind == "throttle":
        return _throttled(fault)
    if fault.kind == "fail":
        code = fault.status or 500
        headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
        body = status_body(code, f"injected failure of {verb}", fault.retry_after)
        return web.Response(
            body=body, status=code, content_type="application/json", headers=headers
        )
    if fault.kind == "reset":
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)  # never sent: the connection is gone
    if fault.kind == "stall":
        return await _stall(serving, request, verb)
    return await _expired(request)


def _throttled(fault: Fault) -> web.Response:
    seconds = 1 if fault.retry_after is None else fault.retry_after
    headers = {"Retry-After": str(seconds)}
    if fault.body == "apf":
        headers["X-Content-Type-Options"] = "nosniff"
        return web.Response(
            text=APF_BODY, status=429, content_type="text/plain", charset="utf-8", headers=headers
        )
    message = "Too many requests: the server is throttling this client"
    return web.Response(
        body=status_body(429, message, seconds),
        status=429,
        content_type="application/json",
        headers=headers,
    )


async def _stall(serving: Serving, request: web.Request, verb: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    held = OpenWatch()
    serving.watches.add(held)
    try:
        if verb != "watch":
            await response.write(STALL_PREFIX)
        while not held.cut:  # until the server stops (or the client goes: cancelled)
            wakeup = serving.wakeup
            await wakeup.wait()
    except (ConnectionError, RuntimeError):
        pass
    finally:
        serving.watches.discard(held)
    # Never finished: the connection goes without the final chunk.
    if request.transport is not None:
        request.transport.abort()
    return response


async def _expired(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    status = ApiError(410, "Expired", "too old resource version (injected)").status()
    with contextlib.suppress(ConnectionError, RuntimeError):
        await response.write(b'{"type":"ERROR","object":' + dump(status) + b"}\n")
        await response.write_eof()
    await asyncio.sleep(0)
    return response
