"""The ledger's read model against the stream: every row explained by the events, none altered.

Reads the stream up to the ledger's checkpoint and, in one read-only REPEATABLE READ snapshot of
the read model, checks that:
- ``event_log`` holds each event as stored (the columns and the envelope), and nothing else;
- ``parked`` holds, for an event it names, exactly the stored bytes;
- ``county_state`` and ``milestones`` are what folding the events gives (the same fold and row
  builders the projection uses), and no row is there that no event explains.
Nothing is written. Memory: one folded state per county; the log is compared batch by batch.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import msgspec
from nats.js import JetStreamContext

from contracts.audit import Break, ReadModelAudit
from contracts.events import EventEnvelope, decode_event
from contracts.facts import CountyFacts, apply, fold, new_facts
from contracts.programme import Programme
from contracts.subjects import EVENTS_ALL, EVENTS_STREAM, aggregate_subject
from services.common.jetstream import read_all
from services.ledger.projection import (
    _LOG_COLUMNS,
    MILESTONE_COLUMNS,
    PROJECTION,
    _log_record,
    milestone_rows,
    state_row,
)

Key = tuple[str, str]
_state_decoder = msgspec.json.Decoder(CountyFacts)
MAX_BREAKS = 1000  # a wholesale difference is reported by its first thousand rows


async def audit_read_model(
    pool: asyncpg.Pool, js: JetStreamContext, programmes: dict[str, Programme]
) -> ReadModelAudit:
    audit = _Audit(programmes)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        checkpoint = int(
            await conn.fetchval("SELECT last_sequence FROM ledger.checkpoint WHERE projection = $1", PROJECTION) or 0
        )
        parked = {r["stream_sequence"]: bytes(r["data"]) for r in await conn.fetch("SELECT * FROM ledger.parked")}
        async for batch in read_all(js, EVENTS_STREAM, EVENTS_ALL):
            within = [(seq, data) for seq, data in batch if seq <= checkpoint]
            if within:
                # From just after the last batch: a row in a hole of the stream is compared too.
                rows = await conn.fetch(
                    f"SELECT {', '.join(_LOG_COLUMNS)}, envelope::text AS envelope_text FROM ledger.event_log"
                    " WHERE stream_sequence BETWEEN $1 AND $2",
                    audit.last_read + 1,
                    within[-1][0],
                )
                audit.compare_log(within, {r["stream_sequence"]: r for r in rows}, parked)
            if batch[-1][0] >= checkpoint:
                break
        audit.stream_end(checkpoint)
        audit.unexplained_log(
            await conn.fetch("SELECT stream_sequence FROM ledger.event_log WHERE stream_sequence > $1", audit.last_read)
        )
        for sequence, data in parked.items():
            audit.check_parked(sequence, data)
        await audit.refold(js)
        audit.compare_states(await conn.fetch("SELECT * FROM ledger.county_state"))
        audit.compare_milestones(await conn.fetch("SELECT * FROM ledger.milestones"))
    return ReadModelAudit(read_model="ledger", checked_to=checkpoint, rows=audit.rows, breaks=tuple(audit.breaks))


class _Audit:
    def __init__(self, programmes: dict[str, Programme]) -> None:
        self._programmes = programmes
        self.states: dict[Key, CountyFacts] = {}
        self._refold: set[Key] = set()
        self._stream: dict[int, bytes] = {}  # parked sequences' stored bytes
        self._parked_wanted: set[int] = set()
        self.unappliable: set[int] = set()
        self.breaks: list[Break] = []
        self.rows: dict[str, int] = {"event_log": 0, "parked": 0, "county_state": 0, "milestones": 0}
        self.last_read = 0

    def add(self, kind: str, where: str, detail: str, sequence: int | None = None) -> None:
        if len(self.breaks) < MAX_BREAKS:
            self.breaks.append(Break(kind=kind, where=where, detail=detail, stream_sequence=sequence))

    def compare_log(
        self, events: Sequence[tuple[int, bytes]], rows: dict[int, asyncpg.Record], parked: dict[int, bytes]
    ) -> None:
        self.unexplained_log(row for seq, row in rows.items() if seq not in {s for s, _ in events})
        for sequence, data in events:
            self.last_read = sequence
            row = rows.get(sequence)
            where = f"ledger.event_log stream sequence {sequence}"
            if sequence in parked:
                self._stream[sequence] = data
                self.unappliable.add(sequence)
                if row is not None:
                    self.add("read_model_unexplained", where, "the event is both parked and in the log", sequence)
                continue
            try:
                envelope = decode_event(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.add(
                    "read_model_missing",
                    f"ledger.parked stream sequence {sequence}",
                    f"undecodable ({exc}) yet not parked",
                    sequence,
                )
                continue
            if row is None:
                self.add("read_model_missing", where, f"event {envelope.event_id} is not in the log", sequence)
            else:
                self.rows["event_log"] += 1
                self._compare_log_row(sequence, envelope, data, row, where)
            self._fold(sequence, envelope)

    def unexplained_log(self, rows: Iterable[asyncpg.Record]) -> None:
        for row in rows:
            self.add(
                "read_model_unexplained",
                f"ledger.event_log stream sequence {row['stream_sequence']}",
                "the log holds an event the stream does not have",
                row["stream_sequence"],
            )

    def _compare_log_row(
        self, sequence: int, envelope: EventEnvelope, data: bytes, row: asyncpg.Record, where: str
    ) -> None:
        expected = _log_record(sequence, envelope, data)
        for column, want in zip(_LOG_COLUMNS[:-1], expected[:-1], strict=True):
            if row[column] != want:
                self.add(
                    "read_model_altered",
                    where,
                    f"{column} is {row[column]!r} in the read model; event {envelope.event_id} says {want!r}",
                    sequence,
                )
                return
        try:
            logged = decode_event(row["envelope_text"].encode())
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.add("read_model_altered", where, f"the logged envelope is no longer an event: {exc}", sequence)
            return
        if logged != envelope:
            self.add(
                "read_model_altered",
                where,
                f"the logged envelope differs from event {envelope.event_id}: {_difference(logged, envelope)}",
                sequence,
            )

    def _fold(self, sequence: int, envelope: EventEnvelope) -> None:
        programme = self._programmes.get(envelope.programme_id)
        if programme is None:
            return
        key = (envelope.programme_id, envelope.county_code)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = new_facts(programme, envelope.county_code)
        try:
            if not apply(programme, state, sequence, envelope):
                self._refold.add(key)
        except Exception:  # the projection parks such an event and refolds the county without it
            self._refold.add(key)

    def stream_end(self, checkpoint: int) -> None:
        if self.last_read < checkpoint:
            self.add(
                "read_model_unexplained",
                "ledger.checkpoint",
                f"the ledger says it applied events up to {checkpoint}; the stream ends at {self.last_read}",
            )

    def check_parked(self, sequence: int, data: bytes) -> None:
        self.rows["parked"] += 1
        stored = self._stream.get(sequence)
        where = f"ledger.parked stream sequence {sequence}"
        if stored is None:
            self.add("read_model_unexplained", where, "a parked event the stream does not have", sequence)
        elif stored != data:
            self.add("read_model_altered", where, "the parked bytes differ from the stored event", sequence)

    async def refold(self, js: JetStreamContext) -> None:
        """Fold again, from the stream, each county with a retraction or an event it could not apply."""
        for programme_id, county_code in sorted(self._refold):
            history = [
                (seq, decode_event(data))
                async for batch in read_all(js, EVENTS_STREAM, aggregate_subject(programme_id, county_code))
                for seq, data in batch
                if seq <= self.last_read and seq not in self.unappliable  # parked: not in the fold
            ]
            try:
                self.states[(programme_id, county_code)] = fold(self._programmes[programme_id], county_code, history)
            except Exception as exc:
                self.add(
                    "read_model_missing",
                    f"ledger.county_state {programme_id} {county_code}",
                    f"an event of the county cannot be applied and is not parked: {exc!r}",
                )

    def compare_states(self, rows: Iterable[asyncpg.Record]) -> None:
        seen: set[Key] = set()
        for row in rows:
            self.rows["county_state"] += 1
            key = (row["programme_id"], row["county_code"])
            seen.add(key)
            where = f"ledger.county_state {key[0]} {key[1]}"
            expected = self.states.get(key)
            if expected is None:
                self.add("read_model_unexplained", where, "no event explains this county's state")
                continue
            want = state_row(expected)
            try:
                actual = _state_decoder.decode(row["state"])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.add("read_model_altered", where, f"the state is no longer a county's facts: {exc}")
                continue
            # (Not ``revision``: it says which write the row came from, which the events do not.)
            if row["last_sequence"] != want[2]:
                self.add(
                    "read_model_altered", where, f"last_sequence is {row['last_sequence']}, the events say {want[2]}"
                )
            elif actual != expected:
                self.add(
                    "read_model_altered",
                    where,
                    f"the state differs from the events' fold: {_difference(actual, expected)}",
                )
        for key in sorted(set(self.states) - seen):
            self.add(
                "read_model_missing",
                f"ledger.county_state {key[0]} {key[1]}",
                "the events give this county a state; the read model has none",
            )

    def compare_milestones(self, rows: Iterable[asyncpg.Record]) -> None:
        expected = {
            (str(r[0]), str(r[1]), str(r[2])): r for state in self.states.values() for r in milestone_rows(state)
        }
        seen = set()
        for row in rows:
            self.rows["milestones"] += 1
            key = (row["programme_id"], row["county_code"], row["milestone_id"])
            seen.add(key)
            where = f"ledger.milestones {' '.join(key)}"
            want = expected.get(key)
            if want is None:
                self.add("read_model_unexplained", where, "no event explains this milestone row")
                continue
            for index, column in enumerate(MILESTONE_COLUMNS):
                if not _same(row[column], want[index]):
                    self.add(
                        "read_model_altered", where, f"{column} is {row[column]!r}; the events say {want[index]!r}"
                    )
                    break
        for key in sorted(set(expected) - seen):
            self.add(
                "read_model_missing",
                f"ledger.milestones {' '.join(key)}",
                "the events give this row; the read model has none",
            )


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(actual, dt.datetime) and isinstance(expected, dt.datetime):
        return actual == expected  # instants compare across offsets
    return bool(actual == expected)


def _difference(actual: msgspec.Struct, expected: msgspec.Struct) -> str:
    """The first field (as a path) where two structs differ, with both values."""
    path, a, b = _first_difference(msgspec.to_builtins(actual), msgspec.to_builtins(expected), "")
    return f"{path or 'value'}: {_short(a)} in the read model, {_short(b)} from the events"


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{index}]")
    return path, a, b


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
