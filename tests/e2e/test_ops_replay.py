"""`cedar replay` end to end against a real NATS server with realistic contract messages."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import nats

from cedar.proto.models import NamespaceEvent, WorkloadImageSet
from cedar.sandbox.nats import NatsServer
from tests.e2e.test_ops_support import (
    REPO_ROOT,
    cedar,
    jetstream,
    publish_audit,
    publish_decision,
    publish_namespace,
    publish_workload,
    wait_history,
    workload,
)

APP = "127.0.0.1:5000/tenants/app:v1"
APP_REF = APP
SIDECAR = "127.0.0.1:5000/tenants/sidecar:v2"


async def _scenario(url: str) -> None:
    async with jetstream(url) as js:
        await publish_namespace(js, "team-a")
        await publish_audit(js, "claim", "team-a", "s0:c3,c7")
        await publish_workload(
            js, workload("Deployment", "team-a", "web", {"app": APP}, replicas=0)
        )
        await publish_workload(
            js,
            workload("ReplicaSet", "team-a", "web-6d4f", {"app": APP}, owner=("Deployment", "web")),
        )
        await publish_workload(js, workload("Deployment", "team-b", "api", {"api": SIDECAR}))
        await publish_decision(
            js, "node-1", APP, "pull", reason="missing", workloads=("Deployment/team-a/web",)
        )
        await publish_decision(
            js,
            "node-1",
            APP,
            "pulled",
            workloads=("Deployment/team-a/web",),
            digest="sha256:" + "a" * 64,
        )
        await publish_decision(
            js,
            "node-2",
            APP,
            "skip",
            reason="node_mismatch: nodeSelector",
            workloads=("Deployment/team-a/web",),
        )
        await publish_decision(
            js,
            "node-1",
            SIDECAR,
            "failed",
            reason="not_found",
            workloads=("Deployment/team-b/api",),
        )
        await wait_history(js, 9)


async def test_replay_prints_the_window_oldest_first(fresh_nats: NatsServer) -> None:
    await _scenario(fresh_nats.url)
    code, out, err = await cedar("replay", "--since", "10m", "--nats-url", fresh_nats.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["SEQ", "TIME", "TYPE", "OBJECT", "DETAIL"]
    assert len(lines) == 10
    # Oldest first by when things happened (sourced messages reach the history late).
    times = [line.split()[1] for line in lines[1:]]
    assert times == sorted(times)
    assert lines[1].split()[2:4] == ["namespace", "Namespace/team-a"]
    assert "9 of 9 records" in err
    assert any("decision" in line and "node/node-2" in line and "skip" in line for line in lines)


async def test_replay_filters_workload_and_its_decisions(fresh_nats: NatsServer) -> None:
    await _scenario(fresh_nats.url)
    code, out, err = await cedar(
        "replay",
        "--since",
        "1h",
        "--namespace",
        "team-a",
        "--name",
        "web",
        "-o",
        "json",
        "--nats-url",
        fresh_nats.url,
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    types = [r["type"] for r in rows]
    # The Deployment, its ReplicaSet (owner), and the three decisions taken for it.
    assert types == ["workload", "workload", "decision", "decision", "decision"]
    assert rows[1]["data"]["owner"]["name"] == "web"
    assert [r["data"]["action"] for r in rows[2:]] == ["pull", "pulled", "skip"]


async def test_replay_filters_by_node_image_kind(fresh_nats: NatsServer) -> None:
    await _scenario(fresh_nats.url)
    code, out, _ = await cedar(
        "replay",
        "--since",
        "1h",
        "--node",
        "node-1",
        "--image",
        APP,
        "-o",
        "json",
        "--nats-url",
        fresh_nats.url,
    )
    assert code == 0
    actions = [json.loads(line)["data"]["action"] for line in out.splitlines()]
    assert actions == ["pull", "pulled"]

    code, out, _ = await cedar(
        "replay",
        "--since",
        "1h",
        "--kind",
        "namespace",
        "--namespace",
        "team-a",
        "-o",
        "json",
        "--nats-url",
        fresh_nats.url,
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["type"] for r in rows] == ["namespace", "audit"]
    assert rows[1]["data"]["level"] == "s0:c3,c7"

    code, out, _ = await cedar(
        "replay", "--since", "1h", "--kind", "audit", "-o", "json", "--nats-url", fresh_nats.url
    )
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["audit"]


async def test_replay_window_in_the_future_is_empty(fresh_nats: NatsServer) -> None:
    await _scenario(fresh_nats.url)
    code, out, err = await cedar(
        "replay", "--since", "2099-01-01T00:00:00Z", "--nats-url", fresh_nats.url
    )
    assert code == 0
    assert out == ""
    assert "0 of 0 records" in err
    code, _, err = await cedar("replay", "--since", "yesterday", "--nats-url", fresh_nats.url)
    assert code == 2
    assert "invalid time" in err


async def test_replay_to_republishes_into_replay_stream(fresh_nats: NatsServer) -> None:
    await _scenario(fresh_nats.url)
    nc = await nats.connect(fresh_nats.url)
    live: list[nats.aio.msg.Msg] = []

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        live.append(msg)

    await nc.subscribe("cedar.replay.incident-1", cb=on_msg)
    await nc.flush()
    try:
        code, out, err = await cedar(
            "replay",
            "--since",
            "1h",
            "--namespace",
            "team-a",
            "--kind",
            "workload",
            "--to",
            "incident-1",
            "--nats-url",
            fresh_nats.url,
        )
        assert code == 0, err
        assert out == ""
        assert "re-published 2 of 9 messages to cedar.replay.incident-1" in err
        # A consumer that starts afterwards reads them from the replay stream, in order.
        js = nc.jetstream()
        sub = await js.subscribe("cedar.replay.incident-1", ordered_consumer=True)
        got = [await sub.next_msg(timeout=5) for _ in range(2)]
        assert [m.headers["Cedar-Original-Subject"] for m in got] == [
            "cedar.workloads.Deployment.team-a.web",
            "cedar.workloads.ReplicaSet.team-a.web-6d4f",
        ]
        first = WorkloadImageSet.model_validate_json(got[0].data)
        assert first.replicas == 0
        for _ in range(100):
            if len(live) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(live) == 2  # and plain subscribers saw them live
        # Live state is untouched: nothing was re-published to a cedar.workloads subject.
        assert all(not isinstance(m, NamespaceEvent) for m in got)
    finally:
        await nc.drain()


async def test_replay_refuses_non_replay_subjects_and_missing_nats() -> None:
    code, _, err = await cedar(
        "replay", "--to", "cedar.workloads.x", "--nats-url", "nats://127.0.0.1:1"
    )
    assert code == 2
    assert "cedar.replay." in err
    code, _, err = await cedar("replay", "--nats-url", "nats://127.0.0.1:1")
    assert code == 1
    assert "cannot reach NATS at nats://127.0.0.1:1" in err


async def test_replay_feeds_a_dry_run_puller(fresh_nats: NatsServer, tmp_path: Path) -> None:
    """`--to` then `cedar puller --dry-run --from-subject`: decisions logged, engine untouched."""
    await _scenario(fresh_nats.url)
    log = tmp_path / "puller.log"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cedar.cli",
        "puller",
        "--node-name",
        "node-9",
        "--no-node-from-api",
        "--dry-run",
        "--from-subject",
        "cedar.replay.dry-1",
        "--metrics-port",
        "0",
        "--nats-url",
        fresh_nats.url,
        "--docker-host",
        "unix:///nonexistent.sock",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log.open("wb"),
        cwd=REPO_ROOT,
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while "desired state loaded" not in log.read_text(errors="replace"):
            assert loop.time() < deadline, log.read_text()
            await asyncio.sleep(0.1)
        code, _, err = await cedar(
            "replay",
            "--since",
            "1h",
            "--kind",
            "workload",
            "--namespace",
            "team-a",
            "--to",
            "cedar.replay.dry-1",
            "--nats-url",
            fresh_nats.url,
        )
        assert code == 0, err
        while '"action":"pull"' not in log.read_text(errors="replace"):
            assert loop.time() < deadline + 30, log.read_text()
            await asyncio.sleep(0.1)
        assert f"would pull {APP}" in log.read_text()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
