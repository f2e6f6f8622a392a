"""TCP links on 127.0.0.1 that can be cut and healed: a network fault between two servers.

I/O: listens on local TCP ports and relays each accepted connection to a target port, in a
thread of its own (an asyncio loop), so that sync and async callers alike can cut a link
while traffic flows. A cut link resets every connection it carries and refuses new ones
(accepts and closes them at once, as a dropped route does); healing lets new ones through.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from cedar.sandbox.errors import ServerStartError
from cedar.sandbox.procs import free_port

__all__ = ["LinkHub", "TcpLink"]

T = TypeVar("T")
_CHUNK = 64 * 1024


class TcpLink:
    """One listening port relayed to `target_port`; owned and run by a `LinkHub`."""

    def __init__(self, hub: LinkHub, target_port: int, port: int) -> None:
        self.hub = hub
        self.target_port = target_port
        self.port = port
        self.is_cut = False
        self.accepted = 0  # connections relayed since the start
        self.refused = 0  # connections closed at once because the link was cut
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    def cut(self) -> None:
        """Reset every connection on the link now, and refuse new ones until `heal`."""
        self.hub.call(self._cut())

    def heal(self) -> None:
        self.is_cut = False

    async def _cut(self) -> None:
        self.is_cut = True
        for writer in list(self._writers):
            _abort(writer)
        self._writers.clear()

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            self.refused += 1
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _abort(writer)  # the target is down: the dialer sees its connection drop
            return
        if self.is_cut:  # cut while connecting
            _abort(writer)
            _abort(up_writer)
            return
        self.accepted += 1
        pair = {writer, up_writer}
        self._writers |= pair
        try:
            await asyncio.gather(
                _pump(reader, up_writer), _pump(up_reader, writer), return_exceptions=True
            )
        finally:
            for w in pair:
                _abort(w)
            self._writers -= pair


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once, with a reset rather than a polite FIN: the way a link dies."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _cancel_tasks() -> None:
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class LinkHub:
    """The links of one test setup, run in one background thread."""

    def __init__(self) -> None:
        self.links: list[TcpLink] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def add(self, target_port: int, port: int | None = None) -> TcpLink:
        """A link to `target_port` on its own listening port (served once started)."""
        link = TcpLink(self, target_port, port if port is not None else free_port())
        self.links.append(link)
        if self._loop is not None:
            self.call(link._serve())
        return link

    def start(self) -> LinkHub:
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="cedar-links", daemon=True)
        self._thread.start()
        ready.wait(5)
        try:
            for link in self.links:
                self.call(link._serve())
        except OSError as err:
            self.stop()
            raise ServerStartError(f"cannot listen for a TCP link: {err}") from err
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run `coro` on the hub's loop and wait for its result."""
        if self._loop is None:
            coro.close()
            raise ServerStartError("the link hub is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        for link in self.links:
            with contextlib.suppress(Exception):
                self.call(link._close())
        with contextlib.suppress(Exception):
            self.call(_cancel_tasks())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        self._loop, self._thread = None, None
