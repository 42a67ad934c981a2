"""Run the submissions service: connect as its own NATS user, declare the streams, serve."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from nats.js import JetStreamContext

from services.common.clock import Clock
from services.common.jetstream import complete_retraction_index, ensure_streams
from services.common.runtime import Runtime
from services.submissions.app import start
from services.submissions.service import SubmissionsService
from services.submissions.store import EventStore

SERVICE_USER = "svc-submissions"
log = structlog.get_logger(__name__)


async def run(runtime: Runtime, clock: Clock, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    nc = await runtime.connect_as(SERVICE_USER)
    completing: asyncio.Task[None] | None = None
    try:
        js = nc.jetstream()
        await ensure_streams(js, runtime.settings.stream_replicas)
        service = SubmissionsService(EventStore(nc, js), runtime.programmes, clock)
        micro = await start(nc, service)
        log.info("submissions service serving", programmes=sorted(runtime.programmes), instance=micro.service.id)
        completing = asyncio.create_task(complete_index(js))
        if ready is not None:
            ready.set()
        await stop.wait()
        await micro.stop()  # no new submissions; those being decided are finished and answered
    finally:
        if completing is not None:
            completing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await completing
        await nc.drain()
        log.info("submissions service stopped")


async def complete_index(js: JetStreamContext) -> None:
    """Index the retractions stored before the retraction index existed (once per deployment,
    while serving: 3.5 s at a million events). A failure only leaves rebuilds
    reading the retractions ahead; the next start tries again."""
    try:
        await complete_retraction_index(js)
    except Exception as exc:  # (any failure: the index is a hint)
        log.warning("retraction index not completed", error=repr(exc))
