"""The fault-injection suite: real processes on loopback, bounded in count and time.

``DUBAN_FAULT_PROFILE=quick`` (the default, run in CI) or ``soak``. At the end of a run that
included fault tests, the tally of tests/faults/report.py is printed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from services.common.embedded import EmbeddedNats
from tests.faults.report import PROFILE, REPORT, FaultReport, Profile


@pytest.fixture(scope="session")
def fault_report() -> FaultReport:
    return REPORT


@pytest.fixture(scope="session")
def profile() -> Profile:
    return PROFILE


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not (REPORT.offered or REPORT.injected):
        return
    terminalreporter.section("fault suite")
    for line in REPORT.lines(PROFILE):
        terminalreporter.write_line(line)


# -- infrastructure of the process-fault tests ------------------------------------------------
# (added with tests/faults/procs.py; the tally above is unchanged)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def module_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """A nats-server of the test module's own (fixed ports, its own store): a test may stop,
    kill and start it without touching the session's shared server."""
    server = EmbeddedNats(tmp_path_factory.mktemp("faults-nats"), server_name="duban-faults")
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
