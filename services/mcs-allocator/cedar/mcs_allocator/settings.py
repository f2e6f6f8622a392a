"""The allocator's settings (CEDAR_MCS_*), on top of the common ones.

Read from the environment by pydantic-settings; no other I/O.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field, field_validator, model_validator

from cedar.mcs_allocator.errors import InvalidSelector
from cedar.mcs_allocator.scope import Scope, parse_selector
from cedar.runtime.durations import Duration
from cedar.runtime.settings import CommonSettings

DEFAULT_EXCLUDE = ("kube-system", "kube-public", "kube-node-lease", "default")


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
        return self

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
