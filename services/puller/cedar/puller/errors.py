"""The puller's exceptions, all under `PullerError`. Pure: no I/O, touches nothing.

`PullerError` is the puller's root under `CedarError`; each error the puller raises on
purpose is one of its subclasses. nats-py's errors never get here: the modules that talk to
NATS turn them into `BusError` (cedar.runtime.bus.bus_errors) and catch those.
"""

from __future__ import annotations

from cedar.runtime.errors import CedarError, ConfigError


class PullerError(CedarError):
    """Root of every error the puller raises on purpose."""


class PullerConfigError(PullerError, ConfigError):
    """A puller setting is unusable (CEDAR_NODE_NAME missing, say); the message says which."""


class EngineError(PullerError):
    """The Docker engine failed or refused; `reason` is the class the puller acts on
    (not_found, unauthorized, timeout, invalid_reference, engine_error, low_disk,
    registry_down) and `message` what the engine said."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class CredentialFileError(PullerError, ValueError):
    """The registry auth file is not a .dockerconfigjson (or legacy .dockercfg) body."""
