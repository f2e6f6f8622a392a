"""The root of Cedar's exception tree, and the errors every layer shares.

Every error Cedar raises on purpose is a `CedarError`; each service has a root of its own
under it (`WatcherError`, `PullerError`, `AllocatorError`), as do the operator commands
(`OpsError`) and the sandbox (`SandboxError`). Client libraries' errors never travel past
the module that talks to them: `cedar.runtime.bus` turns nats-py's into `BusError`, and
`cedar.runtime.kube` turns aiohttp's and the Kubernetes client's into `KubeError`. Where a
builtin fits, an error inherits it too (`ConfigError` is a `ValueError`), as nats-py and
FastStream do. No I/O.
"""

from __future__ import annotations


class CedarError(Exception):
    """Root of every error Cedar raises on purpose."""


class ConfigError(CedarError, ValueError):
    """A setting or a configuration file is unusable; the message says which and why."""


class BusError(CedarError):
    """NATS refused or failed a request (a permission, a missing stream, a bad reply)."""


class BusUnavailable(BusError, ConnectionError):
    """NATS is away for now (timed out, no responders, connection closed, JetStream
    unavailable): retry later; nothing was refused."""


class StalledRead(BusUnavailable):
    """A stream read received nothing for too long before reaching the end."""


class KubeError(CedarError):
    """The Kubernetes API answered with an error Status, or not at all (status 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class Gone(KubeError):
    """410: the resourceVersion asked for is too old; relist."""


class Forbidden(KubeError):
    """403: the service account may not do this."""


class NotFound(KubeError):
    """404."""


class Conflict(KubeError):
    """409: already exists, or a resourceVersion precondition failed."""


class KubeConfigError(ConfigError):
    """No usable Kubernetes configuration (kubeconfig or in-cluster service account)."""
