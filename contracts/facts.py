"""What a county's events establish, in one programme: the meaning of the event stream. Pure.

Per milestone the last reported progress, completion and its evidence, the granted extension;
the reviews and their state; the procedure findings; the progress tables filed; trial operation
and its monthly reports.
The ledger shows these facts; escalation judges them against deadlines. A retraction takes the
retracted submission's facts out: the county is folded again from its events without them
(nothing stored is edited).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from zoneinfo import ZoneInfo

import msgspec

from contracts.events import (
    ActionConfirmed,
    ActionIssued,
    ActionProposed,
    ActionWaived,
    EventEnvelope,
    ExtensionDecided,
    ExtensionRequested,
    MilestoneCompleted,
    ProcedureFindingRecorded,
    ProgressReported,
    ProgressTableFiled,
    ReviewDecided,
    ReviewRequested,
    SubmissionRetracted,
    TrialOperationReported,
    TrialOperationStarted,
)
from contracts.payloads import Document, ExtensionOutcome, ReviewOutcome
from contracts.programme import Programme


class _Facts(msgspec.Struct, kw_only=True, gc=False):
    """A part of a county's facts. Not tracked by the cyclic garbage collector (gc=False): they
    never form cycles, and the ledger keeps thousands of counties' facts alive between batches,
    which every full collection would otherwise walk."""


class MilestoneFacts(_Facts):
    milestone_id: str
    percent: int = 0
    note: str = ""
    reported_at: dt.datetime | None = None
    steps_done: list[str] = msgspec.field(default_factory=list)
    completed_on: dt.date | None = None
    completed_via: str | None = None
    evidence: list[Document] = msgspec.field(default_factory=list)
    extended_deadline: dt.date | None = None  # the latest granted extension
    extension_requested: dt.date | None = None  # pending request's proposed date


class ReviewFacts(_Facts):
    review_kind: str
    state: str  # requested | passed | returned
    requested_on: dt.date | None = None
    decided_on: dt.date | None = None
    approval_document_number: str | None = None
    comments: str = ""


class FindingFacts(_Facts):
    event_id: str
    rule_id: str
    finding_zh: str
    finding_en: str
    detail: str
    milestone_id: str | None
    recorded_at: dt.datetime


class ProgressTableFacts(_Facts):
    period: str
    filed_on: dt.date  # local date it was filed (occurred)
    submission_id: str
    lines: int


class TrialReportFacts(_Facts):
    """One month of trial operation as reported (the first kept report of the month)."""

    period: str
    filed_on: dt.date  # local date it was filed (occurred)
    submission_id: str
    cases_reported: int
    cases_registered: int
    cases_dispatched: int
    cases_closed: int
    cases_closed_on_time: int
    cases_returned: int


class ActionFacts(_Facts):
    action_id: str
    level_id: str
    level_name: str
    state: str  # proposed | issued | waived
    policy_version: str
    due_on: dt.date
    milestone_id: str | None = None
    period: str | None = None
    explanation_zh: str = ""
    decided_by: str | None = None  # the operator who confirmed or waived
    waive_reason: str = ""


class CountyFacts(_Facts):
    programme_id: str
    county_code: str
    last_sequence: int = 0
    milestones: dict[str, MilestoneFacts] = msgspec.field(default_factory=dict)
    reviews: dict[str, ReviewFacts] = msgspec.field(default_factory=dict)
    findings: list[FindingFacts] = msgspec.field(default_factory=list)
    progress_tables: dict[str, ProgressTableFacts] = msgspec.field(default_factory=dict)
    trial_started_on: dt.date | None = None
    trial_reports: dict[str, TrialReportFacts] = msgspec.field(default_factory=dict)  # period -> report
    retracted: list[str] = msgspec.field(default_factory=list)  # submission ids
    actions: dict[str, ActionFacts] = msgspec.field(default_factory=dict)


def new_facts(programme: Programme, county_code: str) -> CountyFacts:
    return CountyFacts(
        programme_id=programme.id,
        county_code=county_code,
        milestones={m.id: MilestoneFacts(milestone_id=m.id) for m in programme.milestones},
    )


def fold(programme: Programme, county_code: str, events: Iterable[tuple[int, EventEnvelope]]) -> CountyFacts:
    """The county's ledger from its events (sequence, envelope) in stream order."""
    history = list(events)
    ledger = folding(programme, county_code, {r for _, e in history if (r := retraction_of(e)) is not None})
    for sequence, envelope in history:
        fold_in(ledger, sequence, envelope, programme)
    return ledger


# fold() in steps, for a reader that has the retractions before the events (a rebuild folds
# several counties at once from one pass over their logs).
def folding(programme: Programme, county_code: str, retracted: Iterable[str]) -> CountyFacts:
    """The start of a county's fold, given every submission its events retract."""
    ledger = new_facts(programme, county_code)
    ledger.retracted = sorted(retracted)
    return ledger


def fold_in(ledger: CountyFacts, sequence: int, envelope: EventEnvelope, programme: Programme) -> None:
    """The next event (in stream order) of a fold begun with :func:`folding`."""
    ledger.last_sequence = max(ledger.last_sequence, sequence)
    if envelope.submission_id not in ledger.retracted:
        _apply(ledger, envelope, programme)


def retraction_of(envelope: EventEnvelope) -> str | None:
    """The submission this event retracts, or None."""
    payload = envelope.payload
    return payload.retracted_submission_id if isinstance(payload, SubmissionRetracted) else None


def programme_zone(programme: Programme) -> ZoneInfo:
    timezone = programme.programme.timezone
    return _ZONES.get(timezone) or _ZONES.setdefault(timezone, ZoneInfo(timezone))


def apply(programme: Programme, ledger: CountyFacts, sequence: int, envelope: EventEnvelope) -> bool:
    """Fold one more event in; False when it is a retraction and the caller must refold."""
    if sequence <= ledger.last_sequence:
        return True  # already applied: a redelivery changes nothing
    if isinstance(envelope.payload, SubmissionRetracted):
        return False
    ledger.last_sequence = sequence
    if envelope.submission_id not in ledger.retracted:
        _apply(ledger, envelope, programme)
    return True


_ZONES: dict[str, ZoneInfo] = {}  # ZoneInfo(key) is cached too, but looking it up costs as much as a fold


def _apply(ledger: CountyFacts, envelope: EventEnvelope, programme: Programme) -> None:
    payload = envelope.payload
    if isinstance(payload, ProgressReported) and 1 < envelope.occurred_at.year < 9999:
        # Most events. A progress report does not use the local date below (nor the programme's
        # zone), and away from the first and last year datetime knows, computing it could not
        # fail either: skipped.
        _progress(ledger, envelope, payload)
        return
    on = envelope.occurred_at.astimezone(programme_zone(programme)).date()
    match payload:
        case ProgressReported():
            _progress(ledger, envelope, payload)
        case MilestoneCompleted():
            m = ledger.milestones.get(payload.milestone_id)
            if m is not None:
                if m.completed_on is None:
                    m.completed_on, m.completed_via = payload.completed_on, payload.via
                m.evidence = [*m.evidence, *payload.evidence]
                m.percent = 100
                if payload.note:
                    m.note = payload.note
        case ReviewRequested():
            ledger.reviews[payload.review_kind] = ReviewFacts(
                review_kind=payload.review_kind, state="requested", requested_on=on
            )
        case ReviewDecided():
            prior = ledger.reviews.get(payload.review_kind)
            ledger.reviews[payload.review_kind] = ReviewFacts(
                review_kind=payload.review_kind,
                state="passed" if payload.outcome is ReviewOutcome.PASSED else "returned",
                requested_on=prior.requested_on if prior else None,
                decided_on=payload.decided_on,
                approval_document_number=payload.approval_document_number,
                comments=payload.comments,
            )
        case TrialOperationStarted():
            if ledger.trial_started_on is None:
                ledger.trial_started_on = payload.started_on
        case ProgressTableFiled():
            ledger.progress_tables.setdefault(
                payload.period,
                ProgressTableFacts(
                    period=payload.period, filed_on=on, submission_id=envelope.submission_id, lines=len(payload.lines)
                ),
            )
        case TrialOperationReported():
            ledger.trial_reports.setdefault(
                payload.period,
                TrialReportFacts(
                    period=payload.period,
                    filed_on=on,
                    submission_id=envelope.submission_id,
                    cases_reported=payload.cases_reported,
                    cases_registered=payload.cases_registered,
                    cases_dispatched=payload.cases_dispatched,
                    cases_closed=payload.cases_closed,
                    cases_closed_on_time=payload.cases_closed_on_time,
                    cases_returned=payload.cases_returned,
                ),
            )
        case ExtensionRequested():
            m = ledger.milestones.get(payload.milestone_id)
            if m is not None:
                m.extension_requested = payload.proposed_deadline
        case ExtensionDecided():
            m = ledger.milestones.get(payload.milestone_id)
            if m is not None:
                m.extension_requested = None
                if payload.outcome is ExtensionOutcome.GRANTED and payload.new_deadline is not None:
                    m.extended_deadline = payload.new_deadline
        case ProcedureFindingRecorded():
            ledger.findings.append(
                FindingFacts(
                    event_id=envelope.event_id,
                    rule_id=payload.rule_id,
                    finding_zh=payload.finding_zh,
                    finding_en=payload.finding_en,
                    detail=payload.detail,
                    milestone_id=payload.milestone_id,
                    recorded_at=envelope.recorded_at,
                )
            )
        case ActionIssued() | ActionProposed():
            known = ledger.actions.get(payload.action_id)
            issued = isinstance(payload, ActionIssued)
            ledger.actions[payload.action_id] = ActionFacts(
                action_id=payload.action_id,
                level_id=payload.level_id,
                level_name=payload.level_name,
                state="issued" if issued else "proposed",
                policy_version=payload.policy_version,
                due_on=payload.due_on,
                milestone_id=payload.milestone_id,
                period=payload.period,
                explanation_zh=payload.explanation_zh,
                decided_by=getattr(payload, "confirmed_by", None) or (known.decided_by if known else None),
            )
        case ActionConfirmed():
            action = ledger.actions.get(payload.action_id)
            if action is not None:
                action.decided_by = payload.operator
        case ActionWaived():
            action = ledger.actions.get(payload.action_id)
            if action is not None:
                action.state, action.decided_by, action.waive_reason = "waived", payload.operator, payload.reason
        case _:
            pass


def _progress(ledger: CountyFacts, envelope: EventEnvelope, payload: ProgressReported) -> None:
    m = ledger.milestones.get(payload.milestone_id)
    if m is not None:
        m.percent, m.note, m.reported_at = payload.percent, payload.note, envelope.occurred_at
        # (steps_done is only ever this union, sorted: no step reported leaves it as it is)
        if payload.steps_done:
            m.steps_done = sorted(set(m.steps_done).union(payload.steps_done))
