"""The notifier's outbox against the stream: every row explained by an action, every recorded
outcome matched by its row.

- a row whose action the stream does not hold (or holds for another county) is unexplained;
- a message the stream records as sent (``notification_sent``) must have its row, in state sent
  (a row deleted or set back to pending would be sent again).
The stream position is taken first and the outbox read in one snapshot after it, so an outcome
recorded after the position cannot be mistaken for a row that lags behind it. Nothing is written.
"""

from __future__ import annotations

import asyncpg
from nats.js import JetStreamContext

from contracts.audit import Break, ReadModelAudit
from contracts.events import ActionIssued, NotificationSent, decode_event
from contracts.subjects import ACTIONS_ALL, EVENTS_STREAM, NOTIFICATIONS_ALL
from services.common.jetstream import read_all

MAX_BREAKS = 1000


async def audit_outbox(pool: asyncpg.Pool, js: JetStreamContext) -> ReadModelAudit:
    position = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        checkpoint = int(await conn.fetchval("SELECT last_sequence FROM notifier.checkpoint") or 0)
        rows = await conn.fetch("SELECT message_id, action_id, programme_id, county_code, state FROM notifier.outbox")
    actions: dict[str, tuple[str, str]] = {}  # action id -> (programme, county) of its issue
    async for batch in read_all(js, EVENTS_STREAM, ACTIONS_ALL):
        for _, data in batch:
            envelope = decode_event(data)
            if isinstance(envelope.payload, ActionIssued):
                actions[envelope.payload.action_id] = (envelope.programme_id, envelope.county_code)
    sent: dict[str, int] = {}  # message id -> the sequence of its notification_sent
    async for batch in read_all(js, EVENTS_STREAM, NOTIFICATIONS_ALL):
        for sequence, data in batch:
            envelope = decode_event(data)
            if sequence <= position and isinstance(envelope.payload, NotificationSent):
                sent.setdefault(envelope.payload.message_id, sequence)
    breaks: list[Break] = []

    def add(kind: str, where: str, detail: str, sequence: int | None = None) -> None:
        if len(breaks) < MAX_BREAKS:
            breaks.append(Break(kind=kind, where=where, detail=detail, stream_sequence=sequence))

    by_id = {row["message_id"]: row for row in rows}
    for row in rows:
        where = f"notifier.outbox {row['message_id']}"
        issued = actions.get(row["action_id"])
        if issued is None:
            add("read_model_unexplained", where, f"no action {row['action_id']} was issued in the stream")
        elif issued != (row["programme_id"], row["county_code"]):
            add(
                "read_model_altered",
                where,
                f"action {row['action_id']} was issued for {issued}, the row says otherwise",
            )
    for message_id, sequence in sorted(sent.items(), key=lambda item: item[1]):
        kept = by_id.get(message_id)
        where = f"notifier.outbox {message_id}"
        if kept is None:
            add(
                "read_model_missing",
                where,
                f"the stream records it sent (sequence {sequence}); the row is gone",
                sequence,
            )
        elif kept["state"] == "pending":
            add(
                "read_model_altered",
                where,
                f"state is pending; the stream records it sent (sequence {sequence})",
                sequence,
            )
    return ReadModelAudit(
        read_model="notifier", checked_to=checkpoint, rows={"outbox": len(rows)}, breaks=tuple(breaks)
    )
