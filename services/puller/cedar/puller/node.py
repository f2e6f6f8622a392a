"""This node's labels and taints: read from its Node object and followed with a watch.

I/O: the Kubernetes API (get and watch of this one Node) through cedar.runtime.kube.
When `CEDAR_NODE_FROM_API` is false, or no Kubernetes configuration is available (a
sandbox, a test), they come from `CEDAR_NODE_LABELS` / `CEDAR_NODE_TAINTS` instead, with the
local `kubernetes.io/os` and `kubernetes.io/arch` unless those are given. The Node's
`status.nodeInfo.containerRuntimeVersion` (`containerd://1.7.2`) is kept for choosing the
engine (runtime_choice.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from cedar.proto.scheduling import NodeInfo, node_from_object, static_node
from cedar.puller.settings import PullerSettings
from cedar.runtime.backoff import Backoff
from cedar.runtime.kube import Gone, KubeClient, KubeError, load_config, resource_path

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
                delay = backoff.next_delay()
                log.warning(
                    "cannot read this node's Node object; retrying",
                    extra={"status": err.status, "error": err.message, "retry_in": delay},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
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
        rv = resource_version
        params = {"fieldSelector": f"metadata.name={self.settings.node}"}
        while not stop.is_set():
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
                    obj = event.get("object") or {}
                    meta = obj.get("metadata") or {}
                    rv = str(meta.get("resourceVersion", rv))
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._publish(node_from_object(obj), on_change)
                    backoff.reset()
                    if stop.is_set():
                        return
            except Gone:
                rv = ""
            except KubeError as err:
                delay = backoff.next_delay()
                log.warning(
                    "node watch failed; retrying",
                    extra={"status": err.status, "error": err.message, "retry_in": delay},
                )
                rv = ""
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
