"""A submissions service on a real nats-server, and ways for tests to look inside it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from contracts.commands import Role
from contracts.events import EventEnvelope, decode_event
from contracts.programme import Programme, load_default_programme
from contracts.replies import Accepted, RefusalRecord, Refused, decode_reply
from contracts.subjects import EVENTS_STREAM, REFUSALS_STREAM, submit_subject
from services.common.clock import SimulatedClock
from services.common.jetstream import ensure_streams, stream_names
from services.common.micro import MicroService
from services.submissions.app import start
from services.submissions.service import SubmissionsService
from services.submissions.store import EventStore

PROGRAMME = load_default_programme()
# Mid-programme: 1.1 and 1.2 are due, the rest is ahead.
NOW = dt.datetime(2017, 6, 15, 10, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))
_ids = itertools.count(1)


def new_id(prefix: str = "s") -> str:
    return f"{prefix}-{next(_ids)}"


@dataclass
class Harness:
    """A submissions service on fresh streams, a client connection, and ways to look inside."""

    nc: NatsClient
    js: JetStreamContext
    clock: SimulatedClock
    programme: Programme

    async def send_raw(self, role: Role | str, county: str, body: bytes, timeout: float = 5.0) -> Accepted | Refused:
        msg = await self.nc.request(submit_subject(role, county), body, timeout=timeout)
        return decode_reply(msg.data)

    async def send(
        self, command: dict[str, Any], *, county: str = "410928", role: Role = Role.COUNTY, **envelope: Any
    ) -> Accepted | Refused:
        body = {
            "submission_id": envelope.pop("submission_id", None) or new_id(),
            "programme_id": envelope.pop("programme_id", self.programme.id),
            "county_code": envelope.pop("county_code", county),
            "command": command,
            **envelope,
        }
        return await self.send_raw(role, county, json.dumps(body, ensure_ascii=False).encode())

    async def events(self, county: str | None = None) -> list[tuple[int, EventEnvelope]]:
        subject = f"duban.events.{self.programme.id}.{county}" if county else "duban.events.>"
        return [(seq, decode_event(data)) for seq, data in await self._read(EVENTS_STREAM, subject)]

    async def refusals(self) -> list[RefusalRecord]:
        return [
            msgspec.json.decode(d, type=RefusalRecord) for _, d in await self._read(REFUSALS_STREAM, "duban.refusals.>")
        ]

    async def _read(self, stream: str, subject: str) -> list[tuple[int, bytes]]:
        info = await self.js.stream_info(stream)
        if info.state.messages == 0:
            return []
        sub = await self.js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        out: list[tuple[int, bytes]] = []
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except TimeoutError:
                    break
                out.append((msg.metadata.sequence.stream, msg.data))
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        return out


async def start_service(url: str, clock: SimulatedClock) -> tuple[MicroService, NatsClient]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    service = SubmissionsService(EventStore(nc, js), {PROGRAMME.id: PROGRAMME}, clock)
    return await start(nc, service), nc


async def wait_serving(client: NatsClient, micro: MicroService) -> None:
    """Until the service answers the service protocol as the client sees the server (a rare
    no-responders right after start otherwise)."""
    for _ in range(50):
        with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
            await client.request(f"$SRV.PING.duban-submissions.{micro.service.id}", b"", timeout=0.5)
            return
        await asyncio.sleep(0.02)


async def reset_streams(js: JetStreamContext) -> None:
    """Empty streams for a test: delete them (consumers go with them) and declare them anew."""
    for stream in stream_names():
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(stream)
    await declare_streams(js)


async def declare_streams(js: JetStreamContext) -> None:
    """Declare the streams as a service starting does, right after some were deleted."""
    for attempt in range(50):  # the server removes a deleted stream's files asynchronously
        try:
            await ensure_streams(js)
            return
        except nats.js.errors.ServerError:
            if attempt == 49:
                raise
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture(loop_scope="session")
async def harness(nats_url: str) -> AsyncIterator[Harness]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await reset_streams(js)  # every test starts from empty streams
    clock = SimulatedClock(NOW)
    micro, service_nc = await start_service(nats_url, clock)
    await wait_serving(nc, micro)
    try:
        yield Harness(nc, js, clock, PROGRAMME)
    finally:
        await micro.stop()
        await service_nc.close()
        await nc.close()


STARTUP = 20.0  # seconds a service may take to get ready


async def start_task(
    name: str, run: Callable[[asyncio.Event, asyncio.Event], Coroutine[Any, Any, None]]
) -> tuple[asyncio.Task[None], asyncio.Event]:
    """Start a service's ``run(stop, ready)``; returns once it is ready (or raises what stopped it)."""
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(stop, ready), name=name)
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiting], timeout=STARTUP, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if task.done():
        task.result()
    assert ready.is_set(), f"{name} not ready within {STARTUP} s"
    return task, stop


async def stop_task(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    await asyncio.wait_for(task, 15)


@pytest.fixture(autouse=True)
def clean_service_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autouse where imported: the services read passwords and gateway settings from the environment first."""
    for name in list(os.environ):
        if name.startswith(("DUBAN_NATS_PASSWORD_", "DUBAN_GATEWAY_")):
            monkeypatch.delenv(name)
