"""Pure rules of the simulated Kubernetes API for one object: defaults, writes, JSON encoding.

What the real API server fills in on create (name from generateName, namespace, uid,
creationTimestamp, generation, a Namespace's finalizer and phase, the defaults of
kubeapi_defaults.py), what it validates (kubeapi_validation.py) and what it keeps on an
update (immutable metadata, the status behind a /status subresource, the resourceVersion
precondition, the generation bump: on a spec change, and for a Deployment on an annotation
change too, pkg/registry/apps/deployment/strategy.go PrepareForUpdate). No I/O and no state.
"""

from __future__ import annotations

import datetime
import json
import random
import string
import uuid
from typing import Any

from cedar.sandbox.errors import ApiError
from cedar.sandbox.kubeapi_defaults import apply_defaults
from cedar.sandbox.kubeapi_ops import JsonObj, ResourceType
from cedar.sandbox.kubeapi_validation import event_errors, invalid, metadata_errors

_IMMUTABLE_METADATA = (
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)

NOT_READY = "node.kubernetes.io/not-ready"

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False)


def dump(obj: Any) -> bytes:
    return _encoder.encode(obj).encode("utf-8")


def clone(obj: Any) -> Any:
    """A deep copy of JSON data; a JSON round trip is several times faster than deepcopy."""
    return json.loads(_encoder.encode(obj))


def now() -> str:
    """A timestamp as the API writes them (RFC 3339, seconds)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def qualified_resource(res: ResourceType) -> str:
    """`deployments.apps`, `namespaces`: how the real server names a resource in messages."""
    return f"{res.plural}.{res.group}" if res.group else res.plural


def namespace_terminating(res: ResourceType, name: str, namespace: str) -> ApiError:
    """The NamespaceLifecycle admission's 403 for a create in a namespace being deleted."""
    message = (
        f"unable to create new content in namespace {namespace} because it is being terminated"
    )
    return ApiError(
        403,
        "Forbidden",
        f'{qualified_resource(res)} "{name}" is forbidden: {message}',
        {
            "name": name,
            "group": res.group,
            "kind": res.plural,
            "causes": [
                {
                    "reason": "NamespaceTerminating",
                    "message": f"namespace {namespace} is being terminated",
                    "field": "metadata.namespace",
                }
            ],
        },
    )


def validate(res: ResourceType, obj: JsonObj) -> None:
    """Raise the real server's `422 Invalid` for what it would refuse in `obj`."""
    errors = metadata_errors(obj.get("metadata") or {})
    if res.kind == "Event":
        errors += event_errors(res.api_version, obj)
    if errors:
        name = (obj.get("metadata") or {}).get("name") or ""
        raise invalid(res.kind, res.group, name, errors)


def new_object(
    res: ResourceType, obj: JsonObj, namespace: str | None, *, owned: bool = False
) -> JsonObj:
    """`obj` as created in `namespace` (the URL's; None: the body's, else "default").

    An owned object is copied only where it is changed here (bulk loads); otherwise the
    caller's object is left alone.
    """
    obj = {**obj, "metadata": dict(obj.get("metadata") or {})} if owned else clone(obj)
    obj["apiVersion"] = res.api_version
    obj["kind"] = res.kind
    meta = obj.setdefault("metadata", {})
    if not meta.get("name"):
        prefix = meta.get("generateName")
        if not prefix:
            raise ApiError(422, "Invalid", "metadata.name or metadata.generateName required")
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        meta["name"] = prefix + suffix
    if res.namespaced:
        body_ns = meta.get("namespace")
        if namespace and body_ns and body_ns != namespace:
            raise ApiError(400, "BadRequest", "the namespace of the object does not match")
        meta["namespace"] = namespace or body_ns or "default"
    else:
        meta.pop("namespace", None)
    for server_set in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
        meta.pop(server_set, None)
    meta["uid"] = str(uuid.uuid4())
    meta["creationTimestamp"] = now()
    if res.has_generation:
        meta["generation"] = 1
    if res.kind == "Namespace":
        # pkg/registry/core/namespace/strategy.go PrepareForCreate: the `kubernetes`
        # finalizer is always there, the status is Active whatever the client sent.
        spec = obj.setdefault("spec", {})
        finalizers = [f for f in spec.get("finalizers") or [] if f != "kubernetes"]
        spec["finalizers"] = [*finalizers, "kubernetes"]
        obj["status"] = {"phase": "Active"}
    if res.kind == "Node":
        # plugin/pkg/admission/nodetaint/admission.go (TaintNodesAtCreation): a new Node is
        # not-ready until the node lifecycle controller sees otherwise.
        taints = obj.setdefault("spec", {}).setdefault("taints", [])
        if not any(t.get("key") == NOT_READY and t.get("effect") == "NoSchedule" for t in taints):
            taints.append({"key": NOT_READY, "effect": "NoSchedule"})
    apply_defaults(res, obj)
    validate(res, obj)
    return obj


def updated_object(
    res: ResourceType,
    old: JsonObj,
    new: JsonObj,
    *,
    subresource: str | None,
    keep_status: bool,
) -> JsonObj | None:
    """What replaces `old` when a client writes `new` (its own copy); None for a no-op.

    The resourceVersion of `old` stays: the store assigns the next one when it commits.
    """
    meta = new.setdefault("metadata", {})
    old_meta = old["metadata"]
    name = old_meta["name"]
    sent_rv = meta.get("resourceVersion")
    if sent_rv not in (None, "", old_meta["resourceVersion"]):
        raise ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {qualified_resource(res)} "{name}": the object '
            "has been modified; please apply your changes to the latest version and try again",
            {"name": name, "group": res.group, "kind": res.plural},
        )
    if subresource == "status":
        # Only the status changes through /status, and the annotations when the body has
        # them: the status strategies reset spec and labels, not annotations (the Deployment
        # controller writes its revision annotation that way, without a generation bump).
        sent_annotations = meta.get("annotations") if "annotations" in meta else None
        new = {**clone(old), "status": new.get("status")}
        meta = new["metadata"]
        if sent_annotations is not None:
            meta["annotations"] = sent_annotations
    elif subresource == "finalize" and res.kind == "Namespace":
        finalizers = (new.get("spec") or {}).get("finalizers")
        new = clone(old)
        new.setdefault("spec", {})["finalizers"] = finalizers or []
        meta = new["metadata"]
    elif subresource is not None:
        raise ApiError(404, "NotFound", f"subresource {subresource!r} is not served")
    elif keep_status and res.has_status:
        # The main resource ignores status when a /status subresource exists.
        new["status"] = clone(old.get("status"))
        if new["status"] is None:
            del new["status"]
    if res.kind == "Namespace" and subresource != "finalize":
        # Only /finalize changes a Namespace's spec.finalizers (namespace strategy.go).
        new.setdefault("spec", {})["finalizers"] = clone((old.get("spec") or {}).get("finalizers"))
        if new["spec"]["finalizers"] is None:
            del new["spec"]["finalizers"]
    new["apiVersion"] = res.api_version
    new["kind"] = res.kind
    for immutable in _IMMUTABLE_METADATA:
        if immutable in old_meta:
            meta[immutable] = old_meta[immutable]
        else:
            meta.pop(immutable, None)
    meta["resourceVersion"] = old_meta["resourceVersion"]
    if subresource is None:
        apply_defaults(res, new)
    if new == old:
        # The real API server neither bumps resourceVersion nor emits an event for a no-op.
        return None
    validate(res, new)
    if res.has_generation and subresource is None:
        changed = new.get("spec") != old.get("spec")
        if res.kind == "Deployment":
            # nil and empty maps are equal to apimachinery's Semantic.DeepEqual.
            changed = changed or (meta.get("annotations") or {}) != (
                old_meta.get("annotations") or {}
            )
        if changed:
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
    return new


def finalized(res: ResourceType, obj: JsonObj) -> bool:
    """A Namespace being deleted whose last finalizer is gone: the server deletes it."""
    return (
        res.kind == "Namespace"
        and bool(obj["metadata"].get("deletionTimestamp"))
        and not (obj.get("spec") or {}).get("finalizers")
        and not obj["metadata"].get("finalizers")
    )
