"""A puller's NATS rights under auth callout, and the deploy files that turn it on.

The grant is the static `puller` user's of deploy/nats/accounts.conf with every write
scoped to one node (and the buckets' STREAM.UPDATE dropped): checked subject by subject,
with NATS's own matching rules, for any pair of node names. The component's files are
kept equal to what they copy (nats.conf, the base's images and labels) and to the names the
code uses (auth users, audience, ServiceAccount, token path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

from cedar.nats_auth.grant import PULLER_INBOX, is_node_name, node_writes, puller_permissions
from cedar.nats_auth.settings import NatsAuthSettings
from cedar.proto import subjects
from tests.deploy.nats_accounts import conf_permissions, subject_matches

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPONENT = DEPLOY / "components" / "nats-auth-callout"

# What the callout grant drops of the static puller user, on purpose (grant.py).
STATIC_WRITES = {
    f"$KV.{subjects.KV_NODE_STATUS}.>",
    f"$KV.{subjects.KV_PULLER_STATE}.>",
    f"{subjects.DECISIONS_PREFIX}.>",
}
FLEET_LEASES = f"$KV.{subjects.KV_FLEET_LEASES}.>"
DROPPED = {
    f"$JS.API.STREAM.UPDATE.KV_{subjects.KV_NODE_STATUS}",
    f"$JS.API.STREAM.UPDATE.KV_{subjects.KV_PULLER_STATE}",
    f"$JS.API.STREAM.UPDATE.KV_{subjects.KV_FLEET_LEASES}",
}

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
node_names = st.lists(_label, min_size=1, max_size=4).map(".".join)


def allowed(patterns: tuple[str, ...], subject: str) -> bool:
    return any(subject_matches(p, subject) for p in patterns)


@given(node_names, node_names)
def test_a_puller_may_write_its_node_and_no_other(node: str, other: str) -> None:
    grant = puller_permissions(node)
    for writer, may in ((node, True), (other, other == node)):
        key = subjects.node_status_key(writer, "registry.example/app:v1")
        assert allowed(grant.publish, f"$KV.{subjects.KV_NODE_STATUS}.{key}") is may
        clock = f"{subjects.token(writer)}.sha256_abc"
        assert allowed(grant.publish, f"$KV.{subjects.KV_PULLER_STATE}.{clock}") is may
        assert allowed(grant.publish, subjects.decisions_subject(writer)) is may


@given(node_names)
def test_no_grant_reaches_another_nodes_subjects_by_a_wildcard(node: str) -> None:
    grant = puller_permissions(node)
    writes = set(node_writes(node))
    for pattern in grant.publish:
        if pattern in writes or pattern == FLEET_LEASES:
            continue
        # Everything else is JetStream's API or flow control, never a message subject (but
        # fleet pacing's leases, which are per registry and slot, shared by every node).
        assert pattern.startswith(("$JS.API.", "$JS.FC.")), pattern
    assert grant.subscribe == (f"{PULLER_INBOX}.>",)


def test_the_grant_is_the_static_puller_user_scoped_to_the_node() -> None:
    static = conf_permissions()["puller"]
    assert set(static["publish_allow"]) >= STATIC_WRITES
    assert set(static["publish_allow"]) >= DROPPED
    grant = puller_permissions("node-a")
    shared = set(grant.publish) - set(node_writes("node-a"))
    assert shared == set(static["publish_allow"]) - STATIC_WRITES - DROPPED
    assert set(grant.subscribe) == set(static["subscribe_allow"])
    assert not static["publish_deny"]


def test_node_names_are_kubernetes_names() -> None:
    assert is_node_name("ip-10-0-0-1.ec2.internal")
    for bad in ("", "Node", "a_b", "a.", ".a", "a..b", "*", ">", "a b", "a" * 254, 7, None):
        assert not is_node_name(bad)


# ------------------------------------------------------------------ the deploy files


def _yaml(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_the_components_nats_conf_is_the_base_plus_the_callout() -> None:
    base = (DEPLOY / "nats" / "nats.conf").read_text()
    ours = (COMPONENT / "nats.conf").read_text()
    assert ours.startswith(base), "deploy/nats/nats.conf changed: copy it to the component"
    added = [line for line in ours[len(base) :].splitlines() if line and not line.startswith("#")]
    assert added == ["include ./auth-callout.conf"]


def test_the_service_gets_the_bases_images_and_labels() -> None:
    (base,) = _yaml(DEPLOY / "kustomization.yaml")
    (ours,) = _yaml(DEPLOY / "nats-auth" / "kustomization.yaml")
    assert ours["images"] == base["images"] and ours["labels"] == base["labels"]


def test_the_names_in_the_files_are_the_ones_the_code_uses() -> None:
    text = (COMPONENT / "auth-callout.conf").read_text()
    auth_users = text.split("auth_users:", 1)[1].split("[", 1)[1].split("]", 1)[0]
    users = {u.strip() for u in auth_users.split(",")}
    static = set(conf_permissions())
    # Every static user but the puller's bypasses the callout, and so does the callout's.
    assert users == (static - {"puller"}) | {"nats-auth"}

    deployment = next(
        d for d in _yaml(DEPLOY / "nats-auth" / "deployment.yaml") if d["kind"] == "Deployment"
    )
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CEDAR_NATS_USER"]["value"] == "nats-auth"
    assert env["CEDAR_AUTH_SERVICE_ACCOUNTS"]["value"] == NatsAuthSettings().auth_service_accounts

    (daemonset,) = _yaml(DEPLOY / "puller" / "daemonset.yaml")
    account = daemonset["spec"]["template"]["spec"]["serviceAccountName"]
    assert NatsAuthSettings().service_accounts == {("cedar-system", account)}

    (patch,) = _yaml(COMPONENT / "puller.yaml")
    spec = patch["spec"]["template"]["spec"]
    (source,) = spec["volumes"][0]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == NatsAuthSettings().auth_audience
    mount = spec["containers"][0]["volumeMounts"][0]["mountPath"]
    token_env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert token_env["CEDAR_NATS_TOKEN_FILE"] == f"{mount}/{source['serviceAccountToken']['path']}"
    assert source["serviceAccountToken"]["expirationSeconds"] >= 600  # the API's minimum


def test_the_service_may_only_create_tokenreviews() -> None:
    docs = _yaml(DEPLOY / "nats-auth" / "rbac.yaml")
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    assert role["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}
    ]
