"""Feeding the projection from the event stream: live, and from the start for a rebuild.

Live: a durable pull consumer fetches batches; each batch is applied in one transaction with the
checkpoint and acknowledged after the commit (AckAll on the batch's last message). When the
database is unavailable the batch is kept, marked in progress and retried with backoff: it is
delayed, never dropped, and never overtaken by later events. At start the consumer is positioned
at the checkpoint + 1: the checkpoint in PostgreSQL is the position.

Rebuild: the stream read from the first event in large batches (services.common.replay). A read
model that is empty, or has more than half of a long stream still to apply (a database restored
from an old backup, a ledger down for long), is caught up by a rebuild before the live consumer
starts: at a million events a rebuild applies ~53,000-64,000 events a second on these machines
at their slowest (~0.6× nats-py's raw read), the live consumer's batches ~1,200-4,000. An empty
read model cannot say which submissions each county retracted: the rebuild reads them from the
retraction index, or, where there is none, ahead in the stream (:func:`foresee_retractions`).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterable, AsyncIterator, Collection, Iterable, Mapping, Sequence

import structlog
from nats.js import JetStreamContext

from contracts.events import IndexedRetraction
from contracts.subjects import EVENTS_ALL, EVENTS_STREAM, aggregate_subject
from services.common.consumer import Batch, follow
from services.common.jetstream import indexed_retractions, read_all, read_subjects, stored_retractions
from services.common.postgres import TRANSIENT_ERRORS
from services.ledger.projection import Key, LedgerProjection, RebuildResult, StoredMessage

log = structlog.get_logger(__name__)

DURABLE = "ledger"
# Events per fetch, and so per transaction. A batch writes each county it touches once: when the
# ledger is behind, larger batches write each state for more events (at a million events, 4,000
# appended a second: p99 append→queryable 3.3 s with 5,000, 8.0 s with 1,000). Once caught up a
# fetch returns what has arrived, so this is only the ceiling.
FETCH_BATCH = 5000
REBUILD_BATCH = 5000
FILL_BY_REBUILD_FROM = 10_000  # events behind: fewer are always left to the live consumer


async def supervise_live(
    js: JetStreamContext,
    projection: LedgerProjection,
    stop: asyncio.Event,
    pause: asyncio.Lock | None = None,
) -> None:
    """Apply events as they are appended, until ``stop`` is set (see services.common.consumer)."""
    await catch_up_by_rebuild(js, projection, pause)

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


def rebuild_to_catch_up(checkpoint: int, end: int) -> bool:
    """Whether a read model at ``checkpoint`` catches up to ``end`` faster by a rebuild: at least
    FILL_BY_REBUILD_FROM events behind, and empty or more than half of the stream behind. A
    rebuild reads every event, 15-40 times as fast as the live consumer applies them, but holds
    the read model's tables for its whole transaction (queries wait) and writes the whole log
    again: for a short lag the live consumer is the cheaper way."""
    behind = end - checkpoint
    return behind >= FILL_BY_REBUILD_FROM and (checkpoint == 0 or 2 * behind > end)


async def catch_up_by_rebuild(js: JetStreamContext, projection: LedgerProjection, pause: asyncio.Lock | None) -> None:
    """Rebuild the read model if that catches it up faster (``rebuild_to_catch_up``). A failure
    is logged and leaves the events to the live consumer."""
    try:
        end = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
        if not rebuild_to_catch_up(await projection.checkpoint(), end):
            return
        async with pause or asyncio.Lock():
            checkpoint = await projection.checkpoint()
            if not rebuild_to_catch_up(checkpoint, end):
                return  # an operator's rebuild got there first
            log.info("read model behind: catching up by a rebuild", checkpoint=checkpoint, events=end)
            result = await rebuild(js, projection, end)
        log.info("read model caught up by a rebuild", events=result.events, seconds=round(result.seconds, 2))
    except Exception:
        log.exception("catching up by a rebuild failed; the live consumer catches up instead")


async def rebuild(js: JetStreamContext, projection: LedgerProjection, end: int, index: bool = True) -> RebuildResult:
    """Rebuild the read model from the stream's first event to ``end``; counties to fold again
    are read again from their subjects. ``index`` False: an empty read model's retractions are
    read ahead in the stream even where the retraction index could say (to compare the two)."""

    async def reread(keys: Sequence[Key], upto: int) -> AsyncIterable[Sequence[tuple[int, bytes]]] | None:
        return await read_subjects(js, EVENTS_STREAM, EVENTS_ALL, {aggregate_subject(*key) for key in keys}, upto)

    async def foresee(upto: int) -> Mapping[Key, Collection[str]] | None:
        return await (foresee_retractions(js, upto) if index else read_retractions_ahead(js, upto))

    return await projection.rebuild(read_stream(js), expected_last=end, reread=reread, foresee=foresee)


async def foresee_retractions(js: JetStreamContext, upto: int) -> dict[Key, set[str]] | None:
    """What the stream's retractions up to ``upto`` retract, per county: from the retraction
    index when it covers the stream from its first event, otherwise from one quick pass over the
    events' bytes (only those that name the retraction's type are decoded). None where neither
    can be read. A retraction missed here (or named wrongly) only makes the rebuild fold its
    county again."""
    indexed = await indexed_retractions(js, upto)
    if indexed is None:
        return await read_retractions_ahead(js, upto)
    log.info("retractions foreseen from the retraction index", entries=len(indexed), upto=upto)
    return _per_county(indexed)


async def read_retractions_ahead(js: JetStreamContext, upto: int) -> dict[Key, set[str]] | None:
    """The retractions up to ``upto``, per county, from a pass over the event stream's bytes
    (1.8-3 s at a million events); None where the replay cannot read the stream."""
    found = await stored_retractions(js, upto)
    return None if found is None else _per_county(found)


def _per_county(retractions: Iterable[IndexedRetraction]) -> dict[Key, set[str]]:
    foreseen: defaultdict[Key, set[str]] = defaultdict(set)
    for entry in retractions:
        foreseen[(entry.programme_id, entry.county_code)].add(entry.retracted_submission_id)
    return dict(foreseen)


async def read_stream(js: JetStreamContext, batch_size: int = REBUILD_BATCH) -> AsyncIterator[list[tuple[int, bytes]]]:
    """Every event from the first to the last stored when called, in batches of (stream
    sequence, data), in order."""
    async for batch in read_all(js, EVENTS_STREAM, EVENTS_ALL, batch_size):
        yield batch
