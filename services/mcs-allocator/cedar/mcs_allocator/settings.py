"""The allocator's settings (CEDAR_MCS_*), on top of the common ones.

Read from the environment by pydantic-settings; no other I/O.
"""

from __future__ import annotations

import re
from datetime import timedelta

from pydantic import Field, field_validator, model_validator

from cedar.mcs_allocator.errors import InvalidSelector
from cedar.mcs_allocator.scope import Scope, parse_selector
from cedar.runtime.durations import Duration
from cedar.runtime.settings import CommonSettings

DEFAULT_EXCLUDE = ("kube-system", "kube-public", "kube-node-lease", "default")
_SELINUX_NAME = re.compile(r"[a-z][a-z0-9_]*")


class AllocatorSettings(CommonSettings):
    metrics_port: int = Field(default=9103, ge=0, le=65535)
    namespace: str = Field(
        default="cedar-system", description="Cedar's own namespace (CEDAR_NAMESPACE); excluded."
    )
    mcs_annotation: str = Field(
        default="cedar.io/selinux-level", description="Namespace annotation carrying the level."
    )
    mcs_exclude: str = Field(
        default=",".join(DEFAULT_EXCLUDE),
        description="Comma-separated namespaces never labelled (Cedar's own is always added).",
    )
    mcs_selector: str = Field(default="", description="Only namespaces matching this selector.")
    mcs_categories: int = Field(default=1024, ge=3, le=1024)
    mcs_categories_per_label: int = Field(default=2, ge=2, le=3)
    mcs_quarantine: Duration = Field(default=timedelta(days=7))
    mcs_resync_interval: Duration = Field(default=timedelta(minutes=10))
    mcs_snapshot_interval: Duration = Field(
        default=timedelta(minutes=10),
        description="How often a replica checks whether a new ledger snapshot is due; 0: never "
        "read or write snapshots (start-up then reads every ledger key).",
    )
    mcs_openshift_compat: bool = False
    mcs_max_in_flight: int = Field(
        default=64, ge=1, le=1024, description="Namespace events handled at once per replica."
    )
    # -- making the level bind (docs/mcs-allocator.md, "Pods and volumes") --------------
    mcs_allowed_types: str = Field(
        default="container_t",
        description="SELinux types a tenant pod may ask for, comma separated (the webhook's "
        "list; the ValidatingAdmissionPolicy carries its own copy).",
    )
    mcs_webhook_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Serve the mutating admission webhook (HTTPS) on this port; unset: no webhook.",
    )
    mcs_webhook_host: str = "0.0.0.0"
    mcs_webhook_cert: str = Field(
        default="/etc/cedar/webhook/tls.crt",
        description="The webhook's certificate chain (PEM), e.g. from a cert-manager Secret.",
    )
    mcs_webhook_key: str = Field(
        default="/etc/cedar/webhook/tls.key", description="The webhook's private key (PEM)."
    )
    mcs_webhook_reload: Duration = Field(
        default=timedelta(seconds=10),
        description="How often the certificate files are checked for a rotation.",
    )
    mcs_watchdog: bool = Field(
        default=True,
        description="Watch the pods of labelled namespaces and report those running at "
        "another level.",
    )
    mcs_nfs_context: bool = Field(
        default=False,
        description='Put context="system_u:object_r:<type>:<level>" into the mountOptions of '
        "NFS PersistentVolumes bound to a claim in a labelled namespace.",
    )
    mcs_nfs_context_type: str = Field(
        default="container_file_t", description="The SELinux type of that mount context."
    )
    mcs_nfs_csi_drivers: str = Field(
        default="nfs.csi.k8s.io",
        description="CSI drivers whose volumes are NFS mounts, comma separated.",
    )
    kubeconfig: str | None = Field(default=None, description="Set from KUBECONFIG by the CLI.")
    dry_run: bool = False
    from_subject: str | None = None

    @field_validator("mcs_selector")
    @classmethod
    def _valid_selector(cls, value: str) -> str:
        try:
            parse_selector(value)
        except InvalidSelector as err:
            raise ValueError(str(err)) from err
        return value

    @model_validator(mode="after")
    def _positive_durations(self) -> AllocatorSettings:
        if self.mcs_resync_interval.total_seconds() <= 0:
            raise ValueError("CEDAR_MCS_RESYNC_INTERVAL must be positive")
        if self.mcs_snapshot_interval.total_seconds() < 0:
            raise ValueError("CEDAR_MCS_SNAPSHOT_INTERVAL must not be negative")
        if self.mcs_quarantine.total_seconds() < 0:
            raise ValueError("CEDAR_MCS_QUARANTINE must not be negative")
        if self.mcs_webhook_reload.total_seconds() <= 0:
            raise ValueError("CEDAR_MCS_WEBHOOK_RELOAD must be positive")
        if not self.allowed_types:
            raise ValueError("CEDAR_MCS_ALLOWED_TYPES must name at least one SELinux type")
        for name in (*self.allowed_types, self.mcs_nfs_context_type):
            if not _SELINUX_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an SELinux type name")
        if self.mcs_metrics_port_clash():
            raise ValueError("CEDAR_MCS_WEBHOOK_PORT must differ from CEDAR_METRICS_PORT")
        return self

    def mcs_metrics_port_clash(self) -> bool:
        return self.mcs_webhook_port is not None and self.mcs_webhook_port == self.metrics_port

    @property
    def allowed_types(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.mcs_allowed_types.split(",") if t.strip())

    @property
    def nfs_csi_drivers(self) -> frozenset[str]:
        return frozenset(d.strip() for d in self.mcs_nfs_csi_drivers.split(",") if d.strip())

    @property
    def excluded(self) -> frozenset[str]:
        names = {n.strip() for n in self.mcs_exclude.split(",") if n.strip()}
        return frozenset(names | {self.namespace})

    def scope(self) -> Scope:
        return Scope.of(self.excluded, self.mcs_selector)

    @property
    def annotations(self) -> tuple[str, ...]:
        """Every annotation the level is written to."""
        if self.mcs_openshift_compat:
            return (self.mcs_annotation, "openshift.io/sa.scc.mcs")
        return (self.mcs_annotation,)
