"""Run the ledger: migrate the schema, follow the event stream, answer queries."""

from __future__ import annotations

import asyncio
import contextlib
from importlib.metadata import version

import structlog

from contracts.audit import ReadModelAudit
from contracts.ledger import (
    AUDIT_SUBJECT,
    PARKED_SUBJECT,
    PROJECTION_STATUS_SUBJECT,
    REBUILD_SUBJECT,
    REPLAY_PARKED_SUBJECT,
    ProjectionStatus,
    QueryError,
    RebuildReport,
)
from contracts.replies import ParkedList, ReplayParkedReport, StatusQuery
from contracts.subjects import EVENTS_STREAM
from services.common.clock import Clock
from services.common.jetstream import ensure_streams
from services.common.leader import Leadership
from services.common.micro import json_endpoint
from services.common.postgres import create_pool
from services.common.runtime import Runtime, load_policy_and_calendar
from services.common.signing import load_signer
from services.ledger.audit import audit_read_model
from services.ledger.consumer import rebuild as rebuild_from_stream
from services.ledger.consumer import supervise_live
from services.ledger.projection import LedgerProjection, migrate
from services.ledger.queries import LedgerReader
from services.ledger.service import LedgerQueries, start_service
from services.ledger.status import LightSettings

SERVICE_USER = "svc-ledger"
log = structlog.get_logger(__name__)


async def run(runtime: Runtime, clock: Clock, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    if runtime.database_url is None:
        raise RuntimeError("the ledger needs PostgreSQL: set DATABASE_URL or let duban start its own")
    pool = await create_pool(runtime.database_url)
    nc = await runtime.connect_as(SERVICE_USER)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        js = nc.jetstream()
        await ensure_streams(js, runtime.settings.stream_replicas)
        projection = LedgerProjection(pool, runtime.programmes)
        reader = LedgerReader(pool)
        policy, calendar = load_policy_and_calendar(runtime.settings)
        settings = LightSettings(
            due_soon_workdays=policy.due_soon_workdays, roll_rest_day_deadlines=policy.roll_rest_day_deadlines
        )
        queries = LedgerQueries(reader, runtime.programmes, clock, calendar, settings, load_signer(runtime.settings))
        pause = asyncio.Lock()

        async def rebuild(_: StatusQuery) -> RebuildReport:
            async with pause:
                end = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
                result = await rebuild_from_stream(js, projection, end)
            rate = result.events / result.seconds if result.seconds else 0.0
            log.info("ledger rebuilt", events=result.events, seconds=round(result.seconds, 2))
            return RebuildReport(
                events=result.events, last_sequence=result.last_sequence, seconds=result.seconds, events_per_second=rate
            )

        async def status(_: StatusQuery) -> ProjectionStatus:
            info = await js.stream_info(EVENTS_STREAM)
            checkpoint = await projection.checkpoint()
            last = int(info.state.last_seq)
            return ProjectionStatus(checkpoint=checkpoint, stream_last_sequence=last, lag=max(0, last - checkpoint))

        async def parked(_: StatusQuery) -> ParkedList:
            return ParkedList(items=tuple(await projection.parked()))

        async def audit(_: StatusQuery) -> ReadModelAudit:
            return await audit_read_model(pool, js, runtime.programmes)

        async def replay_parked(_: StatusQuery) -> ReplayParkedReport:
            async with pause:
                return await projection.replay_parked()

        service = await start_service(
            nc,
            queries,
            [
                json_endpoint("rebuild", REBUILD_SUBJECT, StatusQuery, rebuild, QueryError),
                json_endpoint("status", PROJECTION_STATUS_SUBJECT, StatusQuery, status, QueryError),
                json_endpoint("parked", PARKED_SUBJECT, StatusQuery, parked, QueryError),
                json_endpoint("audit", AUDIT_SUBJECT, StatusQuery, audit, QueryError),
                json_endpoint("replay-parked", REPLAY_PARKED_SUBJECT, StatusQuery, replay_parked, QueryError),
            ],
            version("duban"),
        )
        # Every instance answers queries; one at a time follows the stream (the others stand by).
        leadership = Leadership(js, "ledger", replicas=runtime.settings.stream_replicas)
        consumer = asyncio.create_task(leadership.run(stop, lambda until: supervise_live(js, projection, until, pause)))
        log.info("ledger service serving")
        if ready is not None:
            ready.set()
        await stop.wait()
        await consumer
        await service.stop()
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
        await pool.close()
        log.info("ledger service stopped")
