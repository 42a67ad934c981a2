"""The nats-server restarted under county load (this module's own server, same store and port):
no answered-accepted submission lost, nothing stored twice, and every service reconnects by
itself — its status answers again and the load completes without anyone restarting it.

First a graceful stop and start, then a crash (SIGKILL) and start: with ``sync_interval:
always`` an acknowledged write is on disk before the ack, so a killed server loses none either.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from nats.js.errors import NotFoundError

from contracts.escalation import STATUS_SUBJECT as ESCALATION_STATUS
from contracts.escalation import EscalationStatus
from contracts.ledger import PROJECTION_STATUS_SUBJECT, ProjectionStatus
from contracts.notifier import STATUS_SUBJECT as NOTIFIER_STATUS
from contracts.notifier import NotifierStatus
from contracts.replies import SubmissionsStatus
from contracts.subjects import EVENTS_STREAM, SUBMISSIONS_STATUS_SUBJECT
from services.common.embedded import EmbeddedNats
from tests.faults import checks
from tests.faults.procs import tail
from tests.faults.report import FaultReport, Profile
from tests.faults.scenario import Scenario, time_bound

pytestmark = [pytest.mark.integration, pytest.mark.timeout(time_bound(300))]
DURABLES = {"ledger", "notifier"}
DOWN_SECONDS = 1.0  # long enough for every client to notice and start reconnecting


async def _every_service_answers(sc: Scenario, timeout: float = 60.0) -> None:
    """Each service answers its status subject again: its connection came back by itself."""

    async def answers() -> None:
        while True:
            try:
                await asyncio.gather(
                    checks.ask(sc.nc, SUBMISSIONS_STATUS_SUBJECT, SubmissionsStatus, timeout=2.0),
                    checks.ask(sc.nc, PROJECTION_STATUS_SUBJECT, ProjectionStatus, timeout=2.0),
                    checks.ask(sc.nc, ESCALATION_STATUS, EscalationStatus, timeout=2.0),
                    checks.ask(sc.nc, NOTIFIER_STATUS, NotifierStatus, timeout=2.0),
                )
                return
            except Exception:
                await asyncio.sleep(0.2)

    await checks.bounded("every service answering again after the NATS restart", answers(), timeout, sc.describe)
    for process in sc.services:
        assert process.running and process.starts == 1, f"{process.name} was restarted or died\n{sc.describe()}"
    assert await sc.services.all_ready(), f"a service is not ready after the NATS restart\n{sc.describe()}"


async def test_nats_restart_under_load(
    module_nats: EmbeddedNats, fresh_database: str, tmp_path: Path, profile: Profile, fault_report: FaultReport
) -> None:
    async with Scenario(
        tmp_path,
        nats_urls=[module_nats.url],
        database_url=fresh_database,
        profile=profile,
        report=fault_report,
        describe_infra=lambda: f"--- nats-server log ---\n{tail(module_nats.log_path, 20)}",
    ) as sc:
        await sc.start()
        await sc.phase()
        for fault, stop in (("nats restart", module_nats.stop), ("nats kill -9 and start", module_nats.kill)):
            await stop()
            sc.injected(fault)
            await asyncio.sleep(DOWN_SECONDS)
            await module_nats.start()
            await _every_service_answers(sc)
            await sc.phase()
        # What a restart can also do: lose a consumer that is not durable. Escalation's is
        # ephemeral; it must notice and read on from where it was, folding nothing twice.
        deleted = await _delete_ephemeral_consumers(sc)
        assert deleted, f"escalation has no consumer on {EVENTS_STREAM} to lose\n{sc.describe()}"
        sc.injected("escalation's consumer deleted")
        await sc.phase()
        await sc.finish()


async def _delete_ephemeral_consumers(sc: Scenario) -> list[str]:
    """Delete DUBAN_EVENTS' consumers other than the durable ledger and notifier ones."""
    names = [c.name for c in await sc.js.consumers_info(EVENTS_STREAM) if c.name not in DURABLES]
    for name in names:
        with contextlib.suppress(NotFoundError):  # e.g. a submission's catch-up consumer, gone meanwhile
            await sc.js.delete_consumer(EVENTS_STREAM, name)
    return names
