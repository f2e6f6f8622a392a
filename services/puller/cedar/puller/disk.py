"""The disk guard: new pulls wait while the engine's data root is short of free space.

I/O: statvfs of CEDAR_DOCKER_ROOT (the engine's data root as mounted here), and the
cedar_puller_disk_free_bytes / cedar_puller_disk_low gauges. Without a root it never trips.
"""

from __future__ import annotations

import logging
import os

from cedar.puller import metrics

log = logging.getLogger("cedar.puller")


class DiskGuard:
    def __init__(self, root: str | None, min_free_bytes: int) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.low = False

    def check(self) -> bool:
        """Whether free space is below the guard now; logs when that changes."""
        if not self.root:
            return False
        try:
            st = os.statvfs(self.root)
        except OSError as err:
            log.debug("cannot stat the engine's data root: %s", err)
            return False
        free = st.f_bavail * st.f_frsize
        metrics.DISK_FREE.set(free)
        low = free < self.min_free_bytes
        if low != self.low:
            if low:
                log.warning(
                    "free disk below the guard; new pulls wait",
                    extra={"free_bytes": free, "min_free_bytes": self.min_free_bytes},
                )
            else:
                log.info("free disk above the guard again; pulls resume")
        self.low = low
        metrics.DISK_LOW.set(1 if low else 0)
        return low
