"""The `running` fixture (used by tests/e2e): all four services running as `duban up` runs them (run_services), on the
session's real nats-server and a fresh PostgreSQL database, with a simulated clock."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from contracts.programme import load_default_programme
from services.common.clock import SimulatedClock
from services.common.embedded import free_port
from services.common.opshttp import Readiness
from services.common.runtime import Runtime
from services.common.settings import Settings
from services.common.supervisor import SERVICES, run_services, service_runners
from tests.harness import reset_streams

SHANGHAI = dt.timezone(dt.timedelta(hours=8))


@dataclass
class Running:
    nc: NatsClient
    clock: SimulatedClock
    ops_url: str
    readiness: Readiness
    stop: asyncio.Event  # set it to stop the services as SIGTERM does
    services: asyncio.Task[None]
    settings: Settings  # the services' (its state directory holds their signing key)


@pytest_asyncio.fixture(loop_scope="session")
async def running(
    nats_url: str, fresh_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Running]:
    nc = await nats.connect(nats_url)
    await reset_streams(nc.jetstream())
    clock = SimulatedClock(dt.datetime(2017, 3, 20, 10, 0, tzinfo=SHANGHAI))
    programme = load_default_programme()
    state = tmp_path_factory.mktemp("state")
    runtime = Runtime(Settings(state_dir=state), {programme.id: programme}, nats_url, fresh_database)
    address = f"127.0.0.1:{free_port()}"
    readiness = Readiness(list(SERVICES))
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_services(runtime, clock, stop, service_runners(), readiness=readiness, ops_address=address)
    )
    try:
        await asyncio.wait_for(readiness.wait(), 30)
        yield Running(nc, clock, f"http://{address}", readiness, stop, task, runtime.settings)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await nc.close()
