"""Answering nats-server's authorization requests: TokenReview, then grant or refuse.

I/O: NATS through cedar.runtime.bus (a queue subscription to `$SYS.REQ.USER.AUTH`, as the
auth user that nats.conf's auth_callout lists in `auth_users`; replies to the server's
inbox) and the Kubernetes API through cedar.runtime.kube (POST TokenReview). Each request is
answered on a task of its own, at most CEDAR_AUTH_MAX_INFLIGHT at once, so one slow review
never holds up the others (nats-server waits its auth timeout, then refuses the client).

Every answer is logged and counted in `cedar_nats_auth_requests`: accepted (node, pod),
refused (the reason and its cause), or unreadable (a request that no server signed, which
gets no answer at all). The client's token, and the passwords the server forwards for users
that are not `auth_users`, are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cedar.nats_auth import claims, grant, review
from cedar.nats_auth.errors import REVIEW_FAILED as _REVIEW_FAILED
from cedar.nats_auth.errors import BadRequest, Refusal
from cedar.nats_auth.metrics import REQUESTS, REVIEW_DURATION
from cedar.nats_auth.nkeyjwt import Signer
from cedar.nats_auth.review import Identity
from cedar.nats_auth.settings import NatsAuthSettings
from cedar.runtime.bus import Bus, BusError, bus_errors
from cedar.runtime.health import Health
from cedar.runtime.kube import KubeClient, KubeError, resource_path

log = logging.getLogger("cedar.nats_auth")

AUTH_CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"  # server/auth_callout.go AuthCalloutSubject
QUEUE = "cedar-nats-auth"  # replicas share the requests
XKEY_HEADER = "Nats-Server-Xkey"  # an encrypted request (auth_callout xkey)
READINESS_CHECK = "callout"
TOKENREVIEWS = resource_path("TokenReview")


class Responder:
    """Turns one authorization request into its signed answer."""

    def __init__(
        self,
        settings: NatsAuthSettings,
        signer: Signer,
        kube: KubeClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.signer = signer
        self.kube = kube
        self.clock = clock
        self.allowed = settings.service_accounts
        self.user_ttl = settings.auth_user_ttl.total_seconds()
        self._slots = asyncio.Semaphore(settings.auth_max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()

    async def answer(self, payload: bytes) -> bytes | None:
        """The signed response to one request; None when the request cannot be answered."""
        now = self.clock()
        try:
            request = claims.parse_request(payload.decode(errors="replace"), now=now)
        except BadRequest as err:
            REQUESTS.labels("unreadable", "bad_request").inc()
            log.warning("cannot answer an authorization request: %s", err)
            return None
        try:
            identity = await self._review(request.token)
        except Refusal as refusal:
            REQUESTS.labels("refused", refusal.reason).inc()
            log.warning(
                "refused a NATS client: %s",
                refusal.cause,
                extra={"reason": refusal.reason, **request.describe()},
            )
            return claims.refuse(
                request, self.signer, error=f"cedar nats-auth: {refusal.reason}", now=int(now)
            )
        now = self.clock()
        expires = review.user_expiry(request.token, now=now, ttl=self.user_ttl)
        REQUESTS.labels("accepted", "none").inc()
        log.info(
            "accepted the puller of node %s",
            identity.node,
            extra={
                "node": identity.node,
                "pod": f"{identity.namespace}/{identity.pod}",
                "expires": expires,
                **request.describe(),
            },
        )
        return claims.grant(
            request,
            self.signer,
            account=self.settings.auth_account,
            name=f"puller:{identity.node}",
            permissions=grant.puller_permissions(identity.node),
            expires=expires,
            now=int(now),
        )

    async def _review(self, token: str) -> Identity:
        review.check_token(token)
        body = review.review_body(token, self.settings.auth_audience)
        started = time.monotonic()
        try:
            # Never queue behind an API that pushes back for longer than a review may take:
            # the server refuses the client after its auth timeout anyway.
            answer = await self.kube.request(
                "POST",
                TOKENREVIEWS,
                body=body,
                patience=self.settings.auth_review_timeout.total_seconds(),
            )
        except KubeError as err:
            raise Refusal(_REVIEW_FAILED, f"the TokenReview failed: {err}") from err
        finally:
            REVIEW_DURATION.observe(time.monotonic() - started)
        return review.judge(
            answer,
            token=token,
            audience=self.settings.auth_audience,
            allowed=self.allowed,
            now=self.clock(),
        )

    # ---------------------------------------------------------------- serving

    async def serve(self, bus: Bus, health: Health, stop: asyncio.Event) -> None:
        """Answer requests until `stop`, then finish those in flight."""
        health.require(READINESS_CHECK)

        async def on_message(msg: Msg) -> None:
            task = asyncio.create_task(self._handle(bus, msg), name="nats-auth-request")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        with bus_errors("subscribe to the authorization requests"):
            sub: Subscription = await bus.nc.subscribe(
                AUTH_CALLOUT_SUBJECT, queue=QUEUE, cb=on_message
            )
            await bus.nc.flush()
        health.set(READINESS_CHECK, True)
        log.info(
            "answering NATS authorization requests",
            extra={"issuer": self.signer.public_key, "account": self.settings.auth_account},
        )
        try:
            await stop.wait()
        finally:
            health.set(READINESS_CHECK, False, "stopping")
            try:
                with bus_errors("unsubscribe from the authorization requests"):
                    await sub.unsubscribe()
            except BusError as err:
                log.debug("unsubscribing: %s", err)
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _handle(self, bus: Bus, msg: Msg) -> None:
        async with self._slots:
            if not msg.reply:
                REQUESTS.labels("unreadable", "bad_request").inc()
                log.warning("an authorization request without a reply subject; ignored")
                return
            if msg.headers and XKEY_HEADER in msg.headers:
                REQUESTS.labels("unreadable", "bad_request").inc()
                log.error(
                    "an encrypted authorization request: remove `xkey` from nats.conf's "
                    "auth_callout (cedar nats-auth does not decrypt; docs/deploying.md)"
                )
                return
            try:
                response = await self.answer(msg.data)
            except Exception:  # a bug must cost one client, never the service
                REQUESTS.labels("unreadable", "internal").inc()
                log.exception("failed to answer an authorization request")
                return
            if response is None:
                return
            try:
                with bus_errors("answer an authorization request"):
                    await bus.nc.publish(msg.reply, response)
            except BusError as err:
                log.warning("could not answer an authorization request: %s", err)
