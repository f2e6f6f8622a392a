"""Pure rules of the simulated Kubernetes API: the resource table, selectors, patches.

No I/O and no state here, so that every rule is testable on its own.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cedar.sandbox.errors import ApiError, UnknownResourceError

JsonObj = dict[str, Any]


# ---------------------------------------------------------------- resources


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    # Whether writes to the main resource ignore `status` (it has a /status subresource).
    has_status: bool = True
    # Whether metadata.generation is kept (starts at 1, bumped when `spec` changes).
    has_generation: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        return f"{self.api_version}/{self.plural}"

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False),
    ResourceType("", "v1", "nodes", "Node", namespaced=False),
    # pkg/registry/core/pod/strategy.go PrepareForCreate sets Generation = 1; the
    # persistentvolume and persistentvolumeclaim strategies keep no generation.
    ResourceType("", "v1", "pods", "Pod", namespaced=True),
    ResourceType(
        "", "v1", "persistentvolumes", "PersistentVolume", namespaced=False, has_generation=False
    ),
    ResourceType(
        "",
        "v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        namespaced=True,
        has_generation=False,
    ),
    ResourceType(
        "", "v1", "events", "Event", namespaced=True, has_status=False, has_generation=False
    ),
    ResourceType("apps", "v1", "replicasets", "ReplicaSet", namespaced=True),
    ResourceType("apps", "v1", "deployments", "Deployment", namespaced=True),
    ResourceType("apps", "v1", "daemonsets", "DaemonSet", namespaced=True),
    ResourceType("apps", "v1", "statefulsets", "StatefulSet", namespaced=True),
    ResourceType("batch", "v1", "jobs", "Job", namespaced=True),
    ResourceType("batch", "v1", "cronjobs", "CronJob", namespaced=True),
    ResourceType(
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        namespaced=True,
        has_status=False,
        has_generation=False,
    ),
)


class ResourceTable:
    """Finds a resource by URL parts, by `apiVersion`+`kind`, or by a loose name in tests."""

    def __init__(self, resources: Iterable[ResourceType] = RESOURCES) -> None:
        self.all: tuple[ResourceType, ...] = tuple(resources)
        self._by_url = {(r.group, r.version, r.plural): r for r in self.all}
        self._by_kind = {(r.api_version, r.kind): r for r in self.all}
        # The first entry wins for loose names, so "events" means the core v1 Event.
        self._loose: dict[str, ResourceType] = {}
        for r in self.all:
            for name in (r.plural, r.kind, r.kind.lower(), r.key):
                self._loose.setdefault(name, r)

    def by_url(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._by_url.get((group, version, plural))

    def by_kind(self, api_version: str, kind: str) -> ResourceType:
        found = self._by_kind.get((api_version, kind))
        if found is None:
            raise ApiError(404, "NotFound", f"no resource for {api_version} {kind}")
        return found

    def lookup(self, name: str | ResourceType) -> ResourceType:
        if isinstance(name, ResourceType):
            return name
        found = self._loose.get(name)
        if found is None:
            raise UnknownResourceError(f"unknown resource {name!r}; known: {sorted(self._loose)}")
        return found


# ---------------------------------------------------------------- selectors

Matcher = Callable[[JsonObj], bool]
LabelMatcher = Callable[[Mapping[str, str]], bool]

_REQ_SET = re.compile(r"^\s*([^\s!=()]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_REQ_EQ = re.compile(r"^\s*([^\s!=()]+)\s*(==|=|!=)\s*([^\s!=()]*)\s*$")
_REQ_EXISTS = re.compile(r"^\s*(!?)\s*([^\s!=()]+)\s*$")


def _split_requirements(selector: str) -> list[str]:
    # Commas separate requirements, except inside the value list of `in (a,b)`.
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


@dataclass(frozen=True)
class _Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, value: str | None, present: bool) -> bool:
        if self.op == "=":
            return value in self.values
        if self.op in ("!=", "notin"):
            return value not in self.values
        if self.op == "in":
            return value in self.values
        return present if self.op == "exists" else not present


@dataclass(frozen=True)
class LabelSelector:
    requirements: tuple[_Requirement, ...]

    def __call__(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels.get(r.key), r.key in labels) for r in self.requirements)


@dataclass(frozen=True)
class FieldSelector:
    requirements: tuple[_Requirement, ...]

    def __call__(self, obj: JsonObj) -> bool:
        for r in self.requirements:
            value = _field_value(obj, r.key)
            if not r.matches(value, value is not None):
                return False
        return True


def parse_label_selector(selector: str | None) -> LabelSelector | None:
    """Parse `a=b,c!=d,e in (x,y),f notin (z),g,!h`; None when there is nothing to match."""
    if not selector or not selector.strip():
        return None
    reqs: list[_Requirement] = []
    for req in _split_requirements(selector):
        if m := _REQ_SET.match(req):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append(_Requirement(m.group(1), m.group(2), values))
        elif m := _REQ_EQ.match(req):
            op = "!=" if m.group(2) == "!=" else "="
            reqs.append(_Requirement(m.group(1), op, frozenset({m.group(3)})))
        elif m := _REQ_EXISTS.match(req):
            reqs.append(_Requirement(m.group(2), "!exists" if m.group(1) else "exists"))
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {req!r}")
    return LabelSelector(tuple(reqs))


def _field_value(obj: JsonObj, path: str) -> str | None:
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if node is None or isinstance(node, dict | list):
        return None
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def parse_field_selector(selector: str | None) -> FieldSelector | None:
    """Parse `metadata.name=x,involvedObject.kind!=Pod` (equality only, as the API server)."""
    if not selector or not selector.strip():
        return None
    reqs: list[_Requirement] = []
    for req in _split_requirements(selector):
        m = _REQ_EQ.match(req)
        if m is None:
            raise ApiError(400, "BadRequest", f"invalid field selector: {req!r}")
        op = "!=" if m.group(2) == "!=" else "="
        reqs.append(_Requirement(m.group(1), op, frozenset({m.group(3)})))
    return FieldSelector(tuple(reqs))


@dataclass(frozen=True)
class WatchFilter:
    """What a list or a watch selects: a namespace (None: all), label and field selectors."""

    namespace: str | None = None
    labels: LabelMatcher | None = None
    fields: Matcher | None = None

    def matches(self, obj: JsonObj) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.labels is not None and not self.labels(meta.get("labels") or {}):
            return False
        return self.fields is None or self.fields(obj)


# ---------------------------------------------------------------- patches

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, `null` removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> Any:
    node = doc
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise ApiError(422, "Invalid", f"path not found: /{'/'.join(parts)}")
    return node


def _get(doc: Any, parts: list[str]) -> Any:
    if not parts:
        return doc
    parent = _parent(doc, parts)
    last = parts[-1]
    try:
        return parent[int(last)] if isinstance(parent, list) else parent[last]
    except (KeyError, IndexError, ValueError, TypeError):
        raise ApiError(422, "Invalid", f"path not found: /{'/'.join(parts)}") from None


def _remove(doc: Any, parts: list[str]) -> Any:
    value = _get(doc, parts)
    parent = _parent(doc, parts)
    if isinstance(parent, list):
        del parent[int(parts[-1])]
    else:
        del parent[parts[-1]]
    return value


def _add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent = _parent(doc, parts)
    last = parts[-1]
    if isinstance(parent, list):
        parent.insert(len(parent) if last == "-" else int(last), value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise ApiError(422, "Invalid", f"cannot add at /{'/'.join(parts)}")
    return doc


def json_patch(target: JsonObj, operations: Any) -> JsonObj:
    """RFC 6902 add/remove/replace/move/copy/test on a copy of `target`."""
    if not isinstance(operations, list):
        raise ApiError(400, "BadRequest", "a json-patch body must be a list of operations")
    doc: Any = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ApiError(400, "BadRequest", f"invalid json-patch operation {op!r}")
        parts = _pointer(op["path"])
        kind = op["op"]
        if kind == "add":
            doc = _add(doc, parts, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            _remove(doc, parts)
        elif kind == "replace":
            _get(doc, parts)  # must exist
            if parts:
                _remove(doc, parts)
            doc = _add(doc, parts, copy.deepcopy(op.get("value")))
        elif kind in ("move", "copy"):
            source = _pointer(op.get("from", ""))
            value = _remove(doc, source) if kind == "move" else copy.deepcopy(_get(doc, source))
            doc = _add(doc, parts, value)
        elif kind == "test":
            if _get(doc, parts) != op.get("value"):
                raise ApiError(422, "Invalid", f"test failed at {op['path']}")
        else:
            raise ApiError(400, "BadRequest", f"unknown json-patch op {kind!r}")
    if not isinstance(doc, dict):
        raise ApiError(422, "Invalid", "a patch must leave an object")
    return doc


def apply_patch(target: JsonObj, content_type: str, patch: Any) -> JsonObj:
    """Strategic merge is a plain recursive merge here: lists are replaced whole."""
    media = content_type.split(";", maxsplit=1)[0].strip().lower()
    if media in (MERGE_PATCH, STRATEGIC_PATCH):
        if not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "a merge patch body must be an object")
        result = merge_patch(target, patch)
        assert isinstance(result, dict)
        return result
    if media == JSON_PATCH:
        return json_patch(target, patch)
    raise ApiError(415, "UnsupportedMediaType", f"the patch type {media!r} is not supported")
