"""Pure: from a Kubernetes object (a plain JSON dict) to its contract message, a workload's
image set or a namespace's lifecycle event. No I/O; imports only cedar.proto.

The watcher reads every object it lists or watches through this module, and `cedar prepull`
reads manifests through it, so that a prepull wants exactly what the watcher will publish.
Only the fields Cedar needs are read, straight from the dicts the API returned; nothing is
converted to the official client's typed models (which costs ~20x more per object at list
time). Anything malformed is reported as a `Problem` and skipped, never raised: one bad
object must not stop the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, get_args

from cedar.proto.imageref import InvalidReference, parse
from cedar.proto.models import (
    ContainerImage,
    NamespaceEvent,
    NodeSelectorRequirement,
    NodeSelectorTerm,
    OwnerRef,
    PodScheduling,
    PullPolicy,
    Toleration,
    WorkloadImageSet,
)

JSON = dict[str, Any]

_PULL_POLICIES = frozenset(get_args(PullPolicy))
_SELECTOR_OPERATORS = frozenset({"In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"})
_TOLERATION_OPERATORS = frozenset({"Equal", "Exists"})
_EFFECTS = frozenset({"NoSchedule", "PreferNoSchedule", "NoExecute"})
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"


@dataclass(frozen=True, slots=True)
class Problem:
    """Why (part of) an object could not be read; `reason` is a metric label (short, fixed)."""

    reason: str
    detail: str


class BadObject(ValueError):
    """The object cannot be identified at all (no name or uid). A `ValueError`, as
    `InvalidReference` is: the contracts layer has no Cedar exception root to inherit."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Identity:
    """What names one object, and the versions that tell its changes apart."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    generation: int | None


def identity(obj: Any, namespaced: bool = True) -> Identity:
    """Raises BadObject when `obj` has no name, uid (or namespace, if `namespaced`)."""
    if not isinstance(obj, dict):
        raise BadObject("not_an_object", f"expected an object, got {type(obj).__name__}")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise BadObject("missing_metadata", "metadata is missing")
    name, uid = meta.get("name"), meta.get("uid")
    namespace = meta.get("namespace") if namespaced else ""
    if not isinstance(name, str) or not name:
        raise BadObject("missing_name", "metadata.name is missing")
    if not isinstance(uid, str) or not uid:
        raise BadObject("missing_uid", f"metadata.uid is missing on {name}")
    if namespaced and (not isinstance(namespace, str) or not namespace):
        raise BadObject("missing_namespace", f"metadata.namespace is missing on {name}")
    generation = meta.get("generation")
    return Identity(
        namespace=namespace or "",
        name=name,
        uid=uid,
        resource_version=str(meta.get("resourceVersion") or ""),
        generation=generation if isinstance(generation, int) else None,
    )


def controller_of(obj: JSON) -> OwnerRef | None:
    """The owner reference marked `controller: true` (the object that manages this one)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences")
    if not isinstance(refs, list):
        return None
    for ref in refs:
        if isinstance(ref, dict) and ref.get("controller") is True:
            kind, name, uid = ref.get("kind"), ref.get("name"), ref.get("uid")
            if isinstance(kind, str) and isinstance(name, str) and isinstance(uid, str):
                return OwnerRef(kind=kind, name=name, uid=uid)
    return None


def revision_of(obj: JSON) -> int | None:
    annotations = (obj.get("metadata") or {}).get("annotations")
    if not isinstance(annotations, dict):
        return None
    value = annotations.get(REVISION_ANNOTATION)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _dict(value: Any) -> JSON:
    return value if isinstance(value, dict) else {}


def pod_template_spec(kind: str, obj: JSON) -> JSON | None:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return None
    if kind == "CronJob":
        spec = _dict(_dict(spec.get("jobTemplate")).get("spec"))
    template = spec.get("template")
    if not isinstance(template, dict):
        return None
    pod = template.get("spec")
    return pod if isinstance(pod, dict) else None


def replicas_of(kind: str, obj: JSON) -> int | None:
    spec = _dict(obj.get("spec"))
    if kind in ("Deployment", "ReplicaSet", "StatefulSet"):
        value = spec.get("replicas", 1)  # the API server defaults a missing count to 1
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind == "Job":
        value = spec.get("parallelism", 1)
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind == "CronJob":
        return 0 if spec.get("suspend") is True else None
    return None


@lru_cache(maxsize=8192)
def _reference(image: str) -> tuple[str | None, str | None]:
    """(normalised reference, None) or (None, why it is invalid). Clusters repeat the same
    images across thousands of workloads (sidecars, revisions), hence the cache."""
    try:
        return str(parse(image)), None
    except InvalidReference as err:
        return None, err.reason


def _containers(pod: JSON, problems: list[Problem]) -> tuple[ContainerImage, ...]:
    result: list[ContainerImage] = []
    for field, init in (("initContainers", True), ("containers", False)):
        entries = pod.get(field)
        if entries is None:
            continue
        if not isinstance(entries, list):
            problems.append(Problem("malformed_containers", f"{field} is not a list"))
            continue
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                problems.append(Problem("malformed_containers", f"{field}[{index}] not an object"))
                continue
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                problems.append(Problem("missing_field", f"{field}[{index}].name is missing"))
                name = f"{field}[{index}]"
            image = entry.get("image")
            policy = entry.get("imagePullPolicy")
            if policy is not None and policy not in _PULL_POLICIES:
                problems.append(Problem("invalid_pull_policy", f"{name}: {policy!r}"))
                policy = None
            if not isinstance(image, str) or not image:
                problems.append(Problem("missing_image", f"container {name} has no image"))
                result.append(
                    ContainerImage(
                        container=name,
                        init=init,
                        image=image if isinstance(image, str) else "",
                        error="no image",
                        pull_policy=policy,
                    )
                )
                continue
            reference, error = _reference(image)
            if error is not None:
                problems.append(Problem("invalid_image", f"container {name}: {image!r}: {error}"))
            result.append(
                ContainerImage(
                    container=name,
                    init=init,
                    image=image,
                    reference=reference,
                    error=error,
                    pull_policy=policy,
                )
            )
    return tuple(result)


def _requirements(raw: Any, problems: list[Problem]) -> tuple[NodeSelectorRequirement, ...]:
    if not isinstance(raw, list):
        return ()
    result: list[NodeSelectorRequirement] = []
    for entry in raw:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("key"), str)
            or entry.get("operator") not in _SELECTOR_OPERATORS
        ):
            problems.append(Problem("malformed_affinity", f"node selector requirement {entry!r}"))
            continue
        values = entry.get("values") or []
        result.append(
            NodeSelectorRequirement(
                key=entry["key"],
                operator=entry["operator"],
                values=tuple(str(v) for v in values) if isinstance(values, list) else (),
            )
        )
    return tuple(result)


def _scheduling(pod: JSON, problems: list[Problem]) -> PodScheduling:
    selector_raw = pod.get("nodeSelector")
    node_selector: dict[str, str] = {}
    if isinstance(selector_raw, dict):
        node_selector = {str(k): str(v) for k, v in selector_raw.items()}
    elif selector_raw is not None:
        problems.append(Problem("malformed_scheduling", "nodeSelector is not an object"))

    terms: list[NodeSelectorTerm] = []
    required = _dict(
        _dict(_dict(pod.get("affinity")).get("nodeAffinity")).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        )
    )
    raw_terms = required.get("nodeSelectorTerms")
    if isinstance(raw_terms, list):
        for term in raw_terms:
            if not isinstance(term, dict):
                problems.append(Problem("malformed_affinity", "nodeSelectorTerm not an object"))
                continue
            terms.append(
                NodeSelectorTerm(
                    match_expressions=_requirements(term.get("matchExpressions"), problems),
                    match_fields=_requirements(term.get("matchFields"), problems),
                )
            )

    tolerations: list[Toleration] = []
    raw_tolerations = pod.get("tolerations")
    if isinstance(raw_tolerations, list):
        for entry in raw_tolerations:
            if not isinstance(entry, dict):
                problems.append(Problem("malformed_scheduling", "toleration not an object"))
                continue
            operator = entry.get("operator") or "Equal"
            effect = entry.get("effect") or None
            key, value = entry.get("key"), entry.get("value")
            if (
                operator not in _TOLERATION_OPERATORS
                or (effect is not None and effect not in _EFFECTS)
                or (key is not None and not isinstance(key, str))
                or (value is not None and not isinstance(value, str))
            ):
                problems.append(Problem("malformed_scheduling", f"toleration {entry!r}"))
                continue
            tolerations.append(
                Toleration.model_validate(
                    {"key": key or None, "operator": operator, "value": value, "effect": effect}
                )
            )
    return PodScheduling(
        node_selector=node_selector,
        required_node_affinity=tuple(terms),
        tolerations=tuple(tolerations),
    )


def extract_workload(
    kind: str,
    obj: JSON,
    observed_at: datetime,
    *,
    owner: OwnerRef | None = None,
    revision: int | None = None,
) -> tuple[WorkloadImageSet, list[Problem]]:
    """The image set of one workload, and what was wrong with the object (if anything).

    Raises BadObject only when the object cannot be identified; any other defect leaves a
    Problem and the parts that could be read.
    """
    ident = identity(obj)
    problems: list[Problem] = []
    pod = pod_template_spec(kind, obj)
    if pod is None:
        problems.append(Problem("missing_template", "spec.template.spec is missing"))
        containers: tuple[ContainerImage, ...] = ()
        scheduling = PodScheduling()
    else:
        containers = _containers(pod, problems)
        scheduling = _scheduling(pod, problems)
    item = WorkloadImageSet(
        kind=kind,
        namespace=ident.namespace,
        name=ident.name,
        uid=ident.uid,
        owner=owner,
        revision=revision,
        containers=containers,
        scheduling=scheduling,
        replicas=replicas_of(kind, obj),
        resource_version=ident.resource_version,
        generation=ident.generation,
        observed_at=observed_at,
    )
    return item, problems


def extract_namespace(obj: JSON, observed_at: datetime) -> tuple[NamespaceEvent, list[Problem]]:
    ident = identity(obj, namespaced=False)
    meta = obj["metadata"]
    problems: list[Problem] = []

    def strings(field: str) -> dict[str, str]:
        raw = meta.get(field)
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            problems.append(Problem("malformed_metadata", f"metadata.{field} is not an object"))
            return {}
        return {str(k): str(v) for k, v in raw.items()}

    phase = _dict(obj.get("status")).get("phase")
    event = NamespaceEvent(
        name=ident.name,
        uid=ident.uid,
        labels=strings("labels"),
        annotations=strings("annotations"),
        phase=phase if isinstance(phase, str) else None,
        resource_version=ident.resource_version,
        observed_at=observed_at,
    )
    return event, problems
