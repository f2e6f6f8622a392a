"""Least privilege on NATS, proven on a real nats-server with deploy/nats/accounts.conf.

The committed table (nats_permissions.yaml) says, for every subject family Cedar uses —
its message subjects, the JetStream API on each of its streams, buckets and object store,
the allocator's durable consumer, and the inboxes — which users may publish or subscribe.
Each user probes every row; the server's log (which names the refused user) must show
exactly the refusals the table implies: each user can do what it needs and is denied the
rest. And every permission accounts.conf grants must be one the table asks for, so the
config cannot quietly grow.

Replies are private: each service connects with its own inbox prefix, and a user may
subscribe to its own only, so the puller's user cannot read the allocator's replies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from nats.aio.client import Client as NatsClient

from cedar.runtime import topology
from cedar.runtime.bus import ensure_kv
from cedar.runtime.settings import CommonSettings
from cedar.sandbox.procs import free_port
from tests.deploy.nats_accounts import (
    INBOX,
    USERS,
    AccountsServer,
    Refusal,
    conf_permissions,
    password,
    subject_matches,
)
from tests.harness.nats_server import start_or_fail

TABLE = yaml.safe_load((Path(__file__).parent / "nats_permissions.yaml").read_text())

_OPERATION_SUBJECTS = {
    "CONSUMER.CREATE": "$JS.API.CONSUMER.CREATE.{s}",
    "CONSUMER.CREATE.NAMED": "$JS.API.CONSUMER.CREATE.{s}.probe",
    "CONSUMER.DURABLE.CREATE": "$JS.API.CONSUMER.DURABLE.CREATE.{s}.probe",
    "CONSUMER.DELETE": "$JS.API.CONSUMER.DELETE.{s}.probe",
    "CONSUMER.INFO": "$JS.API.CONSUMER.INFO.{s}.probe",
    "CONSUMER.MSG.NEXT": "$JS.API.CONSUMER.MSG.NEXT.{s}.probe",
    "FC": "$JS.FC.{s}.probe",
    "ACK": "$JS.ACK.{s}.probe.1.1.1.1.0",
    "DIRECT.GET.SUBJECT": "$JS.API.DIRECT.GET.{s}.probe.subject",
}
_DURABLE_SUBJECTS = {
    "CONSUMER.CREATE": "$JS.API.CONSUMER.CREATE.{stream}.{name}",
    "CONSUMER.CREATE.FILTERED": "$JS.API.CONSUMER.CREATE.{stream}.{name}.cedar.namespaces.t",
    "CONSUMER.DURABLE.CREATE": "$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{name}",
    "CONSUMER.DELETE": "$JS.API.CONSUMER.DELETE.{stream}.{name}",
    "CONSUMER.INFO": "$JS.API.CONSUMER.INFO.{stream}.{name}",
    "CONSUMER.MSG.NEXT": "$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
    "ACK": "$JS.ACK.{stream}.{name}.1.1.1.1.0",
}


def publish_rows() -> dict[str, frozenset[str]]:
    """Probe subject -> the users the table lets publish to it."""
    rows = {subject: frozenset(users) for subject, users in TABLE["publish"].items()}
    for stream, operations in TABLE["streams"].items():
        for operation, users in operations.items():
            template = _OPERATION_SUBJECTS.get(operation, f"$JS.API.{operation}.{{s}}")
            rows[template.format(s=stream)] = frozenset(users)
    for durable, operations in TABLE["durables"].items():
        stream, name = durable.split(".", 1)
        for operation, users in operations.items():
            rows[_DURABLE_SUBJECTS[operation].format(stream=stream, name=name)] = frozenset(users)
    return rows


def subscribe_rows() -> dict[str, frozenset[str]]:
    return {subject: frozenset(users) for subject, users in TABLE["subscribe"].items()}


def test_the_table_covers_every_stream_and_bucket_cedar_creates() -> None:
    settings = CommonSettings()
    names = {s.name for s in topology.service_streams(settings)}
    names.add(topology.replay_stream(settings).name)
    for bucket in (
        topology.node_status_bucket(settings),
        topology.puller_state_bucket(settings),
        topology.mcs_ledger_bucket(settings),
    ):
        names.add(topology.kv_stream(bucket.bucket))
    names.add(topology.fleet_leases_stream(settings).name)
    names.add(topology.object_stream(topology.mcs_snapshots_bucket(settings).bucket or ""))
    assert set(TABLE["streams"]) == names
    operations = {frozenset(ops) for ops in TABLE["streams"].values()}
    assert len(operations) == 1, "every stream lists the same operations"


def test_accounts_conf_grants_nothing_the_table_does_not_ask_for() -> None:
    publish, subscribe = publish_rows(), subscribe_rows()
    granted = conf_permissions()
    assert set(granted) == set(USERS)
    unused = []
    for user, perms in granted.items():
        for pattern in perms["publish_allow"]:
            if not any(subject_matches(pattern, s) and user in u for s, u in publish.items()):
                unused.append((user, "publish", pattern))
        for pattern in perms["subscribe_allow"]:
            if not any(subject_matches(pattern, s) and user in u for s, u in subscribe.items()):
                unused.append((user, "subscribe", pattern))
    assert unused == [], "granted in accounts.conf, needed by no row of the table"


@pytest.fixture(scope="module")
def accounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountsServer]:
    root = tmp_path_factory.mktemp("nats-permissions")
    server = start_or_fail(AccountsServer(root / "store", port=free_port(), server_name="perm"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def clients(accounts: AccountsServer) -> AsyncIterator[dict[str, NatsClient]]:
    connected: dict[str, NatsClient] = {}

    async def ignore(_: Exception) -> None:
        return None

    for user in USERS:
        connected[user] = await nats.connect(
            accounts.url,
            user=user,
            password=password(user),
            name=f"probe-{user}",
            inbox_prefix=INBOX[user],
            error_cb=ignore,
            max_reconnect_attempts=0,
            connect_timeout=5,
        )
    try:
        yield connected
    finally:
        for nc in connected.values():
            await nc.close()


async def _settle(accounts: AccountsServer, clients: dict[str, NatsClient]) -> None:
    for nc in clients.values():
        await nc.flush(timeout=5)
    await asyncio.sleep(0.5)  # the server logs a refusal as it answers it


async def test_each_user_may_publish_exactly_where_the_table_says(
    accounts: AccountsServer, clients: dict[str, NatsClient]
) -> None:
    rows = publish_rows()
    mark = accounts.mark()
    for nc in clients.values():
        for subject in rows:
            await nc.publish(subject, b"")
    await _settle(accounts, clients)
    refused = {r for r in accounts.refusals(mark) if r.action == "publish"}
    expected = {
        Refusal(user, "publish", subject)
        for subject, allowed in rows.items()
        for user in USERS
        if user not in allowed
    }
    assert sorted(refused - expected) == [], "refused although the table allows it"
    assert sorted(expected - refused) == [], "allowed although the table refuses it"


async def test_each_user_may_subscribe_exactly_where_the_table_says(
    accounts: AccountsServer, clients: dict[str, NatsClient]
) -> None:
    rows = subscribe_rows()
    mark = accounts.mark()
    subs: list[Any] = []
    for nc in clients.values():
        for subject in rows:
            subs.append(await nc.subscribe(subject))
    await _settle(accounts, clients)
    refused = {r for r in accounts.refusals(mark) if r.action == "subscribe"}
    expected = {
        Refusal(user, "subscribe", subject)
        for subject, allowed in rows.items()
        for user in USERS
        if user not in allowed
    }
    assert sorted(refused - expected) == []
    assert sorted(expected - refused) == []


async def test_the_pullers_user_cannot_read_the_allocators_replies(
    accounts: AccountsServer, clients: dict[str, NatsClient]
) -> None:
    allocator, puller = clients["mcs-allocator"], clients["puller"]
    snooped: list[str] = []

    async def snoop(msg: Any) -> None:
        snooped.append(msg.subject)

    mark = accounts.mark()
    for pattern in (f"{INBOX['mcs-allocator']}.>", "_INBOX.>", ">"):
        await puller.subscribe(pattern, cb=snoop)
    await puller.flush()
    # The allocator reads its ledger: a request whose reply carries the ledger's entries.
    ledger = await ensure_kv(allocator.jetstream(), topology.mcs_ledger_bucket(CommonSettings()))
    await ledger.put("label.1_2", b'{"state": "allocated"}')
    entry = await ledger.get("label.1_2")
    assert entry.value == b'{"state": "allocated"}'
    await _settle(accounts, clients)
    assert snooped == [], "the puller read the allocator's replies"
    refused = accounts.refusals(mark)
    for pattern in (f"{INBOX['mcs-allocator']}.>", "_INBOX.>", ">"):
        assert Refusal("puller", "subscribe", pattern) in refused
    assert not [r for r in refused if r.user == "mcs-allocator"]
