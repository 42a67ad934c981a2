"""Connecting to NATS and declaring the streams, the same way in every service and the CLI.

The event stream is the source of truth: file storage, kept forever (limits retention, no
max age), no deletes or purges, a duplicate window for Nats-Msg-Id, atomic batches for the
several events of one decision. ``sync_interval: always`` is set on the server (see
services.common.embedded), because acknowledged writes otherwise sit unsynced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from typing import Any, TypeVar

import msgspec
import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from contracts.events import EventEnvelope, IndexedRetraction, SubmissionRetracted, decode_event, indexed_retraction
from contracts.subjects import (
    AUDIT_ALL,
    AUDIT_STREAM,
    EVENTS_ALL,
    EVENTS_STREAM,
    REFUSALS_ALL,
    REFUSALS_STREAM,
    RETRACTIONS_ALL,
    RETRACTIONS_COVER_FROM,
    RETRACTIONS_STREAM,
    retractions_subject,
)
from services.common.replay import lean_endpoint, replay

log = structlog.get_logger(__name__)
T = TypeVar("T")

DUPLICATE_WINDOW_SECONDS = 10 * 60
MAX_EVENT_BYTES = 1024 * 1024
STREAM_EXISTS_WITH_OTHER_CONFIG = 10058


def stream_names() -> tuple[str, ...]:
    """Every stream duban declares (a test's fresh start deletes them all)."""
    return tuple(str(config.name) for config in stream_configs())


def stream_configs(replicas: int = 1) -> list[StreamConfig]:
    common: dict[str, Any] = {
        "retention": RetentionPolicy.LIMITS,
        "storage": StorageType.FILE,
        "discard": DiscardPolicy.NEW,  # never silently drop the oldest facts
        "max_age": 0,
        "max_msgs": -1,
        "max_bytes": -1,
        "max_msg_size": MAX_EVENT_BYTES,
        "num_replicas": replicas,
        "deny_delete": True,
        "deny_purge": True,
        "duplicate_window": DUPLICATE_WINDOW_SECONDS,
        "allow_direct": True,
    }
    return [
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=[EVENTS_ALL],
            description="duban domain events: one subject per programme and county",
            allow_atomic=True,
            **common,
        ),
        StreamConfig(
            name=REFUSALS_STREAM,
            subjects=[REFUSALS_ALL],
            description="duban refused submissions, kept so nothing a county sent is lost",
            **common,
        ),
        StreamConfig(
            name=RETRACTIONS_STREAM,
            subjects=[RETRACTIONS_ALL],
            description="duban retraction index: one entry per retraction in DUBAN_EVENTS, for rebuilds",
            **common,
        ),
        StreamConfig(
            name=AUDIT_STREAM,
            subjects=[AUDIT_ALL],
            description="duban audit checkpoints: signed heads of every event chain (contracts.audit)",
            **common,
        ),
    ]


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """Create the streams, or bring an existing one's configuration up to date."""
    for config in stream_configs(replicas):
        if config.name == RETRACTIONS_STREAM:
            config = await _with_coverage(js, config)
        try:
            await js.add_stream(config)
            log.info("stream ready", stream=config.name, replicas=replicas)
        except BadRequestError as exc:
            if exc.err_code != STREAM_EXISTS_WITH_OTHER_CONFIG:
                raise
            await js.update_stream(config)
            log.info("stream updated", stream=config.name, replicas=replicas)


async def _with_coverage(js: JetStreamContext, config: StreamConfig) -> StreamConfig:
    """The retraction index's configuration with the first event sequence it covers: the one it
    was created with, or, for a new index, the event stream's next sequence (1 on a new
    deployment; later on a stream whose earlier retractions were never indexed)."""
    try:
        metadata = (await js.stream_info(RETRACTIONS_STREAM)).config.metadata or {}
        start = metadata.get(RETRACTIONS_COVER_FROM)
    except NotFoundError:
        start = None
    if start is None:
        start = str((await js.stream_info(EVENTS_STREAM)).state.last_seq + 1)
    return dataclasses.replace(config, metadata={**(config.metadata or {}), RETRACTIONS_COVER_FROM: start})


async def index_retractions(js: JetStreamContext, stored: Iterable[tuple[EventEnvelope, int]]) -> int:
    """Add the retractions among these stored events (envelope, stream sequence) to the
    retraction index; returns how many. Raises what publishing raises; the index is a hint, so
    the caller logs and carries on."""
    return await _add_to_index(
        js, (entry for envelope, sequence in stored if (entry := indexed_retraction(envelope, sequence)) is not None)
    )


async def _add_to_index(js: JetStreamContext, entries: Iterable[IndexedRetraction]) -> int:
    # Once each: the entry's Nats-Msg-Id is its event's id.
    count = 0
    for entry in entries:
        await js.publish(
            retractions_subject(entry.programme_id, entry.county_code),
            _index_encoder.encode(entry),
            headers={"Nats-Msg-Id": entry.event_id},
        )
        count += 1
    return count


_index_encoder = msgspec.json.Encoder()
_index_decoder = msgspec.json.Decoder(IndexedRetraction)


async def indexed_retractions(js: JetStreamContext, upto: int) -> list[IndexedRetraction] | None:
    """The retraction index's entries for the event stream's sequences up to ``upto``; None
    where there is no index, or it does not cover the stream from its first event (the caller
    finds the retractions another way). An entry that does not decode is left out (a hint)."""
    try:
        info = await js.stream_info(RETRACTIONS_STREAM)
    except NotFoundError:
        return None
    if (info.config.metadata or {}).get(RETRACTIONS_COVER_FROM) != "1":
        return None
    return [entry for entry in await _index_entries(js) if entry.stream_sequence <= upto]


async def _index_entries(js: JetStreamContext) -> list[IndexedRetraction]:
    entries: list[IndexedRetraction] = []
    async for batch in read_all(js, RETRACTIONS_STREAM, RETRACTIONS_ALL):
        for _, data in batch:
            try:
                entries.append(_index_decoder.decode(data))
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("retraction index entry left out: it does not decode", data=data[:200])
    return entries


async def complete_retraction_index(js: JetStreamContext) -> int | None:
    """Index the retractions stored before the retraction index was created (a deployment that
    had events before it had the index), then mark the index as covering the event stream from
    its first event, so that rebuilds take it. Returns how many entries it added; None where the
    index already covers the stream, or the event stream cannot be read this way (nothing
    changes: rebuilds read the retractions ahead, as before). Run again after a stop part way,
    it adds only what is missing."""
    info = await js.stream_info(RETRACTIONS_STREAM)
    metadata = info.config.metadata or {}
    covers_from = int(metadata.get(RETRACTIONS_COVER_FROM, "1"))
    if covers_from <= 1:
        return None
    upto = min(covers_from - 1, (await js.stream_info(EVENTS_STREAM)).state.last_seq)
    found = await stored_retractions(js, upto) if upto else []
    if found is None:
        return None
    known = {entry.event_id for entry in await _index_entries(js)}
    added = await _add_to_index(js, (entry for entry in found if entry.event_id not in known))
    # The server's own metadata (_nats.*) is its to set.
    ours = {key: value for key, value in metadata.items() if not key.startswith("_nats.")}
    await js.update_stream(dataclasses.replace(info.config, metadata={**ours, RETRACTIONS_COVER_FROM: "1"}))
    log.info("retraction index completed", added=added, read_upto=upto, covered_from_before=covers_from)
    return added


RETRACTION_TYPE = str(SubmissionRetracted.__struct_config__.tag).encode()


async def stored_retractions(js: JetStreamContext, upto: int) -> list[IndexedRetraction] | None:
    """The retractions in the event stream up to ``upto``, as the index's entries would say
    them, from one quick pass over the stream's bytes (1.8-3 s at a million events): only the
    messages that name the retraction's type are decoded. None where the replay cannot read the
    stream."""
    # Those that name the type are handed out: its type, or a text that mentions it (decoding tells).
    events = await read_subjects(js, EVENTS_STREAM, EVENTS_ALL, None, upto, select=RETRACTION_TYPE)
    if events is None:
        return None
    found: list[IndexedRetraction] = []
    async for batch in events:
        for sequence, data in batch:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                if (entry := indexed_retraction(decode_event(data), sequence)) is not None:
                    found.append(entry)
    return found


async def connect(
    url: str,
    *,
    name: str,
    user: str | None = None,
    password: str | None = None,
    inbox_prefix: str | None = None,
    connect_timeout: float = 5.0,
    reconnect_attempts: int = -1,
) -> NatsClient:
    """A connection that reconnects by itself (``-1``: forever, for services) and reports
    problems in the log. A command-line client passes a small number to fail fast. ``url`` may
    name several servers of a cluster, comma-separated."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", connection=name, error=str(exc))

    client: list[NatsClient] = []

    async def on_disconnected() -> None:
        if client and (client[0].is_closed or client[0].is_draining):
            return  # our own close, not a fault
        log.warning("nats disconnected", connection=name)

    async def on_reconnected() -> None:
        log.info("nats reconnected", connection=name)

    options: dict[str, Any] = {
        "name": name,
        "connect_timeout": connect_timeout,
        "max_reconnect_attempts": reconnect_attempts,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
    }
    if user is not None:
        options["user"], options["password"] = user, password
    if inbox_prefix is not None:
        options["inbox_prefix"] = inbox_prefix
    # NATS_URL may list a cluster's servers, comma-separated (nats-py wants a list for that).
    servers = [u.strip() for u in url.split(",") if u.strip()]
    nc = await nats.connect(servers, **options)
    client.append(nc)
    return nc


def stream_sequence(msg: Msg) -> int:
    """The message's stream sequence from its ack subject, without building nats-py's metadata
    objects (a third of the reading cost when a projection replays millions of events)."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>
        return int(tokens[5])
    return int(msg.metadata.sequence.stream)  # the longer form, with domain and account


def delivery_sequence(msg: Msg) -> int:
    """The consumer's delivery sequence of the message: 1, 2, 3… for a new consumer; a jump
    means deliveries were lost on the way (a connection dropped with messages in flight)."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:
        return int(tokens[6])
    return int(msg.metadata.sequence.consumer)


async def read_all(
    js: JetStreamContext, stream: str, subject: str, batch_size: int = 5000, idle_timeout: float = 30.0
) -> AsyncIterator[list[tuple[int, bytes]]]:
    """Every message of ``subject`` stored in ``stream`` when called, in order, in batches of
    (stream sequence, data).

    Through services.common.replay (a connection of its own that splits the frames itself, five
    times nats-py's rate) where it speaks the connection's auth; otherwise through nats-py's
    ordered consumer (see :func:`_read`). Both are lossless and restart on a gap.
    """
    last = await _last_sequence(js, stream, subject)
    if not last:
        return
    nc: NatsClient = js._nc  # nats-py keeps the connection there; the replay needs its server and inbox prefix
    if lean_endpoint(nc) is not None:
        async for batch in replay(js, nc, None, stream, subject, last, batch_size, idle_timeout):
            yield batch
        return
    async for batch in _read(js, stream, subject, last, _sequence_and_data, batch_size, idle_timeout):
        yield batch


async def read_subjects(
    js: JetStreamContext,
    stream: str,
    subject: str,
    keep: Collection[str] | None,
    upto: int,
    batch_size: int = 5000,
    select: bytes | None = None,
) -> AsyncIterator[list[tuple[int, bytes]]] | None:
    """The messages of the subjects ``keep`` (None: all) of those ``subject`` matches, up to sequence
    ``upto`` (a message of ``subject``), interleaved in stream order, in batches of (stream
    sequence, data), through the replay; with ``select``, only those whose data contain these
    bytes. None where the replay does not speak the connection's auth (the caller reads another
    way)."""
    nc: NatsClient = js._nc
    if lean_endpoint(nc) is None:
        return None
    return replay(js, nc, None, stream, subject, upto, batch_size, idle_timeout=30.0, keep=keep, select=select)


async def read_messages(
    js: JetStreamContext, stream: str, subject: str, batch_size: int = 2000, idle_timeout: float = 30.0
) -> AsyncIterator[list[tuple[int, Msg]]]:
    """Like :func:`read_all`, but the whole messages (subject, headers, data), for a reader that
    needs more than the bytes (``duban audit verify`` reads the chain headers)."""
    last = await _last_sequence(js, stream, subject)
    if not last:
        return
    async for batch in _read(js, stream, subject, last, _sequence_and_message, batch_size, idle_timeout):
        yield batch


def _sequence_and_data(sequence: int, msg: Msg) -> tuple[int, bytes]:
    return sequence, msg.data


def _sequence_and_message(sequence: int, msg: Msg) -> tuple[int, Msg]:
    return sequence, msg


async def _last_sequence(js: JetStreamContext, stream: str, subject: str) -> int:
    """The stream sequence of the last message of ``subject`` now (0: none)."""
    try:
        return int((await js.get_last_msg(stream, subject)).seq or 0)
    except NotFoundError:
        return 0


async def _read(
    js: JetStreamContext,
    stream: str,
    subject: str,
    last: int,
    take: Callable[[int, Msg], tuple[int, T]],
    batch_size: int,
    idle_timeout: float,
) -> AsyncIterator[list[tuple[int, T]]]:
    """nats-py's ordered push consumer with a callback: lossless, because the callback waits
    while the bounded queue of batches is full and nats-py answers the server's flow control only
    once the messages before it went through the callback, so a slow reader holds the server back
    (the ordered consumer also restarts itself at the last sequence it saw on any gap)."""
    batches: asyncio.Queue[list[tuple[int, T]]] = asyncio.Queue(maxsize=4)
    batch: list[tuple[int, T]] = []

    async def on_msg(msg: Msg) -> None:
        nonlocal batch
        sequence = stream_sequence(msg)
        if sequence > last:
            return  # appended since the call: left for the caller's live consumer
        batch.append(take(sequence, msg))
        if len(batch) >= batch_size or sequence == last:
            full, batch = batch, []
            await batches.put(full)

    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, cb=on_msg)
    try:
        while True:
            full = await asyncio.wait_for(batches.get(), idle_timeout)
            yield full
            if full[-1][0] >= last:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
