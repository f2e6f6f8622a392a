"""What feeds this node's desired set: the workloads' image sets from NATS, and the node.

I/O: an ordered consumer of stream CEDAR_WORKLOADS from its first message (or, for a
dry-run replay, `--from-subject`: the stream `cedar replay --to` keeps, else a plain core
NATS subscription), through cedar.runtime.bus. After a restart the desired set is simply
rebuilt from the stream; the initial pass is done once the consumer has nothing pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from cedar.proto import subjects
from cedar.proto.models import WorkloadImageSet
from cedar.proto.scheduling import NodeInfo
from cedar.puller import metrics
from cedar.puller.desired import Change, DesiredSet
from cedar.runtime.bus import Bus, BusError, bus_errors
from cedar.runtime.health import Health
from cedar.runtime.sourcing import wait_for_copies

log = logging.getLogger("cedar.puller")

# Two missed heartbeats make an ordered consumer re-create itself (after a NATS restart,
# say); 2 s keeps that gap near 4 s at a negligible message rate.
_IDLE_HEARTBEAT = 2.0
# At most, at each (re)subscription, for CEDAR_WORKLOADS to catch up with the history.
_CATCH_UP_WAIT = 10.0


class DesiredFeed:
    def __init__(
        self,
        *,
        bus: Bus,
        desired: DesiredSet,
        health: Health,
        on_change: Callable[[Change], None],
        synced: asyncio.Event,
        dirty: asyncio.Event,
        from_subject: str | None,
    ) -> None:
        self.bus = bus
        self.desired = desired
        self.health = health
        self.on_change = on_change
        self.synced = synced  # set once the initial pass over the workloads is done
        self.dirty = dirty
        self.from_subject = from_subject
        self._subscription: Subscription | None = None
        self._last_seq = 0

    def node_changed(self, node: NodeInfo) -> None:
        """The node's labels or taints changed: every workload is evaluated again."""
        self.health.set("node", True)
        self.on_change(self.desired.set_node(node))
        self.dirty.set()

    async def subscribe(self) -> None:
        if self.from_subject:
            await self._subscribe_subject(self.from_subject)
            return
        with bus_errors("follow the workloads"):
            # CEDAR_WORKLOADS copies the history: what is "everything there is" for the
            # initial pass (and the warm-up gate) is what it holds once it has caught up.
            await wait_for_copies(self.bus.js, subjects.STREAM_WORKLOADS, within=_CATCH_UP_WAIT)
            info = await self.bus.js.stream_info(subjects.STREAM_WORKLOADS)
            self._last_seq = info.state.last_seq
            self._subscription = await self.bus.js.subscribe(
                f"{subjects.WORKLOADS_PREFIX}.>",
                stream=subjects.STREAM_WORKLOADS,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
                idle_heartbeat=_IDLE_HEARTBEAT,
                cb=self._on_message,
            )
        if info.state.messages == 0:
            self._initial_pass_done()

    async def _subscribe_subject(self, subject: str) -> None:
        with bus_errors(f"subscribe to {subject}"):
            try:
                # `cedar replay --to` keeps what it re-publishes in a stream, so a puller
                # started after the replay still sees every message from the start.
                self._subscription = await self.bus.js.subscribe(
                    subject,
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.ALL,
                    idle_heartbeat=_IDLE_HEARTBEAT,
                    cb=self._on_message,
                )
            except NotFoundError:
                self._subscription = await self.bus.nc.subscribe(subject, cb=self._on_message)
        log.info("taking workloads from a subject", extra={"subject": subject})
        self._initial_pass_done()

    async def close(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(BusError), bus_errors("unsubscribe from the workloads"):
                await self._subscription.unsubscribe()

    async def _on_message(self, msg: Msg) -> None:
        original = (msg.headers or {}).get(subjects.ORIGINAL_SUBJECT_HEADER)
        if original is not None and not original.startswith(subjects.WORKLOADS_PREFIX + "."):
            return  # a replay carries decisions and namespace events too
        try:
            wis = WorkloadImageSet.model_validate_json(msg.data)
        except ValidationError as err:
            metrics.BAD_MESSAGES.inc()
            log.warning(
                "ignoring a message that is not a WorkloadImageSet v1",
                extra={"subject": msg.subject, "errors": err.error_count()},
            )
            wis = None
        if wis is not None:
            self.on_change(self.desired.apply(wis, datetime.now(UTC)))
        if not self.synced.is_set():
            pending = 0
            # A core NATS message (a plain subject) has no JetStream metadata.
            with contextlib.suppress(Exception):
                pending = msg.metadata.num_pending
                if msg.metadata.sequence.stream >= self._last_seq:
                    pending = 0
            if pending == 0:
                self._initial_pass_done()

    def _initial_pass_done(self) -> None:
        if not self.synced.is_set():
            log.info(
                "desired state loaded from NATS", extra={"workloads": self.desired.workload_count}
            )
            self.synced.set()
            self.health.set("desired", True)
            self.dirty.set()
