"""The puller's settings: `CEDAR_*` environment variables (and `DOCKER_HOST`).

Reads only the process environment (through pydantic-settings), once, when built.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

from cedar.puller.errors import PullerConfigError
from cedar.puller.pacing import DEFAULT_LEASE_TTL, FleetBudget, parse_fleet_pulls
from cedar.puller.warmup import DEFAULT_WARM_TIMEOUT, check_timeout
from cedar.runtime.durations import Duration
from cedar.runtime.settings import CommonSettings


class PullerSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="CEDAR_", extra="ignore", populate_by_name=True)

    node_name: str | None = Field(
        default=None, description="This node's name (downward API spec.nodeName). Required."
    )
    metrics_port: int = Field(default=9102, ge=0, le=65535)
    # DOCKER_HOST is the Docker CLI's own variable, so operators set it once for both.
    docker_host: str = Field(
        default="unix:///var/run/docker.sock",
        validation_alias=AliasChoices("DOCKER_HOST", "CEDAR_DOCKER_HOST"),
        description="The Docker engine to drive.",
    )
    runtime: Literal["auto", "docker", "cri"] = Field(
        default="auto",
        description="The engine to drive: the Docker engine API, the CRI (containerd, CRI-O), "
        "or auto (the Node's containerRuntimeVersion, then the usual sockets).",
    )
    cri_endpoint: str | None = Field(
        default=None,
        description="The CRI runtime's socket (unix:///run/containerd/containerd.sock); "
        "setting it means CEDAR_RUNTIME=auto picks the CRI.",
    )
    cri_timeout: Duration = Field(
        default=timedelta(seconds=30),
        description="Limit of one CRI call other than a pull (a pull has CEDAR_PULL_TIMEOUT).",
    )
    registry_auth_file: str | None = Field(
        default=None, description="A .dockerconfigjson file with registry credentials."
    )
    insecure_registries: str = Field(
        default="",
        description="Comma-separated registry hosts probed over plain http "
        "(127.0.0.1 and localhost always are).",
    )
    max_concurrent_pulls: int = Field(default=3, ge=1, le=64)
    refresh_interval: Duration = Field(default=timedelta(hours=1))
    refresh_jitter: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Fraction of the refresh interval over which nodes spread their refreshes.",
    )
    prune_label: str | None = Field(
        default=None, description="key=value (or key) an image must carry to be prunable."
    )
    prune_repositories: str = Field(
        default="", description="Comma-separated repository prefixes that are prunable."
    )
    prune_after: Duration = Field(default=timedelta(hours=72))
    prune_interval: Duration = Field(default=timedelta(hours=24))
    docker_root: str | None = Field(
        default=None, description="The engine's data root as mounted here, for the disk guard."
    )
    min_free_bytes: int = Field(default=5 * 1024**3, ge=0)
    pull_timeout: Duration = Field(default=timedelta(minutes=15))
    registry_probe_ttl: Duration = Field(default=timedelta(seconds=15))
    registry_probe_timeout: Duration = Field(default=timedelta(seconds=5))
    backoff_base: Duration = Field(default=timedelta(seconds=2))
    backoff_max: Duration = Field(default=timedelta(minutes=10))
    permanent_retry: Duration = Field(
        default=timedelta(hours=1),
        description="Retry interval for not_found, unauthorized and invalid references.",
    )
    resync_interval: Duration = Field(
        default=timedelta(seconds=60),
        description="How often the engine is re-listed without any event (eviction detection).",
    )
    node_from_api: bool = True
    node_labels: str = Field(default="", description="k=v,k2=v2 when the Node is not read.")
    node_taints: str = Field(default="", description="key=value:Effect,... likewise.")
    kubeconfig: str | None = Field(
        default=None, validation_alias=AliasChoices("KUBECONFIG", "CEDAR_KUBECONFIG")
    )
    registry_fleet_pulls: str = Field(
        default="",
        description="host=N,...: at most N pulls from that registry at once across the fleet "
        "(`*` for any other registry), coordinated through NATS KV cedar-fleet-leases.",
    )
    fleet_lease_ttl: Duration = Field(
        default=timedelta(seconds=DEFAULT_LEASE_TTL),
        description="A fleet lease (or request) of a puller that stopped renewing it lapses "
        "after this long; renewed every third of it. Whole seconds, at least 1s.",
    )
    warm_timeout: Duration = Field(
        default=timedelta(seconds=DEFAULT_WARM_TIMEOUT),
        description="The warm-up gate opens this long after the node was created, whatever "
        "is still missing.",
    )
    dry_run: bool = False
    from_subject: str | None = None

    @field_validator("registry_fleet_pulls")
    @classmethod
    def _budget_parses(cls, value: str) -> str:
        parse_fleet_pulls(value)  # FleetPullsError (a ValueError) names the bad entry
        return value

    @field_validator("fleet_lease_ttl")
    @classmethod
    def _lease_ttl(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < 1:
            raise ValueError(f"CEDAR_FLEET_LEASE_TTL must be at least 1s, not {value}")
        return value

    @field_validator("warm_timeout")
    @classmethod
    def _warm_timeout(cls, value: timedelta) -> timedelta:
        check_timeout(value.total_seconds())
        return value

    @field_validator("node_name")
    @classmethod
    def _node_required(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("CEDAR_NODE_NAME must not be empty")
        return value

    @property
    def node(self) -> str:
        if not self.node_name:
            raise PullerConfigError(
                "CEDAR_NODE_NAME is required (the downward API's spec.nodeName)"
            )
        return self.node_name

    @property
    def docker_host_explicit(self) -> bool:
        """Whether DOCKER_HOST was set (not the default): auto then keeps to the Docker engine."""
        return "docker_host" in self.model_fields_set

    @property
    def prune_prefixes(self) -> tuple[str, ...]:
        return _split(self.prune_repositories)

    @property
    def fleet_budget(self) -> FleetBudget:
        return parse_fleet_pulls(self.registry_fleet_pulls)

    @property
    def insecure_hosts(self) -> tuple[str, ...]:
        return _split(self.insecure_registries)


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
