"""The notifier's outbox in PostgreSQL: every message is a row before it is sent.

- Planning writes the rows of an issued action in the same transaction as the consumer's
  checkpoint; a redelivered action finds its rows (deterministic message ids) and adds nothing.
- A sender claims due rows with a lease (``claimed_until``), sends outside any transaction and
  writes the outcome. A crash between "sent" and "written" leaves the lease to expire: the row is
  sent at most once more, with the same message id (which the providers' correlation fields
  carry).
- Each outcome also goes into ``event_outbox`` in the same transaction; a publisher appends those
  to the event stream (Nats-Msg-Id = the row's id) and deletes them, so no outcome is lost.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import msgspec

from services.common.postgres import Connection
from services.notifier.channels.base import OutboundMessage

MIGRATION_LOCK = 0x6475_6261_6E05
LEASE = dt.timedelta(seconds=60)

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE notifier.outbox (
            message_id text PRIMARY KEY,
            action_id text NOT NULL,
            programme_id text NOT NULL,
            county_code text NOT NULL,
            channel text NOT NULL,
            recipient_id text NOT NULL,
            message jsonb NOT NULL,
            state text NOT NULL DEFAULT 'pending',  -- pending | sent | failed | digested
            attempts integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL,
            claimed_until timestamptz,
            last_outcome text,
            last_detail text NOT NULL DEFAULT '',
            provider_message_id text,
            queued_at timestamptz NOT NULL,
            sent_at timestamptz
        );
        CREATE INDEX outbox_due ON notifier.outbox (next_attempt_at) WHERE state = 'pending';
        CREATE TABLE notifier.event_outbox (
            event_id text PRIMARY KEY,
            subject text NOT NULL,
            data bytea NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE notifier.checkpoint (
            projection text PRIMARY KEY,
            last_sequence bigint NOT NULL
        );
        """,
    ),
    (
        2,
        # The daily SMS budget counts a person's SMS sent today: without this index each count
        # scanned the whole outbox (20 ms at 22k rows, growing with every message ever queued).
        "CREATE INDEX outbox_sms_sent ON notifier.outbox (recipient_id, sent_at)"
        " WHERE channel = 'sms' AND state = 'sent'",
    ),
    (3, "ALTER TABLE notifier.outbox ADD COLUMN receipt text"),  # delivered | failed, once reported
    (
        4,
        # Actions the notifier could not plan, kept for ops (duban parked / replay-parked).
        "CREATE TABLE notifier.parked (stream_sequence bigint PRIMARY KEY, reason text NOT NULL,"
        " data bytea NOT NULL, parked_at timestamptz NOT NULL DEFAULT now())",
    ),
]


async def migrate(conn: Connection) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE SCHEMA IF NOT EXISTS notifier;"
            "CREATE TABLE IF NOT EXISTS notifier.schema_migrations"
            " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM notifier.schema_migrations")}
        for version, sql in MIGRATIONS:
            if version not in done:
                await conn.execute(sql)
                await conn.execute("INSERT INTO notifier.schema_migrations (version) VALUES ($1)", version)


@dataclass(frozen=True)
class OutboxRow:
    message: OutboundMessage
    action_id: str
    programme_id: str
    county_code: str
    attempts: int
    queued_at: dt.datetime
    last_outcome: str | None


_message_decoder = msgspec.json.Decoder(OutboundMessage)


async def checkpoint(conn: Connection) -> int:
    value = await conn.fetchval("SELECT last_sequence FROM notifier.checkpoint WHERE projection = 'notifier'")
    return int(value or 0)


async def set_checkpoint(conn: Connection, sequence: int) -> None:
    await conn.execute(
        "INSERT INTO notifier.checkpoint VALUES ('notifier', $1)"
        " ON CONFLICT (projection) DO UPDATE SET last_sequence = EXCLUDED.last_sequence",
        sequence,
    )


async def enqueue(
    conn: Connection,
    messages: Sequence[OutboundMessage],
    action_id: str,
    programme_id: str,
    county_code: str,
    now: dt.datetime,
    send_at: dt.datetime | None = None,
) -> list[OutboundMessage]:
    """Insert the rows not there yet; returns the ones inserted (a redelivery inserts none)."""
    inserted = []
    for message in messages:
        status = await conn.execute(
            "INSERT INTO notifier.outbox (message_id, action_id, programme_id, county_code, channel, recipient_id,"
            " message, next_attempt_at, queued_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            " ON CONFLICT (message_id) DO NOTHING",
            message.message_id,
            action_id,
            programme_id,
            county_code,
            message.channel,
            message.recipient_id,
            msgspec.json.encode(message).decode(),
            send_at or now,
            now,
        )
        if status.endswith(" 1"):
            inserted.append(message)
    return inserted


async def claim_due(conn: Connection, now: dt.datetime, limit: int = 50) -> list[OutboxRow]:
    """Lease the rows due now to this sender (others skip them)."""
    rows = await conn.fetch(
        "UPDATE notifier.outbox SET claimed_until = $2 WHERE message_id IN ("
        " SELECT message_id FROM notifier.outbox WHERE state = 'pending' AND next_attempt_at <= $1"
        " AND (claimed_until IS NULL OR claimed_until < $1)"
        " ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED)"
        " RETURNING message, action_id, programme_id, county_code, attempts, queued_at, last_outcome",
        now,
        now + LEASE,
        limit,
    )
    return [
        OutboxRow(
            message=_message_decoder.decode(r["message"]),
            action_id=r["action_id"],
            programme_id=r["programme_id"],
            county_code=r["county_code"],
            attempts=r["attempts"],
            queued_at=r["queued_at"],
            last_outcome=r["last_outcome"],
        )
        for r in rows
    ]


async def record_outcome(
    conn: Connection,
    message_id: str,
    *,
    state: str,
    attempts: int,
    outcome: str,
    detail: str,
    next_attempt_at: dt.datetime | None,
    provider_message_id: str | None,
    sent_at: dt.datetime | None,
) -> None:
    await conn.execute(
        "UPDATE notifier.outbox SET state = $2, attempts = $3, last_outcome = $4, last_detail = $5,"
        " next_attempt_at = COALESCE($6, next_attempt_at), provider_message_id = COALESCE($7, provider_message_id),"
        " sent_at = COALESCE($8, sent_at), claimed_until = NULL WHERE message_id = $1",
        message_id,
        state,
        attempts,
        outcome,
        detail,
        next_attempt_at,
        provider_message_id,
        sent_at,
    )


async def add_event(conn: Connection, event_id: str, subject: str, data: bytes) -> None:
    await conn.execute(
        "INSERT INTO notifier.event_outbox (event_id, subject, data) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        event_id,
        subject,
        data,
    )


async def pending_events(conn: Connection, limit: int = 200) -> list[tuple[str, str, bytes]]:
    rows = await conn.fetch(
        "SELECT event_id, subject, data FROM notifier.event_outbox ORDER BY created_at, event_id LIMIT $1", limit
    )
    return [(r["event_id"], r["subject"], bytes(r["data"])) for r in rows]


async def forget_events(conn: Connection, event_ids: Sequence[str]) -> None:
    await conn.execute("DELETE FROM notifier.event_outbox WHERE event_id = ANY($1::text[])", list(event_ids))


async def sms_sent_on(conn: Connection, recipient_id: str, start: dt.datetime, end: dt.datetime) -> int:
    """SMS sent to a person in [start, end): what the daily budget counts."""
    value = await conn.fetchval(
        "SELECT count(*) FROM notifier.outbox WHERE recipient_id = $1 AND channel = 'sms' AND state = 'sent'"
        " AND sent_at >= $2 AND sent_at < $3",
        recipient_id,
        start,
        end,
    )
    return int(value or 0)


async def state_counts(conn: Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT state, count(*) AS n FROM notifier.outbox GROUP BY state")
    return {str(r["state"]): int(r["n"]) for r in rows}


async def unpublished_events(conn: Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM notifier.event_outbox") or 0)


async def due_count(conn: Connection, now: dt.datetime) -> int:
    """Pending rows whose time has come: what the sender has still to do right now."""
    value = await conn.fetchval(
        "SELECT count(*) FROM notifier.outbox WHERE state = 'pending' AND next_attempt_at <= $1", now
    )
    return int(value or 0)


async def park(conn: Connection, sequence: int, data: bytes, reason: str) -> None:
    await conn.execute(
        "INSERT INTO notifier.parked (stream_sequence, reason, data) VALUES ($1, $2, $3)"
        " ON CONFLICT (stream_sequence) DO UPDATE SET reason = EXCLUDED.reason",
        sequence,
        reason,
        data,
    )


async def parked(conn: Connection, *, lock: bool = False) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT stream_sequence, reason, data, parked_at FROM notifier.parked ORDER BY stream_sequence"
            + (" FOR UPDATE" if lock else "")
        )
    )


async def unpark(conn: Connection, sequence: int, reason: str | None) -> None:
    """Forget a replayed event (``reason`` None), or note why it still fails."""
    if reason is None:
        await conn.execute("DELETE FROM notifier.parked WHERE stream_sequence = $1", sequence)
    else:
        await conn.execute("UPDATE notifier.parked SET reason = $2 WHERE stream_sequence = $1", sequence, reason)
