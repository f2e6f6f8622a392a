"""`/metrics`, `/healthz`, `/readyz` and `/debug/tasks` on one port.

I/O: serves HTTP (aiohttp) on the service's metrics port and reads the process's own
`/proc/self` (open file descriptors, resident memory) for `/debug/tasks`.

`/debug/tasks` answers, as JSON, what a soak test or an operator needs to see a leak: the
number of asyncio tasks of the service's event loop, grouped by task name and by coroutine,
and the process's open file descriptors and resident memory. Only counts and names from
Cedar's code are in it (a task name is cut at its first space, so `pull <image>` is counted
as `pull`), never a setting, a credential or an object of a tenant; it costs one pass over
the tasks and one directory listing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from cedar.runtime.health import Health

# asyncio's default task names are `Task-<n>`: one group, whatever the number.
_NUMBERED = re.compile(r"-\d+$")
PROC_SELF = Path("/proc/self")


def task_group(name: str) -> str:
    """The group a task's name counts in: its first word, without a trailing `-<number>`."""
    first = name.split(" ", 1)[0]
    return _NUMBERED.sub("", first) or "-"


def _coroutine_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    if coro is None:
        return "-"
    name = getattr(coro, "__qualname__", None)
    return name if isinstance(name, str) else type(coro).__qualname__


def open_fds(proc: Path = PROC_SELF) -> int | None:
    """Open file descriptors of the process (None where there is no /proc)."""
    try:
        entries = os.listdir(proc / "fd")
    except OSError:
        return None
    # Listing our own fd directory holds one descriptor open while it reads.
    return len(entries) - 1 if proc == PROC_SELF else len(entries)


def rss_bytes(proc: Path = PROC_SELF) -> int | None:
    """Resident memory of the process (VmRSS of /proc/<pid>/status), None without /proc."""
    try:
        status = (proc / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            return int(value) * 1024 if unit == "kB" else int(value)
    return None


def debug_report() -> dict[str, Any]:
    """What `/debug/tasks` answers; call it on the event loop whose tasks are counted."""
    tasks = asyncio.all_tasks()
    by_name = Counter(task_group(task.get_name()) for task in tasks)
    by_coroutine = Counter(_coroutine_name(task) for task in tasks)
    return {
        "pid": os.getpid(),
        "tasks": len(tasks),
        "by_name": dict(sorted(by_name.items())),
        "by_coroutine": dict(sorted(by_coroutine.items())),
        "open_fds": open_fds(),
        "rss_bytes": rss_bytes(),
    }


def make_app(health: Health) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(status=200 if health.alive else 503, text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        report = health.report()
        return web.Response(
            status=200 if report["ready"] else 503,
            text=json.dumps(report) + "\n",
            content_type="application/json",
        )

    async def debug_tasks(_: web.Request) -> web.Response:
        return web.Response(text=json.dumps(debug_report()) + "\n", content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/debug/tasks", debug_tasks)
    return app


class HttpServer:
    def __init__(self, health: Health, host: str, port: int) -> None:
        self._runner = web.AppRunner(make_app(health), access_log=None)
        self.host = host
        self.port = port

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:  # an ephemeral port was asked for: learn which one
            for address in self._runner.addresses:
                self.port = int(address[1])

    async def stop(self) -> None:
        await self._runner.cleanup()
