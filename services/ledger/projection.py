"""The ledger's read model in PostgreSQL: schema migrations, and applying events to it.

Each batch of events is applied in ONE transaction together with the checkpoint (the last
applied stream sequence). Events at or below the checkpoint are skipped, so a redelivery
changes nothing; the consumer acknowledges only after the commit. The checkpoint, not the
broker's consumer state, is the projection's position.

Tables (schema ``ledger``):
- ``event_log``: every event, for a county's history and for the state as of any moment;
- ``county_state``: each county's folded ledger (JSON), the projection's working state, and the
  ``revision`` of the write that left it (the live projection caches states by revision);
- ``milestones``: one row per county and milestone, for operators' own SQL and dashboards;
- ``checkpoint``; ``parked``: events that could not be applied, for an operator to look at.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import re
import time
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import NamedTuple

import asyncpg
import msgspec
import structlog

from contracts.events import (
    EventEnvelope,
    StoredEventEnvelope,
    decode_event,
    decode_stored_event,
    event_type_of,
)
from contracts.facts import (
    CountyFacts,
    apply,
    fold,
    fold_in,
    folding,
    new_facts,
    retraction_of,
)
from contracts.programme import Programme
from contracts.replies import ParkedEvent, ReplayParkedReport, parked_event
from services.common.consumer import Reposition
from services.common.postgres import Connection

log = structlog.get_logger(__name__)

PROJECTION = "ledger"
MIGRATION_LOCK = 0x6475_6261_6E01  # pg advisory lock id: "duban" + 1

# The log's indexes as migration 5 makes them, and as a rebuild makes them again after its load.
# The column that tells rows apart comes first: a programme's rows all share its id, and a sort
# whose first key is equal everywhere compares every pair in full (abbreviated keys cannot help);
# county first, the same lookups by programme and county built in 1.1 s instead of 1.6 s at a
# million rows (recorded_at first: 0.45 s instead of 0.7 s).
EVENT_LOG_INDEXES = (
    "CREATE INDEX event_log_aggregate ON ledger.event_log (county_code, programme_id, stream_sequence);"
    "CREATE INDEX event_log_recorded ON ledger.event_log (recorded_at, programme_id);"
)

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE ledger.event_log (
            stream_sequence bigint PRIMARY KEY,
            programme_id text NOT NULL,
            county_code text NOT NULL,
            event_id text NOT NULL,
            event_type text NOT NULL,
            submission_id text NOT NULL,
            occurred_at timestamptz NOT NULL,
            recorded_at timestamptz NOT NULL,
            envelope jsonb NOT NULL  -- json from migration 2, text from migration 4
        );
        -- (migration 5 puts each index's other column first)
        CREATE INDEX event_log_aggregate ON ledger.event_log (programme_id, county_code, stream_sequence);
        CREATE INDEX event_log_recorded ON ledger.event_log (programme_id, recorded_at);
        CREATE TABLE ledger.county_state (
            programme_id text NOT NULL,
            county_code text NOT NULL,
            last_sequence bigint NOT NULL,
            state jsonb NOT NULL,
            PRIMARY KEY (programme_id, county_code)
        );
        CREATE TABLE ledger.milestones (
            programme_id text NOT NULL,
            county_code text NOT NULL,
            milestone_id text NOT NULL,
            percent integer NOT NULL,
            note text NOT NULL,
            reported_at timestamptz,
            completed_on date,
            completed_via text,
            extended_deadline date,
            PRIMARY KEY (programme_id, county_code, milestone_id)
        );
        CREATE TABLE ledger.checkpoint (
            projection text PRIMARY KEY,
            last_sequence bigint NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE ledger.parked (
            stream_sequence bigint PRIMARY KEY,
            reason text NOT NULL,
            data bytea NOT NULL,
            parked_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    # The log keeps each event as stored, read back whole: json (validated, kept as text) costs
    # PostgreSQL a quarter less per row than jsonb's parse into its binary form, and a rebuild
    # writes a million rows. json's operators (->, ->>) still serve operators' own SQL.
    (2, "ALTER TABLE ledger.event_log ALTER COLUMN envelope TYPE json USING envelope::json"),
    # Every write of a county's state takes a new revision, never reused (the sequence is not
    # owned by the column, so no TRUNCATE ... RESTART IDENTITY resets it): a projection's cached
    # state is valid exactly while the row still carries the revision it cached, whoever else
    # (another instance, a replay, a rebuild) writes the table.
    (
        3,
        "CREATE SEQUENCE ledger.state_revision;"
        " ALTER TABLE ledger.county_state"
        " ADD COLUMN revision bigint NOT NULL DEFAULT nextval('ledger.state_revision')",
    ),
    # The log's envelope as text: every envelope written was just decoded by msgspec from the
    # stream's bytes (or encoded by it), so json's own validation was a second parse of each
    # row, a fifth of PostgreSQL's time in a rebuild's COPY. Operators' SQL casts where it needs
    # json's operators (``envelope::json ->> 'event_id'``).
    (4, "ALTER TABLE ledger.event_log ALTER COLUMN envelope TYPE text"),
    (5, "DROP INDEX ledger.event_log_aggregate; DROP INDEX ledger.event_log_recorded; " + EVENT_LOG_INDEXES),
]

READ_MODEL_TABLES = ("event_log", "county_state", "milestones", "checkpoint", "parked")


async def migrate(conn: Connection) -> list[int]:
    """Apply the migrations this database has not seen; safe to run from several processes."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE SCHEMA IF NOT EXISTS ledger;"
            "CREATE TABLE IF NOT EXISTS ledger.schema_migrations"
            " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM ledger.schema_migrations")}
        applied = []
        for version, sql in MIGRATIONS:
            if version not in done:
                await conn.execute(sql)
                await conn.execute("INSERT INTO ledger.schema_migrations (version) VALUES ($1)", version)
                applied.append(version)
    if applied:
        log.info("ledger schema migrated", versions=applied)
    return applied


class StoredMessage(NamedTuple):
    """A message read from the event stream: its sequence and its bytes. (A named tuple: a
    rebuild makes a million of them, and a frozen dataclass takes several times as long.)"""

    sequence: int
    data: bytes


_state_encoder = msgspec.json.Encoder()
_state_decoder = msgspec.json.Decoder(CountyFacts)

Key = tuple[str, str]  # (programme_id, county_code)
MilestoneRow = tuple[object, ...]

# The counties' states the live projection keeps between batches, as the JSON it wrote, most
# recently used first out of this budget: at a million events a state is ~17 kB (~40 kB decoded:
# every county decoded took the ledger past its 200 MB), so it holds ~1,000 counties then, every
# county of a small programme always. Decoding a cached state costs far less than reading it.
STATE_CACHE_BYTES = 16 * 1024 * 1024
STATES_PER_WRITE = 128  # counties folded and written together (the rest of a batch waits)
STATES_PER_COPY = 256  # a rebuild writes the states in slices of this many counties


class CachedState(NamedTuple):
    revision: int  # county_state.revision of the row this state was written as
    last_sequence: int
    state: bytes  # the row's state, as written


_cached_state_decoder = msgspec.json.Decoder(CountyFacts)  # (not _state_decoder: a test counts the rows')


class LedgerProjection:
    def __init__(self, pool: asyncpg.Pool, programmes: dict[str, Programme]) -> None:
        self._pool = pool
        self._programmes = programmes
        # Least recently used first. Only committed states go in, and an entry is used only when
        # the row still has its revision, so no other writer needs to tell this one anything.
        self._cache: OrderedDict[Key, CachedState] = OrderedDict()
        self._cache_bytes = 0

    async def checkpoint(self) -> int:
        async with self._pool.acquire() as conn:
            value = await conn.fetchval("SELECT last_sequence FROM ledger.checkpoint WHERE projection = $1", PROJECTION)
        return int(value or 0)

    async def apply_batch(self, batch: Sequence[StoredMessage]) -> int:
        """Apply the events above the checkpoint in one transaction; returns the new checkpoint."""
        written: dict[Key, CachedState] = {}
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT last_sequence FROM ledger.checkpoint WHERE projection = $1 FOR UPDATE", PROJECTION
            )
            checkpoint = int(row["last_sequence"]) if row else 0
            fresh = sorted((m for m in batch if m.sequence > checkpoint), key=lambda m: m.sequence)
            if not fresh:
                return checkpoint
            if fresh[0].sequence != checkpoint + 1:
                # The stream has no holes (no deletes): a gap means an earlier event is missing here.
                raise GapError(checkpoint, fresh[0].sequence)
            events = await self._decode_or_park(conn, fresh)
            await self._insert_log(conn, events)
            written = await self._update_states(conn, [(seq, e) for seq, e, _ in events])
            last = fresh[-1].sequence
            await conn.execute(
                "INSERT INTO ledger.checkpoint (projection, last_sequence, updated_at) VALUES ($1, $2, now())"
                " ON CONFLICT (projection) DO UPDATE SET last_sequence = $2, updated_at = now()",
                PROJECTION,
                last,
            )
        # Committed: these states are now the rows' (an exception above skips this, and the
        # touched counties were already taken out of the cache).
        self._remember(written)
        return last

    def _take(self, keys: Iterable[Key]) -> dict[Key, CachedState]:
        taken = {key: entry for key in keys if (entry := self._cache.pop(key, None)) is not None}
        self._cache_bytes -= sum(len(entry.state) for entry in taken.values())
        return taken

    def _remember(self, states: dict[Key, CachedState]) -> None:
        cache = self._cache
        for key, entry in states.items():
            if (old := cache.pop(key, None)) is not None:
                self._cache_bytes -= len(old.state)
            cache[key] = entry
            self._cache_bytes += len(entry.state)
        while self._cache_bytes > STATE_CACHE_BYTES and cache:
            _, evicted = cache.popitem(last=False)
            self._cache_bytes -= len(evicted.state)

    def _forget(self) -> None:
        self._cache.clear()
        self._cache_bytes = 0

    async def park(self, sequence: int, data: bytes, reason: str) -> None:
        """Record an event that cannot be applied and move the checkpoint past it (the consumer
        calls this after the event failed alone, several times)."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT last_sequence FROM ledger.checkpoint WHERE projection = $1 FOR UPDATE", PROJECTION
            )
            checkpoint = int(row["last_sequence"]) if row else 0
            if sequence <= checkpoint:
                return
            if sequence != checkpoint + 1:
                raise GapError(checkpoint, sequence)
            await _insert_parked(conn, sequence, data, reason)
            await conn.execute(
                "INSERT INTO ledger.checkpoint (projection, last_sequence, updated_at) VALUES ($1, $2, now())"
                " ON CONFLICT (projection) DO UPDATE SET last_sequence = $2, updated_at = now()",
                PROJECTION,
                sequence,
            )

    async def parked(self) -> list[ParkedEvent]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM ledger.parked ORDER BY stream_sequence")
        return [
            parked_event(PROJECTION, r["stream_sequence"], bytes(r["data"]), r["reason"], r["parked_at"]) for r in rows
        ]

    async def replay_parked(self) -> ReplayParkedReport:
        """Try the parked events again (after a fix): each goes into its county's log and the
        county is folded again from the whole log, so order is as if it had never been parked."""
        replayed: list[int] = []
        self._forget()  # not needed for correctness (revisions are), frees what it rewrites
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT stream_sequence, data FROM ledger.parked ORDER BY stream_sequence FOR UPDATE"
            )
            for row in rows:
                sequence, data = row["stream_sequence"], bytes(row["data"])
                try:
                    async with conn.transaction():  # a savepoint: one failure leaves the others
                        envelope = decode_event(data)
                        programme = self._programmes.get(envelope.programme_id)
                        if programme is None:
                            raise LookupError(f"programme {envelope.programme_id!r} is not configured")
                        await conn.executemany(
                            f"INSERT INTO ledger.event_log ({', '.join(_LOG_COLUMNS)})"
                            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                            [_log_record(sequence, envelope, data)],
                        )
                        log_ = await aggregate_log(conn, envelope.programme_id, envelope.county_code)
                        await write_states(conn, [fold(programme, envelope.county_code, log_)])
                        await conn.execute("DELETE FROM ledger.parked WHERE stream_sequence = $1", sequence)
                    replayed.append(sequence)
                except Exception as exc:
                    log.warning("parked event still fails", stream_sequence=sequence, error=repr(exc))
                    await conn.execute(
                        "UPDATE ledger.parked SET reason = $2 WHERE stream_sequence = $1",
                        sequence,
                        f"{type(exc).__name__}: {exc}",
                    )
            remaining = int(await conn.fetchval("SELECT count(*) FROM ledger.parked") or 0)
        log.info("parked events replayed", replayed=len(replayed), still_parked=remaining)
        return ReplayParkedReport(projection=PROJECTION, replayed=tuple(replayed), still_parked=remaining)

    async def _decode_or_park(
        self, conn: Connection, messages: Sequence[StoredMessage]
    ) -> list[tuple[int, EventEnvelope, bytes]]:
        events, undecodable = _decode(messages)
        for sequence, data, reason in undecodable:
            await _insert_parked(conn, sequence, data, reason)
        return events

    async def _insert_log(self, conn: Connection, events: Sequence[tuple[int, EventEnvelope, bytes]]) -> None:
        # COPY in text format from the stored bytes as they are: no re-encoding of each envelope
        # into asyncpg's binary records (that was a quarter of a rebuild's time).
        if events:
            await _copy_log(conn, b"".join([_copy_line(seq, e, data) for seq, e, data in events]))

    async def _update_states(
        self, conn: Connection, events: Sequence[tuple[int, EventEnvelope]]
    ) -> dict[Key, CachedState]:
        """Fold the events into their counties' states and write them; returns the states as
        written (with their new revisions), for the cache once the transaction commits."""
        by_aggregate: dict[Key, list[tuple[int, EventEnvelope]]] = defaultdict(list)
        for seq, envelope in events:
            if envelope.programme_id in self._programmes:
                by_aggregate[(envelope.programme_id, envelope.county_code)].append((seq, envelope))
            else:
                log.warning("event for an unconfigured programme", programme_id=envelope.programme_id)
        # A slice of counties at a time: at a million events a state is ~17 kB of JSON and ~40 kB
        # decoded, and a batch may touch a thousand counties.
        written: dict[Key, CachedState] = {}
        written_bytes = 0
        keys = list(by_aggregate)
        for start in range(0, len(keys), STATES_PER_WRITE):
            some = {key: by_aggregate[key] for key in keys[start : start + STATES_PER_WRITE]}
            for key, entry in (await self._update_some_states(conn, some)).items():
                written[key] = entry
                written_bytes += len(entry.state)
            # What the cache could not keep goes now, not after the commit: a batch may touch
            # every county, ~40 MB of JSON at a million events.
            while written_bytes > STATE_CACHE_BYTES:
                written_bytes -= len(written.pop(next(iter(written))).state)
        return written

    async def _update_some_states(
        self, conn: Connection, by_aggregate: dict[Key, list[tuple[int, EventEnvelope]]]
    ) -> dict[Key, CachedState]:
        # Out of the cache until the transaction commits (see apply_batch).
        cached = self._take(by_aggregate)
        # One round trip: each row's revision, and its (TOASTed) state only when it is not the
        # cached one. A county with no row yet is absent.
        rows = await conn.fetch(
            "SELECT s.programme_id, s.county_code, s.revision, s.last_sequence,"
            " CASE WHEN s.revision IS DISTINCT FROM k.revision THEN s.state END AS state"
            " FROM unnest($1::text[], $2::text[], $3::bigint[]) AS k (programme_id, county_code, revision)"
            " JOIN ledger.county_state s ON s.programme_id = k.programme_id AND s.county_code = k.county_code",
            [k[0] for k in by_aggregate],
            [k[1] for k in by_aggregate],
            [entry.revision if (entry := cached.get(k)) is not None else None for k in by_aggregate],
        )
        states: dict[Key, CountyFacts] = {}
        for r in rows:
            key = (r["programme_id"], r["county_code"])
            entry = cached.get(key)
            if r["state"] is None and entry is not None and entry.last_sequence == r["last_sequence"]:
                states[key] = _cached_state_decoder.decode(entry.state)
            else:  # (last_sequence checked too: a belt against a sequence recreated from 1)
                state = r["state"]
                if state is None:  # revisions equal but last_sequence not: read it after all
                    state = await conn.fetchval(
                        "SELECT state FROM ledger.county_state WHERE programme_id = $1 AND county_code = $2", *key
                    )
                states[key] = _state_decoder.decode(state)
        updated = []
        previous: dict[Key, list[MilestoneRow]] = {}  # the rows now in ledger.milestones
        for (programme_id, county_code), aggregate_events in by_aggregate.items():
            programme = self._programmes[programme_id]
            ledger = states.get((programme_id, county_code))
            if ledger is None:
                ledger = new_facts(programme, county_code)
            else:
                previous[(programme_id, county_code)] = milestone_rows(ledger)
            for seq, envelope in aggregate_events:
                if not apply(programme, ledger, seq, envelope):
                    # A retraction: fold the county again from its log (this batch is in it).
                    ledger = fold(programme, county_code, await aggregate_log(conn, programme_id, county_code))
                    break
            updated.append(ledger)
        written = await write_states(conn, updated, previous_milestones=previous)
        return {
            (lg.programme_id, lg.county_code): CachedState(*written[(lg.programme_id, lg.county_code)])
            for lg in updated
        }

    async def rebuild(
        self,
        batches: AsyncIterable[Sequence[tuple[int, bytes]]],
        expected_last: int | None = None,
        reread: Reread | None = None,
        foresee: Foresee | None = None,
    ) -> RebuildResult:
        """Drop the read model and build it again from the stream, in large batches.

        ``batches`` yields batches in stream order from the first event. The log goes in by
        COPY; states are folded in memory and written once at the end. Each county's fold starts
        with the retractions foreseen: those the replaced read model names, or, when there is
        none, those ``foresee`` names (up to ``expected_last``: from the retraction index, or read
        ahead in the stream). A county whose retractions were not foreseen is folded again at the
        end: from the stream through ``reread`` (while PostgreSQL builds the log's indexes), or
        from its log.
        """
        started = time.monotonic()
        # Every state is rewritten with new revisions, so the cache would only miss: free it
        # before the rebuild holds every state in memory.
        self._forget()
        # Millions of live objects make every cyclic-GC pass long, and rebuilding makes no cycles
        # worth collecting: the collector waits until the end (it measured 4× the decode time).
        collecting = gc.isenabled()
        gc.disable()
        try:
            return await self._rebuild(batches, expected_last, reread, foresee, started)
        finally:
            if collecting:
                gc.enable()

    async def _rebuild(
        self,
        batches: AsyncIterable[Sequence[tuple[int, bytes]]],
        expected_last: int | None,
        reread: Reread | None,
        foresee: Foresee | None,
        started: float,
    ) -> RebuildResult:
        states: dict[tuple[str, str], CountyFacts] = {}
        refold: set[tuple[str, str]] = set()
        retractions: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
        logged: defaultdict[Key, int] = defaultdict(int)  # events in each county's log
        parked_sequences: set[int] = set()
        count, last = 0, 0
        async with self._pool.acquire() as conn, conn.transaction():
            # A retraction makes its county fold again without what it retracts, from its whole log
            # (a third of the counties at a million events, half the rows: it was a quarter of a
            # rebuild). The read model being replaced says which submissions each county retracted:
            # a county starts its fold with those left out, and only a county whose retractions in
            # the stream turn out other than foreseen is folded again at the end.
            foreseen: Mapping[Key, Collection[str]] = await _retractions_in_states(conn, programmes=self._programmes)
            # An empty read model foresees nothing, and a third of the counties would be folded
            # twice: ``foresee`` says instead, from the retraction index (a few milliseconds) or
            # by reading the stream's retractions ahead (one pass over its bytes, 1.8-3 s at a
            # million events, against 3.5-5 s of folding those counties again).
            if foresee is not None and expected_last and not await conn.fetchval(_ANY_STATE):
                ahead = await foresee(expected_last)
                if ahead is not None:  # (None: cannot read ahead; those counties are folded again)
                    foreseen = ahead
                    log.info("retractions read ahead", counties=len(ahead), upto=expected_last)
            phases = {"foresee": time.monotonic() - started}
            await conn.execute("TRUNCATE " + ", ".join(f"ledger.{t}" for t in READ_MODEL_TABLES if t != "checkpoint"))
            await conn.execute("DELETE FROM ledger.checkpoint WHERE projection = $1", PROJECTION)
            # Loading into an index-less table and indexing once is much cheaper than indexing
            # row by row. Readers wait for the commit (TRUNCATE's exclusive lock): they never
            # see the tables half built.
            await conn.execute("DROP INDEX ledger.event_log_aggregate; DROP INDEX ledger.event_log_recorded")
            copying: asyncio.Task[None] | None = None  # the previous batch's COPY, overlapping this decode
            programmes = self._programmes
            try:
                async for batch in batches:
                    # One pass per event (this loop is most of a rebuild's own time): check the
                    # sequence, decode (or park), fold, and write its log row.
                    parked: list[tuple[int, bytes, str]] = []
                    lines: list[bytes] = []
                    for seq, data in batch:
                        # The stream has no holes: anything but the next sequence means events went
                        # missing on the way here, and a rebuild must not commit past them.
                        if seq != last + 1:
                            raise GapError(last, seq)
                        last = seq
                        try:
                            envelope = decode_stored_event(data)
                        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                            parked.append(_undecodable(seq, data, exc))
                            continue
                        programme = programmes.get(envelope.programme_id)
                        if programme is not None:
                            key = (envelope.programme_id, envelope.county_code)
                            ledger = states.get(key)
                            if ledger is None:
                                ledger = folding(programme, envelope.county_code, foreseen.get(key, ()))
                                states[key] = ledger
                            try:
                                if not apply(programme, ledger, seq, envelope):  # a retraction: fold's own step
                                    fold_in(ledger, seq, envelope, programme)
                                    if (retracted := retraction_of(envelope)) is not None:
                                        retractions[key].add(retracted)
                            except Exception as exc:  # as the live consumer would: parked, county refolded without it
                                log.error("event parked", stream_sequence=seq, error=repr(exc))
                                parked.append((seq, data, f"{type(exc).__name__}: {exc}"))
                                refold.add(key)
                                continue
                            logged[key] += 1
                        lines.append(_copy_line(seq, envelope, data))
                    if copying is not None:
                        await copying  # one statement at a time on the connection
                    for sequence, data, reason in parked:
                        await _insert_parked(conn, sequence, data, reason)
                        parked_sequences.add(sequence)
                    copying = asyncio.create_task(_copy_log(conn, b"".join(lines)))
                    count += len(batch)
            except BaseException:
                if copying is not None:  # let the connection finish its statement before the rollback
                    await asyncio.gather(copying, return_exceptions=True)
                raise
            if copying is not None:
                await copying
            if expected_last is not None and last < expected_last:
                raise GapError(last, expected_last + 1)  # the stream's end (when asked) was not reached
            phases["stream"] = time.monotonic() - started
            # Counties whose retractions were not the foreseen ones (or with a parked event) are
            # folded again, all at once in one pass in stream order.
            refold.update(key for key, ledger in states.items() if set(ledger.retracted) != retractions.get(key, set()))
            for key in refold:
                del states[key]  # (its memory first: a third of the counties at a million events)

            def fold_again(keys: Iterable[Key]) -> dict[Key, CountyFacts]:
                return {key: folding(programmes[key[0]], key[1], retractions.get(key, ())) for key in keys}

            refolded = fold_again(sorted(refold))
            source = await reread(list(refolded), last) if refolded and reread is not None else None
            if source is None:  # from their logs, before the indexes exist (a scan in the table's order)
                await _refold_from_log(conn, refolded, programmes)
                await _index_log(conn)
            else:  # from the stream again, while PostgreSQL builds the indexes
                indexing = asyncio.create_task(_index_log(conn))
                try:
                    strays = await _refold_from_stream(source, refolded, logged, parked_sequences, programmes)
                except BaseException:
                    await asyncio.gather(indexing, return_exceptions=True)  # the connection's statement first
                    raise
                await indexing
                if strays:  # the stream gave them other events than their logs hold: from the logs
                    again = fold_again(strays)
                    await _refold_from_log(conn, again, programmes)
                    refolded.update(again)
            states.update(refolded)
            phases["fold_again_and_index"] = time.monotonic() - started
            # A slice at a time, each state let go once written: at a million events the states
            # are ~60 MB as objects and ~25 MB more as JSON, within the ledger's 200 MB.
            keys = list(states)
            for start in range(0, len(keys), STATES_PER_COPY):
                written = [states.pop(key) for key in keys[start : start + STATES_PER_COPY]]
                await write_states(conn, written, fresh_tables=True)
            await conn.execute(
                "INSERT INTO ledger.checkpoint (projection, last_sequence) VALUES ($1, $2)", PROJECTION, last
            )
            phases["states"] = time.monotonic() - started
        seconds = time.monotonic() - started
        phases["commit"] = seconds
        # Each phase's own seconds (the marks above are since the start).
        marks = list(phases.values())
        took = {name: round(end - begin, 2) for name, begin, end in zip(phases, [0.0, *marks[:-1]], marks, strict=True)}
        log.info("read model rebuilt", events=count, last_sequence=last, seconds=round(seconds, 2), phases=took)
        return RebuildResult(events=count, last_sequence=last, seconds=seconds, phases=took)


def _decode(
    messages: Sequence[StoredMessage],
) -> tuple[list[tuple[int, EventEnvelope, bytes]], list[tuple[int, bytes, str]]]:
    """(decoded events, (sequence, bytes, reason) of those that do not decode)."""
    events, undecodable = [], []
    for message in messages:
        try:
            # Exactly decode_event's answer, without its regex calls for events that pass (see
            # contracts.events): what is invalid is still parked, with decode_event's reason.
            events.append((message.sequence, decode_stored_event(message.data), message.data))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            undecodable.append(_undecodable(message.sequence, message.data, exc))
    return events, undecodable


def _undecodable(sequence: int, data: bytes, exc: msgspec.DecodeError) -> tuple[int, bytes, str]:
    log.error("event parked: cannot decode", stream_sequence=sequence, error=str(exc))
    return sequence, data, f"{type(exc).__name__}: {exc}"


async def _insert_parked(conn: Connection, sequence: int, data: bytes, reason: str) -> None:
    await conn.execute(
        "INSERT INTO ledger.parked (stream_sequence, reason, data) VALUES ($1, $2, $3)"
        " ON CONFLICT (stream_sequence) DO UPDATE SET reason = EXCLUDED.reason",
        sequence,
        reason,
        data,
    )


class GapError(Reposition):
    def __init__(self, checkpoint: int, first: int) -> None:
        super().__init__(f"events {checkpoint + 1}..{first - 1} not applied yet; got {first}")
        self.checkpoint = checkpoint
        self.first = first


@dataclass(frozen=True)
class RebuildResult:
    events: int
    last_sequence: int
    seconds: float
    phases: Mapping[str, float] = field(default_factory=dict)  # seconds: foresee, stream, … commit


_LOG_COLUMNS = (
    "stream_sequence",
    "programme_id",
    "county_code",
    "event_id",
    "event_type",
    "submission_id",
    "occurred_at",
    "recorded_at",
    "envelope",
)


def _log_record(seq: int, e: EventEnvelope, data: bytes) -> tuple[object, ...]:
    # The stored bytes as they are, unless the event was upcast on read: then its current form.
    return (
        seq,
        e.programme_id,
        e.county_code,
        e.event_id,
        e.event_type,
        e.submission_id,
        e.occurred_at,
        e.recorded_at,
        data.decode() if e.schema_version == _stored_version(data) else msgspec.json.encode(e).decode(),
    )


async def _copy_log(conn: Connection, rows: bytes) -> None:
    """COPY rows made by :func:`_copy_line` into ``event_log``, as one buffer (a file-like source
    would be read in a thread, 512 kB at a time)."""
    await conn.copy_to_table(
        "event_log", schema_name="ledger", columns=list(_LOG_COLUMNS), source=_one_buffer(rows), format="text"
    )


async def _one_buffer(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _copy_line(seq: int, e: EventEnvelope, data: bytes) -> bytes:
    """One row of ``_LOG_COLUMNS`` in COPY's text format."""
    # Decoded as stored (decode_stored_event's own type): the bytes are the current version.
    stored = type(e) is StoredEventEnvelope or e.schema_version == _stored_version(data)
    envelope = data if stored else msgspec.json.encode(e)
    payload_type = type(e.payload)
    event_type = _EVENT_TYPES.get(payload_type) or _EVENT_TYPES.setdefault(payload_type, event_type_of(e.payload))
    text = f"{seq}\t{e.programme_id}\t{e.county_code}\t{e.event_id}\t{event_type}\t{e.submission_id}\t"
    if text.count("\t") != 6 or "\\" in text or "\n" in text or "\r" in text:
        fields = (str(seq), e.programme_id, e.county_code, e.event_id, event_type, e.submission_id)
        text = "".join(_COPY_ESCAPES.sub(lambda m: _COPY_ESCAPED[m.group()], f) + "\t" for f in fields)
    # The instants as msgspec writes them (RFC 3339: digits, "-", ":", ".", "T", "+" and "Z", nothing
    # to escape): isoformat()'s text but "Z" for "+00:00", the same instant for PostgreSQL, at a
    # tenth of isoformat()'s cost (which was a third of this function's).
    return b"%b%b\t%b\t%b\n" % (
        text.encode(),
        _instant_encoder.encode(e.occurred_at)[1:-1],
        _instant_encoder.encode(e.recorded_at)[1:-1],
        _copy_escape(envelope),
    )


_EVENT_TYPES: dict[type, str] = {}  # payload type -> event type (``EventEnvelope.event_type``, cached)
_instant_encoder = msgspec.json.Encoder()


# COPY text format: backslash, tab, newline and carriage return are written escaped.
_COPY_ESCAPED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_COPY_ESCAPES = re.compile(r"[\\\t\n\r]")


def _copy_escape(value: bytes) -> bytes:
    # A byte's ordinal is looked for with memchr, a one-byte bytes needle by the general search
    # (a tenth of the time on an envelope's ~750 bytes).
    if _BACKSLASH in value:
        value = value.replace(b"\\", b"\\\\")
    if _TAB in value or _NEWLINE in value or _RETURN in value:
        value = value.replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
    return value


_BACKSLASH, _TAB, _NEWLINE, _RETURN = b"\\\t\n\r"


def _stored_version(data: bytes) -> int:
    marker = data.find(b'"schema_version":')
    if marker < 0:
        return -1
    end = data.find(b",", marker)
    try:
        return int(data[marker + 17 : end])
    except ValueError:
        return -1


async def _retractions_in_states(conn: Connection, programmes: Mapping[str, Programme]) -> dict[Key, list[str]]:
    """The submissions each county's state in ``county_state`` says it retracted (counties with
    none left out)."""
    rows = await conn.fetch(
        "SELECT programme_id, county_code, state->'retracted' AS retracted FROM ledger.county_state"
        " WHERE jsonb_array_length(COALESCE(state->'retracted', '[]')) > 0"
    )
    return {
        (r["programme_id"], r["county_code"]): _retracted_decoder.decode(r["retracted"])
        for r in rows
        if r["programme_id"] in programmes
    }


_retracted_decoder = msgspec.json.Decoder(list[str])
_ANY_STATE = "SELECT EXISTS (SELECT 1 FROM ledger.county_state)"


async def _index_log(conn: Connection) -> None:
    # The indexes' sorts of a million rows fit in memory with this (PostgreSQL's default, 64 MB,
    # spills them to disk); for this transaction only.
    await conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
    await conn.execute(EVENT_LOG_INDEXES)


async def _refold_from_log(
    conn: Connection, refolded: dict[Key, CountyFacts], programmes: Mapping[str, Programme]
) -> None:
    async for key, sequence, envelope in _logs_in_stream_order(conn, list(refolded)):
        fold_in(refolded[key], sequence, envelope, programmes[key[0]])


async def _refold_from_stream(
    source: AsyncIterable[Sequence[tuple[int, bytes]]],
    refolded: dict[Key, CountyFacts],
    logged: Mapping[Key, int],
    parked_sequences: AbstractSet[int],
    programmes: Mapping[str, Programme],
) -> set[Key]:
    """Fold ``refolded`` from their subjects' messages in the stream, skipping what was parked
    (exactly their logs, as the stream is written); returns the counties the stream gave another
    number of events than their logs hold, which must be folded from their logs."""
    folded: defaultdict[Key, int] = defaultdict(int)
    async for batch in source:
        for sequence, data in batch:
            if sequence in parked_sequences:
                continue
            envelope = decode_stored_event(data)  # (what does not decode was parked)
            key = (envelope.programme_id, envelope.county_code)
            ledger = refolded.get(key)
            if ledger is not None:  # (else an event of another county on this subject)
                fold_in(ledger, sequence, envelope, programmes[key[0]])
                folded[key] += 1
    return {key for key in refolded if folded[key] != logged.get(key, 0)}


# Reads the messages of these counties' subjects again, up to this stream sequence (None: cannot).
Reread = Callable[[Sequence[Key], int], Awaitable[AsyncIterable[Sequence[tuple[int, bytes]]] | None]]
# Reads what the stream's events up to this sequence retract, per county (None: cannot).
Foresee = Callable[[int], Awaitable[Mapping[Key, Collection[str]] | None]]


async def _logs_in_stream_order(
    conn: Connection, aggregates: Sequence[Key]
) -> AsyncIterator[tuple[Key, int, EventEnvelope]]:
    """Several aggregates' events, interleaved in stream order, in one query read through a
    cursor (inside the caller's transaction). For a rebuild: the envelopes may be
    decode_stored_event's subclasses."""
    if not aggregates:
        return
    async for row in conn.cursor(
        "SELECT programme_id, county_code, stream_sequence, envelope::text AS envelope FROM ledger.event_log"
        " WHERE (programme_id, county_code) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
        " ORDER BY stream_sequence",
        [a[0] for a in aggregates],
        [a[1] for a in aggregates],
        prefetch=5000,
    ):
        yield (
            (row["programme_id"], row["county_code"]),
            row["stream_sequence"],
            decode_stored_event(row["envelope"].encode()),
        )


async def aggregate_log(
    conn: Connection, programme_id: str, county_code: str, recorded_by: dt.datetime | None = None
) -> list[tuple[int, EventEnvelope]]:
    rows = await conn.fetch(
        "SELECT stream_sequence, envelope::text AS envelope FROM ledger.event_log"
        " WHERE programme_id = $1 AND county_code = $2 AND ($3::timestamptz IS NULL OR recorded_at <= $3)"
        " ORDER BY stream_sequence",
        programme_id,
        county_code,
        recorded_by,
    )
    return [(r["stream_sequence"], decode_event(r["envelope"].encode())) for r in rows]


def state_row(ledger: CountyFacts, encoded: bytes | None = None) -> tuple[str, str, int, str]:
    """A county's ``county_state`` row (programme_id, county_code, last_sequence, state), from
    its state's JSON when the caller has it already."""
    state = _state_encoder.encode(ledger) if encoded is None else encoded
    return ledger.programme_id, ledger.county_code, ledger.last_sequence, state.decode()


MILESTONE_COLUMNS = (
    "programme_id",
    "county_code",
    "milestone_id",
    "percent",
    "note",
    "reported_at",
    "completed_on",
    "completed_via",
    "extended_deadline",
)


def milestone_rows(ledger: CountyFacts) -> list[tuple[object, ...]]:
    """A county's ``milestones`` rows, in :data:`MILESTONE_COLUMNS` order."""
    return [
        (
            ledger.programme_id,
            ledger.county_code,
            m.milestone_id,
            m.percent,
            m.note,
            m.reported_at,
            m.completed_on,
            m.completed_via,
            m.extended_deadline,
        )
        for m in ledger.milestones.values()
    ]


async def write_states(
    conn: Connection,
    ledgers: Sequence[CountyFacts],
    fresh_tables: bool = False,
    previous_milestones: Mapping[Key, Sequence[MilestoneRow]] | None = None,
) -> dict[Key, tuple[int, int, bytes]]:
    """Upsert the counties' states and their milestone rows; returns each state's new revision,
    last sequence and JSON (nothing for ``fresh_tables``, where COPY gives the revisions).

    ``previous_milestones``: a county's rows as ``ledger.milestones`` holds them now; only those
    that changed are written (a county not there has all its rows written)."""
    if fresh_tables:
        state_rows = [state_row(lg) for lg in ledgers]
        await conn.copy_records_to_table(
            "county_state",
            schema_name="ledger",
            columns=["programme_id", "county_code", "last_sequence", "state"],
            records=state_rows,
        )
        await conn.copy_records_to_table(
            "milestones", schema_name="ledger", records=[row for lg in ledgers for row in milestone_rows(lg)]
        )
        return {}
    encoded = {(lg.programme_id, lg.county_code): (lg.last_sequence, _state_encoder.encode(lg)) for lg in ledgers}
    state_rows = [state_row(lg, encoded[(lg.programme_id, lg.county_code)][1]) for lg in ledgers]
    previous = previous_milestones or {}
    changed: list[MilestoneRow] = []
    for lg in ledgers:
        rows = milestone_rows(lg)
        before = previous.get((lg.programme_id, lg.county_code))
        if before is None:
            changed.extend(rows)
        else:
            unchanged = set(before)
            changed.extend(row for row in rows if row not in unchanged)
    # One statement each (arrays, not executemany's statement per row); the revision is the
    # column default's fresh nextval for the proposed row, taken by the update too.
    written = await conn.fetch(
        "INSERT INTO ledger.county_state (programme_id, county_code, last_sequence, state)"
        " SELECT p, c, s, j::jsonb FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) AS r (p, c, s, j)"
        " ON CONFLICT (programme_id, county_code) DO UPDATE"
        " SET last_sequence = EXCLUDED.last_sequence, state = EXCLUDED.state, revision = EXCLUDED.revision"
        " RETURNING programme_id, county_code, revision",
        *_columns(state_rows, 4),
    )
    if changed:
        await conn.execute(
            "INSERT INTO ledger.milestones"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::integer[], $5::text[],"
            " $6::timestamptz[], $7::date[], $8::text[], $9::date[])"
            " ON CONFLICT (programme_id, county_code, milestone_id) DO UPDATE SET percent = EXCLUDED.percent,"
            " note = EXCLUDED.note, reported_at = EXCLUDED.reported_at, completed_on = EXCLUDED.completed_on,"
            " completed_via = EXCLUDED.completed_via, extended_deadline = EXCLUDED.extended_deadline",
            *_columns(changed, len(MILESTONE_COLUMNS)),
        )
    return {
        (r["programme_id"], r["county_code"]): (r["revision"], *encoded[(r["programme_id"], r["county_code"])])
        for r in written
    }


def _columns(rows: Sequence[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows as columns (one array parameter each)."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]
