"""`duban demo`: the whole 2017–2018 programme in simulated time, on real servers.

It starts an embedded nats-server and PostgreSQL in a temporary folder, a real SMTP server
(aiosmtpd) delivering into a Maildir, and the four services in this process on a simulated
clock. Then it plays the story (services/demo/story.yaml) day by day as the outside world would:
county systems post submissions as their own NATS users, operators confirm proposals on the
escalation subjects, and every morning escalation is asked to judge the day. After each step it
waits until every service has caught up (ledger lag 0, escalation has seen the stream's end, the
notifier has nothing due), so what the view shows is what the system did, in order.

Outputs, in ``out`` (default ``duban-demo/``): the 督查进度一览表 as .xlsx, the mailbox, the
SMS file, the services' JSON log and ``summary.json``. Nothing keeps running afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import mailbox
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import structlog
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from contracts.audit import FILE_SIGNATURE_HEADER, FILE_SIGNATURE_SUFFIX, AuditReport, FileSignature
from contracts.commands import Role
from contracts.directory import example_directory_path, load_directory
from contracts.escalation import (
    ACTIONS_SUBJECT,
    AUDIT_CHECKPOINT_SUBJECT,
    CONFIRM_SUBJECT,
    TICK_SUBJECT,
    WAIVE_SUBJECT,
    ActionList,
    EscalationStatus,
)
from contracts.escalation import (
    STATUS_SUBJECT as ESCALATION_STATUS,
)
from contracts.events import decode_event
from contracts.ledger import PROJECTION_STATUS_SUBJECT, REPORT_SUBJECT, TABLE_SUBJECT, ProgressTable, ProjectionStatus
from contracts.notifier import STATUS_SUBJECT as NOTIFIER_STATUS
from contracts.notifier import NotifierStatus
from contracts.programme import Programme, load_default_programme
from contracts.replies import Accepted, decode_reply
from contracts.subjects import EVENTS_ALL, EVENTS_STREAM, submit_subject
from services.audit.verify import verify_record
from services.common.clock import SimulatedClock
from services.common.embedded import free_port
from services.common.opshttp import Readiness
from services.common.runtime import Runtime, infrastructure
from services.common.settings import Settings
from services.common.signing import file_signature_from_header, trusted_keys
from services.common.supervisor import SERVICES, run_services, service_runners
from services.demo.script import Step, Story, load_story, submission_body
from services.demo.view import CountyTally, DemoView
from services.notifier import main as notifier_main
from services.notifier.channels.file import FileChannel
from services.notifier.channels.smtp import SmtpChannel
from services.notifier.delivery import NotifierSettings

log = structlog.get_logger(__name__)
OPERATOR = "市督查局（演示）"
MORNING = dt.time(9, 0)  # escalation judges the day at 09:00; submissions come later in the day
XLSX_NAME = "督查进度一览表.xlsx"


class DemoFailed(Exception):
    """The story could not be played as written (a step refused, a service not catching up)."""


@dataclass(frozen=True)
class DemoOptions:
    out_dir: Path = Path("duban-demo")
    speed: float = 15.0  # simulated days per second of wall time; 0: as fast as the services go
    until: dt.date | None = None
    settle_timeout: float = 30.0


@dataclass
class CountyOutcome:
    name: str
    actions_by_level: dict[str, int]  # each action once, whatever became of it
    actions_by_state: dict[str, int]  # issued | proposed | waived
    findings: int
    notifications: dict[str, int]  # sent | delivered | failed

    @classmethod
    def of(cls, tally: CountyTally) -> CountyOutcome:
        return cls(
            name=tally.name,
            actions_by_level=dict(sorted(tally.by_level().items())),
            actions_by_state=dict(sorted(tally.by_state().items())),
            findings=tally.findings,
            notifications=dict(sorted(tally.notifications.items())),
        )


@dataclass
class DemoSummary:
    programme_id: str
    first_day: dt.date
    last_day: dt.date
    days: int
    submissions: int
    operator_decisions: int
    events: int
    emails_received: int
    sms_written: int
    seconds: float
    xlsx: str
    mailbox: str
    sms_file: str
    counties: dict[str, CountyOutcome]
    server_pids: tuple[int, ...]  # the embedded nats-server and PostgreSQL it ran (stopped at the end)
    record_verified: bool = False  # `duban audit verify` at the end: chains, checkpoints, read model
    signer: str = ""  # the public key the 一览表 and the actions were signed with (`--trust` it)

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=2)


def prepare_out_dir(out: Path) -> None:
    """Start from a clean output folder, removing only what an earlier demo wrote."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (
        XLSX_NAME,
        XLSX_NAME + FILE_SIGNATURE_SUFFIX,
        "sms.jsonl",
        "summary.json",
    ):  # duban.log: the CLI truncates it
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "mailbox", ignore_errors=True)


@contextlib.contextmanager
def smtp_server(maildir: Path) -> Any:
    """A real SMTP server on loopback delivering every message into a Maildir."""
    controller = Controller(Mailbox(maildir), hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


class Driver:
    """Plays the story against running services, over NATS, as the outside world would."""

    def __init__(self, runtime: Runtime, clock: SimulatedClock, programme: Programme, view: DemoView) -> None:
        self.runtime = runtime
        self.clock = clock
        self.programme = programme
        self.view = view
        self.zone = ZoneInfo(programme.programme.timezone)
        self.ops: NatsClient | None = None
        self._senders: dict[tuple[Role, str], NatsClient] = {}
        self.submissions = 0
        self.decisions = 0
        self.events = 0

    async def __aenter__(self) -> Driver:
        self.ops = await self.runtime.connect_as("ops")
        return self

    async def __aexit__(self, *_: object) -> None:
        for nc in [*self._senders.values(), *([self.ops] if self.ops else [])]:
            with contextlib.suppress(Exception):
                await nc.close()

    # -- talking to duban ----------------------------------------------------------------------
    async def _request(self, subject: str, body: bytes = b"{}", timeout: float = 30.0) -> bytes:
        return (await self._answer(subject, body, timeout)).data

    async def _answer(self, subject: str, body: bytes = b"{}", timeout: float = 30.0) -> Msg:
        assert self.ops is not None
        msg = await self.ops.request(subject, body, timeout=timeout)
        if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
            raise DemoFailed(f"{subject}: {msg.headers.get('Nats-Service-Error')}: {msg.data.decode()}")
        return msg

    async def _sender(self, role: Role, county_code: str) -> NatsClient:
        key = (role, county_code if role is Role.COUNTY else "")
        if key not in self._senders:
            user = f"county-{county_code}" if role is Role.COUNTY else role.value
            self._senders[key] = await self.runtime.connect_as(
                user, role=role, county_code=county_code if role is Role.COUNTY else None
            )
        return self._senders[key]

    def at(self, day: dt.date, time_of_day: dt.time) -> None:
        self.clock.set(dt.datetime.combine(day, time_of_day, self.zone))

    async def tick(self) -> None:
        await self._request(TICK_SUBJECT)

    async def table(self) -> ProgressTable:
        return msgspec.json.decode(await self._request(TABLE_SUBJECT), type=ProgressTable)

    async def report(self) -> tuple[bytes, FileSignature | None]:
        """The 一览表 and its signature."""
        msg = await self._answer(REPORT_SUBJECT, timeout=60)
        signed = (msg.headers or {}).get(FILE_SIGNATURE_HEADER)
        return msg.data, file_signature_from_header(signed) if signed else None

    async def audit(self, trusted: frozenset[str]) -> AuditReport:
        """A checkpoint of the chains now, then the whole record verified (``duban audit verify``)."""
        await self._request(AUDIT_CHECKPOINT_SUBJECT)
        assert self.ops is not None
        return await verify_record(self.ops, trusted)

    async def play(self, step: Step) -> None:
        if step.operator_action is not None:
            await self._decide(step)
            return
        nc = await self._sender(step.role, step.county_code)
        body = submission_body(step, self.programme.id)
        msg = await nc.request(submit_subject(step.role, step.county_code), body, timeout=30)
        reply = decode_reply(msg.data)
        if not isinstance(reply, Accepted):
            raise DemoFailed(f"{step.day} {step.county_code} {step.submission_id}: refused: {msg.data.decode()}")
        self.submissions += 1

    async def _decide(self, step: Step) -> None:
        action = step.operator_action
        assert action is not None
        query = {"county_code": step.county_code, "state": "proposed"}
        proposals = msgspec.json.decode(
            await self._request(ACTIONS_SUBJECT, json.dumps(query).encode()), type=ActionList
        )
        matching = [
            p
            for p in proposals.items
            if p.level_id == action.level
            and (action.milestone_id is None or p.milestone_id == action.milestone_id)
            and (action.period is None or p.period == action.period)
        ]
        if not matching:
            raise DemoFailed(f"{step.day} {step.county_code}: no proposed {action.level} to {action.decision}")
        for proposal in matching:
            if action.decision == "confirm":
                body = {"action_id": proposal.action_id, "operator": OPERATOR, "note": step.note}
                await self._request(CONFIRM_SUBJECT, json.dumps(body, ensure_ascii=False).encode())
            else:
                body = {"action_id": proposal.action_id, "operator": OPERATOR, "reason": action.reason or step.note}
                await self._request(WAIVE_SUBJECT, json.dumps(body, ensure_ascii=False).encode())
            self.decisions += 1

    async def settle(self, timeout: float) -> None:
        """Wait until every service has caught up with the stream and the notifier has nothing due."""
        assert self.ops is not None
        js = self.ops.jetstream()
        deadline = time.monotonic() + timeout
        while True:
            last = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
            ledger = msgspec.json.decode(await self._request(PROJECTION_STATUS_SUBJECT), type=ProjectionStatus)
            escalation = msgspec.json.decode(await self._request(ESCALATION_STATUS), type=EscalationStatus)
            notifier = msgspec.json.decode(await self._request(NOTIFIER_STATUS), type=NotifierStatus)
            consumer = await js.consumer_info(EVENTS_STREAM, notifier_main.DURABLE)
            if (
                ledger.checkpoint >= last
                and escalation.observed_sequence >= last
                and consumer.num_pending == 0
                and consumer.num_ack_pending == 0
                and notifier.due_now == 0
                and notifier.events_unpublished == 0
                and int((await js.stream_info(EVENTS_STREAM)).state.last_seq) == last
            ):
                return
            if time.monotonic() > deadline:
                raise DemoFailed(
                    f"the services did not catch up within {timeout:g} s: stream at {last}, ledger at "
                    f"{ledger.checkpoint}, escalation at {escalation.observed_sequence}, "
                    f"notifier due {notifier.due_now}"
                )
            await asyncio.sleep(0.005)

    # -- watching the record ---------------------------------------------------------------------
    async def follow_events(self, stop: asyncio.Event) -> None:
        """Every stored event, in order, to the observer and the tallies."""
        assert self.ops is not None
        sub = await self.ops.jetstream().subscribe(EVENTS_ALL, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        try:
            while not stop.is_set():
                try:
                    msg = await sub.next_msg(timeout=0.2)
                except TimeoutError:
                    continue
                self.events += 1
                self.view.add_event(decode_event(msg.data))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def new_view(options: DemoOptions, story: Story | None = None) -> DemoView:
    """The demo's view (and tally) of the shipped story; the runner feeds it."""
    story = story or load_story()
    programme = load_default_programme()
    last_day = min(story.end, options.until) if options.until else story.end
    return DemoView(programme, start=story.start, end=last_day, speed=options.speed)


async def run_demo(options: DemoOptions, view: DemoView | None = None) -> DemoSummary:
    """Play the story, feeding ``view``; returns the summary (also written to ``out/summary.json``)."""
    began = time.monotonic()
    story = load_story()
    view = view or new_view(options, story)
    out = options.out_dir
    prepare_out_dir(out)
    last_day = view.end
    with tempfile.TemporaryDirectory(prefix="duban-demo-") as state, smtp_server(out / "mailbox") as smtp:
        settings = Settings(state_dir=Path(state), embedded_nats_port=free_port(), ops_address="")
        async with infrastructure(settings) as runtime, _services(runtime, story, out, smtp.port) as (clock, stop):
            programme = runtime.programmes[story.programme_id]
            async with Driver(runtime, clock, programme, view) as driver:
                follower = asyncio.create_task(driver.follow_events(stop))
                try:
                    await _play(driver, story, last_day, options)
                    xlsx = out / XLSX_NAME
                    data, signature = await driver.report()
                    xlsx.write_bytes(data)
                    if signature is not None:
                        xlsx.with_name(XLSX_NAME + FILE_SIGNATURE_SUFFIX).write_bytes(msgspec.json.encode(signature))
                    await asyncio.sleep(0.3)  # the follower reads the last events
                    audit = await driver.audit(trusted_keys(settings, environ={}))
                finally:
                    stop.set()
                    await follower
                summary = DemoSummary(
                    programme_id=programme.id,
                    first_day=story.start,
                    last_day=last_day,
                    days=(last_day - story.start).days + 1,
                    submissions=driver.submissions,
                    operator_decisions=driver.decisions,
                    events=driver.events,
                    emails_received=len(mailbox.Maildir(str(out / "mailbox"), create=False)),
                    sms_written=_lines(out / "sms.jsonl"),
                    seconds=round(time.monotonic() - began, 1),
                    xlsx=str(xlsx),
                    mailbox=str(out / "mailbox"),
                    sms_file=str(out / "sms.jsonl"),
                    counties={code: CountyOutcome.of(tally) for code, tally in view.tallies().items()},
                    server_pids=runtime.embedded_pids,
                    record_verified=audit.ok,
                    signer=signature.signer if signature is not None else "",
                )
    (out / "summary.json").write_bytes(summary.to_json())
    return summary


@contextlib.asynccontextmanager
async def _services(
    runtime: Runtime, story: Story, out: Path, smtp_port: int
) -> AsyncIterator[tuple[SimulatedClock, asyncio.Event]]:
    programme = runtime.programmes[story.programme_id]
    zone = ZoneInfo(programme.programme.timezone)
    clock = SimulatedClock(dt.datetime.combine(story.start, dt.time(8, 0), zone))
    channels = {
        "file": FileChannel(out / "sms.jsonl"),
        "email": SmtpChannel("127.0.0.1", smtp_port, security="none", sender="duban-demo@localhost"),
    }
    runners = service_runners(SERVICES)
    runners["notifier"] = partial(
        notifier_main.run,
        channels=channels,  # type: ignore[arg-type]
        directory=load_directory(example_directory_path(), programme),
        settings=NotifierSettings(channels=("file", "email")),
    )
    stop = asyncio.Event()
    readiness = Readiness(list(runners))
    task = asyncio.create_task(run_services(runtime, clock, stop, runners, readiness=readiness))
    ready = asyncio.create_task(readiness.wait())
    await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises the failure
    try:
        yield clock, stop
    finally:
        stop.set()
        await task


async def _play(driver: Driver, story: Story, last_day: dt.date, options: DemoOptions) -> None:
    started = time.monotonic()
    for index, (day, steps) in enumerate(story.days(last_day), start=1):
        driver.at(day, MORNING)
        await driver.tick()
        await driver.settle(options.settle_timeout)
        captions = []
        for step in steps:
            driver.at(day, max(step.at, MORNING))
            await driver.play(step)
            await driver.settle(options.settle_timeout)
            captions.append(step.note)
        driver.view.set_day(day, captions)
        driver.view.update_table(await driver.table())
        if options.speed > 0:
            behind = started + index / options.speed - time.monotonic()
            if behind > 0:
                await asyncio.sleep(behind)


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.exists() else 0
