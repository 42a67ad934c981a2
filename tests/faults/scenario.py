"""One fault scenario from start to verdict: the four services as processes, county load, faults
injected between phases of load, then settle, check and tally.

    async with Scenario(...) as sc:
        await sc.start()
        await sc.phase()                 # profile.submissions_per_phase more per county, accepted
        await sc.services["ledger"].kill(); sc.injected("kill -9 ledger"); ...
        await sc.phase()
        await sc.finish()                # stop the load, settle, check, record, assert

Every wait is bounded; every failure message carries the tails of the processes' logs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from contracts.escalation import AUDIT_CHECKPOINT_SUBJECT
from contracts.programme import Programme, load_default_programme
from services.audit.verify import verify_record
from services.common.jetstream import stream_names
from services.common.signing import signer_from_seed
from tests.faults import checks
from tests.faults.load import Load
from tests.faults.procs import Services, SmtpRecorder, sms_file_counts
from tests.faults.report import PROFILE, FaultReport, Profile

PHASE_TIMEOUT = 60.0  # one phase of load, including a restarted service catching up


def time_bound(quick_seconds: float) -> float:
    """A test's time limit: as given under the quick profile, scaled for the soak profile's
    heavier load and more faults."""
    return quick_seconds if PROFILE.name == "quick" else quick_seconds * 8


class Scenario:
    def __init__(
        self,
        root: Path,
        *,
        nats_urls: Sequence[str],
        database_url: str,
        profile: Profile,
        report: FaultReport,
        extra_env: dict[str, str] | None = None,
        describe_infra: Callable[[], str] = lambda: "",
    ) -> None:
        self.root = root
        self.nats_urls = list(nats_urls)
        self.database_url = database_url
        self.profile = profile
        self.report = report
        self.programme: Programme = load_default_programme()
        self.smtp = SmtpRecorder()
        self.services = Services(
            root, nats_urls=nats_urls, database_url=database_url, smtp_port=self.smtp.port, extra_env=extra_env
        )
        self.load = Load(nats_urls, self.programme, profile.counties)
        self._describe_infra = describe_infra
        self._nc: NatsClient | None = None
        self.faults: list[str] = []
        self.summary = ""
        self.started_at = time.monotonic()

    # -- context -----------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self.smtp.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.load.close()
        self.services.ensure_dead()
        self.smtp.stop()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    @property
    def nc(self) -> NatsClient:
        assert self._nc is not None, "start() first"
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream(timeout=10.0)

    def describe(self) -> str:
        return "\n".join(
            part
            for part in (
                f"load: {self.load.summary()}",
                f"faults so far: {', '.join(self.faults) or 'none'}",
                self._describe_infra(),
                self.services.tails(),
            )
            if part
        )

    # -- steps -------------------------------------------------------------------------------
    async def start(self, *, fresh_streams: bool = True) -> None:
        self._nc = await nats.connect(
            self.nats_urls, name="fault-test", max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2
        )
        if fresh_streams:  # the module's server may have served an earlier test
            for stream in stream_names():
                with contextlib.suppress(NotFoundError):
                    await self.js.delete_stream(stream)
        await self.services.start()
        await self.load.start()

    async def phase(self, per_client: int | None = None, timeout: float = PHASE_TIMEOUT) -> None:
        """Until every county has had ``per_client`` (the profile's) more submissions accepted."""
        try:
            await self.load.more(per_client or self.profile.submissions_per_phase, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}") from None

    def injected(self, fault: str) -> None:
        self.faults.append(fault)
        self.report.injected[fault] += 1

    async def finish(self, *, notifier_kills: int = 0) -> checks.Findings:
        """Stop the load, settle, check every invariant, tally, and assert nothing is wrong."""
        await checks.bounded("stopping the load", self.load.stop(), 60.0, self.describe)
        self.report.offered["submissions"] += self.load.offered
        settled = await checks.settle(self.nc, self.js, self.describe)
        events = await checks.scan_stream(self.js)

        findings = checks.submission_findings(events, self.load.accepted_ids())
        refused = self.load.refused()
        findings.add_lost("submissions refused", refused)
        findings.merge(checks.action_findings(events))
        findings.merge(await checks.escalation_view_findings(self.nc, events))
        rows = await checks.outbox_rows(self.database_url)
        findings.merge(
            checks.notification_findings(
                rows, self.smtp.counts(), sms_file_counts(self.services.sms_file), events, notifier_kills
            )
        )
        rebuilt, differences = await checks.ledger_matches_rebuild(self.nc, self.js, self.database_url, self.describe)
        if differences:
            findings.add_lost("ledger differs from its rebuild", [differences.splitlines()[0]])
        # The record as evidence survived the faults: every chain whole, checkpoints and the
        # signed actions verified, the read model explained by the events.
        await self.nc.request(AUDIT_CHECKPOINT_SUBJECT, b"{}", timeout=30)
        signer = signer_from_seed(self.services.signing_key_file.read_bytes()).public_key
        audit = await verify_record(self.nc, frozenset({signer}))
        findings.add_lost("record breaks", (f"{b.kind} at {b.where}: {b.detail}" for b in audit.breaks[:20]))
        self.report.offered["events verified"] += audit.events

        for kind, ids in findings.lost.items():
            self.report.lost[kind] += len(ids)
        for kind, ids in findings.duplicated.items():
            self.report.duplicated[kind] += len(ids)

        assert not refused, f"valid submissions refused: {refused}\n{self.describe()}"
        assert not differences, f"the ledger is not what a rebuild gives:\n{differences}"
        assert findings.clean, f"{findings}\n{self.describe()}"
        assert self.load.accepted > 0 and len(events) >= self.load.accepted
        assert rows, f"the notifier planned no message at all\n{self.describe()}"
        emails = self.smtp.counts()
        self.summary = (
            f"{self.load.offered} submissions offered, {self.load.accepted} accepted "
            f"({sum(c.resends for c in self.load.clients)} resends), {len(events)} events, rebuild {rebuilt} events, "
            f"{len(rows)} outbox rows, {sum(emails.values())} e-mails received ({len(emails)} distinct), "
            f"settled in {settled.seconds:.1f} s ({settled.late_actions} actions judged late), "
            f"faults: {', '.join(self.faults)}, "
            f"{time.monotonic() - self.started_at:.1f} s in all"
        )
        print(self.summary)

        await self.services.terminate()  # SIGTERM: each exits 0, in time
        return findings
