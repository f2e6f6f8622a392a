"""The watcher's settings (`CEDAR_*` environment variables, plus the standard KUBECONFIG).

Reads only the environment, through pydantic-settings.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, field_validator

from cedar.proto import subjects
from cedar.runtime.settings import CommonSettings

ALL_KINDS: tuple[str, ...] = (*subjects.KUBERNETES_WORKLOAD_KINDS, "Namespace")
_CANONICAL = {kind.lower(): kind for kind in ALL_KINDS}


class WatcherSettings(CommonSettings):
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    watch_kinds: str = Field(
        default=",".join(ALL_KINDS),
        description="Comma-separated kinds to watch (any of " + ", ".join(ALL_KINDS) + ").",
    )
    watch_previous_revisions: int = Field(
        default=1,
        ge=0,
        le=100,
        description="Older ReplicaSet revisions of a Deployment kept warm besides the current.",
    )
    watch_page_size: int = Field(default=500, ge=1, le=10_000, description="Objects per list page.")
    watch_namespace: str | None = Field(
        default=None, description="Watch only this namespace (default: every namespace)."
    )
    watch_timeout_seconds: int = Field(
        default=300, ge=1, description="How long one watch request stays open before renewal."
    )
    publish_max_inflight: int = Field(
        default=4000, ge=1, le=20_000, description="JetStream publishes awaiting their ack at once."
    )
    publish_ack_timeout: float = Field(
        default=5.0, gt=0, description="Seconds to wait for a publish ack before retrying."
    )
    max_message_bytes: int = Field(
        default=900_000,
        ge=1024,
        description="Larger image sets are reported as bad objects (NATS max_payload is 1 MB).",
    )
    kubeconfig: str | None = Field(
        default=None, validation_alias=AliasChoices("KUBECONFIG", "CEDAR_KUBECONFIG")
    )

    @field_validator("watch_kinds")
    @classmethod
    def _known_kinds(cls, value: str) -> str:
        kinds: list[str] = []
        for part in value.split(","):
            name = part.strip()
            if not name:
                continue
            kind = _CANONICAL.get(name.lower().rstrip("s")) or _CANONICAL.get(name.lower())
            if kind is None:
                raise ValueError(
                    f"unknown kind {name!r} in CEDAR_WATCH_KINDS; known: {', '.join(ALL_KINDS)}"
                )
            if kind not in kinds:
                kinds.append(kind)
        return ",".join(kinds)

    @field_validator("watch_namespace")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @property
    def kinds(self) -> tuple[str, ...]:
        """The enabled kinds, in the canonical order."""
        enabled = set(self.watch_kinds.split(",")) if self.watch_kinds else set()
        return tuple(kind for kind in ALL_KINDS if kind in enabled)
