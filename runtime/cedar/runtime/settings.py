"""Settings shared by every service, read from `CEDAR_*` environment variables.

Each service extends `CommonSettings` with its own fields in its own package.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cedar.runtime.durations import Duration


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CEDAR_", extra="ignore")

    nats_url: str = Field(
        default="nats://127.0.0.1:4222", description="NATS server(s), comma separated."
    )
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_token_file: Path | None = Field(
        default=None,
        description="Connect with the token in this file instead of a user and password "
        "(read again at every reconnect): the Pod's bound ServiceAccount token, when NATS "
        "authenticates pullers by auth callout (deploy/components/nats-auth-callout).",
    )
    nats_replicas: int = Field(
        default=1, ge=1, le=5, description="Replicas of the streams and KV buckets Cedar creates."
    )
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(default=0, ge=0, le=65535)
    log_level: str = "INFO"
    history_retention: Duration = Field(
        default=timedelta(days=7), description="How long CEDAR_HISTORY keeps every change."
    )
    node_name: str | None = Field(default=None, description="The node this process runs on.")
    pod_name: str = Field(default_factory=socket.gethostname)

    @property
    def nats_servers(self) -> list[str]:
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("log level must be DEBUG, INFO, WARNING or ERROR")
        return level
