"""CEDAR_HISTORY keeps every change: it takes the watcher's subjects itself, and the
last-value streams (CEDAR_WORKLOADS, CEDAR_NAMESPACES) are sourced from it.

Before, the history *sourced* the last-value streams, which keep one message per subject,
so a change replaced before the source copied it was never in the history (finding 3 of
docs/reliability.md: 3 to 70 of ~130 changes per run of tests/chaos/test_nats_cluster.py).
Here the lag is made deterministic on one real server, and a cluster in the older layout
is moved to the new one. The server behaviours these rely on were seen on nats-server
2.15 here: a source with no consumer yet reports `lag` 0 and `active` -1; a source whose
start sequence is removed before it copied anything starts again from the origin's first
message; a stream drops a sourced message whose Nats-Msg-Id it saw within its window.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig, StreamSource

from cedar.proto import subjects
from cedar.runtime import topology
from cedar.runtime.bus import ensure_stream, ensure_streams
from cedar.runtime.settings import CommonSettings
from cedar.runtime.sourcing import sources_caught_up
from cedar.sandbox.nats import NatsServer
from tests.chaos.observe import read_all

SUBJECT = "cedar.workloads.Deployment.t.web"
SETTINGS = CommonSettings()


@pytest.fixture
async def js(fresh_nats: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(fresh_nats.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def _publish(js: JetStreamContext, subject: str, version: int) -> None:
    await js.publish(
        subject, f'{{"v": {version}}}'.encode(), headers={"Nats-Msg-Id": f"v{version}"}
    )


async def _ids(js: JetStreamContext, stream: str) -> list[str]:
    return [(m.headers or {}).get("Nats-Msg-Id", "") for m in await read_all(js, stream)]


async def test_changes_made_while_the_last_value_stream_lags_are_all_in_the_history(
    js: JetStreamContext,
) -> None:
    await ensure_stream(js, topology.history_stream(SETTINGS))
    for version in (1, 2):  # both stored before CEDAR_WORKLOADS exists (maximal lag)
        await _publish(js, SUBJECT, version)
    await ensure_stream(js, topology.workloads_stream(SETTINGS))
    assert await sources_caught_up(js, subjects.STREAM_WORKLOADS, within=10)
    assert await _ids(js, subjects.STREAM_HISTORY) == ["v1", "v2"]
    last = await js.get_last_msg(subjects.STREAM_WORKLOADS, SUBJECT)
    assert last.headers and last.headers["Nats-Msg-Id"] == "v2"


async def test_sources_caught_up_waits_for_the_copy_and_says_when_it_did_not(
    js: JetStreamContext,
) -> None:
    # A source whose origin does not exist: never caught up. (The server retries such a
    # source on its own schedule, about 10 s apart here; the test must not wait on that.)
    orphan = StreamConfig(
        name="CEDAR_TEST_ORPHAN",
        sources=[StreamSource(name="CEDAR_TEST_NO_SUCH_STREAM")],
        storage=StorageType.MEMORY,
    )
    await js.add_stream(orphan)
    assert not await sources_caught_up(js, orphan.name or "", within=0.5)
    # 2,000 changes in the history before the copy exists: it must wait for all of them.
    await ensure_stream(js, topology.history_stream(SETTINGS))
    await asyncio.gather(*[_publish(js, f"{SUBJECT}-{i}", i) for i in range(2000)])
    await ensure_stream(js, topology.workloads_stream(SETTINGS))
    assert await sources_caught_up(js, subjects.STREAM_WORKLOADS, within=20)
    info = await js.stream_info(subjects.STREAM_WORKLOADS)
    assert info.state.messages == 2000  # everything copied when it says so
    assert await sources_caught_up(js, subjects.STREAM_HISTORY, within=0)  # no sources


async def test_a_burst_of_copies_drops_a_repeated_id_so_the_watcher_never_repeats_one(
    js: JetStreamContext,
) -> None:
    """A -> B -> A stored more than the history's duplicate window apart, then copied in
    one burst (CEDAR_WORKLOADS catching up): under one Nats-Msg-Id the second A is dropped
    and B stays the last value; under the ids the watcher gives (another per change,
    tests/unit/test_watcher_msg_ids.py) A is."""
    history = topology.history_stream(SETTINGS)
    history.duplicate_window = 0.2  # so that the test need not wait two minutes
    await ensure_stream(js, history)
    cases = ((f"{SUBJECT}-same", "a"), (f"{SUBJECT}-new", "a2"))
    for subject, _ in cases:
        await js.publish(subject, b"A", headers={"Nats-Msg-Id": "a"})
        await js.publish(subject, b"B", headers={"Nats-Msg-Id": "b"})
    await asyncio.sleep(0.3)
    for subject, second_id in cases:
        ack = await js.publish(subject, b"A", headers={"Nats-Msg-Id": second_id})
        assert not ack.duplicate
    await ensure_stream(js, topology.workloads_stream(SETTINGS))  # copies all at once
    assert await sources_caught_up(js, subjects.STREAM_WORKLOADS, within=10)
    same = await js.get_last_msg(subjects.STREAM_WORKLOADS, f"{SUBJECT}-same")
    new = await js.get_last_msg(subjects.STREAM_WORKLOADS, f"{SUBJECT}-new")
    assert (same.data, new.data) == (b"B", b"A")


def _older_layout(settings: CommonSettings) -> list[StreamConfig]:
    """The streams as Cedar created them before the history took the subjects."""
    last_value = {
        "max_msgs_per_subject": 1,
        "allow_msg_ttl": True,
        "allow_direct": True,
        "discard": DiscardPolicy.OLD,
        "duplicate_window": 120.0,
        "storage": StorageType.FILE,
    }
    return [
        StreamConfig(
            name=subjects.STREAM_WORKLOADS,
            subjects=[f"{subjects.WORKLOADS_PREFIX}.>"],
            allow_rollup_hdrs=True,
            **last_value,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=subjects.STREAM_NAMESPACES,
            subjects=[f"{subjects.NAMESPACES_PREFIX}.>"],
            **last_value,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=subjects.STREAM_HISTORY,
            subjects=[f"{subjects.AUDIT_PREFIX}.>", f"{subjects.DECISIONS_PREFIX}.>"],
            sources=[
                StreamSource(name=subjects.STREAM_WORKLOADS),
                StreamSource(name=subjects.STREAM_NAMESPACES),
            ],
            max_age=settings.history_retention.total_seconds(),
            storage=StorageType.FILE,
        ),
    ]


async def test_a_cluster_in_the_older_layout_is_moved_and_nothing_is_copied_back(
    js: JetStreamContext,
) -> None:
    for config in _older_layout(SETTINGS):
        await js.add_stream(config)
    for version in range(1, 6):
        await _publish(js, SUBJECT, version)
    await _publish(js, "cedar.namespaces.t", 10)
    await js.publish("cedar.audit.mcs.claim", b"{}")
    assert await sources_caught_up(js, subjects.STREAM_HISTORY, within=10)
    before = {
        name: (await js.stream_info(name)).state.last_seq
        for name in (subjects.STREAM_WORKLOADS, subjects.STREAM_NAMESPACES)
    }
    history_before = await _ids(js, subjects.STREAM_HISTORY)

    streams = topology.service_streams(SETTINGS)
    await ensure_streams(js, streams)
    await ensure_streams(js, streams)  # the next start: the start positions are kept

    history = (await js.stream_info(subjects.STREAM_HISTORY)).config
    assert set(history.subjects or []) >= {"cedar.workloads.>", "cedar.namespaces.>"}
    assert not history.sources
    for name in (subjects.STREAM_WORKLOADS, subjects.STREAM_NAMESPACES):
        info = await js.stream_info(name)
        assert not info.config.subjects
        assert [s.name for s in info.config.sources or []] == [subjects.STREAM_HISTORY]
        assert info.state.last_seq == before[name], f"{name} copied the history back"
    last = await js.get_last_msg(subjects.STREAM_WORKLOADS, SUBJECT)
    assert last.headers and last.headers["Nats-Msg-Id"] == "v5"

    # New changes go into the history and reach the last-value stream.
    ack = await js.publish(SUBJECT, b'{"v": 6}', headers={"Nats-Msg-Id": "v6"})
    assert ack.stream == subjects.STREAM_HISTORY
    assert await sources_caught_up(js, subjects.STREAM_WORKLOADS, within=10)
    last = await js.get_last_msg(subjects.STREAM_WORKLOADS, SUBJECT)
    assert last.headers and last.headers["Nats-Msg-Id"] == "v6"
    assert (await js.stream_info(subjects.STREAM_WORKLOADS)).state.last_seq == (
        before[subjects.STREAM_WORKLOADS] + 1
    )
    assert await _ids(js, subjects.STREAM_HISTORY) == [*history_before, "v6"]


async def test_a_service_that_may_not_update_leaves_the_older_layout_alone(
    js: JetStreamContext,
) -> None:
    for config in _older_layout(SETTINGS):
        await js.add_stream(config)
    await ensure_streams(js, topology.service_streams(SETTINGS), update=False)
    info = await js.stream_info(subjects.STREAM_WORKLOADS)
    assert info.config.subjects == ["cedar.workloads.>"]
    ack = await js.publish(SUBJECT, b"{}")
    assert ack.stream == subjects.STREAM_WORKLOADS
