"""Pure: NATS nkeys and the JWTs nats-server signs and trusts (ed25519-nkey, version 2).

What nats-io/jwt v2 does (claims.go, header.go, decoder.go), for the two sides of an auth
callout: decoding and verifying the server's authorization request (signed by the server's
nkey, `N...`), and signing the user JWT and the authorization response with the issuer
account's nkey (`A...`, the seed `SA...` this service holds). A JWT is
`base64url(header).base64url(claims).base64url(ed25519 signature of the first two)`, the
header `{"typ":"JWT","alg":"ed25519-nkey"}`; the signer's public key is the claims' `iss`.
A public nkey is base32 of a prefix byte, the 32-byte ed25519 key and a CRC-16 (nkeys).
No I/O: seeds come in as bytes, time as a number.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys  # type: ignore[import-untyped]

from cedar.nats_auth.errors import JwtError

JSON = dict[str, Any]

# nkeys' prefix bytes: the first base32 letter of each kind of public key.
PREFIX_ACCOUNT: int = nkeys.PREFIX_BYTE_ACCOUNT  # A...
PREFIX_USER: int = nkeys.PREFIX_BYTE_USER  # U...
PREFIX_SERVER: int = nkeys.PREFIX_BYTE_SERVER  # N...

HEADER: JSON = {"typ": "JWT", "alg": "ed25519-nkey"}
_ALGORITHMS = ("ed25519-nkey", "ed25519")  # header.go: the v2 name and the v1 one
# A claims' registered fields in the order nats-io/jwt's ClaimsData marshals them; its `jti`
# is the hash of these with `jti` empty (claims.go, hash()).
_CLAIMS_DATA = ("aud", "exp", "jti", "iat", "iss", "name", "nbf", "sub")
_MAX_TOKEN = 64 * 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as err:
        raise JwtError(f"not base64url: {err}") from None


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def decode_public_key(text: str, prefix: int) -> bytes:
    """The raw ed25519 key of a public nkey of kind `prefix`; JwtError if it is not one."""
    if not isinstance(text, str) or len(text) != 56:
        raise JwtError("not a public nkey (56 base32 characters)")
    try:
        raw = base64.b32decode(text.encode())
    except (binascii.Error, ValueError):
        raise JwtError("not a public nkey (bad base32)") from None
    body, checksum = raw[:-2], raw[-2:]
    if nkeys.crc16(body) != int.from_bytes(checksum, "little"):
        raise JwtError("not a public nkey (bad checksum)")
    if body[0] != prefix:
        kinds = {PREFIX_ACCOUNT: "account", PREFIX_USER: "user", PREFIX_SERVER: "server"}
        raise JwtError(f"not a public {kinds.get(prefix, 'nkey')} key ({text[0]}...)")
    return bytes(body[1:])


def is_public_key(text: object, prefix: int) -> bool:
    try:
        decode_public_key(text, prefix)  # type: ignore[arg-type]
    except JwtError:
        return False
    return True


def encode_public_key(raw: bytes, prefix: int) -> str:
    body = bytes([prefix]) + raw
    return base64.b32encode(body + nkeys.crc16(body).to_bytes(2, "little")).decode()


class Signer:
    """An nkey from its seed: signs JWTs as that key. The issuer of a callout is an account
    (`SA...` seeds, the default `prefix`); tests also sign as a server."""

    def __init__(self, seed: bytes, prefix: int = PREFIX_ACCOUNT) -> None:
        seed = seed.strip()
        try:
            kind, _ = nkeys.decode_seed(seed)
            self._pair = nkeys.from_seed(bytearray(seed))
        except (nkeys.NkeysError, binascii.Error, ValueError, TypeError):
            raise JwtError("not an nkey seed") from None
        if kind != prefix:
            wanted = "an account nkey seed (SA...)" if prefix == PREFIX_ACCOUNT else "another seed"
            raise JwtError(f"the issuer must be {wanted}")
        self.public_key: str = bytes(self._pair.public_key).decode()

    def sign(self, data: bytes) -> bytes:
        signature: bytes = self._pair.sign(data)
        return signature


def new_account_seed(prefix: int = PREFIX_ACCOUNT) -> bytes:
    """A fresh nkey seed, of an account (`SA...`) unless `prefix` says otherwise, as
    `nk -gen account` makes."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), prefix)
    return seed


def claims_hash(claims: JSON) -> str:
    """nats-io/jwt's `jti`: base32 (no padding) of SHA-512/256 of the registered claims,
    `jti` empty, `omitempty` fields left out."""
    data = {k: claims[k] for k in _CLAIMS_DATA if k != "jti" and claims.get(k)}
    try:
        digest = hashlib.new("sha512_256", _dumps(data)).digest()
    except ValueError:  # an OpenSSL without SHA-512/256: any unique id does
        digest = hashlib.sha256(_dumps(data)).digest()
    return base64.b32encode(digest).rstrip(b"=").decode()


def encode(claims: JSON, signer: Signer, *, now: int) -> str:
    """Sign `claims` (a copy gets `iss`, `iat` and `jti`) as `signer`."""
    body = dict(claims)
    body["iss"] = signer.public_key
    body["iat"] = int(now)
    body["jti"] = claims_hash(body)
    signed = f"{_b64(_dumps(HEADER))}.{_b64(_dumps(body))}"
    return f"{signed}.{_b64(signer.sign(signed.encode()))}"


def decode(token: str, issuer_prefix: int) -> JSON:
    """The claims of a v2 NATS JWT whose signature verifies with its `iss`, a public key of
    kind `issuer_prefix`; JwtError otherwise. Times are not checked here (see claims.py)."""
    if not isinstance(token, str) or len(token) > _MAX_TOKEN:
        raise JwtError("not a JWT (too long, or not text)")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("not a JWT (expected 3 parts)")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
    except (ValueError, UnicodeDecodeError):
        raise JwtError("not a JWT (header or claims are not JSON)") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise JwtError("not a JWT (header or claims are not objects)")
    if str(header.get("typ", "")).upper() != "JWT":
        raise JwtError(f"not a JWT (typ {header.get('typ')!r})")
    if str(header.get("alg", "")).lower() not in _ALGORITHMS:
        raise JwtError(f"unexpected algorithm {header.get('alg')!r}")
    nats = claims.get("nats")
    if not isinstance(nats, dict) or nats.get("version") != 2:
        raise JwtError("not a version 2 NATS JWT")
    key = decode_public_key(claims.get("iss"), issuer_prefix)  # type: ignore[arg-type]
    try:
        nacl.signing.VerifyKey(key).verify(f"{parts[0]}.{parts[1]}".encode(), _unb64(parts[2]))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        raise JwtError("the signature does not verify with the issuer's key") from None
    return claims
