"""Pure: the OpenAPI v3 documents kubectl reads from the simulated Kubernetes API.

kubectl `create -f` and `apply -f` fetch `/openapi/v3` (the index of group-versions,
staging/src/k8s.io/kube-openapi/pkg/handler3) and then one group-version's document, to
learn whether the server validates fields itself: a PATCH operation tagged with the kind's
`x-kubernetes-group-version-kind` that takes the `fieldValidation` query parameter
(staging/src/k8s.io/cli-runtime/pkg/resource/query_param_verifier_v3.go). The sandbox
serves exactly that: the paths and operations of each resource, with their parameters, and
no schemas (so `kubectl explain` has nothing to explain, and client-side apply computes its
patch from kubectl's built-in types). No I/O.
"""

from __future__ import annotations

import hashlib

from cedar.sandbox.errors import ApiError
from cedar.sandbox.kubeapi_ops import JsonObj, ResourceTable, ResourceType
from cedar.sandbox.kubeapi_routes import SCALABLE

_QUERY = {"in": "query", "schema": {"type": "string", "uniqueItems": True}}
_FIELD_VALIDATION = {
    "name": "fieldValidation",
    "description": "Strict, Warn or Ignore: what to do with unknown or duplicate fields",
    **_QUERY,
}
_FIELD_MANAGER = {"name": "fieldManager", **_QUERY}
_DRY_RUN = {"name": "dryRun", **_QUERY}


def _gv_path(res: ResourceType) -> str:
    return f"api/{res.version}" if not res.group else f"apis/{res.group}/{res.version}"


def index(table: ResourceTable) -> JsonObj:
    """`/openapi/v3`: each group-version and the URL of its document."""
    paths: JsonObj = {}
    for gv in sorted({_gv_path(r) for r in table.all}):
        digest = hashlib.sha256(gv.encode()).hexdigest()[:16].upper()
        paths[gv] = {"serverRelativeURL": f"/openapi/v3/{gv}?hash={digest}"}
    return {"paths": paths}


def _operation(res: ResourceType, action: str, writes: bool, kind: str | None = None) -> JsonObj:
    op: JsonObj = {
        "operationId": f"{action}{res.kind}",
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {
            "group": res.group,
            "version": res.version,
            "kind": kind or res.kind,
        },
        "responses": {"200": {"description": "OK"}},
    }
    if writes:
        op["parameters"] = [_DRY_RUN, _FIELD_MANAGER, _FIELD_VALIDATION]
    return op


def document(table: ResourceTable, gv_path: str) -> JsonObj:
    """`/openapi/v3/<api/v1 | apis/GROUP/VERSION>`: the paths of that group-version."""
    found = [r for r in table.all if _gv_path(r) == gv_path]
    if not found:
        raise ApiError(404, "NotFound", f"no OpenAPI document for {gv_path}")
    paths: JsonObj = {}
    for res in found:
        base = f"/{gv_path}/" + ("namespaces/{namespace}/" if res.namespaced else "")
        paths[base + res.plural] = {
            "get": _operation(res, "list", False),
            "post": _operation(res, "post", True),
        }
        paths[f"{base}{res.plural}/{{name}}"] = {
            "get": _operation(res, "get", False),
            "put": _operation(res, "put", True),
            "patch": _operation(res, "patch", True),
            "delete": _operation(res, "delete", False),
        }
        if res.group == "apps" and res.plural in SCALABLE:
            scale = _operation(res, "patch", True, kind="Scale")
            scale["x-kubernetes-group-version-kind"] = {
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
            }
            paths[f"{base}{res.plural}/{{name}}/scale"] = {"patch": scale}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (cedar sandbox)", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }
