"""`cedar status` end to end against a real NATS server with realistic contract messages."""

from __future__ import annotations

import json
from datetime import timedelta

from cedar.proto import subjects
from cedar.sandbox.nats import NatsServer
from tests.e2e.test_ops_support import cedar, jetstream, now, publish_workload, put_status, workload

APP = "127.0.0.1:5000/tenants/app:v1"
AGENT = "127.0.0.1:5000/platform/agent:v3"
GONE = "127.0.0.1:5000/tenants/gone:v1"
OLD_PREPULL = "127.0.0.1:5000/release/old:v9"


async def _fleet(url: str) -> None:
    async with jetstream(url) as js:
        await publish_workload(
            js, workload("Deployment", "team-a", "web", {"app": APP}, replicas=0)
        )
        await publish_workload(js, workload("Deployment", "team-b", "web", {"app": APP}))
        await publish_workload(js, workload("DaemonSet", "platform", "agent", {"agent": AGENT}))
        await publish_workload(js, workload("Deployment", "team-c", "gone", {"app": GONE}))
        await publish_workload(js, workload("Deployment", "team-c", "gone", {}, deleted=True))
        await publish_workload(
            js,
            workload(
                "Prepull",
                "ci",
                "rel-1",
                {"app": OLD_PREPULL},
                expires_at=now() - timedelta(seconds=1),
            ),
        )
        web = ("Deployment/team-a/web", "Deployment/team-b/web")
        await put_status(js, "node-1", APP, "present", workloads=web, digest="sha256:" + "1" * 64)
        await put_status(js, "node-2", APP, "pulling", workloads=web)
        await put_status(
            js,
            "node-3",
            APP,
            "failed",
            reason="unauthorized",
            error="401 from 127.0.0.1:5000",
            workloads=web,
        )
        for node in ("node-1", "node-2", "node-3"):
            await put_status(js, node, AGENT, "present", workloads=("DaemonSet/platform/agent",))
        await put_status(js, "node-1", GONE, "present")  # no longer desired: not summarised

        ledger = await js.key_value(subjects.KV_MCS_LEDGER)
        at = now().isoformat()
        for key, value in {
            "label.3_7": {
                "level": "s0:c3,c7",
                "state": "allocated",
                "namespace": "team-a",
                "uid": "u-a",
                "at": at,
                "replica": "mcs-allocator-0",
            },
            "ns.u-a": {
                "level": "s0:c3,c7",
                "namespace": "team-a",
                "uid": "u-a",
                "written": True,
                "at": at,
            },
            "label.1_900": {
                "level": "s0:c1,c900",
                "state": "allocated",
                "namespace": "team-b",
                "uid": "u-b",
                "at": at,
                "replica": "mcs-allocator-1",
            },
            "ns.u-b": {
                "level": "s0:c1,c900",
                "namespace": "team-b",
                "uid": "u-b",
                "written": False,
                "at": at,
            },
            "label.2_4": {
                "level": "s0:c2,c4",
                "state": "quarantined",
                "namespace": "team-c",
                "uid": "u-c",
                "at": at,
                "replica": "mcs-allocator-0",
            },
        }.items():
            await ledger.put(key, json.dumps(value).encode())


async def test_status_summarises_desired_images(fresh_nats: NatsServer) -> None:
    await _fleet(fresh_nats.url)
    code, out, err = await cedar("status", "--nats-url", fresh_nats.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["IMAGE", "WANTED", "BY"]
    agent, app = lines[1].split(), lines[2].split()
    assert agent == [AGENT, "DaemonSet/platform/agent", "3", "3", "0", "0", "0", "-"]
    assert app == [APP, "Deployment/team-a/web", "(+1)", "3", "1", "1", "0", "1", "unauthorized:1"]
    assert "2 desired images, 3 nodes reporting, 1 images present on every node" in out
    assert GONE not in out and OLD_PREPULL not in out

    code, out, _ = await cedar("status", "-o", "json", "--nats-url", fresh_nats.url)
    rows = {r["image"]: r for r in map(json.loads, out.splitlines())}
    assert rows[APP]["failure_reasons"] == {"unauthorized": 1}
    assert rows[APP]["nodes_by_state"]["pulling"] == ["node-2"]


async def test_status_per_image_and_per_node(fresh_nats: NatsServer) -> None:
    await _fleet(fresh_nats.url)
    code, out, _ = await cedar("status", "--image", APP, "--nats-url", fresh_nats.url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{APP}: wanted by Deployment/team-a/web, Deployment/team-b/web"
    assert lines[1].split()[:4] == ["NODE", "STATE", "DIGEST", "REASON"]
    assert [line.split()[:2] for line in lines[2:]] == [
        ["node-1", "present"],
        ["node-2", "pulling"],
        ["node-3", "failed"],
    ]
    assert "401 from 127.0.0.1:5000" in lines[4]

    code, out, _ = await cedar(
        "status", "--node", "node-1", "-o", "json", "--nats-url", fresh_nats.url
    )
    images = sorted(json.loads(line)["image"] for line in out.splitlines())
    assert images == sorted([APP, AGENT, GONE])

    code, out, err = await cedar("status", "--node", "node-9", "--nats-url", fresh_nats.url)
    assert code == 0 and out == "" and "reports no images" in err


async def test_status_namespaces_and_pool(fresh_nats: NatsServer) -> None:
    await _fleet(fresh_nats.url)
    code, out, err = await cedar("status", "--namespaces", "--nats-url", fresh_nats.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAMESPACE", "LEVEL", "STATE", "SINCE", "BY"]
    assert lines[1].split()[:3] == ["team-a", "s0:c3,c7", "allocated"]
    assert "annotation pending" in lines[2]
    assert lines[3].split()[:3] == ["team-c", "s0:c2,c4", "quarantined"]
    assert (
        "pool: 523776 labels (1024 categories, 2 per label): "
        "2 allocated, 1 quarantined, 523773 free" in out
    )

    code, out, _ = await cedar(
        "status",
        "--namespaces",
        "-o",
        "json",
        "--nats-url",
        fresh_nats.url,
        env={"CEDAR_MCS_CATEGORIES": "16", "CEDAR_MCS_QUARANTINE": "0s"},
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[-1]["pool"] == {
        "categories": 16,
        "categories_per_label": 2,
        "total": 120,
        "allocated": 2,
        "quarantined": 0,
        "free": 118,
    }
    assert rows[2]["state"] == "reusable"


async def test_status_of_an_empty_fleet(fresh_nats: NatsServer) -> None:
    code, out, err = await cedar("status", "--nats-url", fresh_nats.url)
    assert code == 0, err
    assert "0 desired images, 0 nodes reporting" in out
