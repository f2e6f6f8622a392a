"""Least privilege on the Kubernetes API: every ServiceAccount's RBAC is the committed table.

rbac_table.yaml lists, per ServiceAccount, the verbs on each resource its service calls.
The RBAC that `kubectl kustomize deploy/` renders (and each component under deploy/ on
top of it) must grant exactly that. And the table must be enough: each service runs
against the simulated API with every verb the table does not list answered 403 — what
the real API server does under that RBAC — does its job, and makes no other request.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from prometheus_client import REGISTRY

from cedar.proto import subjects
from cedar.proto.models import NamespaceEvent
from cedar.puller.app import assemble
from cedar.puller.settings import PullerSettings
from cedar.runtime.bus import Bus, ensure_stream
from cedar.runtime.health import Health
from cedar.runtime.service import Runtime
from cedar.runtime.topology import service_streams
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import free_port
from cedar.watcher import app as watcher_app
from cedar.watcher import informer
from cedar.watcher.settings import WatcherSettings
from tests.harness.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
TABLE = yaml.safe_load((Path(__file__).parent / "rbac_table.yaml").read_text())
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")
Grants = dict[str, dict[str, set[str]]]  # service account -> "group/resource" -> verbs


def _kubectl() -> str:
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(REPO / ".venv-tools/bin"))
    if found is None:
        pytest.fail("kubectl is not installed; install it with: apt-get install kubectl")
    return found


def _render(directory: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _with_component(tmp: Path, component: Path) -> list[dict[str, Any]]:
    overlay = tmp / component.name
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(DEPLOY, overlay)}\n"
        f"components:\n  - {os.path.relpath(component, overlay)}\n"
    )
    return _render(overlay)


def grants(docs: list[dict[str, Any]]) -> Grants:
    roles = {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
        for d in docs
        if d["kind"] in ("Role", "ClusterRole")
    }
    out: Grants = {}
    for d in docs:
        if d["kind"] == "ServiceAccount":
            out.setdefault(f"{d['metadata']['namespace']}/{d['metadata']['name']}", {})
    for binding in docs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = binding["roleRef"]
        scope = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], scope, ref["name"])]
        for subject in binding.get("subjects") or []:
            assert subject["kind"] == "ServiceAccount", f"{binding['metadata']['name']}: {subject}"
            account = out.setdefault(f"{subject['namespace']}/{subject['name']}", {})
            for rule in role.get("rules") or []:
                assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        key = f"{group or 'core'}/{resource}"
                        account.setdefault(key, set()).update(rule["verbs"])
    return out


def table(*components: str) -> Grants:
    out: Grants = {
        sa: {res: set(verbs) for res, verbs in (rules or {}).items()}
        for sa, rules in TABLE["base"].items()
    }
    for component in components:
        for sa, rules in TABLE["components"].get(component, {}).items():
            for res, verbs in rules.items():
                out.setdefault(sa, {}).setdefault(res, set()).update(verbs)
    return out


def test_the_rendered_rbac_is_the_table() -> None:
    rendered = grants(_render(DEPLOY))
    for account in rendered.values():
        for resource, verbs in account.items():
            assert "*" not in verbs and not resource.endswith("/*"), (resource, verbs)
    assert rendered == table()


def test_each_component_adds_exactly_its_rows_of_the_table(tmp_path: Path) -> None:
    components = sorted(
        p.parent for p in DEPLOY.rglob("kustomization.yaml") if "kind: Component" in p.read_text()
    )
    assert components, "no kustomize components under deploy/"
    named = {str(c.relative_to(DEPLOY)) for c in components}
    assert set(TABLE["components"]) <= named, "the table names a component that is gone"
    for component in components:
        name = str(component.relative_to(DEPLOY))
        assert grants(_with_component(tmp_path, component)) == table(name), name


# -- the services under exactly that RBAC ---------------------------------------------------


def enforce(api: KubeAPI, account: str) -> dict[str, set[str]]:
    """Answer 403 to every verb the table does not give `account`, on every resource."""
    allowed = table()[account]
    by_plural: dict[str, set[str]] = {}
    for key, verbs in allowed.items():
        by_plural.setdefault(key.split("/", 1)[1], set()).update(verbs)
    for res in api.table.all:
        refused = set(VERBS) - by_plural.get(res.plural, set())
        if refused:
            api.forbid(res.plural, refused)
    return by_plural


def made_only_allowed_requests(api: KubeAPI, by_plural: dict[str, set[str]]) -> list[str]:
    return [
        f"{verb} {plural} x{n}"
        for (verb, plural), n in api.request_counts().items()
        if verb not in by_plural.get(plural.split("/", 1)[0], set())
    ]


def _rs(deployment: dict[str, Any], number: int, image: str) -> dict[str, Any]:
    meta = deployment["metadata"]
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {
            "name": f"web-{number}",
            "namespace": "t",
            "annotations": {"deployment.kubernetes.io/revision": str(number)},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": {
            "replicas": 0,
            "template": {"spec": {"containers": [{"name": "a", "image": image}]}},
        },
    }


async def _last(js: Any, stream: str, subject: str) -> Any:
    try:
        return await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return None


async def test_the_watcher_needs_nothing_but_its_rows(
    kube_api: KubeAPI, kubeconfig: Path, fresh_nats: NatsServer
) -> None:
    by_plural = enforce(kube_api, "cedar-system/cedar-watcher")
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "t"}})
    deployment = kube_api.create(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "t"},
            "spec": {"template": {"spec": {"containers": [{"name": "a", "image": "app:3"}]}}},
        }
    )
    for number in (1, 2, 3):
        kube_api.create(_rs(deployment, number, f"app:{number}"))
    settings = WatcherSettings(
        nats_url=fresh_nats.url, kubeconfig=str(kubeconfig), watch_previous_revisions=1
    )
    health = Health()
    bus = Bus(settings, "cedar-watcher-rbac", health)
    runtime: Runtime[WatcherSettings] = Runtime("watcher", settings, health, bus)
    for kind in settings.kinds:
        health.require(informer.health_check_name(kind))
    await bus.connect()
    task = asyncio.create_task(watcher_app.main(runtime))
    subject = subjects.workload_subject("ReplicaSet", "t", "web-1")
    try:
        await eventually(lambda: health.ready, 20, "watcher ready")
        js = bus.js

        async def web1_live() -> bool:
            msg = await _last(js, subjects.STREAM_WORKLOADS, subject)
            return msg is not None and b'"deleted":false' in msg.data

        # Revisions 3 and 2 are kept; when 3 goes, revision 1 is kept again and read anew.
        kube_api.delete("ReplicaSet", "t", "web-3")
        await eventually(web1_live, 20, "revision 1 kept again")
        forbidden = REGISTRY.get_sample_value("cedar_watcher_forbidden", {"kind": "ReplicaSet"})
        assert not forbidden, "the watcher reported a kind as forbidden"
        assert made_only_allowed_requests(kube_api, by_plural) == []
    finally:
        runtime.stop.set()
        await asyncio.wait_for(task, 30)
        await bus.close()


async def test_the_puller_needs_nothing_but_its_rows(
    kube_api: KubeAPI, kubeconfig: Path, fresh_nats: NatsServer
) -> None:
    by_plural = enforce(kube_api, "cedar-system/cedar-puller")
    kube_api.create(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {"pool": "a"}}}
    )
    settings = PullerSettings(
        node_name="n1", nats_url=fresh_nats.url, kubeconfig=str(kubeconfig), dry_run=True
    )
    health = Health()
    bus = Bus(settings, "cedar-puller-rbac", health)
    await bus.connect()
    stop = asyncio.Event()
    puller = await asyncio.wait_for(assemble(settings, bus, health, stop), 30)
    assert puller is not None
    task = asyncio.create_task(puller.run(stop))
    try:
        await eventually(lambda: puller.desired.node.labels.get("pool") == "a", 10, "node read")
        kube_api.patch("nodes", None, "n1", {"metadata": {"labels": {"pool": "b"}}})
        await eventually(lambda: puller.desired.node.labels.get("pool") == "b", 10, "node followed")
        assert made_only_allowed_requests(kube_api, by_plural) == []
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await bus.close()


@pytest.fixture
def allocator_env(
    kubeconfig: Path, fresh_nats: NatsServer, tmp_path: Path
) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CEDAR_")}
    env |= {
        "CEDAR_NATS_URL": fresh_nats.url,
        "KUBECONFIG": str(kubeconfig),
        "CEDAR_METRICS_PORT": str(free_port()),
        "CEDAR_MCS_RESYNC_INTERVAL": "2s",
    }
    yield env


async def test_the_allocator_needs_nothing_but_its_rows(
    kube_api: KubeAPI, fresh_nats: NatsServer, allocator_env: dict[str, str], tmp_path: Path
) -> None:
    by_plural = enforce(kube_api, "cedar-system/cedar-mcs-allocator")
    ns = kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "t"}})
    nc = await nats.connect(fresh_nats.url)
    js = nc.jetstream()
    for config in service_streams(WatcherSettings()):
        await ensure_stream(js, config)

    async def publish(obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        event = NamespaceEvent(
            name=meta["name"],
            uid=meta["uid"],
            annotations=meta.get("annotations") or {},
            resource_version=meta["resourceVersion"],
            observed_at=datetime.now(UTC),
        )
        await js.publish(subjects.namespace_subject(event.name), event.model_dump_json().encode())

    log = (tmp_path / "allocator.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once; the test then polls the API
        [sys.executable, "-m", "cedar.cli", "mcs-allocator"],
        env=allocator_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    ann = "cedar.io/selinux-level"

    def level() -> str | None:
        obj = kube_api.get("namespaces", None, "t") or {}
        return (obj.get("metadata", {}).get("annotations") or {}).get(ann)

    try:
        await publish(ns)
        first = await eventually(level, 30, "namespace labelled")
        # Tampered with: restored, and a Warning Event recorded.
        tampered = kube_api.patch(
            "namespaces", None, "t", {"metadata": {"annotations": {ann: "s0:c1,c2"}}}
        )
        await publish(tampered)
        await eventually(lambda: level() == first, 30, "tampering reverted")
        await eventually(kube_api.events_for, 30, "an Event recorded")
        assert proc.poll() is None
        assert made_only_allowed_requests(kube_api, by_plural) == []
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        await nc.close()
