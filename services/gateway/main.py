"""Run the HTTP gateway: connect a FastStream NATS broker as ``svc-gateway``, serve HTTP with
uvicorn until stop.

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
from faststream.exceptions import IncorrectState
from faststream.nats import NatsBroker, NatsUserPassword

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
CONNECT_TIMEOUT = 5  # seconds, as every service's connection (services.common.jetstream.connect)
RECONNECT_TIME_WAIT = 0.5  # seconds between reconnect attempts, likewise


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


def nats_broker(runtime: Runtime) -> NatsBroker:
    """The gateway's FastStream broker (not connected yet): user ``svc-gateway`` with its password
    on record (none on record: no credentials, as :meth:`Runtime.connect_as`), replies in its own
    inbox ``_INBOX_gateway`` (the only one the server lets it read), reconnecting as the runtime
    says (services: forever). FastStream's own logger is off; connection events are logged here,
    through structlog like every other connection's."""
    password = runtime.password(GATEWAY_USER)
    security = NatsUserPassword(GATEWAY_USER, password) if password is not None else None

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", connection=GATEWAY_USER, error=str(exc))

    async def on_disconnected() -> None:
        try:
            stopping = broker.connection.is_closed or broker.connection.is_draining
        except IncorrectState:  # not connected yet
            stopping = False
        if not stopping:  # (our own stop is not a fault)
            log.warning("nats disconnected", connection=GATEWAY_USER)

    async def on_reconnected() -> None:
        log.info("nats reconnected", connection=GATEWAY_USER)

    broker = NatsBroker(
        runtime.nats_url,
        name=GATEWAY_USER,
        security=security,
        inbox_prefix=GATEWAY_INBOX_PREFIX,
        connect_timeout=CONNECT_TIMEOUT,
        max_reconnect_attempts=runtime.reconnect_attempts,
        # nats-py (and FastStream after it) annotate int, but only sleep on it: half a second
        reconnect_time_wait=RECONNECT_TIME_WAIT,  # type: ignore[arg-type]
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        logger=None,
    )
    return broker


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
    broker = nats_broker(runtime)
    gateway = Gateway(broker, TokenStore(config.tokens_file), rate=config.rate, timeout=config.timeout)
    http: HttpServer | None = None
    try:
        http = HttpServer(create_app(gateway), bind(host, port, "the gateway"))
        port = http.port
        await broker.connect()
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
        with contextlib.suppress(Exception):
            await broker.stop()  # drains the connection, if it was made
        log.info("gateway stopped")
