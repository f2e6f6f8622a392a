"""Pure: the core/v1 Events Cedar records on Kubernetes objects, built so the API accepts them.

The API server validates where an Event may live (kubernetes/kubernetes
pkg/apis/core/validation/events.go, legacyValidateEvent): an Event about a cluster-scoped
object (a Namespace, a Node, a PersistentVolume: involvedObject without a namespace) must be
in `default` (or have no namespace); an Event about a namespaced object must be in that
object's namespace. Anything else is refused with 422 "involvedObject.namespace: Invalid
value: ...: does not match event.namespace". Every Event Cedar records is built here.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

# Where Events about cluster-scoped objects go (metav1.NamespaceDefault).
CLUSTER_EVENTS_NAMESPACE = "default"


def event_namespace(involved_namespace: str | None) -> str:
    """The namespace an Event about an object in `involved_namespace` must be created in."""
    return involved_namespace or CLUSTER_EVENTS_NAMESPACE


def core_event(
    involved: dict[str, Any],
    *,
    reason: str,
    message: str,
    event_type: str,
    component: str,
    instance: str,
    now: datetime,
) -> dict[str, Any]:
    """A core/v1 Event about `involved` (apiVersion, kind, name, uid, and namespace when the
    object is namespaced), in the namespace the API requires."""
    namespace = event_namespace(involved.get("namespace"))
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            # Named after the object, as client-go's recorder does, unique by the suffix.
            "name": f"{involved['name']}.{uuid.uuid4().hex[:16]}",
            "namespace": namespace,
        },
        "involvedObject": dict(involved),
        "reason": reason,
        "message": message,
        "type": event_type,
        "source": {"component": component},
        "reportingComponent": component,
        "reportingInstance": instance,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
