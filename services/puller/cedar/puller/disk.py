"""The disk guard: new pulls wait while the filesystem holding the images is short of space.

Where the free space is measured, first that applies:

1. CEDAR_DOCKER_ROOT, the engine's data root as mounted here (statvfs), as before;
2. on a CRI runtime, the image filesystem its ImageFsInfo names: statvfs of that path when
   it is visible here (the puller runs on the host, or the path is mounted), else of this
   container's own root filesystem, which the runtime keeps on that same filesystem (a
   container's rootfs is a snapshot in the runtime's store). That stand-in is checked: when
   the runtime says its images use more bytes than that filesystem has in use, it is
   another filesystem, and the guard says so once and stays off;
3. nothing: the guard never trips (the Docker engine without CEDAR_DOCKER_ROOT).

I/O: statvfs, the engine's image_fs() (ImageFsInfo on CRI), and the
cedar_puller_disk_free_bytes / cedar_puller_disk_low gauges.
"""

from __future__ import annotations

import logging
import os

from cedar.puller import metrics
from cedar.puller.engine import ImageEngine, ImageFs

log = logging.getLogger("cedar.puller")

OWN_ROOT = "/"


def _usage(path: str) -> tuple[int, int] | None:
    """(free bytes for unprivileged use, bytes in use) of the filesystem holding `path`."""
    try:
        st = os.statvfs(path)
    except OSError as err:
        log.debug("cannot stat %s: %s", path, err)
        return None
    return st.f_bavail * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize


class DiskGuard:
    def __init__(
        self,
        root: str | None,
        min_free_bytes: int,
        engine: ImageEngine | None = None,
        *,
        own_root: str = OWN_ROOT,
    ) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.engine = engine
        self.own_root = own_root
        self.low = False
        self.measured: str | None = None  # the path whose filesystem was measured last
        self._said: str | None = None  # the last "why the guard is off" logged

    async def _free(self) -> int | None:
        if self.root:
            usage = _usage(self.root)
            self.measured = self.root if usage else None
            return usage[0] if usage else None
        if self.engine is None:
            return None
        image_fs = await self.engine.image_fs()
        return None if image_fs is None else self._free_on(image_fs)

    def _free_on(self, image_fs: ImageFs) -> int | None:
        """Free bytes of the runtime's image filesystem, measured where it can be."""
        if os.path.isdir(image_fs.mountpoint):
            usage = _usage(image_fs.mountpoint)
            if usage is not None:
                self.measured = image_fs.mountpoint
                return usage[0]
        usage = _usage(self.own_root)
        if usage is None or image_fs.used_bytes > usage[1]:
            self._off(
                f"the runtime's image filesystem {image_fs.mountpoint} is not visible here and "
                f"is not this container's own; set CEDAR_DOCKER_ROOT to a mount of it"
            )
            self.measured = None
            return None
        self.measured = self.own_root
        return usage[0]

    def _off(self, why: str) -> None:
        if why != self._said:
            log.warning("disk guard off", extra={"reason": why})
            self._said = why

    async def check(self) -> bool:
        """Whether free space is below the guard now; logs when that changes.

        An engine that cannot say raises EngineError, as its listing would.
        """
        free = await self._free()
        if free is None:
            return False
        metrics.DISK_FREE.set(free)
        low = free < self.min_free_bytes
        if low != self.low:
            if low:
                log.warning(
                    "free disk below the guard; new pulls wait",
                    extra={
                        "free_bytes": free,
                        "min_free_bytes": self.min_free_bytes,
                        "path": self.measured,
                    },
                )
            else:
                log.info("free disk above the guard again; pulls resume")
        self.low = low
        metrics.DISK_LOW.set(1 if low else 0)
        return low
