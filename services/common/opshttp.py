"""The ops HTTP port of a duban process: ``/metrics`` (Prometheus), ``/readyz`` and ``/livez``.

``/readyz`` answers 200 once every service the process runs is serving (caught up, subscribed)
and 503 before that or while stopping, with a JSON body naming each service's state, so an
orchestrator routes nothing to an instance that is not ready.
"""

from __future__ import annotations

import asyncio

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from services.common import metrics
from services.common.httpserver import HttpServer, bind, parse_address

log = structlog.get_logger(__name__)


class Readiness:
    """Which services of this process are serving."""

    def __init__(self, services: list[str]) -> None:
        self._events = {name: asyncio.Event() for name in services}
        self._stopping = False
        for name, event in self._events.items():
            metrics.READY.labels(service=name).set_function(
                lambda e=event: 0.0 if self._stopping or not e.is_set() else 1.0  # type: ignore[misc]
            )

    def event(self, service: str) -> asyncio.Event:
        """The event the service sets once it serves."""
        return self._events[service]

    def stopping(self) -> None:
        self._stopping = True

    def states(self) -> dict[str, str]:
        if self._stopping:
            return dict.fromkeys(self._events, "stopping")
        return {name: "ready" if e.is_set() else "starting" for name, e in self._events.items()}

    @property
    def ready(self) -> bool:
        return not self._stopping and all(e.is_set() for e in self._events.values())

    async def wait(self) -> None:
        await asyncio.gather(*(e.wait() for e in self._events.values()))


def ops_app(readiness: Readiness) -> Starlette:
    async def readyz(_: Request) -> JSONResponse:
        return JSONResponse(
            {"ready": readiness.ready, "services": readiness.states()}, status_code=200 if readiness.ready else 503
        )

    async def livez(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    async def exposition(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/readyz", readyz), Route("/livez", livez), Route("/metrics", exposition)])


async def serve_ops(address: str, readiness: Readiness, stop: asyncio.Event) -> None:
    """Serve until ``stop``; a port already taken is logged and the process runs on without it."""
    try:
        server = HttpServer(ops_app(readiness), bind(*parse_address(address), "the ops port"))
        await server.start()
    except OSError as exc:
        log.warning("ops HTTP port not served", address=address, error=str(exc))
        return
    await stop.wait()
    await server.stop()
