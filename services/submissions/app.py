"""The submissions service on NATS: FastStream wiring only; the work is in SubmissionsService.

Request-reply on ``duban.submit.<role>.<county_code>`` in a queue group, so several instances
share the load. The body is handed over undecoded: the service decodes it strictly itself.
"""

from __future__ import annotations

from typing import Any

from faststream import FastStream
from faststream.message import StreamMessage
from faststream.nats import NatsBroker, NatsMessage

from contracts.commands import encode
from contracts.subjects import SUBMISSIONS_QUEUE, SUBMIT_PREFIX
from services.submissions.service import SubmissionsService

SUBMIT_PATTERN = SUBMIT_PREFIX + ".{role}.{county}"


async def _raw_body(message: StreamMessage[Any]) -> bytes:
    # FastStream would JSON-decode the body first; strict decoding is ours to do.
    return bytes(message.body)


def register(broker: NatsBroker, service: SubmissionsService, max_workers: int = 64) -> None:
    @broker.subscriber(
        SUBMIT_PATTERN,
        queue=SUBMISSIONS_QUEUE,
        decoder=_raw_body,
        max_workers=max_workers,
        title="submit",
        description="A county system or operator submits one command; the reply says what was stored.",
    )
    async def on_submission(body: bytes, message: NatsMessage) -> bytes:
        reply = await service.handle(message.raw_message.subject, body)
        return encode(reply)


async def start(broker: NatsBroker) -> None:
    """Start serving; returns once the server has registered the subscriptions."""
    await broker.start()
    await broker.connection.flush()


def build_app(broker: NatsBroker, service: SubmissionsService) -> FastStream:
    register(broker, service)
    return FastStream(broker)
