"""The allocator's errors, all under `AllocatorError`. Pure: no I/O.

NATS and Kubernetes failures arrive as `cedar.runtime.errors.BusError` and `KubeError`;
these are the allocator's own.
"""

from __future__ import annotations

from cedar.runtime.errors import CedarError, ConfigError


class AllocatorError(CedarError):
    """Root of the errors the MCS allocator raises."""


class ConfigurationRefused(AllocatorError, ConfigError):
    """The settings cannot hold what the ledger already holds."""


class InvalidSelector(AllocatorError, ValueError):
    """CEDAR_MCS_SELECTOR is not a label selector."""


class LostRace(AllocatorError):
    """A CAS write or a conditional PATCH lost: read again and decide anew."""

    def __init__(self, keys: tuple[str, ...] = (), refetch: bool = False) -> None:
        super().__init__(", ".join(keys) or "namespace changed")
        self.keys = keys
        self.refetch = refetch


class SnapshotError(AllocatorError, ValueError):
    """Not a snapshot this version can read, or an entry it cannot hold."""


class SnapshotUnavailable(AllocatorError):
    """The stored snapshot could not be read whole (changing under us, or damaged)."""


class WebhookUnavailable(AllocatorError, ConfigError):
    """The admission webhook cannot serve: its port, or no usable certificate."""
