"""The simulated Kubernetes API's server lifecycle: its thread, event loop and HTTP socket.

I/O: listens on one TCP port (aiohttp) from a thread and event loop of its own, so that
sync tests, async tests and service threads can all use the server; writes the kubeconfig
that points at it. Start, stop and restart (same port, open connections cut), and the
wake-ups that tell open watches the store changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web


@dataclass(eq=False)
class OpenWatch:
    """One open watch stream; the server ends it by setting `cut` (and `abrupt`: no final
    chunk, the connection is reset)."""

    cut: bool = False
    abrupt: bool = False


@dataclass
class Serving:
    """State that exists only while the server runs (recreated by every start).

    Touched from the server's event loop only; other threads go through `ServerThread`.
    """

    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    runner: web.AppRunner | None = None
    background: asyncio.Task[None] | None = None
    # Watchers hold the Event they saw before reading the store, so no write is missed.
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    watches: set[OpenWatch] = field(default_factory=set)

    def wake(self) -> None:
        event, self.wakeup = self.wakeup, asyncio.Event()
        event.set()

    def cut(self, abrupt: bool) -> None:
        for watch in self.watches:
            watch.cut = True
            watch.abrupt = abrupt
        self.wake()


Handler = Callable[[Serving, web.Request], Awaitable[web.StreamResponse]]
Background = Callable[[Serving], Coroutine[Any, Any, None]]


class ServerThread:
    """Serves a handler on `host:port` (0: any free port, kept across restarts)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._serving: Serving | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._serving is not None

    def start(self, handler: Handler, background: Background | None = None) -> None:
        """Serve `handler`; `background` runs beside it until the server stops."""
        if self._serving is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_run_loop, args=(loop,), name="cedar-kubeapi", daemon=True)
        thread.start()
        try:
            serving = asyncio.run_coroutine_threadsafe(
                self._serve(loop, thread, handler, background), loop
            ).result(30)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            raise
        self._serving = serving

    def stop(self, abrupt: bool = False) -> None:
        """Stop serving; open watches end cleanly (abrupt: their connections are reset)."""
        serving, self._serving = self._serving, None
        if serving is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_shutdown(serving, abrupt), serving.loop).result(30)
        serving.loop.call_soon_threadsafe(serving.loop.stop)
        serving.thread.join(30)

    def notify(self) -> None:
        """Wake the open watches (the store changed); callable from any thread."""
        serving = self._serving
        if serving is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                serving.loop.call_soon_threadsafe(serving.wake)

    def break_watches(self, abrupt: bool) -> None:
        """End every open watch stream; callable from any thread."""
        serving = self._serving
        if serving is not None:
            serving.loop.call_soon_threadsafe(serving.cut, abrupt)

    async def _serve(
        self,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        handler: Handler,
        background: Background | None,
    ) -> Serving:
        serving = Serving(loop=loop, thread=thread)
        app = web.Application(client_max_size=64 * 1024 * 1024)

        async def handle(request: web.Request) -> web.StreamResponse:
            return await handler(serving, request)

        app.router.add_route("*", "/{tail:.*}", handle)
        # handler_cancellation: a watch whose client went away ends at once, not at its timeout.
        runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = int(runner.addresses[0][1])
        serving.runner = runner
        if background is not None:
            serving.background = asyncio.create_task(background(serving))
        return serving


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


async def _shutdown(serving: Serving, abrupt: bool) -> None:
    if serving.background is not None:
        serving.background.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving.background
    serving.cut(abrupt=abrupt)
    await asyncio.sleep(0)
    if serving.runner is not None:
        await serving.runner.cleanup()


def write_kubeconfig(path: str | Path, server_url: str, token: str = "cedar-sandbox-token") -> Path:
    """A kubeconfig (JSON is valid YAML) for the server: plain HTTP, a dummy `token` (the
    server tells clients apart by it)."""
    path = Path(path)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cedar-sandbox", "cluster": {"server": server_url}}],
        "users": [{"name": "cedar-sandbox", "user": {"token": token}}],
        "contexts": [
            {
                "name": "cedar-sandbox",
                "context": {"cluster": "cedar-sandbox", "user": "cedar-sandbox"},
            }
        ],
        "current-context": "cedar-sandbox",
        "preferences": {},
    }
    path.write_text(json.dumps(config, indent=2))
    return path
