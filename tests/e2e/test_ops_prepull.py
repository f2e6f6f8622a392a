"""`cedar prepull` end to end: real NATS, a real `cedar puller` driving a real Docker engine,
images in a real registry."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from cedar.proto import subjects
from cedar.proto.models import WorkloadImageSet
from cedar.runtime.sourcing import sources_caught_up
from cedar.sandbox.dockerd import DockerEngine
from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import kill_pid
from tests.e2e.test_ops_support import REPO_ROOT, cedar, jetstream
from tests.harness.registry import ImageMaker


def deployment(name: str, namespace: str, *images: str, extra_spec: str = "") -> str:
    containers = "".join(
        f"        - name: c{i}\n          image: {image}\n" for i, image in enumerate(images)
    )
    return (
        "apiVersion: apps/v1\nkind: Deployment\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\n"
        "spec:\n  replicas: 0\n  selector:\n    matchLabels: {app: x}\n"
        "  template:\n    metadata:\n      labels: {app: x}\n    spec:\n"
        f"{extra_spec}      containers:\n{containers}"
    )


@pytest.fixture
def puller(fresh_nats: NatsServer, docker_engine: DockerEngine, tmp_path: Path) -> Iterator[str]:
    """A real `cedar puller` for one node (labels from settings, not the API)."""
    node = f"e2e-{uuid.uuid4().hex[:6]}"
    env = {
        **docker_engine.env(),
        "CEDAR_NODE_NAME": node,
        "CEDAR_NATS_URL": fresh_nats.url,
        "CEDAR_NODE_FROM_API": "false",
        "CEDAR_METRICS_PORT": "0",
        "CEDAR_RESYNC_INTERVAL": "1s",
        "CEDAR_PERMANENT_RETRY": "2s",
        "CEDAR_BACKOFF_MAX": "2s",
    }
    log = tmp_path / "puller.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cedar.cli", "puller"],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    try:
        yield node
    finally:
        kill_pid(proc.pid, grace=20)
        proc.wait(5)


async def _wait_for_node(url: str, node: str) -> None:
    """The puller reports status once it has something to report: give it an image."""


async def test_prepull_waits_until_present_then_exits_0(
    fresh_nats: NatsServer,
    puller: str,
    make_images: ImageMaker,
    docker_engine: DockerEngine,
    tmp_path: Path,
) -> None:
    refs = await make_images.make(2, 256 * 1024)
    manifest = tmp_path / "release.yaml"
    manifest.write_text(deployment("web", "team-a", *refs))
    code, out, err = await cedar(
        "prepull",
        str(manifest),
        "--timeout",
        "90s",
        "--ttl",
        "10m",
        "--no-kube",
        "--nats-url",
        fresh_nats.url,
    )
    assert code == 0, out + err
    assert "all 2 images present on every eligible node (2 image-node pairs on 1 nodes)" in out
    assert "prepull [" in err  # progress, plain lines when stderr is not a terminal
    for ref in refs:
        docker_engine.docker("image", "inspect", ref)

    # The entry on CEDAR_WORKLOADS is a Prepull owned by the Deployment, with an expiry.
    async with jetstream(fresh_nats.url) as js:
        msg = await js.get_last_msg(
            subjects.STREAM_WORKLOADS,
            subjects.workload_subject("Prepull", "team-a", "deployment-web"),
        )
        wis = WorkloadImageSet.model_validate_json(msg.data)
        assert wis.owner is not None and wis.owner.name == "web"
        assert wis.expires_at is not None
        assert wis.references() == set(refs)

    # Replay shows which workload asked and what the node decided.
    code, out, _ = await cedar(
        "replay", "--since", "10m", "--name", "web", "-o", "json", "--nats-url", fresh_nats.url
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0]["data"]["kind"] == "Prepull"
    pulled = [r for r in rows if r["type"] == "decision" and r["data"]["action"] == "pulled"]
    assert {r["data"]["image"] for r in pulled} == set(refs)
    assert all(r["data"]["workloads"] == ["Prepull/team-a/deployment-web"] for r in pulled)


async def test_prepull_reports_what_is_missing_and_exits_1(
    fresh_nats: NatsServer, puller: str, make_images: ImageMaker, tmp_path: Path
) -> None:
    (good,) = await make_images.make(1, 64 * 1024)
    absent = good.rsplit(":", 1)[0] + "-absent:v1"
    manifest = tmp_path / "release.yaml"
    manifest.write_text(deployment("api", "team-b", good, absent))
    code, out, err = await cedar(
        "prepull",
        str(manifest),
        "--timeout",
        "20s",
        "--no-kube",
        "-o",
        "json",
        "--nats-url",
        fresh_nats.url,
    )
    assert code == 1, out + err
    assert out, err
    report = json.loads(out)
    assert report["complete"] is False
    assert report["nodes"] == [puller]
    (missing,) = report["missing"]
    assert missing["node"] == puller and missing["image"] == absent
    assert missing["state"] in ("failed", "pulling", "missing")
    if missing["state"] == "failed":
        assert "not_found" in missing["why"]
    assert missing["workloads"] == ["Deployment/team-b/api"]


async def test_prepull_refuses_invalid_manifests(fresh_nats: NatsServer, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(deployment("ok", "team-a", "127.0.0.1:5000/x:v1"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        deployment("bad", "team-a", "127.0.0.1:5000/y:v1", extra_spec="      hostNetwork: maybe\n")
    )
    code, out, err = await cedar("prepull", str(good), str(bad), "--nats-url", fresh_nats.url)
    assert code == 2
    assert f"invalid: {bad}: document 1 (Deployment/bad): spec.template.spec.hostNetwork:" in err
    assert "1 of 2 manifests are invalid; nothing was published" in err
    nc = await nats.connect(fresh_nats.url)
    try:
        with pytest.raises(nats.js.errors.NotFoundError):
            await nc.jetstream().stream_info(subjects.STREAM_WORKLOADS)
    finally:
        await nc.drain()

    code, out, err = await cedar("prepull", "--validate-only", str(good))
    assert code == 0, err
    assert out.split() == ["127.0.0.1:5000/x:v1"]


async def test_prepull_without_pullers_times_out(fresh_nats: NatsServer, tmp_path: Path) -> None:
    manifest = tmp_path / "release.yaml"
    manifest.write_text(deployment("web", "team-a", "127.0.0.1:5000/x:v1"))
    async with jetstream(fresh_nats.url):
        pass  # the streams exist, as they do once any Cedar service has started
    code, out, err = await cedar(
        "prepull", str(manifest), "--timeout", "2s", "--no-kube", "--nats-url", fresh_nats.url
    )
    assert code == 1, err
    assert "no node reports status in cedar-node-status" in out


async def test_prepull_before_any_service_creates_the_streams(
    fresh_nats: NatsServer, tmp_path: Path
) -> None:
    manifest = tmp_path / "release.yaml"
    manifest.write_text(deployment("web", "team-a", "127.0.0.1:5000/x:v1"))
    code, _, err = await cedar("prepull", "--no-wait", str(manifest), "--nats-url", fresh_nats.url)
    assert code == 0, err
    assert "published 1 images of 1 workloads" in err
    nc = await nats.connect(fresh_nats.url)
    try:
        js = nc.jetstream()
        # Published into the history; CEDAR_WORKLOADS copies it a moment later.
        assert await sources_caught_up(js, subjects.STREAM_WORKLOADS, within=10)
        msg = await js.get_last_msg(
            subjects.STREAM_WORKLOADS,
            subjects.workload_subject("Prepull", "team-a", "deployment-web"),
        )
        assert WorkloadImageSet.model_validate_json(msg.data).kind == "Prepull"
        assert (await js.stream_info(subjects.STREAM_HISTORY)).config.max_age
    finally:
        await nc.drain()
