"""Running one service: logging, metrics/health HTTP, NATS, and graceful shutdown.

On SIGTERM or SIGINT the service's `stop` event is set; its main coroutine stops taking
work, finishes or hands back what is in flight, and returns. The runner then closes the
NATS connection and the HTTP server and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from cedar.runtime.bus import Bus
from cedar.runtime.health import Health
from cedar.runtime.http import HttpServer
from cedar.runtime.logs import setup_logging
from cedar.runtime.metrics import BUILD_INFO
from cedar.runtime.settings import CommonSettings

log = logging.getLogger("cedar.service")

S = TypeVar("S", bound=CommonSettings)

# Kubernetes waits terminationGracePeriodSeconds (30 s by default) before SIGKILL.
SHUTDOWN_GRACE_SECONDS = 20.0


@dataclass
class Runtime(Generic[S]):
    """What a service's main coroutine is given."""

    service: str
    settings: S
    health: Health
    bus: Bus
    stop: asyncio.Event = field(default_factory=asyncio.Event)


MainFn = Callable[[Runtime[S]], Coroutine[Any, Any, None]]


async def serve(
    service: str,
    settings: S,
    main: MainFn[S],
    *,
    connect_nats: bool = True,
    checks: tuple[str, ...] = (),
) -> int:
    """Run `main` as the service `service` until it returns or a signal stops it.

    `checks` are the service's own readiness checks, registered before anything starts
    so that /readyz can never answer ready before the service has reported on them.
    """
    from cedar.runtime.version import __version__

    setup_logging(service, settings.node_name, settings.log_level)
    BUILD_INFO.info({"service": service, "version": __version__})
    health = Health(*checks)
    bus = Bus(settings, f"cedar-{service}-{settings.pod_name}", health)
    runtime: Runtime[S] = Runtime(service=service, settings=settings, health=health, bus=bus)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, runtime.stop, signum)

    http = HttpServer(health, settings.metrics_host, settings.metrics_port)
    try:
        await http.start()
    except OSError as err:
        log.error(
            "cannot listen on %s:%s for /metrics (%s); set CEDAR_METRICS_PORT to a free port",
            settings.metrics_host,
            settings.metrics_port,
            err,
        )
        return 1
    log.info("%s starting", service, extra={"metrics_port": http.port, "version": __version__})

    exit_code = 0
    try:
        if connect_nats and not await bus.connect(runtime.stop):
            return 0
        work = asyncio.create_task(main(runtime), name=f"{service}-main")
        stopper = asyncio.create_task(runtime.stop.wait())
        done, _ = await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            stopper.cancel()
            exc = work.exception()
            if exc is not None:
                log.error("%s stopped on an error", service, exc_info=exc)
                exit_code = 1
        else:
            log.info("%s shutting down: finishing in-flight work", service)
            try:
                await asyncio.wait_for(asyncio.shield(work), SHUTDOWN_GRACE_SECONDS)
            except TimeoutError:
                log.warning("in-flight work did not finish in time; cancelling it")
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
            except Exception:
                log.exception("%s failed while shutting down", service)
    finally:
        health.alive = False
        await bus.close()
        await http.stop()
        log.info("%s stopped", service)
    return exit_code


def _on_signal(stop: asyncio.Event, signum: int) -> None:
    log.info("received %s", signal.Signals(signum).name)
    stop.set()


def run(
    service: str,
    settings: S,
    main: MainFn[S],
    *,
    connect_nats: bool = True,
    checks: tuple[str, ...] = (),
) -> int:
    return asyncio.run(serve(service, settings, main, connect_nats=connect_nats, checks=checks))
