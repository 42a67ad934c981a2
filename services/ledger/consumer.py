"""Feeding the projection from the event stream: live, and from the start for a rebuild.

Live: a durable pull consumer fetches batches; each batch is applied in one transaction with the
checkpoint and acknowledged after the commit (AckAll on the batch's last message). When the
database is unavailable the batch is kept, marked in progress and retried with backoff: it is
delayed, never dropped, and never overtaken by later events. At start the consumer is positioned
at the checkpoint + 1: the checkpoint in PostgreSQL is the position.

Rebuild: the stream read from the first event in large batches (services.common.replay). An
empty read model with a long stream behind it is filled by a rebuild before the live consumer
starts: at a million events, about ten times as fast as the live consumer's batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Sequence

import structlog
from nats.js import JetStreamContext

from contracts.subjects import EVENTS_ALL, EVENTS_STREAM, aggregate_subject
from services.common.consumer import Batch, follow
from services.common.jetstream import read_all, read_subjects
from services.common.postgres import TRANSIENT_ERRORS
from services.ledger.projection import Key, LedgerProjection, RebuildResult, StoredMessage

log = structlog.get_logger(__name__)

DURABLE = "ledger"
FETCH_BATCH = 1000
REBUILD_BATCH = 5000
FILL_BY_REBUILD_FROM = 10_000  # events behind an empty read model: fewer are left to the live consumer


async def supervise_live(
    js: JetStreamContext,
    projection: LedgerProjection,
    stop: asyncio.Event,
    pause: asyncio.Lock | None = None,
) -> None:
    """Apply events as they are appended, until ``stop`` is set (see services.common.consumer)."""
    await fill_empty(js, projection, pause)

    async def apply(batch: Batch) -> None:
        await projection.apply_batch([StoredMessage(sequence, data) for sequence, data in batch])

    await follow(
        js,
        name=DURABLE,
        stream=EVENTS_STREAM,
        subject=EVENTS_ALL,
        checkpoint=projection.checkpoint,
        apply=apply,
        stop=stop,
        transient=TRANSIENT_ERRORS,  # a GapError makes the consumer start again from the checkpoint
        pause=pause,
        batch_size=FETCH_BATCH,
        park=projection.park,
    )


async def fill_empty(js: JetStreamContext, projection: LedgerProjection, pause: asyncio.Lock | None) -> None:
    """Rebuild an empty read model when the stream holds ``FILL_BY_REBUILD_FROM`` events or more.
    A failure is logged and leaves the events to the live consumer."""
    try:
        if await projection.checkpoint() > 0:
            return
        end = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
        if end < FILL_BY_REBUILD_FROM:
            return
        async with pause or asyncio.Lock():
            if await projection.checkpoint() > 0:
                return  # an operator's rebuild got there first
            log.info("empty read model: filling it by a rebuild", events=end)
            result = await rebuild(js, projection, end)
        log.info("empty read model filled", events=result.events, seconds=round(result.seconds, 2))
    except Exception:
        log.exception("filling the empty read model by a rebuild failed; the live consumer catches up instead")


async def rebuild(js: JetStreamContext, projection: LedgerProjection, end: int) -> RebuildResult:
    """Rebuild the read model from the stream's first event to ``end``; counties to fold again
    are read again from their subjects."""

    async def reread(keys: Sequence[Key], upto: int) -> AsyncIterable[Sequence[tuple[int, bytes]]] | None:
        return await read_subjects(js, EVENTS_STREAM, EVENTS_ALL, {aggregate_subject(*key) for key in keys}, upto)

    return await projection.rebuild(read_stream(js), expected_last=end, reread=reread)


async def read_stream(js: JetStreamContext, batch_size: int = REBUILD_BATCH) -> AsyncIterator[list[tuple[int, bytes]]]:
    """Every event from the first to the last stored when called, in batches of (stream
    sequence, data), in order."""
    async for batch in read_all(js, EVENTS_STREAM, EVENTS_ALL, batch_size):
        yield batch
