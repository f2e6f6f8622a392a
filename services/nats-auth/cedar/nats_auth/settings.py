"""The auth callout's settings: `CEDAR_*` environment variables (and `KUBECONFIG`).

Reads only the process environment (through pydantic-settings), once, when built; the
issuer seed file is read by the app, not here. The NATS user the service itself connects
as (an `auth_users` entry of nats.conf's auth_callout, so it bypasses the callout) is the
common CEDAR_NATS_USER and CEDAR_NATS_PASSWORD.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

from cedar.nats_auth.review import parse_service_accounts
from cedar.runtime.durations import Duration
from cedar.runtime.settings import CommonSettings


class NatsAuthSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="CEDAR_", extra="ignore", populate_by_name=True)

    metrics_port: int = Field(default=9104, ge=0, le=65535)
    auth_issuer_seed_file: Path | None = Field(
        default=None,
        description="The issuer account's nkey seed (SA...): nats.conf's auth_callout "
        "issuer is its public key. Required.",
    )
    auth_account: str = Field(
        default="CEDAR",
        min_length=1,
        description="The NATS account accepted pullers are placed in.",
    )
    auth_audience: str = Field(
        default="nats", min_length=1, description="The audience the token must be issued for."
    )
    auth_service_accounts: str = Field(
        default="cedar-system/cedar-puller",
        description="namespace/name,... of the ServiceAccounts accepted as pullers.",
    )
    auth_user_ttl: Duration = Field(
        default=timedelta(hours=24),
        description="Longest life of a granted NATS user; never past its token's expiry. "
        "Keep it above the kubelet's token refresh (80% of the token's life, at most 24h): "
        "a puller reconnects, and is checked again, when its token is rotated.",
    )
    auth_review_timeout: Duration = Field(
        default=timedelta(seconds=5), description="Limit of one TokenReview request."
    )
    auth_max_inflight: int = Field(
        default=32, ge=1, le=1024, description="Authorization requests answered at once."
    )
    kubeconfig: str | None = Field(
        default=None, validation_alias=AliasChoices("KUBECONFIG", "CEDAR_KUBECONFIG")
    )

    @field_validator("auth_service_accounts")
    @classmethod
    def _service_accounts(cls, value: str) -> str:
        parse_service_accounts(value)  # raises ValueError with what is wrong
        return value

    @field_validator("auth_user_ttl")
    @classmethod
    def _ttl(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=10):
            raise ValueError("CEDAR_AUTH_USER_TTL must be at least 10s")
        return value

    @property
    def service_accounts(self) -> frozenset[tuple[str, str]]:
        return parse_service_accounts(self.auth_service_accounts)
