"""`/metrics`, `/healthz` and `/readyz` on one port."""

from __future__ import annotations

import json

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from cedar.runtime.health import Health


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

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
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
