"""Pure: the Deployment controller's decisions, as pkg/controller/deployment makes them.

Given a Deployment and the ReplicaSets it controls, what the controller writes
(pkg/controller/deployment/sync.go getNewReplicaSet, cleanupDeployment;
pkg/controller/deployment/util/deployment_util.go SetNewReplicaSetAnnotations):

- one ReplicaSet per pod template, named `<deployment>-<pod-template-hash>`, the hash also
  in its labels, selector and template labels (`pod-template-hash`);
- the hash as pkg/controller/controller_utils.go ComputeHash makes it: 32-bit FNV-1a over
  the template, then the collisionCount as 8 little-endian bytes when it is set, the
  decimal sum run through SafeEncodeString (staging/src/k8s.io/apimachinery/pkg/util/rand).
  The real controller hashes the Go struct's spew dump, which no other program reproduces
  (it changes with every field Kubernetes adds); here the template's canonical JSON is
  hashed, so the values differ from a real cluster's but behave the same: one per template,
  stable, changed by any change to the template;
- `deployment.kubernetes.io/revision` on the new ReplicaSet (the highest old revision + 1),
  the old value moved to `deployment.kubernetes.io/revision-history` when an old template
  comes back, `desired-replicas`/`max-replicas` on a created one, the Deployment's other
  annotations copied over; the Deployment gets the same revision annotation;
- old ReplicaSets are kept, scaled to 0, the oldest beyond `revisionHistoryLimit` deleted.

No pods exist in the sandbox, so a rollout is immediate: the new ReplicaSet gets the
Deployment's replicas and the old ones 0. No I/O.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

JsonObj = dict[str, Any]

HASH_LABEL = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
DESIRED_REPLICAS = "deployment.kubernetes.io/desired-replicas"
MAX_REPLICAS = "deployment.kubernetes.io/max-replicas"
_NOT_COPIED = frozenset(
    {
        "kubectl.kubernetes.io/last-applied-configuration",
        REVISION,
        REVISION_HISTORY,
        DESIRED_REPLICAS,
        MAX_REPLICAS,
        "deployment.kubernetes.io/error-selector-overlapping-with",
        "deployment.kubernetes.io/selector-updated-at",
    }
)
_ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"


def fnv32a(data: bytes) -> int:
    value = 0x811C9DC5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def safe_encode(text: str) -> str:
    """SafeEncodeString: each character mapped onto the alphabet without vowels."""
    return "".join(_ALPHANUMS[ord(ch) % len(_ALPHANUMS)] for ch in text)


def compute_hash(template: JsonObj, collision_count: int | None) -> str:
    data = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    if collision_count is not None:
        data += (collision_count & 0xFFFFFFFF).to_bytes(4, "little") + bytes(4)
    return safe_encode(str(fnv32a(data)))


def without_hash(template: Any) -> Any:
    """A template as its Deployment has it: EqualIgnoreHash compares without the label."""
    if not isinstance(template, dict):
        return template
    copy = json.loads(json.dumps(template))
    labels = (copy.get("metadata") or {}).get("labels")
    if isinstance(labels, dict):
        labels.pop(HASH_LABEL, None)
        if not labels:
            del copy["metadata"]["labels"]
    return copy


def revision_of(obj: JsonObj) -> int:
    """The revision annotation; 0 when missing or unreadable (MaxRevision skips those)."""
    try:
        return int(((obj.get("metadata") or {}).get("annotations") or {}).get(REVISION, "0"))
    except ValueError:
        return 0


def controlled_by(obj: JsonObj, uid: str) -> bool:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if isinstance(ref, dict) and ref.get("controller") and ref.get("uid") == uid:
            return True
    return False


def _surge(deployment: JsonObj, replicas: int) -> int:
    strategy = (deployment.get("spec") or {}).get("strategy") or {}
    if strategy.get("type") != "RollingUpdate":
        return 0
    value = (strategy.get("rollingUpdate") or {}).get("maxSurge", "25%")
    if isinstance(value, str) and value.endswith("%"):
        try:
            return math.ceil(replicas * int(value[:-1]) / 100)  # round up, as GetScaledValue
        except ValueError:
            return 0
    return int(value) if isinstance(value, int) else 0


@dataclass
class Plan:
    """The writes one sync makes: ReplicaSets to create, to replace, to delete (names),
    and the Deployment's revision and collisionCount."""

    create: list[JsonObj] = field(default_factory=list)
    replace: list[JsonObj] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    revision: str = ""
    collision_count: int | None = None


def _copy_annotations(deployment: JsonObj, rs: JsonObj) -> None:
    annotations = rs["metadata"].setdefault("annotations", {})
    for key, value in ((deployment.get("metadata") or {}).get("annotations") or {}).items():
        if key not in _NOT_COPIED:
            annotations[key] = value


def _new_replicaset(deployment: JsonObj, hash_: str, revision: int) -> JsonObj:
    meta = deployment["metadata"]
    spec = deployment.get("spec") or {}
    template = json.loads(json.dumps(spec.get("template") or {}))
    template.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = hash_
    selector = json.loads(json.dumps(spec.get("selector") or {}))
    selector.setdefault("matchLabels", {})[HASH_LABEL] = hash_
    replicas = int(spec.get("replicas", 1))
    rs: JsonObj = {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {
            "name": f"{meta['name']}-{hash_}",
            "namespace": meta["namespace"],
            "labels": dict(template["metadata"]["labels"]),
            "annotations": {},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "replicas": replicas,
            "minReadySeconds": spec.get("minReadySeconds", 0),
            "selector": selector,
            "template": template,
        },
    }
    _copy_annotations(deployment, rs)
    rs["metadata"]["annotations"].update(
        {
            REVISION: str(revision),
            DESIRED_REPLICAS: str(replicas),
            MAX_REPLICAS: str(replicas + _surge(deployment, replicas)),
        }
    )
    return rs


def plan_sync(deployment: JsonObj, owned: list[JsonObj]) -> Plan:
    """What the controller writes for `deployment`, given the ReplicaSets it controls."""
    spec = deployment.get("spec") or {}
    template = spec.get("template") or {}
    replicas = int(spec.get("replicas", 1))
    collision = (deployment.get("status") or {}).get("collisionCount")
    plan = Plan(collision_count=collision)
    current = next(
        (rs for rs in owned if without_hash(rs["spec"].get("template")) == template), None
    )
    old = [rs for rs in owned if rs is not current]
    new_revision = max((revision_of(rs) for rs in old), default=0) + 1
    if current is None:
        hash_ = compute_hash(template, collision)
        name = f"{deployment['metadata']['name']}-{hash_}"
        if any(rs["metadata"]["name"] == name for rs in owned):
            # A hash collision with another template: the controller bumps collisionCount
            # and tries again on the next sync (sync.go getNewReplicaSet).
            plan.collision_count = (collision or 0) + 1
            return plan
        current = _new_replicaset(deployment, hash_, new_revision)
        plan.create.append(current)
    else:
        updated = json.loads(json.dumps(current))
        _copy_annotations(deployment, updated)
        annotations = updated["metadata"].setdefault("annotations", {})
        had = annotations.get(REVISION)
        if revision_of(updated) < new_revision:
            annotations[REVISION] = str(new_revision)
            if had is not None:  # an old template came back: keep where it was before
                history = annotations.get(REVISION_HISTORY)
                annotations[REVISION_HISTORY] = f"{history},{had}" if history else had
        updated["spec"]["replicas"] = replicas
        updated["spec"]["minReadySeconds"] = spec.get("minReadySeconds", 0)
        if updated != current:
            plan.replace.append(updated)
    plan.revision = str(revision_of(current))
    for rs in old:
        if rs["spec"].get("replicas", 1) != 0:
            scaled = json.loads(json.dumps(rs))
            scaled["spec"]["replicas"] = 0
            plan.replace.append(scaled)
    limit = spec.get("revisionHistoryLimit", 10)
    if isinstance(limit, int) and len(old) > limit:
        by_age = sorted(old, key=lambda rs: (revision_of(rs), rs["metadata"]["name"]))
        doomed = {rs["metadata"]["name"] for rs in by_age[: len(old) - limit]}
        plan.replace = [rs for rs in plan.replace if rs["metadata"]["name"] not in doomed]
        plan.delete = sorted(doomed)
    return plan
