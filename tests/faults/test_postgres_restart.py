"""PostgreSQL restarted under county load (a durable PostgreSQL of the test's own): the ledger's
and the notifier's projections pause while it is away and resume by themselves, skipping no
event — the ledger's checkpoint ends at the stream's end and its read model equals a rebuild.

First a fast shutdown and start, then a crash (SIGKILL of the postmaster and its backends) and
start with crash recovery.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.common.embedded import EmbeddedNats, EmbeddedPostgres
from tests.faults.procs import tail
from tests.faults.report import FaultReport, Profile
from tests.faults.scenario import Scenario, time_bound

pytestmark = [pytest.mark.integration, pytest.mark.timeout(time_bound(300))]
DOWN_SECONDS = 2.0  # long enough for the projections to fail a batch or two


@pytest_asyncio.fixture(loop_scope="session")
async def durable_postgres(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("faults-pg"), durable=True)
    try:
        await pg.start()
        yield pg
    finally:
        await pg.destroy()


async def test_postgres_restart_under_load(
    module_nats: EmbeddedNats,
    durable_postgres: EmbeddedPostgres,
    tmp_path: Path,
    profile: Profile,
    fault_report: FaultReport,
) -> None:
    pg = durable_postgres
    async with Scenario(
        tmp_path,
        nats_urls=[module_nats.url],
        database_url=pg.dsn,
        profile=profile,
        report=fault_report,
        describe_infra=lambda: f"--- postgres log ---\n{tail(pg.log_path, 15)}",
    ) as sc:
        await sc.start()
        await sc.phase()
        for fault, stop in (("postgres restart", pg.stop), ("postgres kill -9 and start", pg.kill)):
            await stop()
            sc.injected(fault)
            await asyncio.sleep(DOWN_SECONDS)
            await pg.start()
            await sc.phase()
        await sc.finish()
        for process in sc.services:
            assert process.starts == 1, f"{process.name} had to be restarted\n{sc.describe()}"
