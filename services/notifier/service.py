"""The notifier application service: issued actions in, messages out, every outcome on record.

1. ``apply_batch``: for each issued action in the stream, plan the messages (pure planning) and
   write them to the outbox together with the consumer's checkpoint, in one transaction.
2. ``work_once``: lease the due rows, ask the delivery rules what to do (quiet hours, budget and
   digest, retry with backoff, fallback), send through the channel, write the outcome.
3. ``publish_events``: append the recorded outcomes to the event stream (queued, sent, failed),
   so a county's history shows who was told what, when, on which channel.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence

import asyncpg
import msgspec
import structlog
from nats.js import JetStreamContext

from contracts.directory import Directory
from contracts.events import (
    EVENT_SCHEMA_VERSIONS,
    ActionIssued,
    Actor,
    EventEnvelope,
    NotificationDelivered,
    NotificationFailed,
    NotificationQueued,
    NotificationRecorded,
    NotificationSent,
    decode_event,
    encode_event,
    event_type_of,
)
from contracts.notifier import NotifierStatus
from contracts.programme import Programme
from contracts.replies import ParkedEvent, ReplayParkedReport, parked_event
from contracts.subjects import EVENTS_STREAM, event_headers, notifications_subject
from services.common import metrics
from services.common.chain import ChainedPublisher
from services.common.clock import Clock
from services.common.postgres import Connection
from services.notifier import outbox
from services.notifier.channels.base import (
    Channel,
    DeliveryResult,
    OutboundMessage,
    Outcome,
    Receipt,
    mask_address,
)
from services.notifier.delivery import (
    Digest,
    Done,
    Fallback,
    GiveUp,
    HoldUntil,
    NotifierSettings,
    OutboxState,
    RetryAt,
    SendNow,
    day_bounds,
    digest,
    local_day,
    next_step,
)
from services.notifier.planning import plan

log = structlog.get_logger(__name__)
PROJECTION = "notifier"


class Notifier:
    def __init__(
        self,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        channels: Mapping[str, Channel],
        directory: Directory,
        settings: NotifierSettings,
        programmes: Mapping[str, Programme],
        clock: Clock,
    ) -> None:
        self._pool = pool
        self._js = js
        self._channels = channels
        self._directory = directory
        self._settings = settings
        self._programmes = programmes
        self._clock = clock
        self._publisher = ChainedPublisher(js)  # each county's notifications chained (contracts.audit)
        self.work_arrived = asyncio.Event()  # set when outbox rows are added: the sender need not poll

    # -- 1. planning ----------------------------------------------------------------------------
    async def checkpoint(self) -> int:
        async with self._pool.acquire() as conn:
            return await outbox.checkpoint(conn)

    async def status(self) -> NotifierStatus:
        async with self._pool.acquire() as conn:
            checkpoint = await outbox.checkpoint(conn)
            states = await outbox.state_counts(conn)
            unpublished = await outbox.unpublished_events(conn)
            due = await outbox.due_count(conn, self._clock.now())
        last = int((await self._js.stream_info(EVENTS_STREAM)).state.last_seq)
        return NotifierStatus(
            checkpoint=checkpoint,
            stream_last_sequence=last,
            outbox=states,
            channels=tuple(self._settings.channels),
            events_unpublished=unpublished,
            due_now=due,
        )

    async def apply_batch(self, batch: Sequence[tuple[int, bytes]]) -> int:
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            checkpoint = await outbox.checkpoint(conn)
            last = checkpoint
            for sequence, data in sorted(batch):
                if sequence <= checkpoint:
                    continue  # a redelivery changes nothing
                last = max(last, sequence)
                await self._plan(conn, data, now)
            if last > checkpoint:
                await outbox.set_checkpoint(conn, last)
        self.work_arrived.set()
        return last

    async def _plan(self, conn: Connection, data: bytes, now: dt.datetime) -> None:
        """An issued action's messages into the outbox (idempotent: message ids are deterministic)."""
        envelope = decode_event(data)
        if not isinstance(envelope.payload, ActionIssued):
            return
        programme = self._programmes.get(envelope.programme_id)
        county = programme.county(envelope.county_code) if programme else None
        if programme is None or county is None:
            return
        messages = plan(envelope.payload, programme.id, county.code, county.name, self._directory, self._settings)
        for message in await outbox.enqueue(conn, messages, envelope.payload.action_id, programme.id, county.code, now):
            await self._record(
                conn,
                NotificationQueued,
                message,
                envelope.payload.action_id,
                programme.id,
                county.code,
                attempt=0,
                now=now,
            )

    async def park(self, sequence: int, data: bytes, reason: str) -> None:
        """Keep an action that cannot be planned for ops, and move the checkpoint past it."""
        async with self._pool.acquire() as conn, conn.transaction():
            if sequence <= await outbox.checkpoint(conn):
                return
            await outbox.park(conn, sequence, data, reason)
            await outbox.set_checkpoint(conn, sequence)

    async def parked(self) -> list[ParkedEvent]:
        async with self._pool.acquire() as conn:
            rows = await outbox.parked(conn)
        return [
            parked_event(PROJECTION, r["stream_sequence"], bytes(r["data"]), r["reason"], r["parked_at"]) for r in rows
        ]

    async def replay_parked(self) -> ReplayParkedReport:
        """Plan the parked actions again (after a fix); each message is still sent at most once."""
        replayed: list[int] = []
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await outbox.parked(conn, lock=True)
            for row in rows:
                try:
                    async with conn.transaction():  # a savepoint: one failure leaves the others
                        await self._plan(conn, bytes(row["data"]), now)
                        await outbox.unpark(conn, row["stream_sequence"], None)
                    replayed.append(row["stream_sequence"])
                except Exception as exc:
                    await outbox.unpark(conn, row["stream_sequence"], f"{type(exc).__name__}: {exc}")
            remaining = len(rows) - len(replayed)
        self.work_arrived.set()
        return ReplayParkedReport(projection=PROJECTION, replayed=tuple(replayed), still_parked=remaining)

    # -- 2. sending -----------------------------------------------------------------------------
    async def work_once(self, limit: int = 50) -> int:
        """Send what is due now; returns the number of rows handled."""
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await outbox.claim_due(conn, now, limit)
        for row in rows:
            await self._work(row, now)
        return len(rows)

    async def _work(self, row: outbox.OutboxRow, now: dt.datetime) -> None:
        message = row.message
        sent_today = 0
        if message.channel in self._settings.budget_channels:  # only budgeted channels are counted
            async with self._pool.acquire() as conn:
                start, end = day_bounds(local_day(now, self._settings), self._settings)
                sent_today = await outbox.sms_sent_on(conn, message.recipient_id, start, end)
        state = OutboxState(
            message=message,
            action_id=row.action_id,
            queued_at=row.queued_at,
            attempts=row.attempts,
            last_outcome=row.last_outcome,
            sent_today=sent_today,
        )
        step = next_step(state, None, now, self._settings, self._directory)
        if isinstance(step, HoldUntil):
            await self._update(row, state="pending", outcome="held", detail=step.reason, at=step.at)
            return
        if isinstance(step, Digest):
            await self._fold_into_digest(row, step, now)
            return
        if not isinstance(step, SendNow):
            await self._update(
                row, state="sent" if isinstance(step, Done) else "failed", outcome="skipped", detail=step.reason
            )
            return
        channel = self._channels.get(message.channel)
        if channel is None:
            result = DeliveryResult(outcome=Outcome.REJECTED, detail=f"no {message.channel} channel configured")
        else:
            try:
                result = await channel.send(message)
            except Exception as exc:  # a channel bug must not stop the sender
                log.exception("channel failed", channel=message.channel)
                result = DeliveryResult(outcome=Outcome.TRANSIENT_ERROR, detail=type(exc).__name__)
        attempts = row.attempts + 1
        after = next_step(
            msgspec.structs.replace(state, attempts=attempts), result, now, self._settings, self._directory
        )

        async def write(conn: Connection) -> None:
            async def finish(state: str, at: dt.datetime | None = None) -> None:
                sent = state == "sent"
                await outbox.record_outcome(
                    conn,
                    message.message_id,
                    state=state,
                    attempts=attempts,
                    outcome=result.outcome.value,
                    detail=result.detail,
                    next_attempt_at=at,
                    provider_message_id=result.provider_message_id if sent else None,
                    sent_at=now if sent else None,
                )

            if isinstance(after, Done):
                await finish("sent")
                log.info(
                    "notification sent",
                    channel=message.channel,
                    recipient=message.recipient_id,
                    address=mask_address(message.address),
                )
                await self._record(
                    conn,
                    NotificationSent,
                    message,
                    row.action_id,
                    row.programme_id,
                    row.county_code,
                    attempt=attempts,
                    now=now,
                    provider_message_id=result.provider_message_id,
                )
            elif isinstance(after, RetryAt):
                await finish("pending", after.at)
            else:
                await finish("failed")
                await self._record(
                    conn,
                    NotificationFailed,
                    message,
                    row.action_id,
                    row.programme_id,
                    row.county_code,
                    attempt=attempts,
                    now=now,
                    detail=f"{result.detail} {after.reason}",
                )
                if isinstance(after, Fallback):
                    for fallback in await outbox.enqueue(
                        conn, [after.message], row.action_id, row.programme_id, row.county_code, now
                    ):
                        await self._record(
                            conn,
                            NotificationQueued,
                            fallback,
                            row.action_id,
                            row.programme_id,
                            row.county_code,
                            attempt=0,
                            now=now,
                            detail=f"fallback: {after.reason}",
                        )
                elif isinstance(after, GiveUp):
                    log.warning("notification given up", recipient=message.recipient_id, reason=after.reason)

        await self._write_outcome(write, message.message_id)

    async def _write_outcome(self, write: Callable[[Connection], Awaitable[None]], message_id: str) -> None:
        """Write a send's outcome, waiting (within half the lease) for a PostgreSQL that is briefly
        away: given up, the row's lease runs out and a message already sent is sent again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + outbox.LEASE.total_seconds() / 2
        delay = 0.2
        while True:
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    await write(conn)  # idempotent: a commit whose answer was lost changes nothing again
                return
            except Exception as exc:  # also asyncpg's InternalClientError on a connection broken mid-query
                if loop.time() + delay > deadline:
                    raise
                log.warning("outcome not written yet; retrying", message_id=message_id, error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _fold_into_digest(self, row: outbox.OutboxRow, step: Digest, now: dt.datetime) -> None:
        """Over budget: this message joins the recipient's digest for the day instead of being lost."""
        async with self._pool.acquire() as conn, conn.transaction():
            await outbox.record_outcome(
                conn,
                row.message.message_id,
                state="digested",
                attempts=row.attempts,
                outcome="digested",
                detail=step.key,
                next_attempt_at=None,
                provider_message_id=None,
                sent_at=None,
            )
            members = await conn.fetch(
                "SELECT message FROM notifier.outbox WHERE state = 'digested' AND last_detail = $1 ORDER BY queued_at",
                step.key,
            )
            folded = [msgspec.json.decode(r["message"], type=OutboundMessage) for r in members]
            summary = digest(folded, step.recipient_id, step.day, self._settings)
            # The digest so far gives way to the digest with this message in it (same key).
            await conn.execute("DELETE FROM notifier.outbox WHERE action_id = $1 AND state = 'pending'", step.key)
            await outbox.enqueue(
                conn, [summary], step.key, row.programme_id, row.county_code, now, send_at=step.send_at
            )

    async def _update(
        self, row: outbox.OutboxRow, *, state: str, outcome: str, detail: str, at: dt.datetime | None = None
    ) -> None:
        async with self._pool.acquire() as conn:
            await outbox.record_outcome(
                conn,
                row.message.message_id,
                state=state,
                attempts=row.attempts,
                outcome=outcome,
                detail=detail,
                next_attempt_at=at,
                provider_message_id=None,
                sent_at=None,
            )

    # -- delivery receipts ------------------------------------------------------------------------
    async def pull_receipts(self) -> int:
        """Ask the channels for delivery reports and record them: Tencent hands out new reports
        (PullSmsSendStatus); Aliyun is asked per SMS sent in the last days (QuerySendDetails)."""
        receipts: list[Receipt] = []
        for channel in self._channels.values():
            pull = getattr(channel, "pull_receipts", None)
            if pull is not None:
                receipts.extend(await pull())
            query = getattr(channel, "query_receipt", None)
            if query is not None:
                async with self._pool.acquire() as conn:
                    rows = await conn.fetch(
                        "SELECT message, provider_message_id, sent_at FROM notifier.outbox WHERE channel = $1"
                        " AND state = 'sent' AND receipt IS NULL AND provider_message_id IS NOT NULL"
                        " AND sent_at > $2 ORDER BY sent_at LIMIT 100",
                        channel.kind,
                        self._clock.now() - dt.timedelta(days=3),
                    )
                for row in rows:
                    message = msgspec.json.decode(row["message"], type=OutboundMessage)
                    sent_on = local_day(row["sent_at"], self._settings)
                    receipt = await query(message.message_id, message.address, row["provider_message_id"], sent_on)
                    if receipt is not None:
                        receipts.append(receipt)
        return await self.record_receipts(receipts)

    async def record_receipts(self, receipts: Sequence[Receipt]) -> int:
        """Record each report of one of our messages as delivered or failed; unknown ids are ignored."""
        now = self._clock.now()
        recorded = 0
        async with self._pool.acquire() as conn, conn.transaction():
            for receipt in receipts:
                row = await conn.fetchrow(
                    "UPDATE notifier.outbox SET receipt = $2 WHERE message_id = $1 AND receipt IS NULL"
                    " RETURNING message, action_id, programme_id, county_code, attempts",
                    receipt.message_id,
                    "delivered" if receipt.delivered else "failed",
                )
                if row is None:
                    continue  # not ours, or reported before: recorded once
                message = msgspec.json.decode(row["message"], type=OutboundMessage)
                kind = NotificationDelivered if receipt.delivered else NotificationFailed
                await self._record(
                    conn,
                    kind,
                    message,
                    row["action_id"],
                    row["programme_id"],
                    row["county_code"],
                    attempt=row["attempts"],
                    now=now,
                    detail=receipt.detail,
                    provider_message_id=receipt.provider_message_id,
                )
                recorded += 1
                if not receipt.delivered:
                    await self._fall_back_after_receipt(conn, message, row, receipt, now)
        return recorded

    async def _fall_back_after_receipt(
        self, conn: Connection, message: OutboundMessage, row: asyncpg.Record, receipt: Receipt, now: dt.datetime
    ) -> None:
        """Accepted but not delivered (phone off, number gone): the same fallback as a permanent
        failure when sending (SMS -> e-mail -> the person's backup)."""
        state = OutboxState(message=message, action_id=row["action_id"], queued_at=now, attempts=row["attempts"])
        failure = DeliveryResult(outcome=Outcome.INVALID_RECIPIENT, detail=receipt.detail)
        step = next_step(state, failure, now, self._settings, self._directory)
        if not isinstance(step, Fallback):
            return
        ids = (row["action_id"], row["programme_id"], row["county_code"])
        for fallback in await outbox.enqueue(conn, [step.message], *ids, now):
            await self._record(
                conn, NotificationQueued, fallback, *ids, attempt=0, now=now, detail=f"fallback: {step.reason}"
            )

    # -- 3. the record --------------------------------------------------------------------------
    async def _record(
        self,
        conn: Connection,
        kind: type[NotificationRecorded],
        message: OutboundMessage,
        action_id: str,
        programme_id: str,
        county_code: str,
        *,
        attempt: int,
        now: dt.datetime,
        detail: str = "",
        provider_message_id: str | None = None,
    ) -> None:
        payload = kind(
            message_id=message.message_id,
            action_id=action_id,
            recipient_id=message.recipient_id,
            channel=message.channel,
            attempt=attempt,
            address_masked=mask_address(message.address),
            detail=detail,
            provider_message_id=provider_message_id,
        )
        event_type = event_type_of(payload)  # type: ignore[arg-type]
        metrics.NOTIFICATIONS.labels(channel=message.channel, outcome=event_type.removeprefix("notification_")).inc()
        event_id = f"{message.message_id}:{event_type}:{attempt}"
        envelope = EventEnvelope(
            event_id=event_id,
            schema_version=EVENT_SCHEMA_VERSIONS[event_type],
            programme_id=programme_id,
            county_code=county_code,
            occurred_at=now,
            recorded_at=now,
            actor=Actor(role="system", user="notifier"),
            submission_id=hashlib.sha256(event_id.encode()).hexdigest()[:40],
            submission_digest="",
            causation_id=action_id,
            correlation_id=action_id,
            payload=payload,  # type: ignore[arg-type]
        )
        await outbox.add_event(conn, event_id, notifications_subject(programme_id, county_code), encode_event(envelope))

    async def publish_events(self) -> int:
        """Append recorded outcomes to the stream; returns how many."""
        async with self._pool.acquire() as conn:
            pending = await outbox.pending_events(conn)
        for event_id, subject, data in pending:
            envelope = decode_event(data)
            headers = event_headers(event_id, envelope.event_type, envelope.correlation_id)
            await self._publisher.publish(subject, data, headers)
        if pending:
            async with self._pool.acquire() as conn:
                await outbox.forget_events(conn, [e for e, _, _ in pending])
        return len(pending)
