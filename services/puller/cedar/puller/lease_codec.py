"""Keys and values of the lease bucket cedar-fleet-leases. Pure: no I/O.

How leases and requests are stored. Keys name the registry by a hash of its folded host
(hosts hold '.', ':' and '[', which a KV key token may not); values are JSON objects of
the `Lease` and `Request` fields, read back strictly: a damaged value raises
`FleetPullsError`, never a bare KeyError or TypeError (the store skips it and counts it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, fields
from typing import Any

from cedar.proto.imageref import canonical_registry
from cedar.puller.pacing import FleetPullsError, Lease, PullPriority, Request


def registry_key(registry: str) -> str:
    """A KV key token for a registry host (hosts contain '.', ':' and '[')."""
    return hashlib.sha256(canonical_registry(registry).encode()).hexdigest()[:16]


def lease_key(registry: str, slot: int) -> str:
    return f"lease.{registry_key(registry)}.{slot}"


def request_key(registry: str, token: str) -> str:
    return f"wait.{registry_key(registry)}.{hashlib.sha256(token.encode()).hexdigest()[:24]}"


def _encode(item: Lease | Request) -> bytes:
    value = {f.name: getattr(item, f.name) for f in fields(item)}
    value["priority"] = item.priority.name.lower()
    return json.dumps(value, sort_keys=True).encode()


def encode_lease(lease: Lease) -> bytes:
    return _encode(lease)


def encode_request(request: Request) -> bytes:
    return _encode(request)


def _decode(data: bytes, cls: type[Lease] | type[Request]) -> dict[str, Any]:
    what = cls.__name__.lower()
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise FleetPullsError(f"stored {what} is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise FleetPullsError(f"stored {what} is not an object")
    missing = [f.name for f in fields(cls) if f.name not in value and f.default is MISSING]
    if missing:
        raise FleetPullsError(f"stored {what} lacks {', '.join(missing)}")
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in value:
            continue
        raw = value[f.name]
        if f.name == "priority":
            if str(raw).upper() not in PullPriority.__members__:
                raise FleetPullsError(f"stored {what} has an unknown priority {raw!r}")
            out[f.name] = PullPriority[str(raw).upper()]
        elif f.type == "int":
            if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                raise FleetPullsError(
                    f"stored {what}: {f.name} must be a non-negative integer, not {raw!r}"
                )
            out[f.name] = raw
        elif f.type == "float":
            number = not isinstance(raw, bool) and isinstance(raw, int | float)
            if f.name == "want" and not (number and 0.0 <= raw <= 1.0):  # NaN fails too
                raise FleetPullsError(
                    f"stored {what}: want must be a number from 0 to 1, not {raw!r}"
                )
            if not number:
                raise FleetPullsError(f"stored {what}: {f.name} must be a number, not {raw!r}")
            out[f.name] = float(raw)
        else:
            out[f.name] = str(raw)
    return out


def decode_lease(data: bytes) -> Lease:
    """A stored lease; raises FleetPullsError (never a bare KeyError) on bad data."""
    return Lease(**_decode(data, Lease))


def decode_request(data: bytes) -> Request:
    return Request(**_decode(data, Request))
