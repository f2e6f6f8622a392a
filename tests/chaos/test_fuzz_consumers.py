"""Arbitrary bytes and wrong schema versions on every subject Cedar consumes, published by a
client allowed to publish there, against the real consumers on a real nats-server with
deploy/nats/accounts.conf.

The services run as processes with their own NATS users: the watcher, a puller (its feed:
CEDAR_WORKLOADS) and the allocator (its intake: the durable on CEDAR_NAMESPACES; its ledger
bucket and snapshot). Hypothesis draws batches of hostile bodies; each batch goes out on
the subjects a compromised or buggy holder of that permission could write, followed by one
valid message. Every consumer must skip the bad ones (and say so in its log), stay up, and
go on to handle the valid one: no crash, no stall. The operator commands that read the
rest (`cedar status`: node status and ledger; `cedar replay`: decisions and audit) must
still answer. No service may be refused anything by NATS on the way.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient

from cedar.ops import natsio
from cedar.proto import subjects
from cedar.proto.models import ContainerImage, WorkloadImageSet
from cedar.sandbox.dockerd import DockerEngine
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.procs import free_port
from tests.chaos import churn
from tests.chaos.fleet import Fleet, ServiceProc
from tests.deploy.nats_accounts import INBOX, USERS, AccountsServer, password
from tests.harness.nats_server import start_or_fail

NODE = "node-fuzz"
ANN = "cedar.io/selinux-level"
DEEP = b"[" * 20_000 + b"]" * 20_000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


def _wrong_version(body: dict[str, Any]) -> st.SearchStrategy[bytes]:
    return st.sampled_from([0, 2, "1", None, 1.5]).map(
        lambda v: json.dumps({**body, "schema_version": v}).encode()
    )


WIS = {
    "kind": "Deployment",
    "namespace": "t",
    "name": "w",
    "uid": "u",
    "observed_at": "2026-01-01T00:00:00Z",
}
NSE = {"name": "t", "uid": "u", "observed_at": "2026-01-01T00:00:00Z"}
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    _wrong_version(WIS),
    _wrong_version(NSE),
    st.sampled_from([DEEP, b"", b"null", b"\xff\xfe", b"{" * 50, b"x" * 900_000]),
)
tokens = st.sampled_from(["Deployment.t.w", "ReplicaSet.t.w-1", "Prepull.t.r", "x.y.z", "a"])


@dataclass
class World:
    server: AccountsServer
    kube: KubeAPI
    fleet: Fleet
    clients: dict[str, NatsClient]
    log_dir: Path
    sentinels: int = 0

    def proc(self, name: str) -> ServiceProc:
        return self.fleet.procs[name]


async def _connect(server: AccountsServer, user: str) -> NatsClient:
    async def ignore(_: Exception) -> None:
        return None

    return await nats.connect(
        server.url,
        user=user,
        password=password(user),
        inbox_prefix=INBOX[user],
        error_cb=ignore,
        name=f"fuzz-{user}",
    )


@pytest.fixture(scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, docker_engine: DockerEngine
) -> AsyncIterator[World]:
    root = tmp_path_factory.mktemp("fuzz-consumers")
    server = start_or_fail(AccountsServer(root / "store", port=free_port(), server_name="fuzz"))
    kube = KubeAPI(bookmark_interval=1.0).start()
    kubeconfig = kube.write_kubeconfig(root / "kubeconfig")
    kube.create(churn.node(NODE, "a"))
    kube.create(churn.namespace("seed"))
    (root / "services").mkdir()
    fleet = Fleet(root / "services", nats_url=server.url, kubeconfig=kubeconfig, replicas=1)
    creds = {u: {"CEDAR_NATS_USER": u, "CEDAR_NATS_PASSWORD": password(u)} for u in USERS}
    fleet.watcher(**creds["watcher"])
    fleet.allocator("allocator", **creds["mcs-allocator"])
    fleet.puller(NODE, docker_engine.host, root / "no-auth-file", **creds["puller"])
    clients: dict[str, NatsClient] = {}
    try:
        fleet.start()
        for _ in range(600):
            if fleet.all_ready():
                break
            await asyncio.sleep(0.1)
        assert fleet.all_ready(), fleet.logs()
        for user in USERS:
            clients[user] = await _connect(server, user)
        yield World(server, kube, fleet, clients, root)
    finally:
        for nc in clients.values():
            await nc.close()
        await asyncio.to_thread(fleet.stop)
        kube.stop()
        server.stop()


async def _eventually(probe: Any, within: float, what: str, world: World) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}\n{world.fleet.logs()}")
        await asyncio.sleep(0.2)


async def _statuses(js: Any) -> dict[str, str]:
    # As `cedar status` reads it: the ops user reads with ordered push consumers only.
    values = await natsio.read_bucket(js, subjects.KV_NODE_STATUS)
    out = {}
    for raw in values.values():
        try:
            out[json.loads(raw)["image"]] = raw.decode()
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _assert_alive(world: World) -> None:
    assert world.fleet.dead() == [], world.fleet.logs()
    for proc in world.fleet:
        assert proc.unexpected_exits == []


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(st.tuples(tokens, bodies), min_size=10, max_size=25))
async def test_the_pullers_feed_skips_bad_workload_messages_and_goes_on(
    world: World, batch: list[tuple[str, bytes]]
) -> None:
    mark = world.server.mark()
    watcher = world.clients["watcher"].jetstream()
    for token, body in batch:
        await watcher.publish(f"{subjects.WORKLOADS_PREFIX}.{token}", body)
    world.sentinels += 1
    image = f"127.0.0.1:1/fuzz/sentinel-{world.sentinels}:v1"
    wis = WorkloadImageSet(
        kind="Deployment",
        namespace="t",
        name=f"sentinel-{world.sentinels}",
        uid=f"uid-sentinel-{world.sentinels}",
        containers=(ContainerImage(container="c", image=image, reference=image),),
        observed_at=datetime.now(UTC),
    )
    await watcher.publish(
        subjects.workload_subject("Deployment", "t", wis.name), wis.model_dump_json().encode()
    )
    ops = world.clients["ops"].jetstream()
    await _eventually(lambda: _has(ops, image), 20, f"the puller wanting {image}", world)
    _assert_alive(world)
    assert "not a WorkloadImageSet v1" in world.proc(f"puller-{NODE}").log_text()
    assert world.server.refusals(mark) == set()


async def _has(js: Any, image: str) -> bool:
    return image in await _statuses(js)


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    batch=st.lists(
        st.tuples(st.sampled_from(["t", "x", "seed", "a_b"]), bodies), min_size=10, max_size=25
    )
)
async def test_the_allocators_intake_skips_bad_namespace_events_and_goes_on(
    world: World, batch: list[tuple[str, bytes]]
) -> None:
    watcher = world.clients["watcher"].jetstream()
    for name, body in batch:
        await watcher.publish(subjects.namespace_subject(name), body)
    world.sentinels += 1
    name = f"sentinel-{world.sentinels}"
    world.kube.create(churn.namespace(name))

    def labelled() -> bool:
        obj = world.kube.get("namespaces", None, name) or {}
        return bool((obj.get("metadata", {}).get("annotations") or {}).get(ANN))

    await _eventually(labelled, 30, f"{name} labelled", world)
    _assert_alive(world)
    # Nothing bad is redelivered for ever: the durable holds no message unacknowledged.
    js = world.clients["mcs-allocator"].jetstream()

    async def drained() -> bool:
        info = await js.consumer_info(subjects.STREAM_NAMESPACES, subjects.ALLOCATOR_DURABLE)
        return info.num_ack_pending == 0 and info.num_redelivered < 50

    await _eventually(drained, 20, "the allocator's durable drained", world)


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    batch=st.lists(
        st.tuples(
            st.sampled_from(["label.3_4", "label.x", "ns.uid-z", "label.1_2_3", "other"]), bodies
        ),
        min_size=5,
        max_size=15,
    )
)
async def test_damaged_ledger_entries_neither_stop_the_allocator_nor_its_restart(
    world: World, batch: list[tuple[str, bytes]]
) -> None:
    allocator = world.clients["mcs-allocator"].jetstream()
    for key, body in batch:
        await allocator.publish(f"$KV.{subjects.KV_MCS_LEDGER}.{key}", body[:900_000])
    proc = world.proc("allocator")
    proc.kill()
    proc.start()
    world.sentinels += 1
    name = f"sentinel-{world.sentinels}"
    world.kube.create(churn.namespace(name))

    def labelled() -> bool:
        obj = world.kube.get("namespaces", None, name) or {}
        return bool((obj.get("metadata", {}).get("annotations") or {}).get(ANN))

    await _eventually(labelled, 40, f"{name} labelled after a restart", world)
    await asyncio.sleep(1.0)
    _assert_alive(world)


async def test_the_operator_commands_read_damaged_status_decisions_and_audit(
    world: World,
) -> None:
    puller = world.clients["puller"].jetstream()
    allocator = world.clients["mcs-allocator"].jetstream()
    for i, body in enumerate([DEEP, b"\xff", b"{}", b'{"schema_version": 2}', b"null"]):
        await puller.publish(f"$KV.{subjects.KV_NODE_STATUS}.{NODE}.bad{i}", body)
        await puller.publish(subjects.decisions_subject(NODE), body)
        await allocator.publish(subjects.audit_subject("claim"), body)
    env = {
        **world.fleet.common,
        "CEDAR_NATS_USER": "ops",
        "CEDAR_NATS_PASSWORD": password("ops"),
    }
    for args in (["status"], ["status", "--namespaces"], ["replay", "--since", "1h"]):
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "cedar.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, (args, proc.stderr[-3000:])
    _assert_alive(world)


def test_no_service_was_refused_anything(world: World) -> None:
    refused = {
        r for r in world.server.refusals() if r.user in ("watcher", "puller", "mcs-allocator")
    }
    # The fuzzing clients are the services' users too, but publish only where allowed.
    assert refused == set(), sorted(refused)[:20]


async def test_the_puller_counts_the_messages_it_skips(world: World) -> None:
    watcher = world.clients["watcher"].jetstream()
    await watcher.publish(f"{subjects.WORKLOADS_PREFIX}.Deployment.t.counted", b"not json")
    proc = world.proc(f"puller-{NODE}")
    await _eventually(
        lambda: proc.metric("cedar_puller_bad_messages_total") > 0, 10, "counted", world
    )


async def test_the_allocator_counts_the_events_it_refuses(world: World) -> None:
    watcher = world.clients["watcher"].jetstream()
    await watcher.publish(subjects.namespace_subject("counted"), b"not json")
    proc = world.proc("allocator")
    await _eventually(lambda: proc.metric("cedar_mcs_bad_events_total") > 0, 10, "counted", world)
