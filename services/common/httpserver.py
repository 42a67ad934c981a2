"""Serving an ASGI app (the gateway, the ops port) with uvicorn inside a duban process.

The socket is bound here, so a taken port is a plain ``OSError`` (uvicorn would ``sys.exit``
inside the event loop); uvicorn's own signal handling is off, the caller's ``stop`` ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any

import uvicorn


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8321`` for IPv6) -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"an address is host:port, not {address!r}")
    return host.strip("[]"), int(port)


def bind(host: str, port: int, what: str) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{what} cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpServer:
    """``await start()`` listens (and raises if it cannot); ``await stop()`` answers the requests
    in flight and closes."""

    def __init__(self, app: Any, listener: socket.socket) -> None:
        self.listener = listener
        self.port = int(listener.getsockname()[1])
        self._server = _Server(
            uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False)
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.listener]))
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.02)
        if not self._server.started:
            await self._task  # raises what went wrong
            raise RuntimeError("the HTTP server stopped while starting")

    @property
    def serving(self) -> asyncio.Task[None]:
        assert self._task is not None
        return self._task

    async def stop(self) -> None:
        self._server.should_exit = True  # no new connections; requests in flight are answered
        try:
            if self._task is not None:
                await self._task
        finally:
            self.listener.close()
