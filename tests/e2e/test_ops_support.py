"""Helpers for the operator-command tests: realistic contract messages on a real NATS server.

No tests here; the test_ops_* modules import these.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import nats
from nats.js import JetStreamContext

from cedar.proto import subjects
from cedar.proto.models import (
    ContainerImage,
    McsAuditRecord,
    NamespaceEvent,
    NodeImageStatus,
    OwnerRef,
    PodScheduling,
    PullerDecision,
    WorkloadImageSet,
)
from cedar.runtime.bus import (
    ensure_kv,
    ensure_stream,
)
from cedar.runtime.settings import CommonSettings
from cedar.runtime.topology import mcs_ledger_bucket, node_status_bucket, service_streams

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    """A JetStream context with Cedar's streams and buckets created, as the services do."""
    settings = CommonSettings(nats_url=url)
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    for stream in service_streams(settings):
        await ensure_stream(js, stream)
    for bucket in (node_status_bucket(settings), mcs_ledger_bucket(settings)):
        await ensure_kv(js, bucket)
    try:
        yield js
    finally:
        await nc.drain()


def now() -> datetime:
    return datetime.now(UTC)


def workload(
    kind: str,
    namespace: str,
    name: str,
    images: dict[str, str],
    *,
    owner: tuple[str, str] | None = None,
    replicas: int | None = 1,
    scheduling: PodScheduling | None = None,
    deleted: bool = False,
    expires_at: datetime | None = None,
) -> WorkloadImageSet:
    from cedar.proto.imageref import normalize

    return WorkloadImageSet(
        kind=kind,
        namespace=namespace,
        name=name,
        uid=f"uid-{kind}-{namespace}-{name}",
        owner=OwnerRef(kind=owner[0], name=owner[1], uid=f"uid-{owner[1]}") if owner else None,
        containers=()
        if deleted
        else tuple(
            ContainerImage(container=c, image=img, reference=normalize(img))
            for c, img in images.items()
        ),
        scheduling=scheduling or PodScheduling(),
        replicas=replicas,
        resource_version="1",
        observed_at=now(),
        deleted=deleted,
        expires_at=expires_at,
    )


async def publish_workload(js: JetStreamContext, wis: WorkloadImageSet) -> None:
    await js.publish(
        subjects.workload_subject(wis.kind, wis.namespace, wis.name),
        wis.model_dump_json().encode(),
    )


async def publish_namespace(js: JetStreamContext, name: str) -> None:
    event = NamespaceEvent(name=name, uid=f"uid-ns-{name}", phase="Active", observed_at=now())
    await js.publish(subjects.namespace_subject(name), event.model_dump_json().encode())


async def publish_decision(
    js: JetStreamContext,
    node: str,
    image: str,
    action: str,
    *,
    reason: str = "",
    workloads: tuple[str, ...] = (),
    digest: str | None = None,
) -> PullerDecision:
    decision = PullerDecision.model_validate(
        {
            "node": node,
            "image": image,
            "action": action,
            "reason": reason,
            "workloads": workloads,
            "digest": digest,
            "at": now(),
        }
    )
    await js.publish(subjects.decisions_subject(node), decision.model_dump_json().encode())
    return decision


async def publish_audit(
    js: JetStreamContext, action: str, namespace: str, level: str | None
) -> None:
    record = McsAuditRecord.model_validate(
        {
            "action": action,
            "namespace": namespace,
            "namespace_uid": f"uid-ns-{namespace}",
            "level": level,
            "replica": "mcs-allocator-0",
            "at": now(),
        }
    )
    await js.publish(subjects.audit_subject(action), record.model_dump_json().encode())


async def put_status(
    js: JetStreamContext,
    node: str,
    image: str,
    state: str,
    *,
    reason: str | None = None,
    error: str | None = None,
    workloads: tuple[str, ...] = (),
    digest: str | None = None,
) -> None:
    kv = await js.key_value(subjects.KV_NODE_STATUS)
    status = NodeImageStatus.model_validate(
        {
            "node": node,
            "image": image,
            "state": state,
            "reason": reason,
            "error": error,
            "workloads": workloads,
            "digest": digest,
            "updated_at": now(),
        }
    )
    await kv.put(subjects.node_status_key(node, image), status.model_dump_json().encode())


async def wait_history(js: JetStreamContext, count: int, within: float = 15.0) -> None:
    """Sourced messages reach CEDAR_HISTORY asynchronously; wait until `count` are there."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        info = await js.stream_info(subjects.STREAM_HISTORY)
        if info.state.messages >= count:
            return
        if loop.time() > deadline:
            raise AssertionError(f"history holds {info.state.messages} messages, not {count}")
        await asyncio.sleep(0.05)


async def cedar(
    *args: str, env: dict[str, str] | None = None, within: float = 120.0
) -> tuple[int, str, str]:
    """Run the real `cedar` command line; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cedar.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=REPO_ROOT,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
