"""Pure: asking the Kubernetes API who a token is (a TokenReview), and judging the answer.

The TokenReview is the authority: the API server verifies the token's signature, issuer,
audience (`spec.audiences`: the token must be for `nats`), expiry, and that its
ServiceAccount and bound Pod still exist with the UIDs the token names
(pkg/serviceaccount/jwt.go and claims.go in kubernetes/kubernetes). Its answer
(pkg/registry/authentication/tokenreview/storage.go) says `status.authenticated`, the
audiences it confirmed, and the user: `system:serviceaccount:<namespace>:<name>`, the
ServiceAccount's UID, groups, and as extras the Pod (`authentication.kubernetes.io/pod-name`,
`pod-uid`) and, since Kubernetes 1.30, the Pod's node (`authentication.kubernetes.io/node-name`,
ServiceAccountInfo.UserInfo in staging/src/k8s.io/apiserver/pkg/authentication/
serviceaccount/util.go). A puller is accepted when all of that holds, its ServiceAccount
is one of those allowed, and the node is a valid node name; anything else is a `Refusal`
with a reason.

The token's own claims are read (unverified) only to name a refusal's cause (wrong
audience, expired, not a JWT at all) and, once the API has verified the token, to bound the
NATS user's expiry by the token's. No I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from cedar.nats_auth import errors
from cedar.nats_auth.errors import Refusal
from cedar.nats_auth.grant import is_node_name

JSON = dict[str, Any]

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"
MAX_TOKEN_BYTES = 16 * 1024  # a bound token is ~1 KiB; a CONNECT carries up to max_control_line


@dataclass(frozen=True)
class Identity:
    """Who a reviewed token is: a ServiceAccount, through one Pod on one node."""

    namespace: str
    service_account: str
    uid: str
    pod: str
    pod_uid: str
    node: str

    @property
    def username(self) -> str:
        return f"{SERVICE_ACCOUNT_PREFIX}{self.namespace}:{self.service_account}"


def parse_service_accounts(text: str) -> frozenset[tuple[str, str]]:
    """`namespace/name,...` as a set of (namespace, name); ValueError when malformed."""
    found = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        namespace, sep, name = item.partition("/")
        if not sep or not namespace or not name or "/" in name:
            raise ValueError(f"{item!r} is not namespace/name")
        found.add((namespace, name))
    if not found:
        raise ValueError("no ServiceAccount given")
    return frozenset(found)


def review_body(token: str, audience: str) -> JSON:
    """The TokenReview to create: this token, which must have been issued for `audience`."""
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [audience]},
    }


def check_token(token: str) -> None:
    """Refuse what is not worth asking the API about: no token, or an oversized one."""
    if not token:
        raise Refusal(errors.NO_TOKEN, "the client sent no token (CEDAR_NATS_TOKEN_FILE unset?)")
    if len(token.encode()) > MAX_TOKEN_BYTES:
        raise Refusal(errors.MALFORMED_TOKEN, f"the token is over {MAX_TOKEN_BYTES} bytes")


def unverified_claims(token: str) -> JSON | None:
    """The claims of a JWT-shaped token, not verified; None when it is not JWT-shaped."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def _audiences(claims: JSON) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    return [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def refusal_reason(token: str, audience: str, now: float) -> str:
    """Why the API most likely refused `token`: the cause the operator should look at."""
    claims = unverified_claims(token)
    if claims is None:
        return errors.MALFORMED_TOKEN
    if audience not in _audiences(claims):
        return errors.WRONG_AUDIENCE
    exp = _number(claims.get("exp"))
    if exp is not None and now >= exp:
        return errors.EXPIRED
    return errors.UNAUTHENTICATED


def _obj(parent: JSON, key: str) -> JSON:
    value = parent.get(key)
    return value if isinstance(value, dict) else {}


def _str(parent: JSON, key: str) -> str:
    value = parent.get(key)
    return value if isinstance(value, str) else ""


def _one(extra: JSON, key: str) -> str:
    values = extra.get(key)
    if isinstance(values, list) and len(values) == 1 and isinstance(values[0], str):
        return values[0]
    return ""


def judge(
    review: JSON,
    *,
    token: str,
    audience: str,
    allowed: frozenset[tuple[str, str]],
    now: float,
) -> Identity:
    """The identity the API confirmed for `token`, if it may act as a puller; else Refusal."""
    status = _obj(review, "status")
    if status.get("authenticated") is not True:
        said = status.get("error") or "no error given"
        raise Refusal(
            refusal_reason(token, audience, now), f"the API did not authenticate it: {said}"
        )
    audiences = status.get("audiences")
    if not isinstance(audiences, list) or audience not in audiences:
        # An API server that ignores spec.audiences would confirm any token; never trust it.
        raise Refusal(
            errors.WRONG_AUDIENCE, f"the API did not confirm the audience {audience!r}: {audiences}"
        )
    user = _obj(status, "user")
    username = _str(user, "username")
    namespace, _, name = username.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
    if not username.startswith(SERVICE_ACCOUNT_PREFIX) or (namespace, name) not in allowed:
        wanted = ", ".join(sorted(f"{ns}/{n}" for ns, n in allowed))
        raise Refusal(errors.WRONG_SERVICE_ACCOUNT, f"{username or 'nobody'} is not {wanted}")
    extra = _obj(user, "extra")
    pod, pod_uid = _one(extra, POD_NAME_KEY), _one(extra, POD_UID_KEY)
    if not pod or not pod_uid:
        raise Refusal(errors.NOT_POD_BOUND, f"{username}'s token is not bound to a Pod")
    node = _one(extra, NODE_NAME_KEY)
    if not node:
        raise Refusal(
            errors.NO_NODE,
            f"{username}'s token (pod {pod}) names no node: Kubernetes 1.30 or later puts "
            f"{NODE_NAME_KEY} in it (feature ServiceAccountTokenPodNodeInfo)",
        )
    if not is_node_name(node):
        raise Refusal(errors.BAD_NODE, f"{node[:300]!r} is not a Kubernetes node name")
    return Identity(
        namespace=namespace,
        service_account=name,
        uid=_str(user, "uid"),
        pod=pod,
        pod_uid=pod_uid,
        node=node,
    )


def user_expiry(token: str, *, now: float, ttl: float) -> int:
    """When the NATS user granted for `token` (verified by the API) expires: after `ttl`,
    never later than the token itself, so a connection never outlives its token."""
    limit = now + ttl
    claims = unverified_claims(token) or {}
    exp = _number(claims.get("exp"))
    return int(min(limit, exp) if exp is not None else limit)
