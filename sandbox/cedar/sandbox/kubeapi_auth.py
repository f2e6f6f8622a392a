"""The simulated Kubernetes API's bound ServiceAccount tokens and its TokenReview.

Tokens are minted as the real TokenRequest (pkg/registry/core/serviceaccount/storage/
token.go) mints a Pod's projected token: bound to a Pod that runs as the ServiceAccount,
with the Pod's node, claims as pkg/serviceaccount/claims.go `Claims` writes them (`iss`,
`sub` system:serviceaccount:<ns>:<name>, `aud`, `iat`, `nbf`, `exp`, `jti`, and
`kubernetes.io` with the namespace and the serviceaccount, pod and node references), an
expiry of at least 10 minutes (pkg/apis/authentication/validation/validation.go). They are
signed with HS256 and a key only this server holds, where the real one signs RS256/ES256
with its service-account key: to a client, a token is opaque either way.

`POST /apis/authentication.k8s.io/v1/tokenreviews` answers as
pkg/registry/authentication/tokenreview/storage.go does: an empty token is a 400; otherwise
201 with `status`. The checks are pkg/serviceaccount/jwt.go's (a token not signed by this
issuer is not a service-account token: "invalid bearer token"; its audiences must meet the
review's `spec.audiences`, or the API's own audience when none is given) and claims.go's
`Validate` (expiry and not-before with go-jose's one-minute leeway; the ServiceAccount and
the bound Pod must still exist with the UIDs in the token). An authenticated answer has the
user as ServiceAccountInfo.UserInfo builds it (staging/src/k8s.io/apiserver/pkg/
authentication/serviceaccount/util.go): username, the ServiceAccount's UID, groups
system:serviceaccounts and system:serviceaccounts:<ns> (plus system:authenticated, which
the API server's authenticator adds to everyone it authenticates), and extras pod-name,
pod-uid, credential-id (JTI=<jti>), node-name and node-uid; and `audiences`, the
intersection. ServiceAccounts are not objects of the simulated API: the first token minted
for one creates it here with a UID, and `delete_service_account` invalidates its tokens.

The test controls count each review (`requests("create", "tokenreviews")`); TokenReview is
not a resource of the table, so the façade's forbid, fail_next and fault modes do not name
it, and it is not in discovery (Cedar posts to its path, as client-go does).

I/O: answers aiohttp requests on the server's event loop; reads Pods and Nodes from the
store. Thread-safe: tests mint tokens from their own threads.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from typing import Any

from aiohttp import web

from cedar.sandbox.errors import ApiError
from cedar.sandbox.kubeapi_controls import Controls
from cedar.sandbox.kubeapi_ops import JsonObj, ResourceTable
from cedar.sandbox.kubeapi_store import Store

__all__ = ["ISSUER", "TOKEN_REVIEWS", "TokenReviews"]

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
# The API server's --service-account-issuer, which is also its default --api-audiences.
ISSUER = "https://kubernetes.default.svc.cluster.local"
MIN_EXPIRATION = 600  # validation.go MinTokenAgeSec
MAX_EXPIRATION = 1 << 32
LEEWAY = 60.0  # go-jose jwt.DefaultLeeway, used by claims.go Validate

POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
NODE_NAME = "authentication.kubernetes.io/node-name"
NODE_UID = "authentication.kubernetes.io/node-uid"
CREDENTIAL_ID = "authentication.kubernetes.io/credential-id"
INVALID_TOKEN = "invalid bearer token"  # bearertoken.go's error when no authenticator took it


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _go_quote(values: list[str]) -> str:
    """Go's %q of a []string: `["a" "b"]`."""
    return "[" + " ".join(json.dumps(v) for v in values) + "]"


class _NotOurs(Exception):
    """Not a token this issuer signed: another authenticator's, or none at all."""


class TokenReviews:
    """Mints bound ServiceAccount tokens and reviews them."""

    def __init__(self, table: ResourceTable, store: Store) -> None:
        self.table = table
        self.store = store
        self._key = os.urandom(32)
        self._lock = threading.Lock()
        self._accounts: dict[tuple[str, str], str] = {}  # (namespace, name) -> uid

    # ------------------------------------------------------------ service accounts

    def service_account_uid(self, namespace: str, name: str) -> str:
        """The ServiceAccount's UID, creating it if this is the first time it is named."""
        with self._lock:
            return self._accounts.setdefault((namespace, name), str(uuid.uuid4()))

    def delete_service_account(self, namespace: str, name: str) -> None:
        """Delete it: tokens minted for it stop authenticating (claims.go Validate)."""
        with self._lock:
            self._accounts.pop((namespace, name), None)

    # ------------------------------------------------------------ minting

    def mint(
        self,
        namespace: str,
        service_account: str,
        pod: str,
        *,
        audiences: list[str] | None = None,
        expiration_seconds: int = 3600,
        issued_at: float | None = None,
    ) -> str:
        """A token for `service_account` bound to `pod` (which must run as it), as the
        kubelet gets for a projected serviceAccountToken volume; `issued_at` (Unix time,
        default now) lets a test make one that has already expired."""
        if not MIN_EXPIRATION <= expiration_seconds <= MAX_EXPIRATION:
            raise ApiError(
                422,
                "Invalid",
                f"spec.expirationSeconds: Invalid value: {expiration_seconds}: may not specify "
                "a duration less than 10 minutes or larger than 2^32 seconds",
            )
        bound = self.store.get(self.table.lookup("pods"), namespace, pod)
        spec = bound.get("spec") or {}
        if spec.get("serviceAccountName", "default") != service_account:
            raise ApiError(
                400,
                "BadRequest",
                f'cannot bind token for serviceaccount "{service_account}" to pod running '
                "with different serviceaccount name.",
            )
        kube: JsonObj = {
            "namespace": namespace,
            "serviceaccount": {
                "name": service_account,
                "uid": self.service_account_uid(namespace, service_account),
            },
            "pod": {"name": pod, "uid": bound["metadata"]["uid"]},
        }
        node_name = spec.get("nodeName")
        if node_name:  # token.go: a missing Node still leaves its name in the claims
            node: JsonObj = {"name": node_name}
            try:
                node["uid"] = self.store.get(self.table.lookup("nodes"), None, node_name)[
                    "metadata"
                ]["uid"]
            except ApiError as e:
                if e.code != 404:
                    raise
            kube["node"] = node
        now = int(time.time() if issued_at is None else issued_at)
        claims = {
            "aud": list(audiences) if audiences else [ISSUER],
            "exp": now + expiration_seconds,
            "iat": now,
            "iss": ISSUER,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": kube,
            "nbf": now,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        header = _b64(json.dumps({"alg": "HS256", "kid": "cedar-sandbox"}).encode())
        signed = f"{header}.{_b64(json.dumps(claims).encode())}"
        return f"{signed}.{_b64(self._sign(signed))}"

    def _sign(self, signed: str) -> bytes:
        return hmac.new(self._key, signed.encode(), hashlib.sha256).digest()

    # ------------------------------------------------------------ reviewing

    def _claims(self, token: str) -> JsonObj:
        """The claims of a token this issuer signed; _NotOurs otherwise (jwt.go: a token
        whose issuer is another is left to the other authenticators)."""
        parts = token.split(".")
        if len(parts) != 3:
            raise _NotOurs
        try:
            claims = json.loads(_unb64(parts[1]))
            signature = _unb64(parts[2])
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise _NotOurs from None
        if not isinstance(claims, dict) or claims.get("iss") != ISSUER:
            raise _NotOurs
        if not hmac.compare_digest(signature, self._sign(f"{parts[0]}.{parts[1]}")):
            raise _NotOurs  # jwt.go: no key verifies it
        return claims

    def authenticate(self, token: str, audiences: list[str], now: float) -> JsonObj:
        """The TokenReview `status` for `token` reviewed for `audiences`."""
        try:
            claims = self._claims(token)
        except _NotOurs:
            return {"user": {}, "error": INVALID_TOKEN}
        try:
            return self._validate(claims, audiences, now)
        except ValueError as e:
            return {"user": {}, "error": f"[{INVALID_TOKEN}, {e}]"}

    def _validate(self, claims: JsonObj, audiences: list[str], now: float) -> JsonObj:
        aud = claims.get("aud")
        token_auds = [aud] if isinstance(aud, str) else list(aud or [])
        if not token_auds:
            token_auds = [ISSUER]  # jwt.go: a legacy token is for the API server only
        wanted = audiences or [ISSUER]
        common = [a for a in token_auds if a in wanted]
        if not common:
            raise ValueError(
                f"token audiences {_go_quote(token_auds)} is invalid for the target "
                f"audiences {_go_quote(wanted)}"
            )
        if isinstance(claims.get("exp"), int) and now > claims["exp"] + LEEWAY:
            raise ValueError("service account token has expired")
        if isinstance(claims.get("nbf"), int) and now < claims["nbf"] - LEEWAY:
            raise ValueError("service account token is not valid yet")
        kube = claims.get("kubernetes.io") or {}
        namespace = kube.get("namespace", "")
        account = kube.get("serviceaccount") or {}
        with self._lock:
            uid = self._accounts.get((namespace, account.get("name", "")))
        if uid is None:
            raise ValueError(f'serviceaccounts "{account.get("name", "")}" not found')
        if uid != account.get("uid"):
            raise ValueError(
                f"service account UID ({uid}) does not match claim ({account.get('uid')})"
            )
        extra: dict[str, list[str]] = {}
        pod_ref = kube.get("pod")
        if pod_ref:
            try:
                pod = self.store.get(self.table.lookup("pods"), namespace, pod_ref["name"])
            except ApiError:
                raise ValueError("service account token has been invalidated") from None
            if pod["metadata"]["uid"] != pod_ref["uid"]:
                raise ValueError(
                    f"pod UID ({pod['metadata']['uid']}) does not match service account pod "
                    f"ref claim ({pod_ref['uid']})"
                )
            if pod["metadata"].get("deletionTimestamp"):
                raise ValueError("service account token has been invalidated")
            extra[POD_NAME], extra[POD_UID] = [pod_ref["name"]], [pod_ref["uid"]]
        if claims.get("jti"):
            extra[CREDENTIAL_ID] = [f"JTI={claims['jti']}"]
        node_ref = kube.get("node")
        if pod_ref and node_ref and node_ref.get("name"):  # claims.go: a pod-bound token's node
            extra[NODE_NAME] = [node_ref["name"]]
            if node_ref.get("uid"):
                extra[NODE_UID] = [node_ref["uid"]]
        name = account.get("name", "")
        return {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{namespace}:{name}",
                "uid": uid,
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{namespace}",
                    "system:authenticated",
                ],
                "extra": extra,
            },
            "audiences": common,
        }

    async def handle(self, request: web.Request, controls: Controls) -> web.Response:
        """POST .../tokenreviews (create is the resource's only verb)."""
        if request.method != "POST":
            raise ApiError(
                405, "MethodNotAllowed", "the server does not allow this method on tokenreviews"
            )
        controls.admit("create", "tokenreviews", "authentication.k8s.io")
        try:
            body = json.loads(await request.read() or b"null")
        except ValueError:
            raise ApiError(400, "BadRequest", "the body is not valid JSON") from None
        if not isinstance(body, dict) or body.get("kind", "TokenReview") != "TokenReview":
            raise ApiError(400, "BadRequest", "not a TokenReview")
        spec = body.get("spec")
        if not isinstance(spec, dict):
            spec = {}
        token = spec.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError(400, "BadRequest", "token is required for TokenReview in authentication")
        audiences = [a for a in spec.get("audiences") or [] if isinstance(a, str)]
        status = self.authenticate(token, audiences, time.time())
        review: dict[str, Any] = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        return web.json_response(review, status=201)
