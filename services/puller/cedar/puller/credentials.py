"""Registry credentials from a mounted `.dockerconfigjson`.

Entries are matched by registry host after `canonical_registry`, so `docker.io`,
`index.docker.io`, `https://index.docker.io/v1/` and `registry-1.docker.io` are one key.
The file is re-read when it changes (a rotated Kubernetes secret updates the mount).
Credentials are only ever handed to the Docker engine: never logged, never exported.
I/O: reads only that file (CEDAR_REGISTRY_AUTH_FILE).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from cedar.proto.imageref import canonical_registry
from cedar.puller.errors import CredentialFileError

log = logging.getLogger("cedar.puller.credentials")


@dataclass(frozen=True)
class Credential:
    username: str = ""
    password: str = ""
    identity_token: str = ""

    def __repr__(self) -> str:  # keep secrets out of tracebacks and debug output
        return f"Credential(username={self.username!r}, secret=***)"

    def engine_auth(self) -> dict[str, str]:
        """The X-Registry-Auth payload for the engine's pull API."""
        if self.identity_token:
            return {"identitytoken": self.identity_token}
        return {"username": self.username, "password": self.password}


def parse_dockerconfig(data: Any) -> dict[str, Credential]:
    """Registry -> credential, from a parsed .dockerconfigjson (or legacy .dockercfg) body."""
    if not isinstance(data, dict):
        raise CredentialFileError("not a JSON object")
    auths = data.get("auths", data)
    if not isinstance(auths, dict):
        raise CredentialFileError("'auths' is not an object")
    result: dict[str, Credential] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        username = str(entry.get("username") or "")
        password = str(entry.get("password") or "")
        token = str(entry.get("identitytoken") or "")
        encoded = entry.get("auth")
        if encoded and not (username and password):
            try:
                decoded = base64.b64decode(str(encoded), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                # Never echo the value: it is the secret.
                log.warning("ignoring an unreadable 'auth' entry", extra={"registry": key})
                continue
            username, sep, password = decoded.partition(":")
            if not sep:
                log.warning("ignoring an 'auth' entry without ':'", extra={"registry": key})
                continue
        if not (username or token):
            continue
        result[canonical_registry(key)] = Credential(username, password, token)
    return result


class CredentialStore:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._creds: dict[str, Credential] = {}

    def for_registry(self, registry: str) -> Credential | None:
        self._reload()
        return self._creds.get(canonical_registry(registry))

    def _reload(self) -> None:
        if not self.path:
            return
        try:
            st = os.stat(self.path)
        except OSError as err:
            if self._stamp != (-1.0, -1):
                log.warning(
                    "cannot read the registry auth file; pulling without credentials",
                    extra={"path": self.path, "error": err.strerror},
                )
            self._stamp, self._creds = (-1.0, -1), {}
            return
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            with open(self.path, encoding="utf-8") as fh:
                self._creds = parse_dockerconfig(json.load(fh))
        except (OSError, ValueError, RecursionError) as err:
            # json's message may quote the file's text; report only where it broke.
            # RecursionError: JSON nested deeper than the interpreter's stack.
            where = f"line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
            log.error(
                "cannot parse the registry auth file; pulling without credentials",
                extra={"path": self.path, "error": err.__class__.__name__, "where": where},
            )
            self._creds = {}
            return
        log.info(
            "loaded registry credentials",
            extra={"path": self.path, "registries": sorted(self._creds)},
        )
