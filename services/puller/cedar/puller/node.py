"""This node's labels and taints: read from its Node object and followed with a watch.

I/O: the Kubernetes API (get and watch of this one Node) through cedar.runtime.kube.
When `CEDAR_NODE_FROM_API` is false, or no Kubernetes configuration is available (a
sandbox, a test), they come from `CEDAR_NODE_LABELS` / `CEDAR_NODE_TAINTS` instead, with the
local `kubernetes.io/os` and `kubernetes.io/arch` unless those are given. The Node's
`status.nodeInfo.containerRuntimeVersion` (`containerd://1.7.2`) is kept for choosing the
engine (runtime_choice.py). API failures back off with jitter, never sooner than the
server's Retry-After; a first 410 reads the Node again at once, 410 after 410 with nothing
in between backs off; a watch that sent nothing for the client's idle timeout is renewed
from where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from cedar.proto.scheduling import NodeInfo, node_from_object, static_node
from cedar.puller.settings import PullerSettings
from cedar.runtime.backoff import Backoff, after
from cedar.runtime.kube import (
    Gone,
    KubeClient,
    KubeError,
    Stalled,
    Unavailable,
    load_config,
    resource_path,
)

log = logging.getLogger("cedar.puller.node")


class NodeSource:
    def __init__(self, settings: PullerSettings) -> None:
        self.settings = settings
        self.client: KubeClient | None = None
        self.current: NodeInfo | None = None
        self.runtime_version: str | None = None  # status.nodeInfo.containerRuntimeVersion
        name = settings.node
        self._static = static_node(name, settings.node_labels, settings.node_taints)
        if settings.node_from_api:
            try:
                self.client = KubeClient(load_config(settings.kubeconfig))
            except Exception as err:
                log.warning(
                    "no Kubernetes configuration; using CEDAR_NODE_LABELS/CEDAR_NODE_TAINTS",
                    extra={"error": str(err)},
                )

    @property
    def from_api(self) -> bool:
        return self.client is not None

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    def _publish(self, node: NodeInfo, on_change: Callable[[NodeInfo], None]) -> None:
        if node != self.current:
            log.info(
                "node labels or taints changed",
                extra={"labels": dict(node.labels), "taints": [t.key for t in node.taints]},
            )
            self.current = node
            on_change(node)

    async def initial(self, stop: asyncio.Event) -> tuple[NodeInfo, str] | None:
        """The node as it is now, and the resourceVersion to watch from; None if stopped."""
        fetched = await self._fetch(stop)
        if fetched is not None:
            self.current = fetched[0]
        return fetched

    async def _fetch(self, stop: asyncio.Event) -> tuple[NodeInfo, str] | None:
        if self.client is None:
            return self._static, ""
        backoff = Backoff(base=0.5, cap=15.0)
        path = resource_path("Node", name=self.settings.node)
        while not stop.is_set():
            try:
                obj = await self.client.get(path)
            except KubeError as err:
                delay = _retry_delay(backoff, err)
                log.warning(
                    "cannot read this node's Node object; retrying",
                    extra={"status": err.status, "error": err.message, "retry_in": delay},
                )
                await _sleep_or_stop(stop, delay)
                continue
            rv = str((obj.get("metadata") or {}).get("resourceVersion", ""))
            info = (obj.get("status") or {}).get("nodeInfo") or {}
            reported = info.get("containerRuntimeVersion") if isinstance(info, dict) else None
            self.runtime_version = str(reported) if reported else None
            return node_from_object(obj), rv
        return None

    async def follow(
        self, stop: asyncio.Event, resource_version: str, on_change: Callable[[NodeInfo], None]
    ) -> None:
        """Keep `current` up to date until `stop`, calling `on_change` with each change."""
        if self.client is None:
            return
        client = self.client
        backoff = Backoff(base=0.5, cap=15.0)
        expired = Backoff(base=2.0, cap=30.0, floor=0.5)
        expired_in_a_row = 0
        rv = resource_version
        params = {"fieldSelector": f"metadata.name={self.settings.node}"}
        while not stop.is_set():
            delivered = False
            try:
                if not rv:
                    fetched = await self._fetch(stop)
                    if fetched is None:
                        return
                    node, rv = fetched
                    self._publish(node, on_change)
                async for event in client.watch(
                    resource_path("Node"), rv, timeout_seconds=300, params=params
                ):
                    delivered = True
                    obj = event.get("object") or {}
                    meta = obj.get("metadata") or {}
                    rv = str(meta.get("resourceVersion", rv))
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._publish(node_from_object(obj), on_change)
                    backoff.reset()
                    if stop.is_set():
                        return
                if delivered:
                    expired_in_a_row = 0
                    expired.reset()
            except Stalled as err:
                log.warning(
                    "node watch sent nothing for too long; watching again",
                    extra={"error": err.message},
                )
            except Gone:
                rv = ""
                if delivered:
                    expired_in_a_row = 0
                    expired.reset()
                expired_in_a_row += 1
                if expired_in_a_row > 1:
                    await _sleep_or_stop(stop, expired.next_delay())
            except KubeError as err:
                delay = _retry_delay(backoff, err)
                log.warning(
                    "node watch failed; retrying",
                    extra={"status": err.status, "error": err.message, "retry_in": delay},
                )
                rv = ""
                await _sleep_or_stop(stop, delay)


def _retry_delay(backoff: Backoff, err: KubeError) -> float:
    """The next wait: the backoff's, but never sooner than the server's Retry-After."""
    return after(backoff.next_delay(), err.retry_after if isinstance(err, Unavailable) else None)


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
