"""Kubernetes manifests for `cedar prepull`: load, validate strictly, extract images. Pure.

Validation uses the `kubernetes-validate` schemas in strict mode (unknown fields are errors)
for one pinned Kubernetes version, the one the deploy tests use, so that a manifest
`cedar prepull` accepts is one `make test` would accept. Images and scheduling come from the
contracts layer's extraction (`cedar.proto.workloads`), the one the watcher uses, so that a
prepull wants exactly what the watcher will publish once the release is applied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from cedar.ops.records import PREPULLED_KINDS, prepull_name
from cedar.proto import subjects
from cedar.proto.models import OwnerRef, WorkloadImageSet
from cedar.proto.workloads import BadObject, extract_workload

# The Kubernetes version Cedar targets: tests/unit/test_deploy.py validates deploy/ against
# it (K8S_VERSIONS' newest), so prepull and `make test` accept the same manifests.
KUBERNETES_VERSION = "1.33.0"

# Kinds with a pod template (Pod is its own template).
WORKLOAD_KINDS = frozenset(PREPULLED_KINDS)


@dataclass(frozen=True)
class Manifest:
    source: str  # file name, or "-" for standard input
    index: int  # document number in that file, from 1
    doc: dict[str, Any]

    @property
    def where(self) -> str:
        meta = self.doc.get("metadata") or {}
        name = meta.get("name", "?") if isinstance(meta, dict) else "?"
        return f"{self.source}: document {self.index} ({self.doc.get('kind', '?')}/{name})"


class ManifestError(ValueError):
    """A manifest cannot be used; the message says where and why."""


def _documents(source: str, text: str) -> Iterator[Manifest]:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        raise ManifestError(f"{source}: not valid YAML: {err}") from err
    index = 0
    for doc in docs:
        if doc is None:
            continue
        index += 1
        if not isinstance(doc, dict):
            raise ManifestError(f"{source}: document {index} is not a mapping")
        if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            for item in doc["items"]:
                if not isinstance(item, dict):
                    raise ManifestError(f"{source}: document {index}: a List item is not a mapping")
                yield Manifest(source, index, item)
        else:
            yield Manifest(source, index, doc)


def load(sources: Iterable[tuple[str, str]]) -> list[Manifest]:
    """(name, text) pairs to manifests, in order."""
    out: list[Manifest] = []
    for source, text in sources:
        out.extend(_documents(source, text))
    return out


def read_files(paths: Iterable[str], stdin_text: str | None = None) -> list[tuple[str, str]]:
    """Files (a directory means its *.yaml, *.yml and *.json files, sorted)."""
    out: list[tuple[str, str]] = []
    for p in paths:
        if p == "-":
            out.append(("-", stdin_text or ""))
            continue
        path = Path(p)
        if path.is_dir():
            files = sorted(
                f for f in path.iterdir() if f.suffix in (".yaml", ".yml", ".json") and f.is_file()
            )
        else:
            files = [path]
        for f in files:
            try:
                out.append((str(f), f.read_text()))
            except OSError as err:
                raise ManifestError(f"{f}: {err.strerror or err}") from err
    return out


def validate(manifest: Manifest, version: str = KUBERNETES_VERSION) -> str | None:
    """None when the manifest is valid for `version` (strict), else the validator's message."""
    doc = manifest.doc
    if not isinstance(doc.get("apiVersion"), str) or not isinstance(doc.get("kind"), str):
        return f"{manifest.where}: apiVersion and kind are required"
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return (
            f"{manifest.where}: no schema for {doc['kind']} {doc['apiVersion']} in Kubernetes "
            f"{version} (strict validation knows only built-in kinds)"
        )
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path) or "(document)"
        return f"{manifest.where}: {path}: {err.message}"
    return None


def _synthetic_uid(manifest: Manifest) -> str:
    meta = manifest.doc.get("metadata") or {}
    key = f"{manifest.doc.get('kind')}/{meta.get('namespace', '')}/{meta.get('name', '')}"
    return "prepull-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def prepull_set(
    manifest: Manifest, now: datetime, ttl: timedelta, default_namespace: str = "default"
) -> WorkloadImageSet | None:
    """The `kind="Prepull"` image set for one workload manifest (None for other kinds).

    Named `<kind>-<name>` in the workload's namespace, owned by the workload it stands for,
    so `cedar replay --name <workload>` finds it.
    """
    doc = manifest.doc
    kind = doc.get("kind")
    if kind not in WORKLOAD_KINDS:
        return None
    meta = dict(doc.get("metadata") or {})
    meta.setdefault("namespace", default_namespace)
    meta.setdefault("uid", _synthetic_uid(manifest))
    obj = {**doc, "metadata": meta}
    if kind == "Pod":
        obj = {"metadata": meta, "spec": {"template": {"spec": doc.get("spec") or {}}}}
    try:
        wis, _problems = extract_workload(str(kind), obj, now)
    except BadObject as err:
        raise ManifestError(f"{manifest.where}: {err}") from err
    return wis.model_copy(
        update={
            "kind": subjects.PREPULL_KIND,
            "name": prepull_name(str(kind), wis.name),
            "owner": OwnerRef(kind=str(kind), name=wis.name, uid=wis.uid),
            "replicas": None,
            "expires_at": now + ttl,
        }
    )
