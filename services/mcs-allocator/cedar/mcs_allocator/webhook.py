"""The mutating admission webhook: new tenant pods get their namespace's level.

For clusters without MutatingAdmissionPolicy (before 1.36, or 1.34/1.35 without the
feature gate): `cedar mcs-allocator` with CEDAR_MCS_WEBHOOK_PORT set serves
`POST /mutate-pods` over HTTPS and answers AdmissionReview v1 requests for pods (CREATE)
and pods/ephemeralcontainers (UPDATE) with the decision of `podlevel.decide_pod`, the same
function the admission policies' CEL is tested against: a JSON Patch that sets the level
where it is absent, or a refusal naming the expected level. `dryRun` requests get the same
answer (the webhook has no side effects: `sideEffects: None`).

TLS: the certificate chain and key are files (a mounted Secret, e.g. cert-manager's
`tls.crt`/`tls.key`), checked every CEDAR_MCS_WEBHOOK_RELOAD and loaded into the serving
context when they change, so a rotation needs no restart (connections already open keep
the certificate they started with). `GET /readyz` and `/healthz` on the same port tell
whether it serves (certificate loaded, namespace cache synced), independently of NATS.

I/O: a TCP port (aiohttp), the certificate files, the namespace cache (`nscache`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl
import time
from typing import Any

from aiohttp import web

from cedar.mcs_allocator.metrics import ADMISSION_SECONDS, ADMISSIONS, WEBHOOK_CERT_RELOADS
from cedar.mcs_allocator.nscache import NamespaceCache
from cedar.mcs_allocator.podlevel import PodRules, decide_pod, level_patch
from cedar.mcs_allocator.schedule import sleep_or_stop
from cedar.runtime.errors import KubeError

log = logging.getLogger("cedar.mcs_allocator.webhook")

PATH = "/mutate-pods"
REVIEW_VERSION = "admission.k8s.io/v1"


class InvalidReview(ValueError):
    """Not an AdmissionReview v1 request this webhook can answer."""


class CertFiles:
    """The certificate chain and key files, and the server-side TLS context they load."""

    def __init__(self, cert: str, key: str) -> None:
        self.cert = cert
        self.key = key
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp: tuple[int, ...] | None = None
        self.loaded = False

    def _current(self) -> tuple[int, ...]:
        stamp: list[int] = []
        for path in (self.cert, self.key):
            st = os.stat(path)  # follows the Secret volume's ..data symlink
            stamp += [st.st_ino, st.st_mtime_ns, st.st_size]
        return tuple(stamp)

    def reload(self) -> bool:
        """Load the files if they changed since the last load; True if loaded now."""
        try:
            stamp = self._current()
            if stamp == self._stamp:
                return False
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as err:
            WEBHOOK_CERT_RELOADS.labels(result="failed").inc()
            log.error(
                "cannot load the webhook certificate %s / key %s: %s%s",
                self.cert,
                self.key,
                err,
                "; still serving the previous one" if self.loaded else "",
            )
            return False
        self._stamp = stamp
        self.loaded = True
        WEBHOOK_CERT_RELOADS.labels(result="loaded").inc()
        log.info("webhook certificate loaded from %s", self.cert)
        return True


def _request_of(review: Any) -> dict[str, Any]:
    if not isinstance(review, dict):
        raise InvalidReview("the body is not a JSON object")
    if review.get("apiVersion") != REVIEW_VERSION or review.get("kind") != "AdmissionReview":
        raise InvalidReview(
            f"expected apiVersion {REVIEW_VERSION} kind AdmissionReview, got "
            f"{review.get('apiVersion')!r} {review.get('kind')!r} "
            "(set admissionReviewVersions: [v1])"
        )
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise InvalidReview("the AdmissionReview has no request with a uid")
    return request


def _response(uid: str, **fields: Any) -> dict[str, Any]:
    return {
        "apiVersion": REVIEW_VERSION,
        "kind": "AdmissionReview",
        "response": {"uid": uid, **fields},
    }


def _deny(uid: str, code: int, reason: str, message: str) -> dict[str, Any]:
    status = {"code": code, "reason": reason, "message": message}
    return _response(uid, allowed=False, status=status)


class Webhook:
    def __init__(self, cache: NamespaceCache, rules: PodRules, certs: CertFiles) -> None:
        self.cache = cache
        self.rules = rules
        self.certs = certs
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def ready(self) -> bool:
        return self.certs.loaded and self.cache.synced.is_set()

    async def review(self, body: bytes) -> tuple[dict[str, Any], str, str]:
        """The AdmissionReview response for `body`, with the result and rule it counts as.

        Raises InvalidReview for a body that is not an AdmissionReview v1 request.
        """
        try:
            request = _request_of(json.loads(body))
        except ValueError as err:
            raise InvalidReview(str(err)) from err
        uid = request["uid"]
        kind = request.get("kind") or {}
        sub = request.get("subResource") or ""
        operation = request.get("operation")
        wanted = (operation == "CREATE" and sub == "") or (
            operation == "UPDATE" and sub == "ephemeralcontainers"
        )
        if kind.get("kind") != "Pod" or kind.get("group", "") != "" or not wanted:
            # Not what this webhook is registered for: never stand in the way.
            return _response(uid, allowed=True), "admitted", "not-a-pod-admission"
        pod = request.get("object")
        if not isinstance(pod, dict):
            raise InvalidReview("the request carries no object")
        namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace")
        if not isinstance(namespace, str) or not namespace:
            raise InvalidReview("the request names no namespace")
        try:
            ns = await self.cache.lookup(namespace)
        except KubeError as err:
            log.warning("cannot read namespace %s for admission: %s", namespace, err)
            message = f"cedar-mcs-allocator cannot read namespace {namespace}: {err}"
            return _deny(uid, 503, "ServiceUnavailable", message), "error", "namespace-lookup"
        if ns is None:
            message = f"namespace {namespace} does not exist"
            return _deny(uid, 404, "NotFound", message), "denied", "no-namespace"
        decision = decide_pod(pod, ns, self.rules, operation=str(operation))
        if not decision.allowed:
            log.info(
                "refused pod %s/%s: %s",
                namespace,
                (pod.get("metadata") or {}).get("name")
                or (pod.get("metadata") or {}).get("generateName", ""),
                decision.message,
                extra={
                    "namespace": namespace,
                    "rule": decision.rule,
                    "dry_run": request.get("dryRun"),
                },
            )
            return _deny(uid, 403, "Forbidden", decision.message), "denied", decision.rule
        if decision.set_level is None:
            return _response(uid, allowed=True), "admitted", decision.rule
        patch = json.dumps(level_patch(pod, decision.set_level)).encode()
        answer = _response(
            uid, allowed=True, patchType="JSONPatch", patch=base64.b64encode(patch).decode()
        )
        return answer, "mutated", decision.rule

    async def _handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        body = await request.read()
        try:
            answer, result, rule = await self.review(body)
        except InvalidReview as err:
            ADMISSIONS.labels(result="invalid", rule="").inc()
            log.warning("refused a malformed admission request: %s", err)
            return web.Response(status=400, text=f"invalid AdmissionReview: {err}\n")
        ADMISSIONS.labels(result=result, rule=rule).inc()
        response = web.Response(body=json.dumps(answer).encode(), content_type="application/json")
        ADMISSION_SECONDS.observe(time.perf_counter() - started)
        return response

    async def _readyz(self, _: web.Request) -> web.Response:
        ok = self.ready
        state = {"certificate": self.certs.loaded, "namespaces": self.cache.synced.is_set()}
        return web.json_response({"ready": ok, **state}, status=200 if ok else 503)

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def start(self, host: str, port: int) -> None:
        """Listen; the certificate must load (a webhook without one cannot serve)."""
        self.certs.reload()
        if not self.certs.loaded:
            raise OSError(f"no usable certificate in {self.certs.cert} / {self.certs.key}")
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post(PATH, self._handle)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.certs.context)
        await site.start()
        self.port = port
        if port == 0:
            for address in self._runner.addresses:
                self.port = int(address[1])
        log.info("admission webhook listening on https://%s:%d%s", host, self.port, PATH)

    async def keep_cert_fresh(self, stop: asyncio.Event, every: float) -> None:
        while not stop.is_set():
            await sleep_or_stop(stop, every)
            self.certs.reload()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
