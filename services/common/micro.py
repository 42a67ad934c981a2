"""Every duban service is a NATS micro service, declared one way.

`nats micro ls|info|stats` list each service with its endpoints; each endpoint takes JSON and
answers JSON indented for a person at a terminal (`nats req` prints it as it comes). A bad
request, a refusal by the service and an internal failure each answer with the NATS service
error headers (``Nats-Service-Error-Code``, ``Nats-Service-Error``) and a body in the service's
error type (code, message in Chinese and English, detail).

nats-py runs a subscription's callbacks one after another; an endpoint that waits on I/O per
request (submissions append to JetStream) asks for ``concurrency`` > 1 and its requests run as
tasks, bounded, and finished before the service stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import structlog
from nats.aio.client import Client as NatsClient
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from contracts.payloads import decode_json
from services.common import metrics

log = structlog.get_logger(__name__)
Q = TypeVar("Q")
Handler = Callable[[Request], Awaitable[None]]


# The service's error answer: a struct with code, message_zh, message_en and detail.
ErrorType = type[msgspec.Struct]


class EndpointFailure(Exception):
    """Raised by an endpoint's answer: the request is understood and refused (``status`` is the
    NATS service error code, HTTP-like: 400, 404, 409, 503)."""

    def __init__(self, code: str, zh: str, en: str, detail: str = "", status: str = "409") -> None:
        super().__init__(en)
        self.code, self.zh, self.en, self.detail, self.status = code, zh, en, detail, status


def readable_json(value: Any) -> bytes:
    """JSON a person can read in a terminal: indented, Chinese as is."""
    return msgspec.json.format(msgspec.json.encode(value), indent=2)


@dataclass(frozen=True)
class BytesAnswer:
    """An answer of raw bytes with headers of its own (a file and its signature)."""

    data: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Endpoint:
    name: str
    subject: str
    handler: Handler
    concurrency: int = 1


def json_endpoint(
    name: str,
    subject: str,
    query_type: type[Q],
    answer: Callable[[Q], Awaitable[Any]],
    error: ErrorType,
    *,
    concurrency: int = 1,
    content_type: str | None = None,
) -> Endpoint:
    """An endpoint that decodes ``query_type`` (an empty body: its defaults), awaits ``answer``
    and responds with its result as readable JSON, or with raw bytes when it answers bytes
    (``content_type`` then names them)."""
    decoder = msgspec.json.Decoder(query_type)

    async def handle(request: Request) -> None:
        try:
            query = decode_json(decoder, request.data or b"{}")  # (invalid UTF-8 too: a DecodeError)
        except msgspec.ValidationError as exc:
            await _fail(request, error, _bad_request("请求格式错误", "malformed request", str(exc)))
            return
        except msgspec.DecodeError as exc:
            await _fail(request, error, _bad_request("请求不是合法的JSON", "the request is not JSON", str(exc)))
            return
        try:
            result = await answer(query)
        except EndpointFailure as failure:
            await _fail(request, error, failure)
            return
        except Exception as exc:
            log.exception("endpoint failed", endpoint=name)
            await _fail(request, error, EndpointFailure("unavailable", "暂时无法完成", "failed", str(exc), "500"))
            return
        if isinstance(result, BytesAnswer):
            kind = {"Content-Type": content_type} if content_type else {}
            await request.respond(result.data, headers={**kind, **result.headers})
        elif isinstance(result, bytes):
            await request.respond(result, headers={"Content-Type": content_type} if content_type else None)
        else:
            await request.respond(readable_json(result))

    return Endpoint(name, subject, handle, concurrency)


def _bad_request(zh: str, en: str, detail: str) -> EndpointFailure:
    return EndpointFailure("bad_request", zh, en, detail, "400")


async def _fail(request: Request, error: ErrorType, failure: EndpointFailure) -> None:
    body = error(failure.code, failure.zh, failure.en, failure.detail)
    await request.respond_error(failure.status, failure.en, readable_json(body))


@dataclass
class MicroService:
    """A started micro service; ``stop`` takes no new requests and finishes those in flight."""

    service: Service
    in_flight: set[asyncio.Task[None]] = field(default_factory=set)

    async def stop(self, grace: float = 10.0) -> None:
        await self.service.stop()
        if self.in_flight:
            log.info("finishing requests in flight", count=len(self.in_flight))
            await asyncio.wait(self.in_flight, timeout=grace)


async def start_micro(
    nc: NatsClient,
    *,
    name: str,
    version: str,
    description: str,
    endpoints: list[Endpoint],
    metadata: dict[str, str] | None = None,
) -> MicroService:
    service = await add_service(nc, name=name, version=version, description=description, metadata=metadata)
    started = MicroService(service)
    for endpoint in endpoints:
        handler = _inbox_replies_only(name, endpoint, _measured(name, endpoint))
        if endpoint.concurrency > 1:
            handler = _concurrent(handler, endpoint.concurrency, started.in_flight)
        await service.add_endpoint(name=endpoint.name, subject=endpoint.subject, handler=handler)
    await nc.flush()  # the subscriptions are registered on the server when this returns
    return started


# Every client's reply inbox starts so: _INBOX. (the default), _INBOX_county_<code>, _INBOX_city,
# _INBOX_province, _INBOX_gateway (services.common.natsauth); no stream captures such a subject.
INBOX_PREFIX = "_INBOX"


def _inbox_replies_only(service: str, endpoint: Endpoint, handler: Handler) -> Handler:
    """Drop a request whose reply subject is not an inbox. The requester chooses the reply
    subject, and the answer is published with the *service's* permissions: a county "replying" to
    ``duban.events.<programme>.<another county>`` would have the submissions service write into
    that county's event stream, which the county itself may not."""

    async def handle(request: Request) -> None:
        reply = request._msg.reply  # (nats-py's Request has no public accessor)
        if reply and not reply.startswith(INBOX_PREFIX):
            log.warning(
                "request dropped: its reply subject is not an inbox",
                service=service,
                endpoint=endpoint.name,
                subject=request.subject,
                reply=reply[:200],
            )
            return
        await handler(request)

    return handle


def _measured(service: str, endpoint: Endpoint) -> Handler:
    seconds = metrics.REQUEST_SECONDS.labels(service=service, endpoint=endpoint.name)

    async def handle(request: Request) -> None:
        began = time.perf_counter()
        try:
            await endpoint.handler(request)
        finally:
            seconds.observe(time.perf_counter() - began)

    return handle


def _concurrent(handler: Handler, limit: int, in_flight: set[asyncio.Task[None]]) -> Handler:
    slots = asyncio.Semaphore(limit)

    async def run(request: Request) -> None:
        try:
            await handler(request)
        except Exception as exc:
            log.exception("request failed")
            await request.respond_error("500", repr(exc))
        finally:
            slots.release()

    async def dispatch(request: Request) -> None:
        await slots.acquire()  # a full house holds the subscription back: backpressure, not a pile-up
        task = asyncio.create_task(run(request))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    return dispatch
