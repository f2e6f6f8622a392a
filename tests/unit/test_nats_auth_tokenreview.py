"""The simulated API's bound tokens and TokenReview hold to the real API server's rules.

What the auth callout depends on, each with the kubernetes/kubernetes source it comes from;
the simulator's state is used directly (no server: tests/integration/test_nats_auth_callout.py
reviews over HTTP).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from cedar.sandbox.errors import ApiError
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.kubeapi_auth import ISSUER

NS, SA = "cedar-system", "cedar-puller"


@pytest.fixture
def api() -> KubeAPI:
    api = KubeAPI()
    for node in ("node-a", "node-b"):
        api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    for pod, account, node in (("puller-a", SA, "node-a"), ("other", "other", "node-b")):
        api.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod, "namespace": NS},
                "spec": {
                    "serviceAccountName": account,
                    "nodeName": node,
                    "containers": [{"name": "c", "image": "i"}],
                },
            }
        )
    return api


def _claims(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return data


def _review(api: KubeAPI, token: str, audiences: list[str] | None = None) -> dict[str, Any]:
    return api.tokens.authenticate(token, audiences or [], time.time())


def test_a_bound_token_has_the_claims_of_a_projected_one(api: KubeAPI) -> None:
    """pkg/serviceaccount/claims.go Claims; pkg/registry/core/serviceaccount/storage/token.go
    (the Pod's node goes into a pod-bound token)."""
    token = api.mint_token(NS, SA, "puller-a", audiences=["nats", "other"])
    claims = _claims(token)
    pod, node = api.get("pods", NS, "puller-a"), api.get("nodes", None, "node-a")
    assert pod is not None and node is not None
    assert claims["sub"] == f"system:serviceaccount:{NS}:{SA}" and claims["iss"] == ISSUER
    assert claims["aud"] == ["nats", "other"]
    assert claims["exp"] - claims["iat"] == 3600 and claims["nbf"] == claims["iat"]
    kube = claims["kubernetes.io"]
    assert kube["namespace"] == NS and kube["serviceaccount"]["name"] == SA
    assert kube["pod"] == {"name": "puller-a", "uid": pod["metadata"]["uid"]}
    assert kube["node"] == {"name": "node-a", "uid": node["metadata"]["uid"]}


def test_a_review_says_who_and_on_which_node(api: KubeAPI) -> None:
    """pkg/registry/authentication/tokenreview/storage.go (status.audiences is the
    intersection); staging/src/k8s.io/apiserver/pkg/authentication/serviceaccount/util.go
    ServiceAccountInfo.UserInfo (username, the ServiceAccount's uid, groups, extras)."""
    token = api.mint_token(NS, SA, "puller-a", audiences=["nats", "other"])
    claims = _claims(token)
    pod, node = api.get("pods", NS, "puller-a"), api.get("nodes", None, "node-a")
    assert pod is not None and node is not None
    status = _review(api, token, ["nats"])
    assert status["authenticated"] is True and status["audiences"] == ["nats"]
    user = status["user"]
    assert user["username"] == f"system:serviceaccount:{NS}:{SA}"
    assert user["uid"] == claims["kubernetes.io"]["serviceaccount"]["uid"]
    assert user["groups"] == [
        "system:serviceaccounts",
        f"system:serviceaccounts:{NS}",
        "system:authenticated",
    ]
    assert user["extra"] == {
        "authentication.kubernetes.io/pod-name": ["puller-a"],
        "authentication.kubernetes.io/pod-uid": [pod["metadata"]["uid"]],
        "authentication.kubernetes.io/credential-id": [f"JTI={claims['jti']}"],
        "authentication.kubernetes.io/node-name": ["node-a"],
        "authentication.kubernetes.io/node-uid": [node["metadata"]["uid"]],
    }


def test_the_audience_must_be_the_reviews_or_the_apis(api: KubeAPI) -> None:
    """pkg/serviceaccount/jwt.go: the token's audiences must meet the requested ones (the
    API's own when the review names none); the error text is jwt.go's, inside the
    bearer-token authenticator's."""
    token = api.mint_token(NS, SA, "puller-a")
    refused = _review(api, token, ["nats"])
    assert "authenticated" not in refused
    assert refused["error"] == (
        f'[invalid bearer token, token audiences ["{ISSUER}"] is invalid for the target '
        'audiences ["nats"]]'
    )
    own = _review(api, token)
    assert own["authenticated"] is True and own["audiences"] == [ISSUER]


def test_expiry_has_go_joses_minute_of_leeway(api: KubeAPI) -> None:
    """pkg/serviceaccount/claims.go Validate: jwt.Expected with go-jose's DefaultLeeway."""
    within = api.mint_token(NS, SA, "puller-a", audiences=["nats"], issued_at=time.time() - 3630)
    assert _review(api, within, ["nats"])["authenticated"] is True
    past = api.mint_token(NS, SA, "puller-a", audiences=["nats"], issued_at=time.time() - 3700)
    assert "service account token has expired" in _review(api, past, ["nats"])["error"]


def test_a_token_dies_with_its_pod_or_its_service_account(api: KubeAPI) -> None:
    """pkg/serviceaccount/claims.go Validate: the bound Pod and the ServiceAccount must still
    exist with the UIDs in the token."""
    token = api.mint_token(NS, SA, "puller-a", audiences=["nats"])
    api.delete("pods", NS, "puller-a")
    assert "token has been invalidated" in _review(api, token, ["nats"])["error"]
    other = api.mint_token(NS, "other", "other", audiences=["nats"])
    api.tokens.delete_service_account(NS, "other")
    assert 'serviceaccounts "other" not found' in _review(api, other, ["nats"])["error"]


def test_what_no_known_issuer_signed_is_an_invalid_bearer_token(api: KubeAPI) -> None:
    """pkg/serviceaccount/jwt.go leaves tokens of other issuers, or with a bad signature, to
    the other authenticators; the bearer-token authenticator's error is then its own."""
    token = api.mint_token(NS, SA, "puller-a", audiences=["nats"])
    header, body, signature = token.split(".")
    forged = _claims(token)
    forged["kubernetes.io"]["node"]["name"] = "node-b"
    forged_body = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    for bad in ("garbage", "a.b.c", f"{header}.{forged_body}.{signature}", f"{header}.{body}.x"):
        assert _review(api, bad, ["nats"]) == {"user": {}, "error": "invalid bearer token"}


def test_token_requests_are_validated_as_the_real_api_does(api: KubeAPI) -> None:
    """pkg/apis/authentication/validation/validation.go (10 minutes at least);
    pkg/registry/core/serviceaccount/storage/token.go (the Pod must run as the account)."""
    with pytest.raises(ApiError, match="less than 10 minutes"):
        api.mint_token(NS, SA, "puller-a", expiration_seconds=60)
    with pytest.raises(ApiError, match="different serviceaccount name"):
        api.mint_token(NS, "other", "puller-a")
    with pytest.raises(ApiError) as missing:
        api.mint_token(NS, SA, "no-such-pod")
    assert missing.value.code == 404
