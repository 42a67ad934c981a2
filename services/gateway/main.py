"""Run the HTTP gateway: connect to NATS as ``svc-gateway``, serve HTTP with uvicorn until stop.

Configuration (environment): ``DUBAN_HTTP_ADDR`` (host:port, default 127.0.0.1:8321),
``DUBAN_GATEWAY_TOKENS`` (the token file, default ``<DUBAN_STATE_DIR>/gateway/tokens.json``),
``DUBAN_GATEWAY_RATE`` (per-token limits, default ``20/second;600/minute``) and
``DUBAN_GATEWAY_TIMEOUT`` (seconds to wait for a NATS reply, default 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from services.common.clock import Clock
from services.common.httpserver import HttpServer, bind, parse_address
from services.common.natsauth import GATEWAY_INBOX_PREFIX, GATEWAY_USER
from services.common.runtime import Runtime
from services.gateway.app import DEFAULT_RATE, REQUEST_TIMEOUT, Gateway, create_app
from services.gateway.tokens import TokenStore, tokens_path

log = structlog.get_logger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:8321"
RATE_ENV = "DUBAN_GATEWAY_RATE"
TIMEOUT_ENV = "DUBAN_GATEWAY_TIMEOUT"


@dataclass(frozen=True)
class GatewayConfig:
    tokens_file: Path
    rate: str = DEFAULT_RATE
    timeout: float = REQUEST_TIMEOUT

    @classmethod
    def from_env(cls, state_dir: Path, environ: Mapping[str, str] | None = None) -> GatewayConfig:
        env = os.environ if environ is None else environ
        return cls(
            tokens_file=tokens_path(state_dir, env),
            rate=env.get(RATE_ENV) or DEFAULT_RATE,
            timeout=float(env.get(TIMEOUT_ENV) or REQUEST_TIMEOUT),
        )


async def run(
    runtime: Runtime,
    clock: Clock,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    host: str | None = None,
    port: int | None = None,
    *,
    config: GatewayConfig | None = None,
) -> None:
    """Serve until ``stop``; ``ready`` is set once NATS is connected and the port is listening.

    ``host``/``port`` default to ``DUBAN_HTTP_ADDR`` (127.0.0.1:8321); ``config`` to the
    environment. ``clock`` is taken for the common service shape (the gateway keeps no time of
    its own: rate windows are wall-clock seconds).
    """
    del clock
    default_host, default_port = parse_address(runtime.settings.http_address or DEFAULT_ADDRESS)
    host = host or default_host
    port = port if port is not None else default_port
    config = config or GatewayConfig.from_env(runtime.settings.state_dir)
    # Before connecting: a bad rate or a taken port fails at once.
    gateway = Gateway(None, TokenStore(config.tokens_file), rate=config.rate, timeout=config.timeout)
    http: HttpServer | None = None
    nc = None
    try:
        http = HttpServer(create_app(gateway), bind(host, port, "the gateway"))
        port = http.port
        nc = gateway.nc = await runtime.connect_as(GATEWAY_USER, inbox=GATEWAY_INBOX_PREFIX)
        await http.start()
        log.info(
            "gateway serving",
            url=f"http://{host}:{port}",
            key_file=str(config.tokens_file),  # (a key named "token…" would be redacted by our logging)
            rate=config.rate,
        )
        if ready is not None:
            ready.set()
        waiting = asyncio.create_task(stop.wait())
        await asyncio.wait([http.serving, waiting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
    finally:
        if http is not None:
            await http.stop()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
        log.info("gateway stopped")
