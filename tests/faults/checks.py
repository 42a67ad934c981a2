"""What the fault tests check once the faults are over: the system settles, and nothing is lost,
duplicated or let in.

- :func:`settle`: every service has caught up (ledger lag 0, escalation caught up with lag 0,
  notifier consumer drained, nothing due, every outcome published), twice in a row on an
  unchanged stream, within a bound;
- :func:`scan_stream`: the whole DUBAN_EVENTS stream, decoded;
- :func:`submission_findings`: every accepted submission stored exactly once;
- :func:`action_findings`: every action recorded exactly once (issued or proposed);
- :func:`ledger_matches_rebuild`: the live read model equals a rebuild from the stream;
- :func:`notification_findings`: each e-mail received at most (1 + notifier kills) times, each
  SMS in the file at most once, and every message the outbox marks sent actually arrived.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import msgspec
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from contracts.escalation import ACTIONS_SUBJECT, TICK_SUBJECT, ActionList, EscalationStatus, TickReport
from contracts.escalation import STATUS_SUBJECT as ESCALATION_STATUS
from contracts.events import ActionIssued, ActionProposed, EventEnvelope, decode_event
from contracts.ledger import PROJECTION_STATUS_SUBJECT, REBUILD_SUBJECT, ProjectionStatus, RebuildReport
from contracts.notifier import STATUS_SUBJECT as NOTIFIER_STATUS
from contracts.notifier import NotifierStatus
from contracts.subjects import ACTIONS_ALL, EVENTS_ALL, EVENTS_STREAM
from services.common.jetstream import read_all

T = TypeVar("T")
SETTLE_TIMEOUT = 120.0  # the notifier's lease (60 s) may have to run out after a kill mid-send


async def ask(nc: NatsClient, subject: str, answer: type[T], timeout: float = 5.0, body: bytes = b"{}") -> T:
    msg = await nc.request(subject, body, timeout=timeout)
    if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
        raise RuntimeError(f"{subject}: {msg.headers.get('Nats-Service-Error-Code')} {msg.data[:300]!r}")
    return msgspec.json.decode(msg.data, type=answer)


@dataclass
class Settled:
    ledger: ProjectionStatus
    escalation: EscalationStatus
    notifier: NotifierStatus
    seconds: float
    late_actions: int  # actions a last judgement still found due (a failed judgement left for the tick)


async def _statuses(nc: NatsClient, js: JetStreamContext) -> tuple[ProjectionStatus, EscalationStatus, NotifierStatus]:
    ledger, escalation, notifier = await asyncio.gather(
        ask(nc, PROJECTION_STATUS_SUBJECT, ProjectionStatus),
        ask(nc, ESCALATION_STATUS, EscalationStatus),
        ask(nc, NOTIFIER_STATUS, NotifierStatus),
    )
    return ledger, escalation, notifier


async def _last_action_sequence(js: JetStreamContext) -> int:
    """The stream sequence of the last action recorded (what the notifier must have planned)."""
    try:
        return int((await js.get_last_msg(EVENTS_STREAM, ACTIONS_ALL)).seq or 0)
    except NotFoundError:
        return 0


async def settle(
    nc: NatsClient, js: JetStreamContext, describe: Callable[[], str], timeout: float = SETTLE_TIMEOUT
) -> Settled:
    """Wait (bounded) until every service has done all there is to do; ``describe`` adds context
    (process logs) to the failure."""
    began = time.monotonic()
    deadline = began + timeout
    last_error = ""
    previous: int | None = None
    late_actions = 0
    while True:
        try:
            ledger, escalation, notifier = await _statuses(nc, js)
            # The notifier's checkpoint, not its consumer's ack state: an ack lost with a NATS
            # connection leaves a message "pending" until ack_wait (60 s) redelivers it, harmlessly.
            drained = notifier.checkpoint >= await _last_action_sequence(js)
            stream_last = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
            done = (
                ledger.lag == 0
                and ledger.checkpoint == stream_last
                and escalation.caught_up
                and escalation.lag == 0
                and escalation.observed_sequence == stream_last
                and drained
                and notifier.due_now == 0
                and notifier.events_unpublished == 0
            )
            if done and previous == stream_last:
                # Judging now must find nothing more to do: every due action has been recorded.
                tick = await ask(nc, TICK_SUBJECT, TickReport, timeout=10.0)
                if tick.new_actions == 0:
                    return Settled(ledger, escalation, notifier, time.monotonic() - began, late_actions)
                late_actions += tick.new_actions
                done = False
            previous = stream_last if done else None
            last_error = f"ledger {ledger}, escalation {escalation}, notifier {notifier} (actions planned: {drained})"
        except Exception as exc:  # a service still reconnecting answers nothing or an error
            previous = None
            last_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise AssertionError(f"the services did not settle within {timeout:g} s: {last_error}\n{describe()}")
        await asyncio.sleep(0.3)


async def scan_stream(js: JetStreamContext) -> list[tuple[int, EventEnvelope]]:
    """Every event in DUBAN_EVENTS, in order (with its stream sequence), to the stream's end."""
    last = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
    events = [
        (seq, decode_event(data)) async for batch in read_all(js, EVENTS_STREAM, EVENTS_ALL) for seq, data in batch
    ]
    sequences = [seq for seq, _ in events]
    assert sequences == list(range(1, last + 1)), f"the scan read {len(events)} events, not 1..{last} in order"
    return events


@dataclass
class Findings:
    """What is wrong, by kind: ``lost`` and ``duplicated`` list the ids concerned."""

    lost: dict[str, list[str]] = field(default_factory=dict)
    duplicated: dict[str, list[str]] = field(default_factory=dict)

    def add_lost(self, kind: str, ids: Iterable[str]) -> None:
        ids = sorted(ids)
        if ids:
            self.lost.setdefault(kind, []).extend(ids)

    def add_duplicated(self, kind: str, ids: Iterable[str]) -> None:
        ids = sorted(ids)
        if ids:
            self.duplicated.setdefault(kind, []).extend(ids)

    def merge(self, other: Findings) -> None:
        for kind, ids in other.lost.items():
            self.add_lost(kind, ids)
        for kind, ids in other.duplicated.items():
            self.add_duplicated(kind, ids)

    @property
    def clean(self) -> bool:
        return not self.lost and not self.duplicated

    def __str__(self) -> str:
        def show(found: dict[str, list[str]]) -> str:
            return "; ".join(f"{k} {len(v)}: {v[:10]}" for k, v in found.items()) or "none"

        return f"lost: {show(self.lost)} / duplicated: {show(self.duplicated)}"


def submission_findings(events: list[tuple[int, EventEnvelope]], accepted: Iterable[str]) -> Findings:
    """Every accepted submission stored exactly once: one progress_reported event per submission
    id, and no event id stored twice."""
    findings = Findings()
    by_submission: Counter[str] = Counter(
        e.submission_id for _, e in events if e.actor.role == "county" and e.event_type == "progress_reported"
    )
    accepted = set(accepted)
    findings.add_lost("submissions", (i for i in accepted if by_submission[i] == 0))
    findings.add_duplicated("submissions", (i for i, n in by_submission.items() if n > 1))
    event_ids = Counter(e.event_id for _, e in events)
    findings.add_duplicated("events", (i for i, n in event_ids.items() if n > 1))
    return findings


def action_findings(events: list[tuple[int, EventEnvelope]]) -> Findings:
    """Each action recorded once, as issued or as proposed (a confirmation's issue aside)."""
    findings = Findings()
    counts: Counter[str] = Counter()
    for _, e in events:
        payload = e.payload
        if isinstance(payload, ActionProposed) or (isinstance(payload, ActionIssued) and payload.confirmed_by is None):
            counts[payload.action_id] += 1
    findings.add_duplicated("actions", (i for i, n in counts.items() if n > 1))
    return findings


async def escalation_view_findings(nc: NatsClient, events: list[tuple[int, EventEnvelope]]) -> Findings:
    """Escalation's own view (``duban.ops.escalation.actions``) holds exactly the actions on the
    stream, in the state the stream gives them: it folded every event, none twice, none skipped."""
    findings = Findings()
    view = await ask(nc, ACTIONS_SUBJECT, ActionList, timeout=10.0)
    states: dict[str, str] = {}
    for _, e in events:
        payload = e.payload
        if isinstance(payload, ActionProposed):
            states[payload.action_id] = "proposed"
        elif isinstance(payload, ActionIssued):
            states[payload.action_id] = "issued"
    seen = {item.action_id: item.state for item in view.items}
    findings.add_lost("actions escalation did not see", set(states) - set(seen))
    findings.add_lost(
        "actions in another state in escalation's view",
        (f"{i}: {seen[i]} not {states[i]}" for i in set(states) & set(seen) if seen[i] != states[i]),
    )
    findings.add_duplicated("actions escalation holds and the stream does not", set(seen) - set(states))
    return findings


# -- the ledger against a rebuild ----------------------------------------------------------------

WALL_CLOCK_COLUMNS = frozenset({"updated_at", "parked_at"})  # when a row was written, not what it says
# Which write a row came from (a rebuild rewrites every county_state row with a new revision).
UNCOMPARED_COLUMNS = WALL_CLOCK_COLUMNS | {"revision"}
LEDGER_TABLES = ("event_log", "county_state", "milestones", "checkpoint", "parked")


async def ledger_snapshot(database_url: str) -> dict[str, list[tuple[Any, ...]]]:
    conn = await asyncpg.connect(database_url)
    try:
        snapshot: dict[str, list[tuple[Any, ...]]] = {}
        for table in LEDGER_TABLES:
            rows = await conn.fetch(f"SELECT * FROM ledger.{table}")
            snapshot[table] = sorted(
                (tuple((k, repr(v)) for k, v in row.items() if k not in UNCOMPARED_COLUMNS) for row in rows),
            )
        return snapshot
    finally:
        await conn.close()


async def ledger_matches_rebuild(
    nc: NatsClient, js: JetStreamContext, database_url: str, describe: Callable[[], str]
) -> tuple[int, str]:
    """Snapshot the live read model, rebuild it from the stream, snapshot again, compare.

    Returns (events in the rebuild, "" or a description of the differences)."""
    before = await ledger_snapshot(database_url)
    report = await ask(nc, REBUILD_SUBJECT, RebuildReport, timeout=120.0)
    after = await ledger_snapshot(database_url)
    stream_last = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
    problems = []
    if report.last_sequence != stream_last:
        problems.append(f"the rebuild read to {report.last_sequence}, the stream ends at {stream_last}")
    for table in LEDGER_TABLES:
        if before[table] != after[table]:
            only_live = [r for r in before[table] if r not in after[table]][:3]
            only_rebuilt = [r for r in after[table] if r not in before[table]][:3]
            problems.append(
                f"ledger.{table}: live {len(before[table])} rows, rebuilt {len(after[table])};"
                f" only live {only_live}; only rebuilt {only_rebuilt}"
            )
    return report.events, ("\n".join(problems) + "\n" + describe()) if problems else ""


# -- notifications -------------------------------------------------------------------------------


async def outbox_rows(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch("SELECT message_id, action_id, channel, state, attempts FROM notifier.outbox"))
    finally:
        await conn.close()


def notification_findings(
    rows: list[asyncpg.Record],
    emails: Counter[str],
    sms: Counter[str],
    events: list[tuple[int, EventEnvelope]],
    notifier_kills: int,
) -> Findings:
    """E-mails at most (1 + kills) times each (a crash between "sent" and "recorded" resends once),
    SMS once (the file channel deduplicates); every issued action planned, every row sent
    actually received."""
    findings = Findings()
    findings.add_duplicated("e-mails", (i for i, n in emails.items() if n > 1 + notifier_kills))
    findings.add_duplicated("sms", (i for i, n in sms.items() if n > 1))
    sent = [r for r in rows if r["state"] == "sent"]
    findings.add_lost(
        "e-mails", (r["message_id"] for r in sent if r["channel"] == "email" and not emails[r["message_id"]])
    )
    findings.add_lost("sms", (r["message_id"] for r in sent if r["channel"] == "file" and not sms[r["message_id"]]))
    planned = {r["action_id"] for r in rows}
    issued = {e.payload.action_id for _, e in events if isinstance(e.payload, ActionIssued)}
    findings.add_lost("actions not planned", issued - planned)
    return findings


async def bounded(what: str, awaitable: Awaitable[T], timeout: float, describe: Callable[[], str]) -> T:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise AssertionError(f"{what} took more than {timeout:g} s\n{describe()}") from None
