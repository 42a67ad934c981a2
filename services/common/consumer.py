"""Following the event stream into a PostgreSQL-backed projection: the one loop every projection
(ledger, notifier) uses.

A durable pull consumer is positioned at the projection's checkpoint + 1 (the checkpoint in
PostgreSQL is the position, not the broker's state). Each fetched batch goes to ``apply``, which
commits it together with the checkpoint; the batch is acknowledged after that (AckAll on its
last message). When ``apply`` fails with a transient error the batch is kept, marked in progress
and retried with backoff: delayed, never dropped, never overtaken by later events. Any other
failure restarts the loop from the checkpoint, logged, so a projection never silently stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

import structlog
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from services.common import metrics
from services.common.jetstream import delivery_sequence, stream_sequence

log = structlog.get_logger(__name__)

Batch = Sequence[tuple[int, bytes]]
Park = Callable[[int, bytes, str], Awaitable[None]]


class Reposition(Exception):
    """The consumer must start again from the checkpoint: deliveries were lost on the way (after a
    reconnect the server counts them as delivered; acknowledging later ones would acknowledge
    them too), or the projection found a gap. Retrying the same batch would never fill it."""


POISON_ATTEMPTS = 3  # tries of an event alone before it is parked


async def follow(
    js: JetStreamContext,
    *,
    name: str,
    stream: str,
    subject: str,
    checkpoint: Callable[[], Awaitable[int]],
    apply: Callable[[Batch], Awaitable[object]],
    stop: asyncio.Event,
    transient: tuple[type[BaseException], ...] = (Exception,),
    pause: asyncio.Lock | None = None,
    batch_size: int = 1000,
    park: Park | None = None,
) -> None:
    """Run ``name``'s projection until ``stop`` is set, restarting from the checkpoint on failure.

    A batch that fails with a ``transient`` error is kept and retried. One that fails otherwise
    is taken apart: each event is applied alone, up to POISON_ATTEMPTS times, and an event that
    still fails is handed to ``park`` (which records it for ops and moves the checkpoint past
    it, in one transaction), so one poison event does not stop the projection.
    """
    delay = 0.5
    while not stop.is_set():
        try:
            await _follow_once(js, name, stream, subject, checkpoint, apply, stop, transient, pause, batch_size, park)
        except asyncio.CancelledError:
            raise
        except Reposition as exc:
            log.warning("consumer starts again from the checkpoint", consumer=name, reason=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
            continue
        except Exception:
            log.exception("consumer failed; restarting from the checkpoint", consumer=name, retry_in=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 10.0)


async def _follow_once(
    js: JetStreamContext,
    name: str,
    stream: str,
    subject: str,
    checkpoint: Callable[[], Awaitable[int]],
    apply: Callable[[Batch], Awaitable[object]],
    stop: asyncio.Event,
    transient: tuple[type[BaseException], ...],
    pause: asyncio.Lock | None,
    batch_size: int,
    park: Park | None,
) -> None:
    start = await checkpoint() + 1
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(stream, name)
    sub = await js.pull_subscribe(
        subject,
        durable=name,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=AckPolicy.ALL,
            ack_wait=60,
            max_ack_pending=batch_size * 2,
        ),
    )
    log.info("consuming", consumer=name, from_sequence=start)
    lock = pause or asyncio.Lock()
    applied, position = metrics.EVENTS_APPLIED.labels(consumer=name), metrics.CHECKPOINT.labels(consumer=name)
    next_delivery = 1  # a new consumer delivers 1, 2, 3…
    try:
        while not stop.is_set():
            try:
                messages = await sub.fetch(batch_size, timeout=0.5)
            except (NatsTimeoutError, TimeoutError):
                continue
            if not messages:  # a status message (a pull request expiring) carries no events
                continue
            for m in messages:
                delivered = delivery_sequence(m)
                if delivered != next_delivery:
                    raise Reposition(f"deliveries {next_delivery}..{delivered - 1} did not arrive")
                next_delivery = delivered + 1
            batch = [(stream_sequence(m), m.data) for m in messages]
            delay = 0.2
            while True:
                try:
                    async with lock:
                        await apply(batch)
                    break
                except Reposition:
                    raise
                except transient as exc:
                    # Keep the batch; tell the server we are still on it; try again.
                    log.warning("batch delayed", consumer=name, error=str(exc), first=batch[0][0], retry_in=delay)
                    for m in messages:
                        with contextlib.suppress(Exception):
                            await m.in_progress()
                    if stop.is_set():
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                except Exception as exc:
                    if park is None:
                        raise
                    log.warning("batch failed; applying its events one by one", consumer=name, error=repr(exc))
                    async with lock:
                        await _isolate(name, batch, apply, park, transient)
                    break
            await messages[-1].ack()
            applied.inc(len(batch))
            position.set(batch[-1][0])
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _isolate(
    name: str,
    batch: Batch,
    apply: Callable[[Batch], Awaitable[object]],
    park: Park,
    transient: tuple[type[BaseException], ...],
) -> None:
    """Apply each event alone; park the ones that keep failing (not for a transient error)."""
    for sequence, data in batch:
        for attempt in range(1, POISON_ATTEMPTS + 1):
            try:
                await apply([(sequence, data)])
                break
            except Reposition:
                raise
            except transient:
                raise  # the database went away meanwhile: the caller starts over from the checkpoint
            except Exception as exc:
                if attempt < POISON_ATTEMPTS:
                    await asyncio.sleep(0.1 * attempt)
                    continue
                log.error("event parked", consumer=name, stream_sequence=sequence, error=repr(exc), attempts=attempt)
                metrics.PARKED.labels(consumer=name).inc()
                await park(sequence, data, f"{type(exc).__name__}: {exc}")
