"""The NATS connection every service uses; creating streams and buckets; reading streams.

The connection is retried forever with backoff, at start and after any outage, so a
service never dies because NATS is briefly away. It authenticates with CEDAR_NATS_USER and
CEDAR_NATS_PASSWORD, or with the token in CEDAR_NATS_TOKEN_FILE (a puller's bound
ServiceAccount token, for the auth callout), followed as the kubelet rotates it. Streams
and buckets (configured in `cedar.runtime.topology`) are created or updated idempotently by
whichever service starts first. nats-py's errors stop here: `bus_errors()` turns them into
`BusError` and `BusUnavailable` (`cedar.runtime.errors`). I/O: NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    StreamConfig,
)
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from cedar.runtime import sourcing
from cedar.runtime.backoff import Backoff
from cedar.runtime.errors import BusError, BusUnavailable, StalledRead
from cedar.runtime.health import Health
from cedar.runtime.metrics import NATS_CONNECTED
from cedar.runtime.settings import CommonSettings

log = logging.getLogger("cedar.bus")

T = TypeVar("T")

# nats-py's errors that mean "NATS is away for now", as opposed to a request it refuses.
TRANSIENT_ERRORS = (
    TimeoutError,
    NatsTimeoutError,
    NoRespondersError,
    ConnectionClosedError,
    ServiceUnavailableError,
)

__all__ = [
    "Bus",
    "BusError",
    "BusUnavailable",
    "StalledRead",
    "bus_errors",
    "ensure_kv",
    "ensure_object_store",
    "ensure_stream",
    "ensure_streams",
    "kv_deleted",
    "read_to_end",
    "reply_pending",
    "reply_seq",
]


@contextlib.contextmanager
def bus_errors(what: str) -> Iterator[None]:
    """Turn nats-py's errors raised inside into Cedar's: `BusUnavailable` when NATS is away
    for now, `BusError` when it refused. `what` names the operation in the message."""
    try:
        yield
    except BusError:
        raise
    except TRANSIENT_ERRORS as err:
        raise BusUnavailable(
            f"{what}: NATS is unavailable ({err.__class__.__name__}: {err})"
        ) from err
    except NatsError as err:
        raise BusError(f"{what}: {err.__class__.__name__}: {err}") from err


async def ensure_stream(js: JetStreamContext, config: StreamConfig, *, update: bool = True) -> None:
    """Create the stream; if it exists with another configuration, update it to ours.

    With `update=False` (a stream another service owns: its NATS user may create it but
    not change it) an existing stream is left as it is. An update keeps where each of the
    stream's sources started: a source given a start sequence once (when the layout was
    moved, `cedar.runtime.sourcing`) would otherwise copy its origin from the start.
    """
    assert config.name is not None
    if not update:
        # Whatever its configuration: asking to create it could even be refused as a
        # sourcing cycle, when it is in a layout the owner has still to move.
        with contextlib.suppress(NotFoundError):
            await js.stream_info(config.name)
            return
    try:
        await js.add_stream(config)
    except BadRequestError as err:
        # 10058: exists with another configuration.
        if err.err_code != 10058:
            raise
        if not update:
            log.info(
                "stream exists with another configuration; its owner manages it",
                extra={"stream": config.name},
            )
            return
        existing = (await js.stream_info(config.name)).config
        log.info("updating stream configuration", extra={"stream": config.name})
        await js.update_stream(keep_source_starts(config, existing))


def keep_source_starts(config: StreamConfig, existing: StreamConfig) -> StreamConfig:
    """`config` with the start position of each source `existing` has too."""
    if not config.sources or not existing.sources:
        return config
    started = {(s.name, s.filter_subject): s for s in existing.sources}
    sources = []
    for source in config.sources:
        old = started.get((source.name, source.filter_subject))
        if old is not None and source.opt_start_seq is None and source.opt_start_time is None:
            sources.append(
                dataclasses.replace(
                    source, opt_start_seq=old.opt_start_seq, opt_start_time=old.opt_start_time
                )
            )
        else:
            sources.append(source)
    return dataclasses.replace(config, sources=sources)


async def ensure_streams(
    js: JetStreamContext, configs: Iterable[StreamConfig], *, update: bool = True
) -> None:
    """`ensure_stream` for each, in order; with `update`, a cluster still in the older
    layout of the history and the last-value streams is moved first (`cedar.runtime.sourcing`)."""
    configs = list(configs)
    if update:
        await sourcing.move_to_history_first(js, configs)
    for config in configs:
        await ensure_stream(js, config, update=update)


async def ensure_kv(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    try:
        return await js.create_key_value(config)
    except BadRequestError as err:
        if err.err_code != 10058:
            raise
        log.warning(
            "KV bucket exists with another configuration; using it as it is",
            extra={"bucket": config.bucket},
        )
        return await js.key_value(config.bucket)


async def ensure_object_store(js: JetStreamContext, config: ObjectStoreConfig) -> ObjectStore:
    assert config.bucket is not None
    try:
        return await js.object_store(config.bucket)
    except BucketNotFoundError:
        return await js.create_object_store(config.bucket, config)


def kv_deleted(headers: dict[str, str] | None) -> bool:
    """Whether a KV stream message removes its key: a delete or purge, or a server marker
    (a key whose TTL ran out)."""
    if not headers:
        return False
    return headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers


def reply_seq(reply: str) -> int:
    """The stream sequence in a JetStream reply subject (v1: 9 tokens, v2: 12)."""
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def reply_pending(reply: str) -> int:
    """How many messages the consumer has yet to deliver after this one."""
    tokens = reply.split(".")
    return int(tokens[8] if len(tokens) == 9 else tokens[10])


async def read_to_end(
    js: JetStreamContext,
    stream: str,
    subject: str,
    *,
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
    start_seq: int | None = None,
    stall: float = 30.0,
) -> list[Msg]:
    """The messages of `subject` in `stream`, up to the point where the consumer has none
    pending; raises StalledRead if nothing arrives for `stall` seconds before that.

    An ordered push consumer with no client-side pending limits, and the messages kept
    as they arrive: nats-py's per-message iteration costs several times more, which
    matters at hundreds of thousands of messages.
    """
    raw: list[Msg] = []

    async def take(msg: Msg) -> None:
        raw.append(msg)

    config = None
    if start_seq is not None:
        deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config = ConsumerConfig(deliver_policy=deliver_policy, opt_start_seq=start_seq)
    sub = await js.subscribe(
        subject,
        stream=stream,
        cb=take,
        ordered_consumer=True,
        deliver_policy=None if config else deliver_policy,
        config=config,
        pending_msgs_limit=0,
        pending_bytes_limit=0,
    )
    try:
        if not raw:
            info = await sub.consumer_info()
            # The consumer sequence counts deliveries (the stream sequence starts at the
            # start sequence, delivered or not).
            delivered = info.delivered.consumer_seq if info.delivered else 0
            if not raw and not info.num_pending and not delivered:
                return raw  # nothing to read
        # Done when the newest message says nothing is pending; checked by polling, as a
        # check per message would cost more than the wait.
        loop = asyncio.get_running_loop()
        seen, since = 0, loop.time()
        while not raw or reply_pending(raw[-1].reply):
            await asyncio.sleep(0.02)
            if len(raw) != seen:
                seen, since = len(raw), loop.time()
            elif loop.time() - since > stall:
                raise StalledRead(f"{stream}: nothing received for {stall:.0f}s before the end")
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return raw


class TokenFile:
    """The token of CEDAR_NATS_TOKEN_FILE, sent at every connect and reconnect.

    The kubelet rotates a projected ServiceAccount token in place, well before it expires,
    and the auth callout grants a connection no longer than its token lives: the Bus
    checks the file every TOKEN_CHECK_SECONDS and, when it holds a new token, reconnects so
    that the server authorizes it with that one. When a later read fails the last token is
    sent (the kubelet swaps the file atomically, so this passes); the first must succeed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._value = ""

    def read(self) -> str:
        """The token now; OSError (with the path) when there is none to send."""
        try:
            value = self.path.read_text().strip()
        except OSError as err:
            if self._value:
                log.warning("cannot read %s (%s); sending the last token", self.path, err)
                return self._value
            raise OSError(f"cannot read the NATS token file {self.path}: {err}") from err
        if not value:
            if self._value:
                return self._value
            raise OSError(f"the NATS token file {self.path} is empty")
        self._value = value
        return value

    __call__ = read

    def rotated(self) -> bool:
        """Whether the file now holds another token than the one last sent."""
        try:
            value = self.path.read_text().strip()
        except OSError:
            return False
        return bool(value) and value != self._value


# How often a token connection looks for a rotated token (the kubelet refreshes a projected
# token at 80% of its life, so a 1 h token leaves 12 minutes).
TOKEN_CHECK_SECONDS = 30.0


class Bus:
    """A NATS connection with JetStream that reconnects forever.

    `connect()` returns once connected (retrying with backoff) or when `stop` is set.
    Readiness check `nats` follows the connection state.
    """

    def __init__(self, settings: CommonSettings, name: str, health: Health) -> None:
        self.settings = settings
        self.name = name
        self.health = health
        health.require("nats")
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self.connected_event = asyncio.Event()
        self._closing = False
        token_file = settings.nats_token_file
        self._token = TokenFile(token_file) if token_file is not None else None
        self.token_check_interval = TOKEN_CHECK_SECONDS
        self._token_task: asyncio.Task[None] | None = None

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("NATS is not connected yet")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("NATS is not connected yet")
        return self._js

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def _set_state(self, up: bool, reason: str = "") -> None:
        NATS_CONNECTED.set(1 if up else 0)
        self.health.set("nats", up, reason)
        if up:
            self.connected_event.set()
        else:
            self.connected_event.clear()

    async def _disconnected(self) -> None:
        if self._closing:  # our own shutdown, not an outage
            return
        log.warning("NATS connection lost; reconnecting", extra={"servers": self.settings.nats_url})
        self._set_state(False, "disconnected")

    async def _reconnected(self) -> None:
        log.info("NATS connection restored")
        self._set_state(True)

    async def _error(self, err: Exception) -> None:
        # A refused publish or subscribe is a deployment error an operator must see.
        if "permissions violation" in str(err).lower():
            log.warning("NATS refused an operation: %s — check this service's NATS user", err)
        else:
            log.debug("NATS client error: %s", err)

    @property
    def inbox_prefix(self) -> str:
        """`_INBOX.<service>`: this service's replies and deliveries arrive under a prefix
        of its own, and deploy/nats/accounts.conf lets each user subscribe to its own only,
        so no service can read another's replies. The service is the connection name
        without the pod name (`cedar-watcher-<pod>` -> `_INBOX.cedar-watcher`)."""
        pod = self.settings.pod_name
        service = self.name.removesuffix(f"-{pod}") if pod else self.name
        return "_INBOX." + "".join("_" if c in ". *>\t" else c for c in service)

    async def connect(self, stop: asyncio.Event | None = None) -> bool:
        backoff = Backoff(base=0.2, cap=10.0)
        password = self.settings.nats_password
        # A token file replaces the user and password (nats-py would send those first).
        user = None if self._token else self.settings.nats_user
        secret = password.get_secret_value() if password and not self._token else None
        while stop is None or not stop.is_set():
            if self._token is not None:
                try:
                    self._token.read()  # a missing token fails here, with its path
                except OSError as err:
                    delay = backoff.next_delay()
                    log.warning("%s; retrying in %.1fs — check CEDAR_NATS_TOKEN_FILE", err, delay)
                    self._set_state(False, "no NATS token")
                    await self._pause(stop, delay)
                    continue
            try:
                self._nc = await nats.connect(
                    servers=self.settings.nats_servers,
                    name=self.name,
                    inbox_prefix=self.inbox_prefix,
                    user=user,
                    password=secret,
                    token=self._token,
                    connect_timeout=2,
                    reconnect_time_wait=1,
                    max_reconnect_attempts=-1,
                    allow_reconnect=True,
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected,
                    error_cb=self._error,
                    closed_cb=self._closed if self._token is not None else None,
                )
            except (NatsError, OSError, TimeoutError) as err:
                delay = backoff.next_delay()
                log.warning(
                    "cannot reach NATS at %s (%s); retrying in %.1fs — check CEDAR_NATS_URL",
                    self.settings.nats_url,
                    err.__class__.__name__,
                    delay,
                )
                self._set_state(False, f"cannot connect: {err.__class__.__name__}")
                await self._pause(stop, delay)
                continue
            self._js = self._nc.jetstream(timeout=5)
            self._set_state(True)
            log.info("connected to NATS", extra={"server": str(self._nc.connected_url)})
            if self._token is not None and self._token_task is None:
                self._token_task = asyncio.create_task(self._follow_token(), name="nats-token")
            return True
        return False

    async def _follow_token(self) -> None:
        """Reconnect when the token file holds a new token (see TokenFile)."""
        assert self._token is not None
        while not self._closing:
            await asyncio.sleep(self.token_check_interval)
            nc = self._nc
            if nc is not None and nc.is_connected and self._token.rotated():
                log.info("the NATS token was rotated; reconnecting to be authorized with it")
                await nc.force_reconnect()

    async def _closed(self) -> None:
        # nats-py gives up (closes) on an -ERR such as "User Authentication Expired": the
        # grant of a token it did not renew in time. Only a restart connects again.
        if self._closing:
            return
        log.error(
            "NATS closed the connection (the grant for the token expired, or it was refused)"
            "; failing /healthz so that the service is restarted — check CEDAR_NATS_TOKEN_FILE"
        )
        self._set_state(False, "closed by the server")
        self.health.alive = False

    @staticmethod
    async def _pause(stop: asyncio.Event | None, delay: float) -> None:
        if stop is None:
            await asyncio.sleep(delay)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def ensure(
        self,
        streams: Iterable[StreamConfig] = (),
        buckets: Iterable[KeyValueConfig] = (),
        *,
        update: bool = True,
    ) -> dict[str, KeyValue]:
        """Create (and, with `update`, reconfigure) streams and buckets.

        Retried while NATS is unreachable. Pass `update=False` for streams this service
        reads but does not own.
        """
        streams, buckets = list(streams), list(buckets)

        async def once() -> dict[str, KeyValue]:
            await ensure_streams(self.js, streams, update=update)
            return {b.bucket: await ensure_kv(self.js, b) for b in buckets}

        return await self._retrying(once)

    async def ensure_object_store(self, config: ObjectStoreConfig) -> ObjectStore:
        """Create the object store bucket if it is missing; retried like `ensure`."""

        return await self._retrying(lambda: ensure_object_store(self.js, config))

    async def _retrying(self, fn: Callable[[], Awaitable[T]]) -> T:
        backoff = Backoff(base=0.2, cap=5.0)
        while True:
            try:
                return await fn()
            except TRANSIENT_ERRORS as err:
                delay = backoff.next_delay()
                log.warning("cannot set up JetStream yet (%s); retrying in %.1fs", err, delay)
                await asyncio.sleep(delay)

    async def close(self) -> None:
        """Drain (deliver what is buffered) and close; never raises, even mid-reconnect."""
        self._closing = True
        if self._token_task is not None:
            self._token_task.cancel()
        nc = self._nc
        if nc is not None and not nc.is_closed:
            try:
                await nc.drain()
            except (NatsError, TimeoutError, OSError):
                # Between reconnects there is nothing to drain to.
                with contextlib.suppress(NatsError, TimeoutError, OSError):
                    await nc.close()
        self._set_state(False, "closed")
