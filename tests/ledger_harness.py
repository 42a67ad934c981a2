"""A ledger (projection + queries) on a real nats-server and PostgreSQL, beside the submissions
harness, with helpers to wait for it to catch up and to ask it questions over NATS."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import msgspec
import nats
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from contracts.ledger import QueryError
from contracts.workdays import WorkdayCalendar
from services.common.clock import SimulatedClock
from services.common.postgres import create_pool
from services.ledger.consumer import supervise_live
from services.ledger.projection import LedgerProjection, migrate
from services.ledger.queries import LedgerReader
from services.ledger.service import LedgerQueries, start_service
from services.ledger.status import LightSettings
from tests.harness import PROGRAMME, Harness

T = TypeVar("T")
CALENDAR = WorkdayCalendar.official()


@dataclass
class Ledger:
    nc: NatsClient
    pool: asyncpg.Pool
    projection: LedgerProjection
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def caught_up(self, harness: Harness, timeout: float = 10.0) -> int:
        """Wait until every event in the stream is applied; returns the checkpoint."""
        info = await harness.js.stream_info("DUBAN_EVENTS")
        target = int(info.state.last_seq)
        async with asyncio.timeout(timeout):
            while (checkpoint := await self.projection.checkpoint()) < target:
                await asyncio.sleep(0.02)
        return checkpoint

    async def ask(self, subject: str, answer_type: type[T], query: dict[str, Any] | None = None) -> T:
        msg = await self.nc.request(subject, msgspec.json.encode(query or {}), timeout=5)
        if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
            raise AssertionError(msgspec.json.decode(msg.data, type=QueryError))
        return msgspec.json.decode(msg.data, type=answer_type)

    async def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """The read model's tables, as comparable rows."""
        out = {}
        async with self.pool.acquire() as conn:
            for table, order in (
                ("event_log", "stream_sequence"),
                ("county_state", "programme_id, county_code"),
                ("milestones", "programme_id, county_code, milestone_id"),
                ("checkpoint", "projection"),
            ):
                # Not the wall clock's updated_at, nor county_state.revision (which write it was:
                # a rebuild rewrites every row with a new one).
                columns = {
                    "checkpoint": "projection, last_sequence",
                    "county_state": "programme_id, county_code, last_sequence, state",
                }.get(table, "*")
                rows = await conn.fetch(f"SELECT {columns} FROM ledger.{table} ORDER BY {order}")
                out[table] = [tuple(r.values()) for r in rows]
        return out


async def start_ledger(nats_url: str, dsn: str, clock: SimulatedClock) -> Ledger:
    pool = await create_pool(dsn)
    async with pool.acquire() as conn:
        await migrate(conn)
    nc = await nats.connect(nats_url)
    projection = LedgerProjection(pool, {PROGRAMME.id: PROGRAMME})
    queries = LedgerQueries(LedgerReader(pool), {PROGRAMME.id: PROGRAMME}, clock, CALENDAR, LightSettings())
    await start_service(nc, queries, [], "0.0.0-test")
    stop = asyncio.Event()
    task = asyncio.create_task(supervise_live(nc.jetstream(), projection, stop))
    return Ledger(nc, pool, projection, stop, task)


async def stop_ledger(ledger: Ledger) -> None:
    ledger.stop.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ledger.task, 10)
    await ledger.nc.close()
    await ledger.pool.close()


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(harness: Harness, nats_url: str, fresh_database: str) -> AsyncIterator[Ledger]:
    running = await start_ledger(nats_url, fresh_database, harness.clock)
    try:
        yield running
    finally:
        await stop_ledger(running)
