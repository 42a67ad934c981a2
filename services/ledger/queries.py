"""Reading the ledger's read model: current states, states as of a past moment, a history."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

import asyncpg
import msgspec

from contracts.events import EventEnvelope, decode_event
from contracts.facts import CountyFacts, fold
from contracts.programme import Programme
from services.ledger.projection import aggregate_log

_state_decoder = msgspec.json.Decoder(CountyFacts)


class LedgerReader:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def states(self, programme: Programme) -> dict[str, CountyFacts]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT county_code, state FROM ledger.county_state WHERE programme_id = $1", programme.id
            )
        return {r["county_code"]: _state_decoder.decode(r["state"]) for r in rows}

    async def states_as_of(self, programme: Programme, as_of: dt.datetime) -> dict[str, CountyFacts]:
        """What the ledger knew at ``as_of``: the events recorded by then, folded."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT county_code, stream_sequence, envelope::text AS envelope FROM ledger.event_log"
                " WHERE programme_id = $1 AND recorded_at <= $2 ORDER BY stream_sequence",
                programme.id,
                as_of,
            )
        events: dict[str, list[tuple[int, EventEnvelope]]] = defaultdict(list)
        for r in rows:
            events[r["county_code"]].append((r["stream_sequence"], decode_event(r["envelope"].encode())))
        return {county: fold(programme, county, history) for county, history in events.items()}

    async def history(self, programme: Programme, county_code: str) -> list[tuple[int, EventEnvelope]]:
        async with self._pool.acquire() as conn:
            return await aggregate_log(conn, programme.id, county_code)

    async def checkpoint(self) -> int:
        async with self._pool.acquire() as conn:
            value = await conn.fetchval("SELECT last_sequence FROM ledger.checkpoint WHERE projection = 'ledger'")
        return int(value or 0)
