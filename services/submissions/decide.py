"""Deciding a submission: authorise it, check it against the programme and the county's record,
and say which events to store — or why it is refused.

Pure and deterministic: (programme, record, submission, sender, now) → decision. The service
around it does the decoding, the loading and the appending, and for a submission id already
stored reads that submission back from the stream for ``answer_resend``.

Refused outright: malformed, unauthorised, unknown references, dates in the future, a reused
submission id with other content. A step out of the procedure's order is *not* refused: the
fact is stored together with a procedure finding (DOMAIN.md, "The procedure").
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from contracts.commands import (
    COUNTY_COMMANDS,
    CompleteMilestone,
    DecideExtension,
    DecideReview,
    FileProgressTable,
    ReportProgress,
    ReportTrialOperation,
    RequestExtension,
    RequestReview,
    RetractSubmission,
    Role,
    StartTrialOperation,
    Submission,
)
from contracts.errors import ErrorCode
from contracts.events import (
    EventPayload,
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
from contracts.payloads import Document, ExtensionOutcome, ReviewOutcome, recorded_as
from contracts.programme import Decider, Programme
from contracts.replies import Accepted, Refused, refused
from services.submissions.procedure import Trigger, breaches, month_end
from services.submissions.record import CountyRecord, Facts, StoredSubmission, fold_fact

# How far ahead of our clock a sender's clock may run before its time counts as "future".
CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Sender:
    """Who sent the submission, as the subject it arrived on proves (the server enforces it)."""

    role: Role
    county_code: str  # the subject's county token
    user: str | None = None


@dataclass(frozen=True)
class NewEvent:
    event_id: str
    payload: EventPayload


@dataclass(frozen=True)
class Accept:
    events: tuple[NewEvent, ...]
    occurred_at: dt.datetime


@dataclass(frozen=True)
class Resent:
    """The submission id is stored already (its first event at ``first_sequence``): the answer
    is the stored one, or a conflict if the content differs (``answer_resend``)."""

    first_sequence: int


Decision = Accept | Resent | Refused


class _Refusal(Exception):
    def __init__(self, refusal: Refused) -> None:
        self.refusal = refusal


def event_id(submission_id: str, index: int) -> str:
    return f"{submission_id}/{index}"


def authorise(sender: Sender, submission: Submission, programmes: dict[str, Programme]) -> Programme | Refused:
    """Checks that need no history: the subject, the sender's role, the programme and county."""
    sid = submission.submission_id
    if submission.county_code != sender.county_code:
        return refused(
            ErrorCode.COUNTY_MISMATCH,
            submission_id=sid,
            field="$.county_code",
            detail=f"subject county {sender.county_code}, payload county {submission.county_code}",
        )
    is_county_command = isinstance(submission.command, COUNTY_COMMANDS)
    if (sender.role is Role.COUNTY) != is_county_command:
        who = "county systems" if sender.role is Role.COUNTY else f"{sender.role} operators"
        return refused(
            ErrorCode.NOT_AUTHORISED,
            submission_id=sid,
            field="$.command.kind",
            detail=f"{who} may not submit {type(submission.command).__struct_config__.tag}",
        )
    programme = programmes.get(submission.programme_id)
    if programme is None:
        return refused(
            ErrorCode.UNKNOWN_PROGRAMME,
            submission_id=sid,
            field="$.programme_id",
            detail=f"known: {', '.join(sorted(programmes))}",
        )
    if programme.county(submission.county_code) is None:
        return refused(ErrorCode.UNKNOWN_COUNTY, submission_id=sid, field="$.county_code")
    return programme


def decide(
    programme: Programme,
    record: CountyRecord,
    submission: Submission,
    sender: Sender,
    now: dt.datetime,
) -> Decision:
    """Decide an authorised submission against the county's record."""
    sid = submission.submission_id
    first_sequence = record.submissions.get(sid)
    if first_sequence is not None:
        return Resent(first_sequence)
    try:
        occurred_at = _occurred_at(submission, now)
        context = _Context(programme, record, submission, sender, occurred_at, now)
        payloads = list(context.facts_of_command())
    except _Refusal as refusal:
        return refusal.refusal
    return Accept(tuple(_with_findings(programme, record.facts, sid, payloads, context.on)), occurred_at)


def answer_resend(stored: StoredSubmission, submission_id: str, digest: str) -> Accepted | Refused:
    """A submission id sent again: the same content gets the first answer again (nothing new is
    stored), other content under the same id is refused."""
    if stored.digest != digest:
        return refused(ErrorCode.SUBMISSION_ID_CONFLICT, submission_id=submission_id, field="$.submission_id")
    return Accepted(submission_id=submission_id, events=stored.events, findings=stored.findings, duplicate=True)


def _occurred_at(submission: Submission, now: dt.datetime) -> dt.datetime:
    if submission.occurred_at is None:
        return now
    try:  # 0001-01-01T00:00+08:00 is a valid instant on the wire, and no datetime in UTC
        submission.occurred_at.astimezone(dt.UTC)
    except OverflowError:
        raise _Refusal(
            refused(
                ErrorCode.INVALID_VALUE,
                submission_id=submission.submission_id,
                field="$.occurred_at",
                detail=f"{submission.occurred_at.isoformat()} is out of range",
            )
        ) from None
    if submission.occurred_at > now + CLOCK_SKEW:
        raise _Refusal(
            refused(
                ErrorCode.DATE_IN_FUTURE,
                submission_id=submission.submission_id,
                field="$.occurred_at",
                detail=f"{submission.occurred_at.isoformat()} is after {now.isoformat()}",
            )
        )
    return submission.occurred_at


def _with_findings(
    programme: Programme,
    facts_before: Facts,
    submission_id: str,
    payloads: list[EventPayload],
    on: dt.date,
) -> Iterator[NewEvent]:
    """Number the facts and add a finding after each fact that breaks a procedure rule.

    Each fact is judged against the record as it stands with the decision's earlier facts
    applied, so a provincial approval that completes milestone 1.2 satisfies its own rule.
    """
    facts = facts_before.copy()
    index = 0
    for payload in payloads:
        own_id = event_id(submission_id, index)
        index += 1
        yield NewEvent(own_id, payload)
        for trigger in _triggers(programme, facts, payload, on):
            for breach in breaches(programme, facts, trigger):
                yield NewEvent(
                    event_id(submission_id, index),
                    ProcedureFindingRecorded(
                        rule_id=breach.rule.id,
                        trigger_event_id=own_id,
                        finding_zh=breach.rule.finding_zh,
                        finding_en=breach.rule.finding_en,
                        milestone_id=_finding_milestone(programme, trigger),
                        detail=breach.detail,
                    ),
                )
                index += 1
        fold_fact(facts, payload, submission_id)


def _finding_milestone(programme: Programme, trigger: Trigger) -> str | None:
    """The milestone a finding is shown against in the ledger."""
    if trigger.milestone_id is not None:
        return trigger.milestone_id
    if trigger.kind == "review_requested":
        review = programme.review(trigger.value)
        return review.milestone if review else None
    started = programme.milestones_completed_by("trial_operation_started")
    return started[0].id if started else None


def _triggers(programme: Programme, facts: Facts, payload: EventPayload, on: dt.date) -> Iterable[Trigger]:
    """What in ``payload`` the rules look at; ``on`` is the day it was reported."""
    match payload:
        case ProgressReported():
            done = set(facts.steps_done.get(payload.milestone_id, set()))
            for step_id in payload.steps_done:
                if step_id not in done:
                    done.add(step_id)
                    yield Trigger("step_done", on, f"{payload.milestone_id}/{step_id}")
        case MilestoneCompleted():
            if payload.milestone_id not in facts.completed:
                day = payload.completed_on
                yield Trigger("milestone_completed", day, payload.milestone_id)
                milestone = programme.milestone(payload.milestone_id)
                done = facts.steps_done.get(payload.milestone_id, set())
                for step in milestone.steps if milestone else ():
                    if step.id not in done:
                        yield Trigger("step_done", day, f"{payload.milestone_id}/{step.id}")
        case ReviewRequested():
            yield Trigger("review_requested", on, payload.review_kind)
        case TrialOperationStarted():
            if facts.trial_started_on is None:
                yield Trigger("trial_operation_started", payload.started_on)
        case TrialOperationReported():
            yield Trigger("trial_operation_reported", month_end(payload.period), payload.period)
        case _:
            return


class _Context:
    """One submission being turned into facts; raises _Refusal for what cannot be stored."""

    def __init__(
        self,
        programme: Programme,
        record: CountyRecord,
        submission: Submission,
        sender: Sender,
        occurred_at: dt.datetime,
        now: dt.datetime,
    ) -> None:
        self.programme = programme
        self.record = record
        self.submission = submission
        self.sender = sender
        zone = ZoneInfo(programme.programme.timezone)
        self.today = now.astimezone(zone).date()
        self.on = occurred_at.astimezone(zone).date()  # the local day it happened

    def refuse(self, code: ErrorCode, field: str, detail: str = "") -> _Refusal:
        return _Refusal(refused(code, submission_id=self.submission.submission_id, field=field, detail=detail))

    def milestone(self, milestone_id: str, field: str = "$.command.milestone_id") -> None:
        if self.programme.milestone(milestone_id) is None:
            known = ", ".join(m.id for m in self.programme.milestones)
            raise self.refuse(ErrorCode.UNKNOWN_MILESTONE, field, f"{milestone_id!r}; known: {known}")

    def not_future(self, day: dt.date, field: str) -> None:
        if day > self.today:
            raise self.refuse(
                ErrorCode.DATE_IN_FUTURE,
                field,
                f"{day.isoformat()} is after {self.today.isoformat()}",
            )

    def review_kind(self, kind: str) -> Decider:
        review = self.programme.review(kind)
        if review is None:
            known = ", ".join(r.kind for r in self.programme.reviews)
            raise self.refuse(ErrorCode.UNKNOWN_REVIEW_KIND, "$.command.review_kind", f"{kind!r}; known: {known}")
        return review.decided_by

    def prior_submission(self, submission_id: str, field: str) -> None:
        if submission_id not in self.record.submissions:
            raise self.refuse(ErrorCode.UNKNOWN_SUBMISSION, field, submission_id)

    def facts_of_command(self) -> Iterator[EventPayload]:
        command = self.submission.command
        match command:
            case ReportProgress():
                self.milestone(command.milestone_id)
                milestone = self.programme.milestone(command.milestone_id)
                assert milestone is not None
                for i, step in enumerate(command.steps_done):
                    if milestone.step(step) is None:
                        known = ", ".join(s.id for s in milestone.steps) or "none"
                        raise self.refuse(ErrorCode.UNKNOWN_STEP, f"$.command.steps_done[{i}]", f"known: {known}")
                yield recorded_as(ProgressReported, command)
            case CompleteMilestone():
                self.milestone(command.milestone_id)
                self.not_future(command.completed_on, "$.command.completed_on")
                yield recorded_as(MilestoneCompleted, command)  # via="county" by default
            case RequestReview():
                self.review_kind(command.review_kind)
                yield recorded_as(ReviewRequested, command)
            case StartTrialOperation():
                self.not_future(command.started_on, "$.command.started_on")
                yield recorded_as(TrialOperationStarted, command)
                for milestone in self.programme.milestones_completed_by("trial_operation_started"):
                    yield MilestoneCompleted(
                        milestone_id=milestone.id,
                        completed_on=command.started_on,
                        evidence=(Document(title="系统试运行开始"),),
                        via="trial_operation_started",
                    )
            case ReportTrialOperation():
                yield from self._trial_report(command)
            case FileProgressTable():
                first_day = dt.date(int(command.period[:4]), int(command.period[5:]), 1)
                self.not_future(first_day, "$.command.period")
                for i, line in enumerate(command.lines):
                    self.milestone(line.milestone_id, f"$.command.lines[{i}].milestone_id")
                yield recorded_as(ProgressTableFiled, command)
            case RequestExtension():
                self.milestone(command.milestone_id)
                milestone = self.programme.milestone(command.milestone_id)
                assert milestone is not None
                if command.proposed_deadline <= milestone.deadline:
                    raise self.refuse(
                        ErrorCode.INVALID_VALUE,
                        "$.command.proposed_deadline",
                        f"must be after the ledger deadline {milestone.deadline.isoformat()}",
                    )
                yield recorded_as(ExtensionRequested, command)
            case DecideReview():
                yield from self._review_decision(command)
            case DecideExtension():
                yield from self._extension_decision(command)
            case RetractSubmission():
                target = command.retracted_submission_id
                self.prior_submission(target, "$.command.retracted_submission_id")
                if target in self.record.retracted or target in self.record.retractions:
                    raise self.refuse(
                        ErrorCode.INVALID_VALUE,
                        "$.command.retracted_submission_id",
                        "already retracted, or itself a retraction",
                    )
                yield recorded_as(SubmissionRetracted, command)

    def _trial_report(self, command: ReportTrialOperation) -> Iterator[EventPayload]:
        """A month of trial operation: a month that has ended, reported once, with consistent totals.

        A month before trial operation started is stored with a procedure finding (a rule in the
        programme file), not refused: the county has told us a fact out of order.
        """
        last_day = month_end(command.period)
        if last_day >= self.today:
            raise self.refuse(
                ErrorCode.DATE_IN_FUTURE,
                "$.command.period",
                f"{command.period} has not ended on {self.today.isoformat()}: report a month once it is over",
            )
        for field, value, bound_field, bound in (
            ("cases_registered", command.cases_registered, "cases_reported", command.cases_reported),
            ("cases_dispatched", command.cases_dispatched, "cases_registered", command.cases_registered),
            ("cases_closed", command.cases_closed, "cases_dispatched", command.cases_dispatched),
            ("cases_closed_on_time", command.cases_closed_on_time, "cases_closed", command.cases_closed),
            ("cases_returned", command.cases_returned, "cases_dispatched", command.cases_dispatched),
        ):
            if value > bound:
                raise self.refuse(
                    ErrorCode.INCONSISTENT_TOTALS,
                    f"$.command.{field}",
                    f"{field} {value} is more than {bound_field} {bound}",
                )
        earlier = self.record.facts.trial_reports.get(command.period)
        if earlier is not None:
            raise self.refuse(
                ErrorCode.DUPLICATE_PERIOD,
                "$.command.period",
                f"{command.period} was reported in submission {earlier}; "
                "to correct it the city retracts that submission (retract_submission), then report again",
            )
        yield recorded_as(TrialOperationReported, command)

    def _review_decision(self, command: DecideReview) -> Iterator[EventPayload]:
        decider = self.review_kind(command.review_kind)
        if decider is Decider.NONE:
            raise self.refuse(
                ErrorCode.INVALID_VALUE,
                "$.command.review_kind",
                f"{command.review_kind} is reported by the county, not decided by an operator",
            )
        if decider.value != self.sender.role.value:
            raise self.refuse(
                ErrorCode.NOT_AUTHORISED,
                "$.command.review_kind",
                f"{command.review_kind} is decided by the {decider.value}, not the {self.sender.role}",
            )
        self.not_future(command.decided_on, "$.command.decided_on")
        if command.request_submission_id is not None:
            self.prior_submission(command.request_submission_id, "$.command.request_submission_id")
            requested = self.record.facts.reviews_requested.get(command.review_kind, [])
            if command.request_submission_id not in requested:
                raise self.refuse(
                    ErrorCode.INVALID_VALUE,
                    "$.command.request_submission_id",
                    f"not a {command.review_kind} request on record",
                )
        yield recorded_as(ReviewDecided, command)
        if command.outcome is ReviewOutcome.PASSED:
            review = self.programme.review(command.review_kind)
            assert review is not None
            for milestone in self.programme.milestones_completed_by(f"review:{review.kind}"):
                yield MilestoneCompleted(
                    milestone_id=milestone.id,
                    completed_on=command.decided_on,
                    evidence=(Document(title=f"{review.name}通过", number=command.approval_document_number),),
                    via=f"review:{review.kind}",
                )

    def _extension_decision(self, command: DecideExtension) -> Iterator[EventPayload]:
        if self.sender.role is not Role.CITY:
            raise self.refuse(ErrorCode.NOT_AUTHORISED, "$.command.kind", "extensions are decided by the city")
        self.milestone(command.milestone_id)
        if command.request_submission_id is not None:
            self.prior_submission(command.request_submission_id, "$.command.request_submission_id")
            requested = self.record.facts.extension_requests.get(command.request_submission_id)
            if requested != command.milestone_id:
                raise self.refuse(
                    ErrorCode.INVALID_VALUE,
                    "$.command.request_submission_id",
                    f"not an extension request for milestone {command.milestone_id}",
                )
        if command.outcome is ExtensionOutcome.GRANTED:
            milestone = self.programme.milestone(command.milestone_id)
            assert milestone is not None
            if command.new_deadline is None:
                raise self.refuse(ErrorCode.MALFORMED, "$.command.new_deadline", "a grant needs the new deadline")
            if command.new_deadline <= milestone.deadline:
                raise self.refuse(
                    ErrorCode.INVALID_VALUE,
                    "$.command.new_deadline",
                    f"must be after the ledger deadline {milestone.deadline.isoformat()}",
                )
        elif not command.reason:
            raise self.refuse(ErrorCode.MALFORMED, "$.command.reason", "a refusal needs a reason")
        yield recorded_as(ExtensionDecided, command)
