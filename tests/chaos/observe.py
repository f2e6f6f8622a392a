"""What the fault suite watches while it runs, and reads back at the end.

- `BusTap`: one plain NATS subscriber on `>` per server (each stays on its own server), so
  that every message any client publishes to any running server is seen, whatever the
  routes do. Every byte is kept, for the credential scan and for what the watcher sent.
- `AnnotationLog`: a list + watch of Namespaces against the (simulated) API, recording every
  value the level annotation took, to prove each namespace was labelled exactly once.
- Readers of the end state: the ledger, the node-status bucket, the streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cedar.proto import subjects
from cedar.runtime.kube import Gone, KubeClient, KubeError, load_config, resource_path
from cedar.runtime.topology import kv_stream, kv_subject

ANNOTATION = "cedar.io/selinux-level"


@dataclass(frozen=True, slots=True)
class Seen:
    subject: str
    reply: str
    headers: tuple[tuple[str, str], ...]
    data: bytes

    @property
    def delivered(self) -> bool:
        """A JetStream delivery of a stored message (to a consumer), not a publish."""
        return self.reply.startswith("$JS.ACK.")

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class BusTap:
    """A `>` subscriber on each server of a cluster, reconnecting to that server only
    (the sandbox cluster does not tell clients about other servers: `no_advertise`)."""

    def __init__(self, urls: Iterable[str]) -> None:
        self.urls = list(urls)
        self.clients: list[NatsClient] = []
        self.seen: list[Seen] = []

    async def start(self) -> BusTap:
        for url in self.urls:

            async def on_msg(msg: Msg) -> None:
                headers = tuple(sorted((msg.headers or {}).items()))
                self.seen.append(Seen(msg.subject, msg.reply or "", headers, bytes(msg.data)))

            nc = await nats.connect(
                servers=[url],
                name="chaos-tap",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.2,
                connect_timeout=2,
                dont_randomize=True,
            )
            await nc.subscribe(">", cb=on_msg, pending_msgs_limit=0, pending_bytes_limit=0)
            self.clients.append(nc)
        return self

    async def close(self) -> None:
        for nc in self.clients:
            with contextlib.suppress(Exception):
                await nc.close()

    def every_byte(self) -> bytes:
        """Subjects, headers and payloads of every message seen, for a credential scan."""
        parts: list[bytes] = []
        for seen in self.seen:
            parts.append(seen.subject.encode())
            for key, value in seen.headers:
                parts.append(f"{key}: {value}".encode())
            parts.append(seen.data)
        return b"\n".join(parts)

    def published_by_watcher(self) -> dict[str, dict[str, float]]:
        """subject -> {Nats-Msg-Id: observed_at} of what the watcher published."""
        found: dict[str, dict[str, float]] = {}
        for seen in self.seen:
            if not seen.subject.startswith(
                (subjects.WORKLOADS_PREFIX + ".", subjects.NAMESPACES_PREFIX + ".")
            ):
                continue
            msg_id = seen.header("Nats-Msg-Id")
            if msg_id is None or seen.delivered or seen.header("Nats-Stream-Source"):
                continue
            found.setdefault(seen.subject, {})[msg_id] = observed_at(seen.data)
        return found


def observed_at(data: bytes) -> float:
    """The watcher's `observed_at` of a message body, as a Unix time (0 if unreadable)."""
    from datetime import datetime

    try:
        value = json.loads(data).get("observed_at")
        return datetime.fromisoformat(value).timestamp() if isinstance(value, str) else 0.0
    except (ValueError, AttributeError):
        return 0.0


@dataclass
class AnnotationLog:
    """Every value the level annotation of each namespace took, in order."""

    kubeconfig: Path
    values: dict[str, list[str | None]] = field(default_factory=dict)
    uids: dict[str, str] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    relists: int = 0

    def start(self) -> AnnotationLog:
        self.task = asyncio.create_task(self._run(), name="annotation-log")
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def _note(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name"))
        self.uids[name] = str(meta.get("uid"))
        value = (meta.get("annotations") or {}).get(ANNOTATION)
        history = self.values.setdefault(name, [])
        if not history or history[-1] != value:
            history.append(value)

    async def _run(self) -> None:
        client = KubeClient(load_config(str(self.kubeconfig)))
        path = resource_path("Namespace")
        try:
            while True:
                try:
                    rv = ""
                    self.relists += 1
                    async for items, list_rv in client.list_pages(path):
                        rv = list_rv
                        for item in items:
                            self._note(item)
                    while True:
                        async for event in client.watch(path, rv, timeout_seconds=60):
                            obj = event.get("object") or {}
                            rv = str((obj.get("metadata") or {}).get("resourceVersion", rv))
                            if event.get("type") in ("ADDED", "MODIFIED"):
                                self._note(obj)
                except Gone:
                    continue
                except KubeError:
                    await asyncio.sleep(0.2)
        finally:
            await client.close()

    def relabelled(self) -> dict[str, list[str | None]]:
        """Namespaces whose annotation took more than one value, or lost it again."""
        out = {}
        for name, history in self.values.items():
            labels = [v for v in history if v is not None]
            if len(labels) > 1 or (labels and history[-1] is None):
                out[name] = history
        return out


async def read_last_per_subject(
    js: JetStreamContext, stream: str, filter_subject: str
) -> dict[str, Msg]:
    """The last message of every subject of a stream, by an ephemeral pull consumer."""
    sub = await js.pull_subscribe(
        filter_subject,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
        ),
    )
    out: dict[str, Msg] = {}
    try:
        pending = (await sub.consumer_info()).num_pending
        while pending > 0:
            for msg in await sub.fetch(batch=min(pending, 500), timeout=10):
                pending -= 1
                out[msg.subject] = msg
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


async def read_all(js: JetStreamContext, stream: str, filter_subject: str = ">") -> list[Msg]:
    """Every message of a stream, in order."""
    sub = await js.pull_subscribe(
        filter_subject,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
        ),
    )
    out: list[Msg] = []
    try:
        pending = (await sub.consumer_info()).num_pending
        while pending > 0:
            batch = await sub.fetch(batch=min(pending, 500), timeout=10)
            pending -= len(batch)
            out += batch
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


async def read_bucket(js: JetStreamContext, bucket: str) -> dict[str, bytes]:
    """Every live key of a KV bucket with its value."""
    prefix = kv_subject(bucket)
    found = await read_last_per_subject(js, kv_stream(bucket), prefix + ">")
    values: dict[str, bytes] = {}
    for subject, msg in found.items():
        operation = (msg.headers or {}).get("KV-Operation")
        if operation in ("DEL", "PURGE") or "Nats-Marker-Reason" in (msg.headers or {}):
            continue
        values[subject[len(prefix) :]] = bytes(msg.data)
    return values


@dataclass(frozen=True)
class HistoryCheck:
    """Whether CEDAR_HISTORY kept every message it stored, and whether the last-value
    streams hold, for each subject, the history's last message of it (their source)."""

    last_seq: int
    missing: list[int]  # sequences of the history no longer in it
    stale: list[str]  # subjects whose last value is not the history's last message

    @property
    def lost(self) -> int:
        return len(self.missing)


def source_seq(msg: Msg) -> int | None:
    """The history sequence a sourced copy came from (`Nats-Stream-Source`:
    `<origin> <seq> ...`), or None when it was not copied from CEDAR_HISTORY."""
    parts = (msg.headers or {}).get("Nats-Stream-Source", "").split()
    if len(parts) >= 2 and parts[0] == subjects.STREAM_HISTORY:
        return int(parts[1])
    return None


def check_history(history: list[Msg], last_seq: int, last_values: dict[str, Msg]) -> HistoryCheck:
    """Compare the history's sequences with 1..last_seq (nothing expires during a run),
    and `last_values` (CEDAR_WORKLOADS and CEDAR_NAMESPACES, last per subject) with the
    history's last message of each workload and namespace subject."""
    held = {msg.metadata.sequence.stream for msg in history}
    missing = [seq for seq in range(1, last_seq + 1) if seq not in held]
    newest: dict[str, int] = {}
    for msg in history:
        if msg.subject.startswith(
            (subjects.WORKLOADS_PREFIX + ".", subjects.NAMESPACES_PREFIX + ".")
        ):
            newest[msg.subject] = msg.metadata.sequence.stream
    stale = []
    for subject in sorted(newest.keys() | last_values.keys()):
        copied = last_values.get(subject)
        came_from = source_seq(copied) if copied is not None else None
        if came_from != newest.get(subject):
            stale.append(f"{subject}: history {newest.get(subject)}, last value {came_from}")
    return HistoryCheck(last_seq, missing, stale)
