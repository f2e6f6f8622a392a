"""The puller's runtime components (deploy/components/{containerd,cri-o,docker}): an overlay of
the base with each renders with `kubectl kustomize`, validates strictly against the
Kubernetes schemas, mounts exactly its runtime's socket from the host and nothing else, stays
unprivileged, and fails no checkov check the base does not fail on purpose."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.test_deploy import (
    DEPLOY,
    K8S_VERSIONS,
    REPO,
    by_kind,
    ok,
    run,
    tool,
    tools_venv,
)

COMPONENTS = DEPLOY / "components"
# component -> (CEDAR_RUNTIME, CEDAR_CRI_ENDPOINT or None, host paths mounted)
EXPECTED: dict[str, tuple[str, str | None, dict[str, str]]] = {
    "containerd": (
        "cri",
        "unix:///run/containerd/containerd.sock",
        {"/run/containerd/containerd.sock": "Socket"},
    ),
    "cri-o": ("cri", "unix:///var/run/crio/crio.sock", {"/var/run/crio/crio.sock": "Socket"}),
    "docker": (
        "docker",
        None,
        {"/var/run/docker.sock": "Socket", "/var/lib/docker": "Directory"},
    ),
}


def render(component: str, tmp_path: Path) -> list[dict[str, Any]]:
    overlay = tmp_path / "overlays" / component
    overlay.mkdir(parents=True)
    base = os.path.relpath(DEPLOY, overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [base], "components": [f"{base}/components/{component}"]})
    )
    kubectl = tool("kubectl", "apt-get install kubectl")
    out = ok(run([kubectl, "kustomize", str(overlay)]), f"kustomize with {component}")
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("runtimes")
    return {c: render(c, tmp) for c in EXPECTED}


def puller(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    ds = by_kind(docs, "DaemonSet")["cedar-puller"]
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_every_component_is_listed_and_documented() -> None:
    # Every component that chooses the puller's runtime is one of these (other components,
    # such as the NATS auth callout's, choose nothing of the kind).
    choosing = {
        p.name
        for p in COMPONENTS.iterdir()
        if p.is_dir() and any("CEDAR_RUNTIME" in f.read_text() for f in p.glob("*.yaml"))
    }
    assert choosing == set(EXPECTED)
    guide = (REPO / "docs" / "deploying.md").read_text()
    for component in EXPECTED:
        assert f"deploy/components/{component}" in guide, component
    assert "nothing for it to drive" not in guide


@pytest.mark.parametrize("component", sorted(EXPECTED))
def test_the_puller_mounts_its_runtimes_socket_and_nothing_else(
    renders: dict[str, list[dict[str, Any]]], component: str
) -> None:
    runtime, endpoint, host_paths = EXPECTED[component]
    pod, c = puller(renders[component])
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CEDAR_RUNTIME"] == runtime
    assert env.get("CEDAR_CRI_ENDPOINT") == endpoint
    if runtime == "cri":
        assert "DOCKER_HOST" not in env and "CEDAR_DOCKER_ROOT" not in env
        # The socket is root:root 0660 on containerd and CRI-O nodes: reached by group.
        assert pod["securityContext"]["supplementalGroups"] == [0]
    found = {
        v["hostPath"]["path"]: v["hostPath"]["type"] for v in pod["volumes"] if "hostPath" in v
    }
    assert found == host_paths
    by_volume = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"] if "hostPath" in by_volume[m["name"]]}
    for path in host_paths:
        assert path in mounts, f"{path} is a volume but not mounted"
    for path, mount in mounts.items():
        if host_paths[path] == "Directory":
            assert mount["readOnly"] is True, path
    # Still no privilege of any kind.
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")


@pytest.mark.parametrize("component", sorted(EXPECTED))
def test_only_the_puller_changes(
    renders: dict[str, list[dict[str, Any]]], component: str, tmp_path: Path
) -> None:
    kubectl = tool("kubectl", "apt-get install kubectl")
    base = [
        d for d in yaml.safe_load_all(ok(run([kubectl, "kustomize", str(DEPLOY)]), "base")) if d
    ]

    def key(doc: dict[str, Any]) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    changed = {key(d) for d in renders[component] if d != next(b for b in base if key(b) == key(d))}
    assert changed == {("DaemonSet", "cedar-puller")}
    assert {key(d) for d in renders[component]} == {key(b) for b in base}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_render_validates_strictly(
    renders: dict[str, list[dict[str, Any]]], version: str
) -> None:
    errors = []
    for component, docs in renders.items():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                errors.append(
                    f"{component}: {doc['kind']}/{doc['metadata']['name']}: {err.message}"
                )
    assert not errors, "\n".join(errors)


def test_checkov_finds_nothing_new(
    renders: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    for component, docs in renders.items():
        (tmp_path / f"{component}.yaml").write_text(yaml.safe_dump_all(docs))
    checkov = tools_venv("checkov")
    proc = run(
        [
            checkov,
            "--directory",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--quiet",
            "--compact",
            "--soft-fail",
            "--skip-download",
        ],
        env={**os.environ, "LOG_LEVEL": "ERROR"},
    )
    out = ok(proc, "checkov")
    report = json.loads(out[out.find("{") :])
    if isinstance(report, list):
        (report,) = [r for r in report if r.get("check_type") == "kubernetes"]
    assert report["summary"]["passed"] > 0, "checkov ran no check"
    failed: dict[str, set[tuple[str, str]]] = {c: set() for c in EXPECTED}
    for f in report["results"]["failed_checks"]:
        component = re.sub(r"^/|\.yaml$", "", f["file_path"])
        failed[component].add((f["check_id"], f["resource"]))
    skips = yaml.safe_load((DEPLOY / "checkov-skips.yaml").read_text())["skips"]
    allowed = {(s["check"], r) for s in skips for r in s["resources"]}
    for component, failures in failed.items():
        unexpected = sorted(failures - allowed)
        assert not unexpected, f"{component}: checkov failures the base does not skip: {unexpected}"
    docker_socket = ("CKV_K8S_27", "DaemonSet.cedar-system.cedar-puller")
    assert docker_socket in failed["docker"]
    # No Docker socket on CRI nodes: the one deliberate exception does not apply there.
    assert docker_socket not in failed["containerd"] | failed["cri-o"]
