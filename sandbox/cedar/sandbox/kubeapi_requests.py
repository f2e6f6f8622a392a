"""Pure: what the simulated Kubernetes API makes of a request before the store sees it.

The media types a body may come in, as the real server takes them
(staging/src/k8s.io/apiserver/pkg/endpoints/handlers/create.go, patch.go): JSON; the
protobuf of kubectl's typed clients (kubeapi_protobuf.py); for a PATCH the merge,
strategic-merge and JSON patch types. Server-side apply (`application/apply-patch+yaml`),
YAML and CBOR bodies are refused with a 415 that says the sandbox does not take them. The
`Accept` header must allow JSON (the only thing it answers in), else 406. The query's
`dryRun` is refused (not supported), `fieldValidation` is checked against the fields the
sandbox knows (the top level and `metadata`). And the autoscaling/v1 Scale of the /scale
subresource (pkg/registry/apps/deployment/storage/storage.go ScaleREST). No I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cedar.sandbox.errors import ApiError
from cedar.sandbox.kubeapi_ops import (
    JSON_PATCH,
    MERGE_PATCH,
    STRATEGIC_PATCH,
    JsonObj,
    ResourceType,
)
from cedar.sandbox.kubeapi_protobuf import PROTOBUF, decode

APPLY_PATCH = "application/apply-patch+yaml"
_JSON = ("application/json", "")
_PATCHES = (MERGE_PATCH, STRATEGIC_PATCH, JSON_PATCH)
_TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec", "status"}
_TOP_LEVEL_BY_KIND = {
    "Event": {
        "involvedObject", "reason", "message", "source", "firstTimestamp", "lastTimestamp",
        "count", "type", "eventTime", "series", "action", "related", "reportingComponent",
        "reportingInstance", "regarding", "note", "reportingController", "deprecatedSource",
        "deprecatedFirstTimestamp", "deprecatedLastTimestamp", "deprecatedCount",
    },
}  # fmt: skip
_METADATA = {
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
    "annotations", "ownerReferences", "finalizers", "managedFields",
}  # fmt: skip


def media_type(header: str) -> str:
    return header.split(";", maxsplit=1)[0].strip().lower()


def accepts_json(accept: str) -> bool:
    """Whether an `Accept` header allows the JSON the sandbox answers in."""
    if not accept.strip():
        return True
    for part in accept.split(","):
        media = media_type(part)
        if media in ("*/*", "application/*", "application/json", "application/json-patch+json"):
            return True
    return False


def _unsupported_media(media: str, verb: str) -> ApiError:
    if media == APPLY_PATCH:
        return ApiError(
            415,
            "UnsupportedMediaType",
            "server-side apply is not supported by the sandbox's simulated API: use "
            "client-side `kubectl apply` (without --server-side)",
        )
    accepted = ", ".join(("application/json", PROTOBUF, *(_PATCHES if verb == "patch" else ())))
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format ({media or 'none'}) - the "
        f"sandbox's simulated API accepts: {accepted}",
    )


def decode_body(raw: bytes, content_type: str, verb: str) -> Any:
    """The JSON value of a create, update or patch body; raises the real server's errors."""
    media = media_type(content_type)
    if media == PROTOBUF and verb in ("create", "update"):
        return decode(raw)
    if media in _JSON or (verb == "patch" and media in _PATCHES):
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise ApiError(400, "BadRequest", "the body is not valid JSON") from None
    raise _unsupported_media(media, verb)


def check_query(query: Mapping[str, str]) -> str:
    """The request's fieldValidation directive (Strict, Warn or Ignore)."""
    if query.get("dryRun"):
        raise ApiError(400, "BadRequest", "dryRun is not supported by the sandbox's simulated API")
    directive = query.get("fieldValidation") or "Warn"
    if directive not in ("Strict", "Warn", "Ignore"):
        raise ApiError(
            400,
            "BadRequest",
            f"fieldValidation must be one of Ignore, Warn, Strict; got {directive!r}",
        )
    return directive


def unknown_fields(res: ResourceType, obj: Any) -> list[str]:
    """The top-level and metadata fields of `obj` that `res` does not have."""
    if not isinstance(obj, dict):
        return []
    known = _TOP_LEVEL | _TOP_LEVEL_BY_KIND.get(res.kind, set())
    found = [f'unknown field "{k}"' for k in obj if k not in known]
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        found += [f'unknown field "metadata.{k}"' for k in meta if k not in _METADATA]
    return found


def strict_error(problems: list[str]) -> ApiError:
    return ApiError(400, "BadRequest", "strict decoding error: " + ", ".join(problems))


# ---------------------------------------------------------------- the /scale subresource


def to_scale(obj: JsonObj) -> JsonObj:
    """The autoscaling/v1 Scale of a Deployment, ReplicaSet or StatefulSet."""
    meta = obj["metadata"]
    spec = obj.get("spec") or {}
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
            if k in meta
        },
        "spec": {"replicas": spec.get("replicas", 1)},
        "status": {
            "replicas": (obj.get("status") or {}).get("replicas", 0),
            "selector": ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
        },
    }


def scaled_replicas(scale: Any) -> int:
    """The replicas a written Scale asks for (a 422 when it asks for none or nonsense)."""
    replicas = (
        ((scale or {}).get("spec") or {}).get("replicas") if isinstance(scale, dict) else None
    )
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise ApiError(
            422,
            "Invalid",
            f"Scale is invalid: spec.replicas: Invalid value: {json.dumps(replicas)}: must be "
            "greater than or equal to 0",
        )
    return replicas
