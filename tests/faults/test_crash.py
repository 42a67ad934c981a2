"""kill -9 each service in turn under steady county load: nothing lost, nothing duplicated.

The four services run as their own processes on this module's nats-server and a fresh database,
on the real clock: in 2026 every milestone is long overdue, so escalation issues its actions at
once and the notifier has e-mails and SMS to send while the faults happen. The notifier is killed
first, as soon as its first e-mail arrives (in the middle of sending), then the others.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from services.common.embedded import EmbeddedNats
from tests.faults.report import FaultReport, Profile
from tests.faults.scenario import Scenario, time_bound

pytestmark = [pytest.mark.integration, pytest.mark.timeout(time_bound(420))]

ORDER = ("notifier", "submissions", "ledger", "escalation")


async def _wait_first_email(sc: Scenario, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not sc.smtp.counts():
        if time.monotonic() > deadline:
            raise AssertionError(f"no e-mail arrived within {timeout:g} s\n{sc.describe()}")
        await asyncio.sleep(0.01)


async def test_kill_9_each_service_under_load(
    module_nats: EmbeddedNats, fresh_database: str, tmp_path: Path, profile: Profile, fault_report: FaultReport
) -> None:
    async with Scenario(
        tmp_path, nats_urls=[module_nats.url], database_url=fresh_database, profile=profile, report=fault_report
    ) as sc:
        await sc.start()
        for round_ in range(profile.kills_per_service):
            for name in ORDER:
                if name == "notifier" and round_ == 0:
                    await _wait_first_email(sc)  # kill it while it sends
                else:
                    await sc.phase()
                await sc.services[name].kill()
                sc.injected(f"kill -9 {name}")
                await sc.services[name].start()
        await sc.phase()  # the load carries on after the last restart
        await sc.finish(notifier_kills=sc.services["notifier"].kills)
