"""The submission decision: authorisation, refusals, idempotency and the procedure's gates.

A county's record is built the way the service builds it: by folding the stored events of
earlier accepted decisions (each NewEvent wrapped into an EventEnvelope and applied in order).
"""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
from itertools import count

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.commands import (
    Command,
    CompleteMilestone,
    DecideExtension,
    DecideReview,
    FileProgressTable,
    ReportProgress,
    RequestExtension,
    RequestReview,
    RetractSubmission,
    Role,
    StartTrialOperation,
    Submission,
    encode,
)
from contracts.errors import ErrorCode
from contracts.events import (
    EVENT_SCHEMA_VERSIONS,
    Actor,
    EventEnvelope,
    MilestoneCompleted,
    ProcedureFindingRecorded,
    event_type_of,
)
from contracts.payloads import (
    Document,
    ExtensionOutcome,
    ProgressTableLine,
    ReviewOutcome,
)
from contracts.programme import Programme, load_default_programme
from contracts.replies import Accepted, Refused
from services.submissions.decide import (
    Accept,
    Decision,
    Resent,
    Sender,
    answer_resend,
    authorise,
    decide,
)
from services.submissions.procedure import add_months
from services.submissions.record import CountyRecord, StoredSubmission, stored_submission

PROGRAMME = load_default_programme()
PROGRAMMES = {PROGRAMME.id: PROGRAMME}
PID = PROGRAMME.id
QINGFENG = "410922"
NANLE = "410923"
SHANGHAI = dt.timezone(dt.timedelta(hours=8))
# Late enough that every ledger date lies in the past.
NOW = dt.datetime(2018, 12, 1, 2, 0, tzinfo=dt.UTC)
EVIDENCE = (Document(title="会议纪要", number="清政〔2017〕1号"),)

TENDER_RULE = "tender-pre-review-before-tender"
PLAN_PRE_RULE = "plan-pre-review-before-provincial-review"
PLAN_COMPLETE_RULE = "plan-approval-before-plan-complete"
CONSTRUCTION_RULE = "plan-approval-before-construction"
TRIAL_RULE = "system-built-before-trial-operation"
SELF_ACCEPTANCE_RULE = "self-acceptance-before-pre-acceptance"
SIX_MONTHS_RULE = "six-months-trial-before-pre-acceptance"
FORMAL_RULE = "pre-acceptance-before-formal-acceptance"


def digest_of(submission: Submission) -> str:
    return hashlib.sha256(encode(submission)).hexdigest()


class County:
    """One county's record in the programme, fed by decisions the way the service feeds it."""

    _ids = count(1)

    def __init__(self, code: str = QINGFENG, programme: Programme = PROGRAMME) -> None:
        self.code = code
        self.programme = programme
        self.record = CountyRecord(programme.id, code)
        self.sequence = 0
        self.stream: list[tuple[EventEnvelope, int]] = []  # what the service's store would hold

    def submission(
        self,
        command: Command,
        *,
        sid: str | None = None,
        occurred_at: dt.datetime | None = None,
        county_code: str | None = None,
        programme_id: str = PID,
    ) -> Submission:
        return Submission(
            submission_id=sid or f"s-{next(self._ids)}",
            programme_id=programme_id,
            county_code=county_code or self.code,
            command=command,
            occurred_at=occurred_at,
        )

    def decide(
        self,
        command: Command,
        *,
        role: Role = Role.COUNTY,
        sid: str | None = None,
        occurred_at: dt.datetime | None = None,
        now: dt.datetime = NOW,
        digest: str | None = None,
        sender_county: str | None = None,
        county_code: str | None = None,
        programme_id: str = PID,
        apply: bool = True,
    ) -> Decision:
        """authorise + decide; an Accept is applied to the record (unless ``apply`` is false)."""
        submission = self.submission(
            command, sid=sid, occurred_at=occurred_at, county_code=county_code, programme_id=programme_id
        )
        sender = Sender(role, sender_county or submission.county_code, user="tester")
        programme = authorise(sender, submission, PROGRAMMES)
        if isinstance(programme, Refused):
            return programme
        decision = decide(programme, self.record, submission, sender, now)
        if apply and isinstance(decision, Accept):
            self.apply(decision, submission, sender, digest or digest_of(submission), now)
        return decision

    def apply(self, accept: Accept, submission: Submission, sender: Sender, digest: str, now: dt.datetime) -> None:
        for new in accept.events:
            self.sequence += 1
            envelope = EventEnvelope(
                event_id=new.event_id,
                schema_version=EVENT_SCHEMA_VERSIONS[event_type_of(new.payload)],
                programme_id=submission.programme_id,
                county_code=submission.county_code,
                occurred_at=accept.occurred_at,
                recorded_at=now,
                actor=Actor(
                    role=sender.role.value,
                    county_code=sender.county_code if sender.role is Role.COUNTY else None,
                    user=sender.user,
                ),
                submission_id=submission.submission_id,
                submission_digest=digest,
                causation_id=submission.submission_id,
                correlation_id=submission.submission_id,
                payload=new.payload,
            )
            self.record.apply(envelope, self.sequence)
            self.stream.append((envelope, self.sequence))

    def stored(self, submission_id: str) -> StoredSubmission:
        """A stored submission read back from the stream, as the service's store does."""
        return stored_submission([(e, n) for e, n in self.stream if e.submission_id == submission_id])

    def resend(self, command: Command, *, sid: str, role: Role = Role.COUNTY) -> Accepted | Refused:
        """Send a submission id again: decide, then answer from the stream as the service does."""
        submission = self.submission(command, sid=sid)
        decision = self.decide(command, sid=sid, role=role, apply=False)
        assert isinstance(decision, Resent), decision
        assert decision.first_sequence == next(n for e, n in self.stream if e.submission_id == sid)
        return answer_resend(self.stored(sid), sid, digest_of(submission))

    # -- shorthands for the usual steps ----------------------------------------------------------
    def ok(self, command: Command, **kwargs: object) -> Accept:
        decision = self.decide(command, **kwargs)  # type: ignore[arg-type]
        assert isinstance(decision, Accept), decision
        return decision

    def request(self, kind: str, **kwargs: object) -> Accept:
        return self.ok(RequestReview(review_kind=kind), **kwargs)

    def decide_review(
        self,
        kind: str,
        outcome: ReviewOutcome = ReviewOutcome.PASSED,
        *,
        role: Role = Role.CITY,
        on: dt.date = dt.date(2017, 4, 1),
        request: str | None = None,
        **kwargs: object,
    ) -> Decision:
        return self.decide(
            DecideReview(
                review_kind=kind,
                outcome=outcome,
                decided_on=on,
                request_submission_id=request,
                approval_document_number="豫建城〔2017〕1号" if outcome is ReviewOutcome.PASSED else None,
            ),
            role=role,
            **kwargs,  # type: ignore[arg-type]
        )

    def pass_review(self, kind: str, role: Role = Role.CITY, **kwargs: object) -> Accept:
        decision = self.decide_review(kind, role=role, **kwargs)  # type: ignore[arg-type]
        assert isinstance(decision, Accept), decision
        return decision

    def complete(self, milestone: str, on: dt.date = dt.date(2017, 5, 1), **kwargs: object) -> Accept:
        return self.ok(CompleteMilestone(milestone_id=milestone, completed_on=on, evidence=EVIDENCE), **kwargs)

    def approve_plan(self) -> None:
        self.request("plan_pre_review")
        self.pass_review("plan_pre_review")
        self.request("provincial_plan_review")
        self.pass_review("provincial_plan_review", Role.PROVINCE, on=dt.date(2017, 4, 20))


def types_of(accept: Accept) -> list[str]:
    return [event_type_of(e.payload) for e in accept.events]


def findings_of(accept: Accept) -> list[ProcedureFindingRecorded]:
    return [e.payload for e in accept.events if isinstance(e.payload, ProcedureFindingRecorded)]


def rules_of(accept: Accept) -> list[str]:
    return [f.rule_id for f in findings_of(accept)]


def refusal(decision: Decision | Accepted, code: ErrorCode, field: str | None) -> Refused:
    assert isinstance(decision, Refused), decision
    assert (decision.code, decision.field) == (code, field), decision
    assert decision.message_zh and decision.message_en
    assert decision.retryable is False
    return decision


# -- county commands -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (ReportProgress(milestone_id="1.1", percent=50, note="项目部已成立"), ["progress_reported"]),
        (
            ReportProgress(milestone_id="1.2", percent=30, steps_done=("designer_selected",)),
            ["progress_reported"],
        ),
        (
            CompleteMilestone(milestone_id="1.1", completed_on=dt.date(2017, 3, 30), evidence=EVIDENCE),
            ["milestone_completed"],
        ),
        (RequestReview(review_kind="plan_pre_review"), ["review_requested"]),
        (RequestReview(review_kind="self_acceptance"), ["review_requested"]),
        (
            FileProgressTable(
                period="2017-04",
                lines=(
                    ProgressTableLine(milestone_id="1.1", percent=100),
                    ProgressTableLine(milestone_id="1.2", percent=40),
                ),
            ),
            ["progress_table_filed"],
        ),
        (
            RequestExtension(milestone_id="1.3", proposed_deadline=dt.date(2017, 7, 31), reason="招标流标"),
            ["extension_requested"],
        ),
    ],
)
def test_county_command_accepted(command: Command, expected: list[str]) -> None:
    county = County()
    decision = county.decide(command, sid="c-1")
    assert isinstance(decision, Accept)
    assert types_of(decision) == expected
    assert [e.event_id for e in decision.events] == [f"c-1/{i}" for i in range(len(expected))]
    assert decision.occurred_at == NOW  # no occurred_at given: when we received it
    assert [e.event_type for e in county.stored("c-1").events] == expected


def test_payload_carries_the_command_fields() -> None:
    decision = County().ok(ReportProgress(milestone_id="1.1", percent=50, note="过半"))
    payload = decision.events[0].payload
    assert (payload.milestone_id, payload.percent, payload.note) == ("1.1", 50, "过半")  # type: ignore[union-attr]


def test_county_completion_is_via_county() -> None:
    decision = County().complete("1.1", on=dt.date(2017, 3, 30))
    (event,) = decision.events
    assert isinstance(event.payload, MilestoneCompleted)
    assert (event.payload.via, event.payload.completed_on) == ("county", dt.date(2017, 3, 30))


def test_occurred_at_in_the_past_is_kept() -> None:
    when = dt.datetime(2017, 5, 2, 9, 0, tzinfo=SHANGHAI)
    decision = County().ok(ReportProgress(milestone_id="1.1", percent=10), occurred_at=when)
    assert decision.occurred_at == when


def test_trial_operation_after_23_completes_31_without_finding() -> None:
    county = County()
    county.approve_plan()
    county.complete("2.3", on=dt.date(2017, 11, 28))
    decision = county.ok(StartTrialOperation(started_on=dt.date(2017, 12, 1)), sid="trial")
    assert types_of(decision) == ["trial_operation_started", "milestone_completed"]
    completed = decision.events[1].payload
    assert isinstance(completed, MilestoneCompleted)
    assert (completed.milestone_id, completed.completed_on, completed.via) == (
        "3.1",
        dt.date(2017, 12, 1),
        "trial_operation_started",
    )
    assert county.record.facts.trial_started_on == dt.date(2017, 12, 1)
    assert county.record.facts.completed["3.1"] == dt.date(2017, 12, 1)


def test_trial_operation_before_23_is_stored_with_a_finding_and_completes_31() -> None:
    county = County()
    decision = county.ok(StartTrialOperation(started_on=dt.date(2017, 11, 1)), sid="trial")
    assert types_of(decision) == [
        "trial_operation_started",
        "procedure_finding_recorded",
        "milestone_completed",
    ]
    (finding,) = findings_of(decision)
    assert finding.rule_id == TRIAL_RULE
    assert finding.trigger_event_id == "trial/0"
    assert "2.3" in finding.detail
    assert "3.1" in county.record.facts.completed
    # A second report of the start is not a second breach.
    again = county.ok(StartTrialOperation(started_on=dt.date(2017, 11, 2)))
    assert findings_of(again) == []
    assert county.record.facts.trial_started_on == dt.date(2017, 11, 1)


# -- operator commands ---------------------------------------------------------------------------
def test_city_decides_a_pre_review_for_a_request_on_record() -> None:
    county = County()
    county.request("plan_pre_review", sid="req-1")
    decision = county.decide_review("plan_pre_review", request="req-1", sid="dec-1")
    assert isinstance(decision, Accept)
    assert types_of(decision) == ["review_decided"]
    assert county.record.facts.reviews_passed == {"plan_pre_review": dt.date(2017, 4, 1)}


def test_decision_without_request_on_record_is_accepted() -> None:
    decision = County().decide_review("tender_pre_review")
    assert isinstance(decision, Accept) and types_of(decision) == ["review_decided"]


def test_passed_provincial_review_completes_12_without_finding() -> None:
    county = County()
    county.request("plan_pre_review")
    county.pass_review("plan_pre_review")
    county.request("provincial_plan_review", sid="prov-req")
    decision = county.pass_review(
        "provincial_plan_review", Role.PROVINCE, on=dt.date(2017, 4, 25), request="prov-req", sid="prov"
    )
    assert types_of(decision) == ["review_decided", "milestone_completed"]
    completed = decision.events[1].payload
    assert isinstance(completed, MilestoneCompleted)
    assert completed.milestone_id == "1.2"
    assert completed.via == "review:provincial_plan_review"
    assert completed.completed_on == dt.date(2017, 4, 25)
    assert completed.evidence[0].number == "豫建城〔2017〕1号"
    assert findings_of(decision) == []
    assert county.record.facts.completed["1.2"] == dt.date(2017, 4, 25)


def test_returned_provincial_review_does_not_complete_12() -> None:
    county = County()
    decision = county.decide_review("provincial_plan_review", ReviewOutcome.RETURNED, role=Role.PROVINCE)
    assert isinstance(decision, Accept)
    assert types_of(decision) == ["review_decided"]
    assert "1.2" not in county.record.facts.completed
    assert "provincial_plan_review" not in county.record.facts.reviews_passed


@pytest.mark.parametrize(("kind", "milestone"), [("pre_acceptance", "3.2"), ("formal_acceptance", "3.3")])
def test_passed_acceptance_completes_its_milestone(kind: str, milestone: str) -> None:
    decision = County().pass_review(kind, Role.PROVINCE, on=dt.date(2018, 7, 20))
    assert types_of(decision) == ["review_decided", "milestone_completed"]
    completed = decision.events[1].payload
    assert isinstance(completed, MilestoneCompleted)
    assert (completed.milestone_id, completed.via) == (milestone, f"review:{kind}")


def test_returned_after_passed_withdraws_the_pass() -> None:
    county = County()
    county.pass_review("tender_pre_review")
    county.decide_review("tender_pre_review", ReviewOutcome.RETURNED)
    assert "tender_pre_review" not in county.record.facts.reviews_passed
    decision = county.ok(ReportProgress(milestone_id="1.3", percent=60, steps_done=("tender_published",)))
    assert rules_of(decision) == [TENDER_RULE]


def test_city_grants_an_extension_on_record() -> None:
    county = County()
    county.ok(
        RequestExtension(milestone_id="1.3", proposed_deadline=dt.date(2017, 7, 31), reason="流标"),
        sid="ext-req",
    )
    decision = county.decide(
        DecideExtension(
            milestone_id="1.3",
            outcome=ExtensionOutcome.GRANTED,
            request_submission_id="ext-req",
            new_deadline=dt.date(2017, 7, 15),
        ),
        role=Role.CITY,
    )
    assert isinstance(decision, Accept)
    assert types_of(decision) == ["extension_decided"]


def test_city_refuses_an_extension_with_a_reason() -> None:
    decision = County().decide(
        DecideExtension(milestone_id="1.3", outcome=ExtensionOutcome.REFUSED, reason="理由不充分"),
        role=Role.CITY,
    )
    assert isinstance(decision, Accept) and types_of(decision) == ["extension_decided"]


def test_extension_refused_without_reason_is_malformed() -> None:
    decision = County().decide(DecideExtension(milestone_id="1.3", outcome=ExtensionOutcome.REFUSED), role=Role.CITY)
    refusal(decision, ErrorCode.MALFORMED, "$.command.reason")


@pytest.mark.parametrize("role", [Role.CITY, Role.PROVINCE])
def test_operator_retracts_a_submission(role: Role) -> None:
    county = County()
    county.complete("1.1", sid="done-1")
    assert "1.1" in county.record.facts.completed
    decision = county.ok(RetractSubmission(retracted_submission_id="done-1", reason="误报"), role=role, sid="retract-1")
    assert types_of(decision) == ["submission_retracted"]
    assert [e.event_id for e in decision.events] == ["retract-1/0"]
    assert county.record.is_retracted("done-1")
    assert "1.1" not in county.record.facts.completed


# -- the procedure's gates: out of order is stored, with a finding --------------------------------
def test_tender_published_without_pre_review_is_stored_with_finding() -> None:
    county = County()
    decision = county.ok(ReportProgress(milestone_id="1.3", percent=60, steps_done=("tender_published",)), sid="p1")
    assert types_of(decision) == ["progress_reported", "procedure_finding_recorded"]
    (finding,) = findings_of(decision)
    assert finding.rule_id == TENDER_RULE
    assert finding.trigger_event_id == "p1/0"
    assert finding.milestone_id == "1.3"
    assert finding.finding_zh == "招标文件未经市城管综合执法局预审通过即发布"
    assert finding.finding_en.startswith("tender documents were published")
    assert "招标文件预审" in finding.detail
    assert decision.events[1].event_id == "p1/1"
    # The fact stands, and the stored submission remembers its finding.
    assert county.record.facts.steps_done["1.3"] == {"tender_published"}
    assert [f.rule_id for f in county.stored("p1").findings] == [TENDER_RULE]


def test_tender_published_after_passed_pre_review_has_no_finding() -> None:
    county = County()
    county.request("tender_pre_review", sid="tr")
    county.pass_review("tender_pre_review", request="tr")
    decision = county.ok(ReportProgress(milestone_id="1.3", percent=60, steps_done=("tender_published",)))
    assert types_of(decision) == ["progress_reported"]


def test_tender_pre_review_merely_requested_is_not_enough() -> None:
    county = County()
    county.request("tender_pre_review")
    decision = county.ok(ReportProgress(milestone_id="1.3", percent=60, steps_done=("tender_published",)))
    assert rules_of(decision) == [TENDER_RULE]


def test_tender_finding_is_raised_once_per_step() -> None:
    county = County()
    county.ok(ReportProgress(milestone_id="1.3", percent=60, steps_done=("tender_published",)))
    again = county.ok(ReportProgress(milestone_id="1.3", percent=70, steps_done=("tender_published",)))
    assert findings_of(again) == []
    done = county.complete("1.3", on=dt.date(2017, 6, 20))
    assert findings_of(done) == []


def test_step_listed_twice_in_one_report_gives_one_finding() -> None:
    decision = County().ok(
        ReportProgress(milestone_id="1.3", percent=60, steps_done=("tender_published", "tender_published"))
    )
    assert rules_of(decision) == [TENDER_RULE]


def test_completing_13_without_tender_pre_review_is_a_finding() -> None:
    county = County()
    decision = county.complete("1.3", on=dt.date(2017, 6, 20), sid="c13")
    assert types_of(decision) == ["milestone_completed", "procedure_finding_recorded"]
    (finding,) = findings_of(decision)
    assert (finding.rule_id, finding.milestone_id, finding.trigger_event_id) == (TENDER_RULE, "1.3", "c13/0")


def test_completing_13_after_tender_pre_review_is_clean() -> None:
    county = County()
    county.pass_review("tender_pre_review")
    assert findings_of(county.complete("1.3", on=dt.date(2017, 6, 20))) == []


def test_provincial_review_requested_without_plan_pre_review_is_a_finding() -> None:
    county = County()
    decision = county.request("provincial_plan_review", sid="prov")
    assert types_of(decision) == ["review_requested", "procedure_finding_recorded"]
    (finding,) = findings_of(decision)
    assert finding.rule_id == PLAN_PRE_RULE
    assert finding.milestone_id == "1.2"  # the milestone the review belongs to
    assert finding.trigger_event_id == "prov/0"


def test_provincial_review_after_returned_pre_review_is_a_finding() -> None:
    county = County()
    county.request("plan_pre_review")
    county.decide_review("plan_pre_review", ReviewOutcome.RETURNED)
    assert rules_of(county.request("provincial_plan_review")) == [PLAN_PRE_RULE]


def test_provincial_review_after_passed_pre_review_is_clean() -> None:
    county = County()
    county.request("plan_pre_review")
    county.pass_review("plan_pre_review")
    assert findings_of(county.request("provincial_plan_review")) == []


@pytest.mark.parametrize("milestone", ["2.1", "2.2", "2.3"])
def test_phase_two_completed_before_provincial_approval_is_a_finding(milestone: str) -> None:
    county = County()
    county.request("plan_pre_review")
    county.pass_review("plan_pre_review")  # a city pre-review is not the approval
    decision = county.complete(milestone, on=dt.date(2017, 7, 20))
    assert types_of(decision)[:2] == ["milestone_completed", "procedure_finding_recorded"]
    assert CONSTRUCTION_RULE in rules_of(decision)
    finding = next(f for f in findings_of(decision) if f.rule_id == CONSTRUCTION_RULE)
    assert finding.milestone_id == milestone
    assert milestone in county.record.facts.completed


@pytest.mark.parametrize("milestone", ["2.1", "2.2", "2.3"])
def test_phase_two_completed_after_provincial_approval_is_clean(milestone: str) -> None:
    county = County()
    county.approve_plan()
    assert findings_of(county.complete(milestone, on=dt.date(2017, 7, 20))) == []


def test_phase_two_progress_is_not_a_breach() -> None:
    # Only completion of phase-2 work is judged; reporting progress is not.
    assert findings_of(County().ok(ReportProgress(milestone_id="2.1", percent=40))) == []


def test_county_reporting_12_complete_without_provincial_approval_is_a_finding() -> None:
    county = County()
    decision = county.complete("1.2", on=dt.date(2017, 4, 28), sid="c12")
    assert PLAN_COMPLETE_RULE in rules_of(decision)
    finding = next(f for f in findings_of(decision) if f.rule_id == PLAN_COMPLETE_RULE)
    assert (finding.milestone_id, finding.trigger_event_id) == ("1.2", "c12/0")


def test_county_reporting_12_complete_after_provincial_approval_is_clean() -> None:
    county = County()
    county.request("plan_pre_review")
    county.pass_review("plan_pre_review")
    county.request("provincial_plan_review")
    county.pass_review("provincial_plan_review", Role.PROVINCE)
    assert findings_of(county.complete("1.2", on=dt.date(2017, 4, 28))) == []


def _in_trial_since(started: dt.date) -> County:
    county = County()
    county.approve_plan()
    county.complete("2.3", on=dt.date(2017, 8, 1))
    county.ok(StartTrialOperation(started_on=started))
    county.request("self_acceptance")
    return county


def test_pre_acceptance_before_six_months_of_trial_is_a_finding_naming_the_earliest_date() -> None:
    county = _in_trial_since(dt.date(2017, 8, 31))
    decision = county.request("pre_acceptance", occurred_at=dt.datetime(2018, 2, 27, 10, 0, tzinfo=SHANGHAI), sid="pa")
    assert types_of(decision) == ["review_requested", "procedure_finding_recorded"]
    (finding,) = findings_of(decision)
    assert finding.rule_id == SIX_MONTHS_RULE
    assert finding.milestone_id == "3.2"
    assert "2018-02-28" in finding.detail  # 2017-08-31 + 6 months, clamped to February's end
    assert "2017-08-31" in finding.detail


def test_pre_acceptance_at_exactly_six_months_is_clean() -> None:
    county = _in_trial_since(dt.date(2017, 8, 31))
    decision = county.request("pre_acceptance", occurred_at=dt.datetime(2018, 2, 28, 10, 0, tzinfo=SHANGHAI))
    assert findings_of(decision) == []


def test_six_months_are_counted_on_the_local_day() -> None:
    # 2018-02-27T16:30Z is already 2018-02-28 in Shanghai: six months are up.
    county = _in_trial_since(dt.date(2017, 8, 31))
    decision = county.request("pre_acceptance", occurred_at=dt.datetime(2018, 2, 27, 16, 30, tzinfo=dt.UTC))
    assert findings_of(decision) == []
    county = _in_trial_since(dt.date(2017, 8, 31))
    decision = county.request("pre_acceptance", occurred_at=dt.datetime(2018, 2, 27, 15, 59, tzinfo=dt.UTC))
    assert rules_of(decision) == [SIX_MONTHS_RULE]


def test_pre_acceptance_without_trial_operation_is_a_finding() -> None:
    county = County()
    county.request("self_acceptance")
    (finding,) = findings_of(county.request("pre_acceptance"))
    assert finding.rule_id == SIX_MONTHS_RULE
    assert "试运行" in finding.detail


def test_pre_acceptance_without_self_acceptance_is_a_finding() -> None:
    county = County()
    county.approve_plan()
    county.complete("2.3", on=dt.date(2017, 8, 1))
    county.ok(StartTrialOperation(started_on=dt.date(2017, 9, 1)))
    decision = county.request("pre_acceptance", occurred_at=dt.datetime(2018, 4, 1, tzinfo=SHANGHAI))
    assert rules_of(decision) == [SELF_ACCEPTANCE_RULE]
    assert findings_of(decision)[0].milestone_id == "3.2"


def test_self_acceptance_reported_counts_as_passed() -> None:
    county = _in_trial_since(dt.date(2017, 9, 1))
    decision = county.request("pre_acceptance", occurred_at=dt.datetime(2018, 4, 1, tzinfo=SHANGHAI))
    assert findings_of(decision) == []


def test_formal_acceptance_without_passed_pre_acceptance_is_a_finding() -> None:
    county = County()
    county.request("pre_acceptance")
    decision = county.request("formal_acceptance", sid="fa")
    (finding,) = findings_of(decision)
    assert (finding.rule_id, finding.milestone_id, finding.trigger_event_id) == (FORMAL_RULE, "3.3", "fa/0")


def test_formal_acceptance_after_passed_pre_acceptance_is_clean() -> None:
    county = County()
    county.pass_review("pre_acceptance", Role.PROVINCE, on=dt.date(2018, 7, 20))
    assert findings_of(county.request("formal_acceptance")) == []


def test_retracting_the_passed_tender_pre_review_brings_the_finding_back() -> None:
    county = County()
    county.request("tender_pre_review", sid="tr")
    county.pass_review("tender_pre_review", request="tr", sid="pass-tr")
    county.ok(RetractSubmission(retracted_submission_id="pass-tr", reason="批复有误"), role=Role.CITY)
    assert "tender_pre_review" not in county.record.facts.reviews_passed
    decision = county.ok(ReportProgress(milestone_id="1.3", percent=60, steps_done=("tender_published",)))
    assert rules_of(decision) == [TENDER_RULE]


def test_retracting_the_provincial_approval_reopens_12_and_the_construction_gate() -> None:
    county = County()
    county.request("plan_pre_review")
    county.pass_review("plan_pre_review")
    county.pass_review("provincial_plan_review", Role.PROVINCE, sid="approval")
    assert "1.2" in county.record.facts.completed
    county.ok(RetractSubmission(retracted_submission_id="approval", reason="文号错误"), role=Role.PROVINCE)
    assert "1.2" not in county.record.facts.completed
    assert CONSTRUCTION_RULE in rules_of(county.complete("2.1", on=dt.date(2017, 7, 20)))


def test_phase_two_completed_on_a_date_before_the_approval_is_a_finding() -> None:
    county = County()
    county.request("plan_pre_review")
    county.pass_review("plan_pre_review")
    county.pass_review("provincial_plan_review", Role.PROVINCE, on=dt.date(2017, 4, 20))
    decision = county.complete("2.1", on=dt.date(2017, 3, 15))  # built before the approval
    assert CONSTRUCTION_RULE in rules_of(decision)


def test_trial_operation_started_on_a_date_before_23_completed_is_a_finding() -> None:
    county = County()
    county.approve_plan()
    county.complete("2.3", on=dt.date(2017, 11, 28))
    decision = county.ok(StartTrialOperation(started_on=dt.date(2017, 10, 1)))
    assert rules_of(decision) == [TRIAL_RULE]


def test_retracted_facts_do_not_come_back_with_later_events() -> None:
    county = County()
    county.pass_review("tender_pre_review", sid="pass-tr")
    county.ok(RetractSubmission(retracted_submission_id="pass-tr", reason="批复有误"), role=Role.CITY)
    county.ok(ReportProgress(milestone_id="1.1", percent=10))
    assert "tender_pre_review" not in county.record.facts.reviews_passed


def test_findings_do_not_change_the_record_they_were_judged_against() -> None:
    county = County()
    before = county.record.facts
    decision = county.decide(
        ReportProgress(milestone_id="1.3", percent=60, steps_done=("tender_published",)), apply=False
    )
    assert isinstance(decision, Accept)
    assert county.record.facts is before and county.record.facts.steps_done == {}


# -- refusals ------------------------------------------------------------------------------------
def test_county_mismatch() -> None:
    decision = County(QINGFENG).decide(
        ReportProgress(milestone_id="1.1", percent=10), county_code=NANLE, sender_county=QINGFENG
    )
    r = refusal(decision, ErrorCode.COUNTY_MISMATCH, "$.county_code")
    assert QINGFENG in r.detail and NANLE in r.detail


def test_operator_command_from_a_county_subject() -> None:
    county = County()
    decision = county.decide_review("plan_pre_review", role=Role.COUNTY)
    refusal(decision, ErrorCode.NOT_AUTHORISED, "$.command.kind")
    decision = county.decide(RetractSubmission(retracted_submission_id="x", reason="r"), role=Role.COUNTY)
    refusal(decision, ErrorCode.NOT_AUTHORISED, "$.command.kind")


@pytest.mark.parametrize("role", [Role.CITY, Role.PROVINCE])
def test_county_command_on_an_operator_subject(role: Role) -> None:
    decision = County().decide(ReportProgress(milestone_id="1.1", percent=10), role=role)
    refusal(decision, ErrorCode.NOT_AUTHORISED, "$.command.kind")


def test_unknown_programme() -> None:
    decision = County().decide(ReportProgress(milestone_id="1.1", percent=10), programme_id="kaifeng-2017-1")
    r = refusal(decision, ErrorCode.UNKNOWN_PROGRAMME, "$.programme_id")
    assert PID in r.detail


def test_unknown_county() -> None:
    decision = County("410101").decide(ReportProgress(milestone_id="1.1", percent=10))
    refusal(decision, ErrorCode.UNKNOWN_COUNTY, "$.county_code")


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (ReportProgress(milestone_id="4.1", percent=10), "$.command.milestone_id"),
        (
            CompleteMilestone(milestone_id="1.4", completed_on=dt.date(2017, 5, 1), evidence=EVIDENCE),
            "$.command.milestone_id",
        ),
        (
            RequestExtension(milestone_id="3.4", proposed_deadline=dt.date(2019, 1, 1), reason="r"),
            "$.command.milestone_id",
        ),
        (
            FileProgressTable(
                period="2017-05",
                lines=(
                    ProgressTableLine(milestone_id="1.1", percent=100),
                    ProgressTableLine(milestone_id="9.9", percent=0),
                ),
            ),
            "$.command.lines[1].milestone_id",
        ),
    ],
)
def test_unknown_milestone(command: Command, field: str) -> None:
    r = refusal(County().decide(command), ErrorCode.UNKNOWN_MILESTONE, field)
    assert "1.1" in r.detail  # names the known ones


def test_unknown_milestone_in_extension_decision() -> None:
    decision = County().decide(
        DecideExtension(milestone_id="4.1", outcome=ExtensionOutcome.REFUSED, reason="r"), role=Role.CITY
    )
    refusal(decision, ErrorCode.UNKNOWN_MILESTONE, "$.command.milestone_id")


def test_unknown_step() -> None:
    decision = County().decide(
        ReportProgress(milestone_id="1.3", percent=10, steps_done=("project_registered", "tender_issued"))
    )
    r = refusal(decision, ErrorCode.UNKNOWN_STEP, "$.command.steps_done[1]")
    assert "tender_published" in r.detail


def test_step_of_another_milestone_is_unknown() -> None:
    decision = County().decide(ReportProgress(milestone_id="1.2", percent=10, steps_done=("tender_published",)))
    refusal(decision, ErrorCode.UNKNOWN_STEP, "$.command.steps_done[0]")


def test_step_on_a_milestone_without_steps() -> None:
    decision = County().decide(ReportProgress(milestone_id="1.1", percent=10, steps_done=("anything",)))
    r = refusal(decision, ErrorCode.UNKNOWN_STEP, "$.command.steps_done[0]")
    assert "none" in r.detail


def test_unknown_review_kind() -> None:
    county = County()
    refusal(
        county.decide(RequestReview(review_kind="expert_review")),
        ErrorCode.UNKNOWN_REVIEW_KIND,
        "$.command.review_kind",
    )
    refusal(county.decide_review("expert_review"), ErrorCode.UNKNOWN_REVIEW_KIND, "$.command.review_kind")


# The timezone is Asia/Shanghai: 2017-06-01T17:00Z is already 2017-06-02 there.
LATE_UTC = dt.datetime(2017, 6, 1, 17, 0, tzinfo=dt.UTC)
EARLY_UTC = dt.datetime(2017, 6, 1, 15, 59, tzinfo=dt.UTC)  # 23:59 on 06-01 in Shanghai


def test_completion_today_in_shanghai_is_not_future() -> None:
    county = County()
    assert isinstance(county.complete("1.1", on=dt.date(2017, 6, 2), now=LATE_UTC), Accept)


def test_completion_tomorrow_in_shanghai_is_future() -> None:
    decision = County().decide(
        CompleteMilestone(milestone_id="1.1", completed_on=dt.date(2017, 6, 3), evidence=EVIDENCE),
        now=LATE_UTC,
    )
    r = refusal(decision, ErrorCode.DATE_IN_FUTURE, "$.command.completed_on")
    assert "2017-06-02" in r.detail and "2017-06-03" in r.detail


def test_completion_on_the_utc_date_before_shanghai_midnight_is_future() -> None:
    county = County()
    decision = county.decide(
        CompleteMilestone(milestone_id="1.1", completed_on=dt.date(2017, 6, 2), evidence=EVIDENCE),
        now=EARLY_UTC,
    )
    refusal(decision, ErrorCode.DATE_IN_FUTURE, "$.command.completed_on")
    assert isinstance(county.complete("1.1", on=dt.date(2017, 6, 1), now=EARLY_UTC), Accept)


def test_other_future_dates_are_refused() -> None:
    county = County()
    refusal(
        county.decide(StartTrialOperation(started_on=dt.date(2017, 6, 3)), now=LATE_UTC),
        ErrorCode.DATE_IN_FUTURE,
        "$.command.started_on",
    )
    refusal(
        county.decide_review("plan_pre_review", on=dt.date(2017, 6, 3), now=LATE_UTC),
        ErrorCode.DATE_IN_FUTURE,
        "$.command.decided_on",
    )
    refusal(
        county.decide(
            FileProgressTable(period="2017-07", lines=(ProgressTableLine(milestone_id="1.1", percent=1),)),
            now=LATE_UTC,
        ),
        ErrorCode.DATE_IN_FUTURE,
        "$.command.period",
    )
    table = FileProgressTable(period="2017-06", lines=(ProgressTableLine(milestone_id="1.1", percent=1),))
    assert isinstance(county.decide(table, now=LATE_UTC), Accept)


def test_occurred_at_within_clock_skew_is_accepted() -> None:
    when = NOW + dt.timedelta(minutes=5)
    decision = County().ok(ReportProgress(milestone_id="1.1", percent=10), occurred_at=when)
    assert decision.occurred_at == when


def test_occurred_at_beyond_clock_skew_is_refused() -> None:
    decision = County().decide(
        ReportProgress(milestone_id="1.1", percent=10),
        occurred_at=NOW + dt.timedelta(minutes=5, seconds=1),
    )
    refusal(decision, ErrorCode.DATE_IN_FUTURE, "$.occurred_at")


def test_province_may_not_decide_a_city_review() -> None:
    county = County()
    r = refusal(
        county.decide_review("plan_pre_review", role=Role.PROVINCE),
        ErrorCode.NOT_AUTHORISED,
        "$.command.review_kind",
    )
    assert "city" in r.detail
    refusal(county.decide_review("tender_pre_review", role=Role.PROVINCE), ErrorCode.NOT_AUTHORISED,
            "$.command.review_kind")  # fmt: skip


def test_city_may_not_decide_a_provincial_review() -> None:
    county = County()
    decision = county.decide_review("provincial_plan_review", role=Role.CITY)
    refusal(decision, ErrorCode.NOT_AUTHORISED, "$.command.review_kind")
    assert "1.2" not in county.record.facts.completed


@pytest.mark.parametrize("role", [Role.CITY, Role.PROVINCE])
def test_nobody_decides_self_acceptance(role: Role) -> None:
    decision = County().decide_review("self_acceptance", role=role)
    refusal(decision, ErrorCode.INVALID_VALUE, "$.command.review_kind")


def test_review_decision_for_unknown_request() -> None:
    decision = County().decide_review("plan_pre_review", request="never-sent")
    refusal(decision, ErrorCode.UNKNOWN_SUBMISSION, "$.command.request_submission_id")


def test_review_decision_for_a_request_of_another_kind() -> None:
    county = County()
    county.request("tender_pre_review", sid="tr")
    decision = county.decide_review("plan_pre_review", request="tr")
    refusal(decision, ErrorCode.INVALID_VALUE, "$.command.request_submission_id")


def test_extension_decided_by_province() -> None:
    decision = County().decide(
        DecideExtension(milestone_id="1.3", outcome=ExtensionOutcome.GRANTED, new_deadline=dt.date(2017, 8, 1)),
        role=Role.PROVINCE,
    )
    refusal(decision, ErrorCode.NOT_AUTHORISED, "$.command.kind")


def test_extension_granted_without_new_deadline() -> None:
    decision = County().decide(DecideExtension(milestone_id="1.3", outcome=ExtensionOutcome.GRANTED), role=Role.CITY)
    refusal(decision, ErrorCode.MALFORMED, "$.command.new_deadline")


@pytest.mark.parametrize("new_deadline", [dt.date(2017, 6, 30), dt.date(2017, 6, 1)])
def test_extension_granted_not_after_the_ledger_deadline(new_deadline: dt.date) -> None:
    decision = County().decide(
        DecideExtension(milestone_id="1.3", outcome=ExtensionOutcome.GRANTED, new_deadline=new_deadline),
        role=Role.CITY,
    )
    refusal(decision, ErrorCode.INVALID_VALUE, "$.command.new_deadline")


def test_extension_decision_for_a_request_of_another_milestone() -> None:
    county = County()
    county.ok(RequestExtension(milestone_id="1.3", proposed_deadline=dt.date(2017, 7, 31), reason="r"), sid="ext")
    decision = county.decide(
        DecideExtension(
            milestone_id="2.1",
            outcome=ExtensionOutcome.GRANTED,
            request_submission_id="ext",
            new_deadline=dt.date(2017, 9, 1),
        ),
        role=Role.CITY,
    )
    refusal(decision, ErrorCode.INVALID_VALUE, "$.command.request_submission_id")


@pytest.mark.parametrize("proposed", [dt.date(2017, 6, 30), dt.date(2017, 5, 31)])
def test_extension_proposed_not_after_the_ledger_deadline(proposed: dt.date) -> None:
    decision = County().decide(RequestExtension(milestone_id="1.3", proposed_deadline=proposed, reason="r"))
    r = refusal(decision, ErrorCode.INVALID_VALUE, "$.command.proposed_deadline")
    assert "2017-06-30" in r.detail


def test_retraction_of_an_unknown_submission() -> None:
    decision = County().decide(RetractSubmission(retracted_submission_id="never-sent", reason="r"), role=Role.CITY)
    r = refusal(decision, ErrorCode.UNKNOWN_SUBMISSION, "$.command.retracted_submission_id")
    assert "never-sent" in r.detail


def test_retracting_twice() -> None:
    county = County()
    county.complete("1.1", sid="done")
    county.ok(RetractSubmission(retracted_submission_id="done", reason="r"), role=Role.CITY)
    decision = county.decide(RetractSubmission(retracted_submission_id="done", reason="r"), role=Role.CITY)
    refusal(decision, ErrorCode.INVALID_VALUE, "$.command.retracted_submission_id")


def test_retracting_a_retraction() -> None:
    county = County()
    county.complete("1.1", sid="done")
    county.ok(RetractSubmission(retracted_submission_id="done", reason="r"), role=Role.CITY, sid="undo")
    decision = county.decide(RetractSubmission(retracted_submission_id="undo", reason="r"), role=Role.CITY)
    refusal(decision, ErrorCode.INVALID_VALUE, "$.command.retracted_submission_id")
    assert "1.1" not in county.record.facts.completed


def test_a_refusal_stores_nothing() -> None:
    county = County()
    county.decide(ReportProgress(milestone_id="4.1", percent=10), sid="bad")
    assert county.record.submissions == {} and county.sequence == 0


# -- idempotency ---------------------------------------------------------------------------------
def test_resend_with_same_digest_is_a_duplicate_with_the_original_events() -> None:
    county = County()
    command = ReportProgress(milestone_id="1.3", percent=60, steps_done=("tender_published",))
    first = county.ok(command, sid="same")
    sequence = county.sequence
    again = county.resend(command, sid="same")
    assert isinstance(again, Accepted) and again.duplicate
    assert [(e.event_id, e.event_type) for e in again.events] == [
        (e.event_id, event_type_of(e.payload)) for e in first.events
    ]
    assert [e.stream_sequence for e in again.events] == [sequence - 1, sequence]
    assert [f.rule_id for f in again.findings] == [TENDER_RULE]
    assert county.sequence == sequence  # nothing new


def test_a_record_keeps_nothing_the_cyclic_collector_walks_per_submission() -> None:
    # A record is held for as long as its county is cached; each tracked object it kept per
    # submission was walked by every full collection, and those pauses were the service's
    # latency tail (tests/bench/README.md, "Submissions").
    county = County()
    report = ReportProgress(milestone_id="1.3", percent=60, steps_done=("tender_published",))
    county.ok(report)
    county.stream.clear()  # the test's stand-in for the stream, not part of the record
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(1000):
        county.ok(report)
        county.stream.clear()
    gc.collect()
    assert len(county.record.submissions) == 1001
    assert len(gc.get_objects()) - before < 20


def test_duplicate_is_recognised_even_if_facts_have_changed() -> None:
    county = County()
    command = ReportProgress(milestone_id="1.3", percent=60, steps_done=("tender_published",))
    county.ok(command, sid="same")
    county.pass_review("tender_pre_review")
    again = county.resend(command, sid="same")
    assert isinstance(again, Accepted) and again.duplicate and [f.rule_id for f in again.findings] == [TENDER_RULE]


def test_same_id_other_content_is_a_conflict() -> None:
    county = County()
    county.ok(ReportProgress(milestone_id="1.1", percent=10), sid="same")
    decision = county.resend(ReportProgress(milestone_id="1.1", percent=20), sid="same")
    r = refusal(decision, ErrorCode.SUBMISSION_ID_CONFLICT, "$.submission_id")
    assert r.submission_id == "same"


def test_same_id_reused_by_an_operator_is_a_conflict() -> None:
    county = County()
    county.ok(ReportProgress(milestone_id="1.1", percent=10), sid="same")
    command = DecideReview(
        review_kind="plan_pre_review",
        outcome=ReviewOutcome.PASSED,
        decided_on=dt.date(2017, 4, 1),
        approval_document_number="豫建城〔2017〕1号",
    )
    decision = county.resend(command, sid="same", role=Role.CITY)
    refusal(decision, ErrorCode.SUBMISSION_ID_CONFLICT, "$.submission_id")


# -- add_months ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("day", "months", "expected"),
    [
        (dt.date(2017, 8, 31), 6, dt.date(2018, 2, 28)),
        (dt.date(2019, 8, 31), 6, dt.date(2020, 2, 29)),  # leap year
        (dt.date(2017, 12, 1), 6, dt.date(2018, 6, 1)),
        (dt.date(2017, 1, 31), 1, dt.date(2017, 2, 28)),
        (dt.date(2017, 3, 31), 1, dt.date(2017, 4, 30)),
        (dt.date(2017, 7, 15), 6, dt.date(2018, 1, 15)),
        (dt.date(2017, 12, 31), 12, dt.date(2018, 12, 31)),
        (dt.date(2016, 2, 29), 12, dt.date(2017, 2, 28)),
        (dt.date(2017, 5, 5), 0, dt.date(2017, 5, 5)),
    ],
)
def test_add_months_examples(day: dt.date, months: int, expected: dt.date) -> None:
    assert add_months(day, months) == expected


DATES = st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2900, 12, 31))


@given(DATES, st.integers(min_value=0, max_value=600))
def test_add_months_lands_in_the_right_month_on_the_same_or_clamped_day(day: dt.date, months: int) -> None:
    out = add_months(day, months)
    assert out.year * 12 + out.month - 1 == day.year * 12 + day.month - 1 + months
    if out.day != day.day:
        assert out.day < day.day
        assert (out + dt.timedelta(days=1)).day == 1  # clamped to the month's last day
    assert out >= day


@given(DATES, DATES, st.integers(min_value=0, max_value=120))
def test_add_months_is_monotonic(a: dt.date, b: dt.date, months: int) -> None:
    lo, hi = sorted((a, b))
    assert add_months(lo, months) <= add_months(hi, months)


@given(st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2900, 12, 28)).filter(lambda d: d.day <= 28),
       st.integers(min_value=0, max_value=120), st.integers(min_value=0, max_value=120))  # fmt: skip
def test_add_months_composes_when_no_clamping(day: dt.date, m: int, n: int) -> None:
    assert add_months(add_months(day, m), n) == add_months(day, m + n)
