"""The components of deploy/mcs-allocator/ that make the level bind, rendered and checked.

Each component is rendered with `kubectl kustomize` on top of the base, as an operator's
overlay would, and every object is validated strictly with kubernetes-validate: against the
Kubernetes 1.36 schemas (MutatingAdmissionPolicy v1 is GA there), and the v1beta1 component
against 1.34 and 1.35. cert-manager's kinds have no Kubernetes schema; they are checked
field by field. Then what the manifests promise: failurePolicy Fail, the namespaces left
out, the webhook's Service, port, path and certificate Secret matching what the allocator
serves, and RBAC for exactly the new verbs. The CEL itself is evaluated in
tests/unit/test_mcs_admission_cel.py.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cedar.mcs_allocator.settings import AllocatorSettings
from cedar.mcs_allocator.webhook import PATH as WEBHOOK_PATH
from tests.deploy.test_deploy import checkov_failures

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPONENTS = DEPLOY / "mcs-allocator"
EXCLUDED = AllocatorSettings().excluded

# component set -> the Kubernetes versions it is for
RENDERINGS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("pod-level",): ("1.36.0",),
    ("pod-level-v1beta1",): ("1.34.0", "1.35.0"),
    ("pod-level-webhook", "webhook-cert-manager"): ("1.34.0", "1.36.0"),
    ("pod-level-webhook",): ("1.30.0", "1.36.0"),
    ("nfs-context",): ("1.36.0",),
    ("pod-level", "nfs-context"): ("1.36.0",),
}
CERT_MANAGER = "cert-manager.io/v1"


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not installed; install it with: apt-get install kubectl")
    return path


_RENDERED: dict[tuple[str, ...], list[dict[str, Any]]] = {}


def render(tmp_path: Path, components: tuple[str, ...]) -> list[dict[str, Any]]:
    """The base with `components`, as `kubectl kustomize` renders it (each set once)."""
    if components not in _RENDERED:
        _RENDERED[components] = _render(tmp_path, components)
    return copy.deepcopy(_RENDERED[components])


def _render(tmp_path: Path, components: tuple[str, ...]) -> list[dict[str, Any]]:
    overlay = tmp_path / ("overlay-" + "-".join(components))
    overlay.mkdir(exist_ok=True)
    rel = os.path.relpath
    text = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
    text += f"resources:\n  - {rel(DEPLOY, overlay)}\ncomponents:\n"
    text += "".join(f"  - {rel(COMPONENTS / c, overlay)}\n" for c in components)
    (overlay / "kustomization.yaml").write_text(text)
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _new_objects(docs: list[dict[str, Any]], base: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen = {(d["kind"], d["metadata"]["name"]) for d in base}
    return [d for d in docs if (d["kind"], d["metadata"]["name"]) not in seen]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(tmp_path_factory.mktemp("base"), ())


@pytest.mark.parametrize(
    ("components", "version"),
    [(c, v) for c, versions in RENDERINGS.items() for v in versions],
    ids=lambda x: "+".join(x) if isinstance(x, tuple) else x,
)
def test_components_validate_strictly(
    tmp_path: Path, components: tuple[str, ...], version: str
) -> None:
    docs = render(tmp_path, components)
    errors = []
    for doc in docs:
        if doc["apiVersion"] == CERT_MANAGER:
            continue  # not a Kubernetes schema: test_cert_manager_objects
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: no schema ({err})")
    assert not errors, "\n".join(errors)


def test_the_v1beta1_component_is_refused_by_the_1_36_schemas_only_as_expected(
    tmp_path: Path,
) -> None:
    # MutatingAdmissionPolicy v1 does not exist before 1.36, so the components are not
    # interchangeable: the v1 one has no schema in 1.35.
    (mutation,) = [
        d for d in render(tmp_path, ("pod-level",)) if d["kind"] == "MutatingAdmissionPolicy"
    ]
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(mutation, "1.35.0", strict=True)


def _selector_values(selector: dict[str, Any]) -> set[str]:
    (req,) = selector["matchExpressions"]
    assert (req["key"], req["operator"]) == ("kubernetes.io/metadata.name", "NotIn")
    return set(req["values"])


def test_pod_level_components_leave_out_the_excluded_namespaces(tmp_path: Path) -> None:
    for components in (("pod-level",), ("pod-level-v1beta1",), ("pod-level-webhook",)):
        docs = render(tmp_path, components)
        (vap_binding,) = [
            d
            for d in docs
            if d["kind"] == "ValidatingAdmissionPolicyBinding"
            and d["metadata"]["name"] == "cedar-mcs-pod-level"
        ]
        assert vap_binding["spec"]["validationActions"] == ["Deny"]
        assert _selector_values(vap_binding["spec"]["matchResources"]["namespaceSelector"]) == (
            EXCLUDED
        )
        for binding in by_kind(docs, "MutatingAdmissionPolicyBinding").values():
            assert _selector_values(binding["spec"]["matchResources"]["namespaceSelector"]) == (
                EXCLUDED
            )
        for config in by_kind(docs, "MutatingWebhookConfiguration").values():
            (hook,) = config["webhooks"]
            assert _selector_values(hook["namespaceSelector"]) == EXCLUDED


def test_the_webhook_is_wired_to_what_the_allocator_serves(tmp_path: Path) -> None:
    docs = render(tmp_path, ("pod-level-webhook", "webhook-cert-manager"))
    (config,) = by_kind(docs, "MutatingWebhookConfiguration").values()
    (hook,) = config["webhooks"]
    assert hook["failurePolicy"] == "Fail"
    assert hook["sideEffects"] == "None"  # dryRun requests are sent to it
    assert hook["admissionReviewVersions"] == ["v1"]
    assert 1 <= hook["timeoutSeconds"] <= 10
    rules = {
        (op, r) for rule in hook["rules"] for op in rule["operations"] for r in rule["resources"]
    }
    assert rules == {("CREATE", "pods"), ("UPDATE", "pods/ephemeralcontainers")}
    service_ref = hook["clientConfig"]["service"]
    assert service_ref["path"] == WEBHOOK_PATH
    service = by_kind(docs, "Service")[service_ref["name"]]
    assert service["metadata"]["namespace"] == service_ref["namespace"] == "cedar-system"
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == service_ref["port"]]
    deployment = by_kind(docs, "Deployment")["cedar-mcs-allocator"]
    pod = deployment["spec"]["template"]["spec"]
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["CEDAR_MCS_WEBHOOK_PORT"]) == ports[port["targetPort"]]
    settings = AllocatorSettings(
        mcs_webhook_port=int(env["CEDAR_MCS_WEBHOOK_PORT"]),
        mcs_webhook_cert=env["CEDAR_MCS_WEBHOOK_CERT"],
        mcs_webhook_key=env["CEDAR_MCS_WEBHOOK_KEY"],
    )
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": "webhook",
        "scheme": "HTTPS",
    }
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "webhook-tls"]
    assert mount["readOnly"] is True
    assert Path(settings.mcs_webhook_cert).parent == Path(mount["mountPath"])
    assert Path(settings.mcs_webhook_key).parent == Path(mount["mountPath"])
    (volume,) = [v for v in pod["volumes"] if v["name"] == "webhook-tls"]
    secret = volume["secret"]["secretName"]
    # The certificate the component issues lands in that Secret, for the Service's name,
    # and is what cainjector is told to inject.
    certificates = {
        d["metadata"]["name"]: d
        for d in docs
        if d["apiVersion"] == CERT_MANAGER and d["kind"] == "Certificate"
    }
    ns, name = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
    serving = certificates[name]
    assert serving["metadata"]["namespace"] == ns == "cedar-system"
    assert serving["spec"]["secretName"] == secret
    assert f"{service['metadata']['name']}.cedar-system.svc" in serving["spec"]["dnsNames"]
    assert "server auth" in serving["spec"]["usages"]
    # Replicas and a disruption budget keep a failurePolicy-Fail webhook answering.
    assert deployment["spec"]["replicas"] >= 2
    assert "cedar-mcs-allocator" in by_kind(docs, "PodDisruptionBudget")
    policy = by_kind(docs, "NetworkPolicy")["cedar-mcs-webhook"]
    allowed_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports[port["targetPort"]] in allowed_ports


def test_cert_manager_objects(tmp_path: Path) -> None:
    docs = [
        d
        for d in render(tmp_path, ("pod-level-webhook", "webhook-cert-manager"))
        if d["apiVersion"] == CERT_MANAGER
    ]
    issuers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Issuer"}
    certificates = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Certificate"}
    assert {d["kind"] for d in docs} == {"Issuer", "Certificate"}
    for cert in certificates.values():
        assert set(cert) == {"apiVersion", "kind", "metadata", "spec"}
        assert cert["spec"]["issuerRef"]["kind"] == "Issuer"
        assert cert["spec"]["issuerRef"]["name"] in issuers
        assert cert["spec"]["secretName"]
    ca = certificates["cedar-mcs-webhook-ca"]
    assert ca["spec"]["isCA"] is True
    assert issuers["cedar-mcs-webhook-ca"]["spec"] == {
        "ca": {"secretName": ca["spec"]["secretName"]}
    }


def _grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_rbac_grants_exactly_the_new_verbs(tmp_path: Path, base: list[dict[str, Any]]) -> None:
    roles = by_kind(base, "ClusterRole")
    assert _grants(roles["cedar-mcs-allocator"]) == {
        *(("", "namespaces", v) for v in ("get", "list", "watch", "patch")),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "events", "create"),
        ("events.k8s.io", "events", "create"),
    }
    docs = render(tmp_path, ("nfs-context",))
    assert _grants(by_kind(docs, "ClusterRole")["cedar-mcs-allocator-nfs"]) == {
        ("", "persistentvolumes", "list"),
        ("", "persistentvolumes", "watch"),
        ("", "persistentvolumes", "patch"),
    }
    binding = by_kind(docs, "ClusterRoleBinding")["cedar-mcs-allocator-nfs"]
    assert binding["roleRef"]["name"] == "cedar-mcs-allocator-nfs"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cedar-mcs-allocator", "namespace": "cedar-system"}
    ]
    (container,) = by_kind(docs, "Deployment")["cedar-mcs-allocator"]["spec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert AllocatorSettings(mcs_nfs_context=env["CEDAR_MCS_NFS_CONTEXT"]).mcs_nfs_context
    # No component grants claims, pod writes or anything cluster-wide beyond these.
    for components in RENDERINGS:
        for role in by_kind(render(tmp_path, components), "ClusterRole").values():
            for _group, resource, verb in _grants(role):
                if resource in ("pods", "persistentvolumeclaims"):
                    assert verb in ("list", "watch"), (role["metadata"]["name"], resource, verb)


def test_new_objects_are_labelled_and_namespaced(
    tmp_path: Path, base: list[dict[str, Any]]
) -> None:
    cluster_scoped = {
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "MutatingAdmissionPolicy",
        "MutatingAdmissionPolicyBinding",
        "MutatingWebhookConfiguration",
    }
    for components in RENDERINGS:
        for doc in _new_objects(render(tmp_path, components), base):
            where = f"{doc['kind']}/{doc['metadata']['name']}"
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cedar", where
            if doc["kind"] in cluster_scoped:
                assert "namespace" not in doc["metadata"], where
            else:
                assert doc["metadata"]["namespace"] == "cedar-system", where


def test_checkov_finds_nothing_new_in_the_components(tmp_path: Path) -> None:
    """The base's accepted exceptions (deploy/checkov-skips.yaml) and nothing more."""
    docs = render(tmp_path, ("pod-level-webhook", "webhook-cert-manager", "nfs-context"))
    docs += [d for d in render(tmp_path, ("pod-level",)) if "Policy" in d["kind"]]
    scan = tmp_path / "scan"
    scan.mkdir()
    (scan / "cedar.yaml").write_text(yaml.safe_dump_all(docs))
    failed = checkov_failures("kubernetes", scan)
    skips = yaml.safe_load((DEPLOY / "checkov-skips.yaml").read_text())["skips"]
    allowed = {(s["check"], r) for s in skips for r in s["resources"]}
    assert failed <= allowed, f"new checkov failures: {sorted(failed - allowed)}"
