"""Pure: the auth callout's three JWTs: the server's request, the user, and the response.

As nats-server's server/auth_callout.go and nats-io/jwt v2 (authorization_claims.go,
user_claims.go) define them, and ADR-26 ("NATS Authorization Callouts") describes:

- the **authorization request** arrives on `$SYS.REQ.USER.AUTH`, signed by the server's
  nkey (its `iss` and `server_id.id`), with `aud` "nats-authorization-request", the
  client's CONNECT options under `nats.connect_opts` (the token as `auth_token`) and
  `nats.user_nkey`, a user key the server made for this connection alone;
- the **user JWT** has that user key as `sub`, is signed by the callout's issuer account
  (`auth_callout.issuer` in nats.conf), names in `aud` the account the client is placed in
  (server configuration mode), and carries the permissions and an expiry: the server
  closes the connection when it passes, and the client connects (and is checked) again;
- the **authorization response** has the same `sub`, the server's ID as `aud`, and either
  the user JWT (`nats.jwt`) or a refusal (`nats.error`), never both.

No I/O: time comes in as `now` (Unix seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cedar.nats_auth import nkeyjwt
from cedar.nats_auth.errors import BadRequest, JwtError
from cedar.nats_auth.grant import Permissions
from cedar.nats_auth.nkeyjwt import JSON, Signer

AUTH_REQUEST_AUDIENCE = "nats-authorization-request"  # auth_callout.go AuthRequestSubject
AUTH_REQUEST_TYPE = "authorization_request"
AUTH_RESPONSE_TYPE = "authorization_response"
NO_LIMIT = -1  # jwt.NoLimit: NewUserClaims' default subs, data and payload limits


@dataclass(frozen=True)
class AuthRequest:
    """What one authorization request says of the connecting client (and who asks)."""

    server_id: str  # the asking server's public nkey: our response's audience
    server_name: str
    user_nkey: str  # the subject the user JWT and the response must have
    token: str  # the CONNECT's auth_token ("" when none)
    user: str  # the CONNECT's user ("" when none)
    client_name: str
    client_host: str
    client_id: int
    expires: int  # when the server stops waiting (0: not said)

    def describe(self) -> dict[str, Any]:
        """The request's fields fit for a log line (never the token)."""
        return {
            "client": self.client_name,
            "client_host": self.client_host,
            "client_id": self.client_id,
            "server": self.server_name,
        }


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def parse_request(token: str, *, now: float) -> AuthRequest:
    """The request in `token`, checked: signed by the server it names, for the callout,
    with a valid user key, not yet expired. BadRequest otherwise."""
    try:
        claims = nkeyjwt.decode(token, nkeyjwt.PREFIX_SERVER)
    except JwtError as err:
        raise BadRequest(f"the authorization request is not a server-signed JWT: {err}") from None
    nats = claims["nats"]
    if nats.get("type") != AUTH_REQUEST_TYPE:
        raise BadRequest(f"not an authorization request (type {nats.get('type')!r})")
    if claims.get("aud") != AUTH_REQUEST_AUDIENCE:
        raise BadRequest(f"the request's audience is {claims.get('aud')!r}")
    server = nats.get("server_id") if isinstance(nats.get("server_id"), dict) else {}
    server_id = _text(server.get("id"))
    if server_id != claims["iss"]:
        raise BadRequest("the request was not signed by the server it names")
    user_nkey = _text(nats.get("user_nkey"))
    if not nkeyjwt.is_public_key(user_nkey, nkeyjwt.PREFIX_USER):
        raise BadRequest("the request's user_nkey is not a user public key")
    expires = claims.get("exp", 0)
    if not isinstance(expires, int) or isinstance(expires, bool):
        raise BadRequest("the request's exp is not a number")
    if expires and now > expires:
        raise BadRequest("the request expired before it was read (the server gave up)")
    opts = nats.get("connect_opts") if isinstance(nats.get("connect_opts"), dict) else {}
    info = nats.get("client_info") if isinstance(nats.get("client_info"), dict) else {}
    client_id = info.get("id", 0)
    return AuthRequest(
        server_id=server_id,
        server_name=_text(server.get("name")),
        user_nkey=user_nkey,
        token=_text(opts.get("auth_token")),
        user=_text(opts.get("user")),
        client_name=_text(opts.get("name")),
        client_host=_text(info.get("host")),
        client_id=client_id if isinstance(client_id, int) else 0,
        expires=expires,
    )


def user_claims(
    request: AuthRequest, *, account: str, name: str, permissions: Permissions, expires: int
) -> JSON:
    """The user JWT's claims (before signing): this connection's key, placed in `account`."""
    return {
        "sub": request.user_nkey,
        "aud": account,
        "name": name,
        "exp": int(expires),
        "nats": {
            "pub": {"allow": list(permissions.publish)},
            "sub": {"allow": list(permissions.subscribe)},
            "subs": NO_LIMIT,
            "data": NO_LIMIT,
            "payload": NO_LIMIT,
            "type": "user",
            "version": 2,
        },
    }


def response_claims(request: AuthRequest, *, user_jwt: str = "", error: str = "") -> JSON:
    """The authorization response's claims: the user JWT, or the refusal."""
    if bool(user_jwt) == bool(error):
        raise ValueError("a response carries a user JWT or an error, exactly one")
    nats: JSON = {"jwt": user_jwt} if user_jwt else {"error": error}
    nats |= {"type": AUTH_RESPONSE_TYPE, "version": 2}
    return {"sub": request.user_nkey, "aud": request.server_id, "nats": nats}


def grant(
    request: AuthRequest,
    signer: Signer,
    *,
    account: str,
    name: str,
    permissions: Permissions,
    expires: int,
    now: int,
) -> bytes:
    """The response that lets the client in with `permissions` until `expires`."""
    claims = user_claims(
        request, account=account, name=name, permissions=permissions, expires=expires
    )
    user_jwt = nkeyjwt.encode(claims, signer, now=now)
    return nkeyjwt.encode(response_claims(request, user_jwt=user_jwt), signer, now=now).encode()


def refuse(request: AuthRequest, signer: Signer, *, error: str, now: int) -> bytes:
    """The response that turns the client away; `error` lands in the server's log."""
    return nkeyjwt.encode(response_claims(request, error=error), signer, now=now).encode()
