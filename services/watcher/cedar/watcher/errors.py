"""The watcher's exception root. Pure: no I/O.

Every error the watcher raises on purpose is a `WatcherError`. An object the watcher cannot
identify is `cedar.proto.workloads.BadObject` (a `ValueError` of the contracts layer, which
cannot import Cedar's runtime); NATS's errors reach the watcher only as
`cedar.runtime.errors.BusError`, Kubernetes's only as `KubeError`.
"""

from __future__ import annotations

from cedar.runtime.errors import CedarError


class WatcherError(CedarError):
    """Root of every error the watcher raises on purpose."""
