"""Feeding the projection from the event stream: live, and from the start for a rebuild.

Live: a durable pull consumer fetches batches; each batch is applied in one transaction with the
checkpoint and acknowledged after the commit (AckAll on the batch's last message). When the
database is unavailable the batch is kept, marked in progress and retried with backoff: it is
delayed, never dropped, and never overtaken by later events. At start the consumer is positioned
at the checkpoint + 1: the checkpoint in PostgreSQL is the position.

Rebuild: an ordered consumer reads the stream from the first event in large batches.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import structlog
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from contracts.subjects import EVENTS_ALL, EVENTS_STREAM
from services.common.jetstream import read_all
from services.ledger.projection import GapError, LedgerProjection, StoredMessage

log = structlog.get_logger(__name__)

DURABLE = "ledger"
FETCH_BATCH = 1000
REBUILD_BATCH = 5000


async def supervise_live(
    js: JetStreamContext,
    projection: LedgerProjection,
    stop: asyncio.Event,
    pause: asyncio.Lock | None = None,
) -> None:
    """Keep the live consumer running: an unexpected failure is logged and the loop restarted
    from the checkpoint, so the ledger never silently stops following the stream."""
    delay = 0.5
    while not stop.is_set():
        try:
            await run_live(js, projection, stop, pause)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("ledger consumer failed; restarting from the checkpoint", retry_in=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 10.0)


async def run_live(
    js: JetStreamContext,
    projection: LedgerProjection,
    stop: asyncio.Event,
    pause: asyncio.Lock | None = None,
    applied: asyncio.Condition | None = None,
) -> None:
    """Apply events as they are appended, until ``stop`` is set."""
    checkpoint = await projection.checkpoint()
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(EVENTS_STREAM, DURABLE)
    sub = await js.pull_subscribe(
        EVENTS_ALL,
        durable=DURABLE,
        stream=EVENTS_STREAM,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=checkpoint + 1,
            ack_policy=AckPolicy.ALL,
            ack_wait=60,
            max_ack_pending=FETCH_BATCH * 2,
        ),
    )
    log.info("ledger consuming", from_sequence=checkpoint + 1)
    lock = pause or asyncio.Lock()
    while not stop.is_set():
        try:
            messages = await sub.fetch(FETCH_BATCH, timeout=0.5)
        except (NatsTimeoutError, TimeoutError):
            continue
        if not messages:  # a status message (e.g. a pull request expiring) carries no events
            continue
        batch = [StoredMessage(m.metadata.sequence.stream, m.data) for m in messages]
        delay = 0.2
        while True:
            try:
                async with lock:
                    await projection.apply_batch(batch)
                break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, GapError) as exc:
                # Keep the batch; tell the server we are still on it; try again.
                log.warning("ledger batch delayed", error=str(exc), first=batch[0].sequence, retry_in=delay)
                for m in messages:
                    with contextlib.suppress(Exception):
                        await m.in_progress()
                if stop.is_set():
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        await messages[-1].ack()
        if applied is not None:
            async with applied:
                applied.notify_all()
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


async def read_stream(js: JetStreamContext, batch_size: int = REBUILD_BATCH) -> AsyncIterator[list[StoredMessage]]:
    """Every event from the first to the last stored when called, in batches, in order."""
    async for batch in read_all(js, EVENTS_STREAM, EVENTS_ALL, batch_size):
        yield [StoredMessage(sequence, data) for sequence, data in batch]
