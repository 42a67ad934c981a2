"""Connecting to NATS and declaring the streams, the same way in every service and the CLI.

The event stream is the source of truth: file storage, kept forever (limits retention, no
max age), no deletes or purges, a duplicate window for Nats-Msg-Id, atomic batches for the
several events of one decision. ``sync_interval: always`` is set on the server (see
services.common.embedded), because acknowledged writes otherwise sit unsynced.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

from contracts.subjects import EVENTS_ALL, EVENTS_STREAM, REFUSALS_ALL, REFUSALS_STREAM

log = structlog.get_logger(__name__)

DUPLICATE_WINDOW_SECONDS = 10 * 60
MAX_EVENT_BYTES = 1024 * 1024
STREAM_EXISTS_WITH_OTHER_CONFIG = 10058


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
    ]


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """Create the streams, or bring an existing one's configuration up to date."""
    for config in stream_configs(replicas):
        try:
            await js.add_stream(config)
            log.info("stream ready", stream=config.name, replicas=replicas)
        except BadRequestError as exc:
            if exc.err_code != STREAM_EXISTS_WITH_OTHER_CONFIG:
                raise
            await js.update_stream(config)
            log.info("stream updated", stream=config.name, replicas=replicas)


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
    problems in the log. A command-line client passes a small number to fail fast."""

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
    nc = await nats.connect(url, **options)
    client.append(nc)
    return nc


async def read_all(
    js: JetStreamContext, stream: str, subject: str, batch_size: int = 5000
) -> AsyncIterator[list[tuple[int, bytes]]]:
    """Every message of ``subject`` stored in ``stream`` when called, in order, in batches of
    (stream sequence, data).

    A pull consumer (ephemeral, no acks): the server sends a batch only when asked for one, so a
    slow reader is never outrun — a push consumer would drop what exceeds its pending limit and
    only say so to the error callback.
    """
    info = await js.stream_info(stream)
    last = int(info.state.last_seq)
    if info.state.messages == 0:
        return
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60,
        ),
    )
    try:
        while True:
            try:
                messages = await sub.fetch(batch_size, timeout=2)
            except (NatsTimeoutError, TimeoutError):
                return  # nothing more on this subject up to the stream's end
            # Messages appended since the call are left for the caller's live consumer.
            batch = [(m.metadata.sequence.stream, m.data) for m in messages if m.metadata.sequence.stream <= last]
            if batch:
                yield batch
            if not batch or batch[-1][0] >= last or messages[-1].metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
