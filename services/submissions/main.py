"""Run the submissions service: connect as its own NATS user, declare the streams, serve."""

from __future__ import annotations

import asyncio

import structlog

from services.common.clock import Clock
from services.common.jetstream import ensure_streams
from services.common.runtime import Runtime
from services.submissions.app import start
from services.submissions.service import SubmissionsService
from services.submissions.store import EventStore

SERVICE_USER = "svc-submissions"
log = structlog.get_logger(__name__)


async def run(runtime: Runtime, clock: Clock, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    nc = await runtime.connect_as(SERVICE_USER)
    try:
        js = nc.jetstream()
        await ensure_streams(js, runtime.settings.stream_replicas)
        service = SubmissionsService(EventStore(nc, js), runtime.programmes, clock)
        micro = await start(nc, service)
        log.info("submissions service serving", programmes=sorted(runtime.programmes), instance=micro.service.id)
        if ready is not None:
            ready.set()
        await stop.wait()
        await micro.stop()  # no new submissions; those being decided are finished and answered
    finally:
        await nc.drain()
        log.info("submissions service stopped")
