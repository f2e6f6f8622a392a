"""Pure: which NFS PersistentVolumes get the SELinux mount context of their tenant, and which
are reported because theirs names another level.

kubelet mounts a volume with `-o context=...` of the pod's level only for volumes whose
plugin supports it (the SELinuxMount feature; for CSI, drivers whose CSIDriver object says
`seLinuxMount: true`). The in-tree `nfs` plugin says it does not (pkg/volume/nfs/nfs.go,
`SupportsSELinux: false`), nor do CSI NFS drivers without that flag, so their files carry
the NFS default label and any pod that may read NFS reads them all. For a PV with
`spec.nfs`, or `spec.csi.driver` in CEDAR_MCS_NFS_CSI_DRIVERS, bound (status.phase Bound)
to a claim in a namespace in scope with a level, the allocator puts
`context="system_u:object_r:<type>:<level>"` into `spec.mountOptions` (the quotes keep the
comma of the level inside one mount option). A PV that already carries a context option
(`context`, `fscontext`, `defcontext`, `rootcontext`; they exclude each other) naming the
same level is left alone; one naming another level, or one that cannot be read, is a
conflict: reported, never changed (changing the context of a volume in use cuts its tenant
off from its files, or opens them to another). No I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cedar.mcs_allocator.podlevel import NamespaceLevel
from cedar.proto.levels import try_parse

CONTEXT_OPTIONS = ("context", "fscontext", "defcontext", "rootcontext")


@dataclass(frozen=True)
class VolumeRules:
    context_type: str = "container_file_t"
    csi_drivers: frozenset[str] = frozenset({"nfs.csi.k8s.io"})


@dataclass(frozen=True, slots=True)
class VolumeView:
    """The few fields of a PersistentVolume the allocator keeps."""

    name: str
    uid: str
    resource_version: str
    claim_namespace: str  # '' unless bound
    claim_name: str
    mount_options: tuple[str, ...]


@dataclass(frozen=True)
class AddContext:
    mount_options: tuple[str, ...]  # the whole new list
    level: str


@dataclass(frozen=True)
class ContextConflict:
    found: str  # the context option found
    level: str  # the level the claim's namespace has


VolumeAction = AddContext | ContextConflict


def is_nfs(pv: Mapping[str, Any], rules: VolumeRules) -> bool:
    spec = pv.get("spec") or {}
    if isinstance(spec.get("nfs"), Mapping):
        return True
    csi = spec.get("csi")
    return isinstance(csi, Mapping) and csi.get("driver") in rules.csi_drivers


def volume_view(pv: Mapping[str, Any], rules: VolumeRules) -> VolumeView | None:
    """What is kept of `pv`; None for a PV that is not an NFS volume."""
    if not is_nfs(pv, rules):
        return None
    meta = pv.get("metadata") or {}
    spec = pv.get("spec") or {}
    claim = spec.get("claimRef") or {}
    bound = (pv.get("status") or {}).get("phase") == "Bound" and isinstance(claim, Mapping)
    options = spec.get("mountOptions") or []
    return VolumeView(
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        resource_version=str(meta.get("resourceVersion", "")),
        claim_namespace=str(claim.get("namespace", "")) if bound else "",
        claim_name=str(claim.get("name", "")) if bound else "",
        mount_options=tuple(str(o) for o in options if isinstance(o, str)),
    )


def context_option(level: str, context_type: str) -> str:
    return f'context="system_u:object_r:{context_type}:{level}"'


def existing_context(options: tuple[str, ...]) -> str | None:
    """The first SELinux context mount option, as written."""
    for option in options:
        name = option.split("=", 1)[0].strip()
        if name in CONTEXT_OPTIONS and "=" in option:
            return option
    return None


def context_level(option: str) -> str | None:
    """The level of a context option (`user:role:type:level`), or None if unreadable."""
    value = option.split("=", 1)[1].strip().strip('"').strip("'")
    parts = value.split(":", 3)
    if len(parts) != 4 or not all(parts):
        return None
    return parts[3]


def same_level(a: str, b: str) -> bool:
    """Levels compared as category sets (`s0:c9,c5` is `s0:c5,c9`)."""
    if a == b:
        return True
    la, lb = try_parse(a, 1024, None), try_parse(b, 1024, None)
    return la is not None and la == lb


def decide_volume(
    view: VolumeView,
    namespace_of: Callable[[str], NamespaceLevel | None],
    rules: VolumeRules,
) -> VolumeAction | None:
    """What to do about one NFS volume; None: nothing (not bound, out of scope, no level yet,
    or its context already names the right level)."""
    if not view.claim_namespace:
        return None
    ns = namespace_of(view.claim_namespace)
    if ns is None or not ns.in_scope or not ns.level:
        return None
    found = existing_context(view.mount_options)
    if found is None:
        option = context_option(ns.level, rules.context_type)
        return AddContext((*view.mount_options, option), ns.level)
    level = context_level(found)
    if level is not None and same_level(level, ns.level):
        return None
    return ContextConflict(found, ns.level)
