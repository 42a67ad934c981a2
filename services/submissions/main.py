"""Run the submissions service: connect as its own NATS user, declare the streams, serve."""

from __future__ import annotations

import asyncio
import logging

import structlog
from faststream.nats import NatsBroker
from faststream.nats.security import NatsUserPassword

from services.common.clock import Clock
from services.common.jetstream import ensure_streams
from services.common.runtime import Runtime
from services.submissions.app import register, start
from services.submissions.service import SubmissionsService
from services.submissions.store import EventStore

SERVICE_USER = "svc-submissions"
log = structlog.get_logger(__name__)


async def run(runtime: Runtime, clock: Clock, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    nc = await runtime.connect_as(SERVICE_USER)
    js = nc.jetstream()
    await ensure_streams(js, runtime.settings.stream_replicas)
    service = SubmissionsService(EventStore(nc, js), runtime.programmes, clock)
    password = runtime.password(SERVICE_USER)
    broker = NatsBroker(
        runtime.nats_url,
        security=NatsUserPassword(SERVICE_USER, password) if password else None,
        name=SERVICE_USER,
        max_reconnect_attempts=-1,
        log_level=logging.DEBUG,  # per-message lines only when debugging
    )
    register(broker, service)
    await start(broker)
    log.info("submissions service serving", programmes=sorted(runtime.programmes))
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await broker.stop()
        await nc.drain()
        log.info("submissions service stopped")
