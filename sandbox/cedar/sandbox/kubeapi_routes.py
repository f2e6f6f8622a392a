"""Pure: the simulated Kubernetes API's URL routing, request verbs and discovery documents.

A request path becomes either a `Route` (resource, namespace, name, subresource) or the
discovery document it names (`/api`, `/apis`, `/apis/<group>`, `/<group>/<version>`,
`/version`), as the real API server serves them. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from cedar.sandbox.errors import ApiError
from cedar.sandbox.kubeapi_ops import JsonObj, ResourceTable, ResourceType

_TRUE = ("1", "true", "True")

_WRITE_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}

_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]

# What the real server's discovery says of each resource (each registry's ShortNames and
# Categories, e.g. pkg/registry/core/namespace/storage/storage.go: "ns").
SHORT_NAMES = {
    "namespaces": ["ns"],
    "nodes": ["no"],
    "pods": ["po"],
    "persistentvolumes": ["pv"],
    "persistentvolumeclaims": ["pvc"],
    "events": ["ev"],
    "replicasets": ["rs"],
    "deployments": ["deploy"],
    "daemonsets": ["ds"],
    "statefulsets": ["sts"],
    "cronjobs": ["cj"],
}
_IN_ALL = {"pods", "replicasets", "deployments", "daemonsets", "statefulsets", "jobs", "cronjobs"}
SCALABLE = {"deployments", "replicasets", "statefulsets"}
SUBRESOURCES = {"status", "scale", "finalize"}


def is_true(value: str | None) -> bool:
    """A boolean query parameter (`watch`, `allowWatchBookmarks`) as the server reads it."""
    return value in _TRUE


@dataclass(frozen=True)
class Route:
    res: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None

    @property
    def plural(self) -> str:
        return f"{self.res.plural}/{self.subresource}" if self.subresource else self.res.plural


def route(table: ResourceTable, path: str) -> Route | JsonObj:
    """The resource a path addresses, or the discovery document it asks for."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return {"paths": ["/api", "/api/v1", "/apis", "/version"]}
    if parts == ["version"]:
        return {"major": "1", "minor": "33", "gitVersion": "v1.33.0-cedar-sandbox"}
    if parts == ["api"]:
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    if parts == ["apis"]:
        return _group_list(table)
    if parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    elif parts[0] == "apis":
        return _group(table, parts[1])
    else:
        raise ApiError(404, "NotFound", f"the server could not find {path}")
    if not rest:
        return _resource_list(table, group, version)
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        scoped = table.by_url(group, version, rest[2])
        if scoped is not None and scoped.namespaced:
            namespace, rest = rest[1], rest[2:]
    res = table.by_url(group, version, rest[0])
    if res is None or len(rest) > 3:
        raise ApiError(404, "NotFound", f"the server could not find {path}")
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else None
    if subresource is not None and not _serves(res, subresource):
        raise ApiError(
            404,
            "NotFound",
            f"the server could not find the requested resource: {res.plural}/{subresource} "
            "is not served by the sandbox's simulated API",
        )
    if name is not None and res.namespaced and namespace is None:
        raise ApiError(404, "NotFound", f"the server could not find {path}")
    return Route(res, namespace, name, subresource)


def _serves(res: ResourceType, subresource: str) -> bool:
    if subresource == "status":
        return res.has_status
    if subresource == "scale":
        return res.group == "apps" and res.plural in SCALABLE
    return subresource == "finalize" and res.kind == "Namespace"


def verb_of(method: str, watch: str | None, route: Route) -> str:
    """The API verb of an HTTP method on a route (`watch`: the query's `watch` parameter)."""
    if method == "GET":
        if is_true(watch):
            return "watch"
        return "get" if route.name else "list"
    verb = _WRITE_VERBS.get(method)
    if verb is None or (verb == "create") == (route.name is not None):
        what = "deletecollection" if method == "DELETE" else f"{method} here"
        raise ApiError(
            405, "MethodNotAllowed", f"the sandbox's simulated API does not support {what}"
        )
    return verb


# ---------------------------------------------------------------- discovery


def _group_list(table: ResourceTable) -> JsonObj:
    groups: dict[str, list[str]] = {}
    for res in table.all:
        if res.group and res.version not in groups.setdefault(res.group, []):
            groups[res.group].append(res.version)
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_group(table, name) for name in groups],
    }


def _group(table: ResourceTable, name: str) -> JsonObj:
    versions = sorted({r.version for r in table.all if r.group == name})
    if not versions:
        raise ApiError(404, "NotFound", f"no API group {name}")
    entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": name,
        "versions": entries,
        "preferredVersion": entries[0],
    }


def _resource_list(table: ResourceTable, group: str, version: str) -> JsonObj:
    found = [r for r in table.all if r.group == group and r.version == version]
    if not found:
        raise ApiError(404, "NotFound", f"no API {group}/{version}")
    resources: list[JsonObj] = []
    for r in found:
        entry: JsonObj = {
            "name": r.plural,
            "singularName": r.kind.lower(),
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": _VERBS,
        }
        if r.plural in SHORT_NAMES and not (r.group and r.kind == "Event"):
            entry["shortNames"] = SHORT_NAMES[r.plural]
        if r.plural in _IN_ALL:
            entry["categories"] = ["all"]
        resources.append(entry)
        for sub in sorted(SUBRESOURCES):
            if _serves(r, sub):
                resources.append(
                    {
                        "name": f"{r.plural}/{sub}",
                        "singularName": "",
                        "namespaced": r.namespaced,
                        "kind": "Scale" if sub == "scale" else r.kind,
                        **({"group": "autoscaling", "version": "v1"} if sub == "scale" else {}),
                        "verbs": ["update"] if sub == "finalize" else ["get", "patch", "update"],
                    }
                )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": found[0].api_version,
        "resources": resources,
    }
