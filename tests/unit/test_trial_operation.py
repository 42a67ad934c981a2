"""Trial-operation reports (试运行月报) and acceptance readiness: the pure parts, no I/O.

Calendar facts used below: 2018-03-05 is a Monday (a working day); 2018-04-05 is 清明 (off;
04-08 Sunday is a working day); 2018-07-31 is a Tuesday.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import msgspec
import pytest

from contracts.commands import ReportTrialOperation, RetractSubmission, Role, StartTrialOperation, decode_submission
from contracts.errors import ERROR_TEXT, ErrorCode
from contracts.events import ActionIssued, ActionProposed, ProcedureFindingRecorded, TrialOperationReported
from contracts.facts import CountyFacts, TrialReportFacts, fold
from contracts.policy import load_default_policy
from contracts.programme import TrialOperation, load_programme
from contracts.readiness import readiness, stable_run
from contracts.replies import Refused
from contracts.workdays import WorkdayCalendar
from services.escalation.ladder import Judge, due_actions
from services.escalation.replay import replay
from services.submissions.decide import Accept
from tests.story import Story
from tests.unit.test_decide import County
from tests.unit.test_programme_loader import SHIPPED, edited

D = dt.date.fromisoformat
CAL = WorkdayCalendar.official()
POLICY = load_default_policy()
COUNTY = "410928"
STABLE = {
    "cases_reported": 100,
    "cases_registered": 98,
    "cases_dispatched": 96,
    "cases_closed": 92,
    "cases_closed_on_time": 85,
    "cases_returned": 2,
}


def report(period: str, **changes: int) -> ReportTrialOperation:
    return ReportTrialOperation(period=period, **{**STABLE, **changes})


def at(day: str) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(hour=10, tzinfo=dt.timezone(dt.timedelta(hours=8)))


def on_trial(started: str = "2017-12-27") -> County:
    county = County(COUNTY)
    county.ok(StartTrialOperation(started_on=D(started)), now=at(started))
    return county


def periods(first: str, last: str) -> list[str]:
    out, (year, month) = [], (int(first[:4]), int(first[5:]))
    while f"{year:04d}-{month:02d}" <= last:
        out.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return out


def third_of_next(period: str) -> str:
    year, month = int(period[:4]), int(period[5:])
    return dt.date(year + month // 12, month % 12 + 1, 3).isoformat()


def story_on_trial(started: str, reported: list[str], *, self_acceptance: str | None = None) -> Story:
    story = Story()
    story.decide_review("2017-04-25", COUNTY, "provincial_plan_review", Role.PROVINCE)  # may build
    story.complete("2017-11-27", COUNTY, "2.3")  # built and connected: trial operation may start
    story.send(started, COUNTY, {"kind": "start_trial_operation", "started_on": started})
    for period in reported:
        story.report_trial(third_of_next(period), COUNTY, period)
    if self_acceptance:
        story.send(self_acceptance, COUNTY, {"kind": "request_review", "review_kind": "self_acceptance"})
    return story


def facts_of(story: Story) -> CountyFacts:
    return fold(story.programme, COUNTY, story.histories[COUNTY])


def judge() -> Judge:
    return Judge(Story().programme, {POLICY.version: POLICY}, POLICY, CAL)


# -- the report: decided --------------------------------------------------------------------------
def test_a_valid_report_is_stored_as_reported() -> None:
    county = on_trial()
    decision = county.ok(report("2018-01"), now=at("2018-02-03"))
    assert [type(e.payload) for e in decision.events] == [TrialOperationReported]
    assert decision.events[0].payload == TrialOperationReported(period="2018-01", **STABLE)
    assert county.record.facts.trial_reports == {"2018-01": decision.events[0].event_id.split("/")[0]}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"cases_registered": 101}, "cases_registered"),  # more than reported
        ({"cases_dispatched": 99}, "cases_dispatched"),  # more than registered
        ({"cases_closed": 97}, "cases_closed"),  # more than dispatched
        ({"cases_closed_on_time": 93}, "cases_closed_on_time"),  # more than closed
        ({"cases_returned": 97}, "cases_returned"),  # more than dispatched
    ],
)
def test_inconsistent_totals_are_refused_naming_the_field(changes: dict[str, int], field: str) -> None:
    decision = on_trial().decide(report("2018-01", **changes), now=at("2018-02-03"))
    assert isinstance(decision, Refused)
    assert decision.code == ErrorCode.INCONSISTENT_TOTALS and decision.field == f"$.command.{field}"
    assert field in decision.detail and "试运行月报" in ERROR_TEXT[ErrorCode.INCONSISTENT_TOTALS][0]


def test_a_negative_count_is_malformed_and_named() -> None:
    body = {
        "submission_id": "neg",
        "programme_id": "puyang-2017-13",
        "county_code": COUNTY,
        "command": {"kind": "report_trial_operation", "period": "2018-01", **STABLE, "cases_closed": -1},
    }
    with pytest.raises(msgspec.ValidationError, match=r"cases_closed"):
        decode_submission(msgspec.json.encode(body))


def test_a_month_not_yet_over_is_refused() -> None:
    decision = on_trial().decide(report("2018-02"), now=at("2018-02-28"))
    assert isinstance(decision, Refused) and decision.code == ErrorCode.DATE_IN_FUTURE
    assert decision.field == "$.command.period"


def test_a_second_report_for_the_same_month_is_a_duplicate_period_pointing_to_retraction() -> None:
    county = on_trial()
    county.ok(report("2018-01"), sid="jan-1", now=at("2018-02-03"))
    decision = county.decide(report("2018-01", cases_closed=90), sid="jan-2", now=at("2018-02-04"))
    assert isinstance(decision, Refused) and decision.code == ErrorCode.DUPLICATE_PERIOD
    assert decision.field == "$.command.period"
    assert "jan-1" in decision.detail and "retract_submission" in decision.detail


def test_a_correction_is_a_retraction_then_a_new_report() -> None:
    story = Story()
    story.send("2017-12-27", COUNTY, {"kind": "start_trial_operation", "started_on": "2017-12-27"})
    first = story.report_trial("2018-02-03", COUNTY, "2018-01", closed=60, closed_on_time=50)  # a typo: not stable
    story.send(
        "2018-02-05",
        COUNTY,
        {"kind": "retract_submission", "retracted_submission_id": first, "reason": "结案数填报错误"},
        role=Role.CITY,
    )
    second = story.report_trial("2018-02-05", COUNTY, "2018-01")  # accepted: the first is retracted
    facts = facts_of(story)
    assert facts.trial_reports["2018-01"].submission_id == second
    assert facts.trial_reports["2018-01"].cases_closed == STABLE["cases_closed"]
    state = readiness(story.programme, facts, D("2018-02-10"), CAL)
    # (December was never reported: the count restarts on 01-01, with a stable January.)
    assert [(m.period, m.state) for m in state.months] == [
        ("2017-12", "missing"),
        ("2018-01", "stable"),
        ("2018-02", "pending"),
    ]


def test_a_month_before_trial_operation_is_stored_with_a_procedure_finding() -> None:
    county = on_trial("2018-03-01")
    decision = county.ok(report("2018-02"), now=at("2018-03-05"))
    findings = [e.payload for e in decision.events if isinstance(e.payload, ProcedureFindingRecorded)]
    assert [(f.rule_id, f.milestone_id) for f in findings] == [("trial-report-after-trial-start", "3.1")]
    assert "2018-03-01" in findings[0].detail
    # With no start on record at all, the same.
    decision = County("410922").decide(report("2018-01"), now=at("2018-02-03"))
    assert isinstance(decision, Accept)
    assert any(isinstance(e.payload, ProcedureFindingRecorded) for e in decision.events)


def test_retracting_is_an_operator_step() -> None:
    county = on_trial()
    county.ok(report("2018-01"), sid="jan", now=at("2018-02-03"))
    refused = county.decide(RetractSubmission(retracted_submission_id="jan", reason="更正"), now=at("2018-02-04"))
    assert isinstance(refused, Refused) and refused.code == ErrorCode.NOT_AUTHORISED


# -- stable months: counting -----------------------------------------------------------------------
def test_six_months_count_from_the_start_date_every_touched_month_stable() -> None:
    programme = Story().programme
    reports = {
        p: TrialReportFacts(period=p, filed_on=D(third_of_next(p)), submission_id=p, **STABLE)
        for p in periods("2017-12", "2018-05")
    }
    run = stable_run(programme, D("2017-12-27"), reports, D("2018-07-01"))
    assert run.earliest_application == D("2018-06-27")  # add_months(start, 6), as the procedure rule counts
    assert run.stable_months == 6 and [m.period for m in run.months] == periods("2017-12", "2018-05")
    # The boundary of the 2018-07-31 deadline: a start on 01-31 ends on 07-31, one on 02-01 on 08-01.
    assert stable_run(programme, D("2018-01-31"), {}, D("2018-01-31")).earliest_application == D("2018-07-31")
    assert stable_run(programme, D("2018-02-01"), {}, D("2018-02-01")).earliest_application == D("2018-08-01")


def test_an_unstable_month_restarts_the_count_and_names_the_shortfall() -> None:
    programme = Story().programme
    reports = {
        p: TrialReportFacts(period=p, filed_on=D(third_of_next(p)), submission_id=p, **STABLE)
        for p in periods("2017-12", "2018-03")
    }
    reports["2018-02"] = msgspec.structs.replace(reports["2018-02"], cases_closed=80, cases_closed_on_time=70)
    run = stable_run(programme, D("2017-12-27"), reports, D("2018-04-01"))
    assert run.run_started_on == D("2018-03-01") and run.earliest_application == D("2018-09-01")
    assert run.known_on == D("2018-03-03")  # the day the unstable report came in
    february = next(m for m in run.months if m.period == "2018-02")
    assert february.state == "unstable" and february.shortfalls == ("结案率83.3%低于90%",)
    assert run.stable_months == 1  # March


def test_thresholds_come_from_the_programme_file_with_defaults_when_absent(tmp_path: Path) -> None:
    without = tmp_path / "without.yaml"
    start = SHIPPED.index("trial_operation:\n")
    end = SHIPPED.index("  is_default: true\n", start) + len("  is_default: true\n")
    without.write_text(SHIPPED[:start] + SHIPPED[end:], encoding="utf-8")
    assert load_programme(without).trial_operation == TrialOperation()
    assert TrialOperation().min_closure_rate == 0.9 and TrialOperation().stable_months == 6
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(edited("  min_closure_rate: 0.9\n", "  min_closure_rate: 0.97\n"), encoding="utf-8")
    programme = load_programme(stricter)
    facts = TrialReportFacts(period="2018-01", filed_on=D("2018-02-03"), submission_id="x", **STABLE)
    assert stable_run(programme, D("2018-01-01"), {"2018-01": facts}, D("2018-02-10")).months[0].state == "unstable"


# -- readiness -------------------------------------------------------------------------------------
def test_readiness_of_a_county_on_time() -> None:
    story = story_on_trial("2017-12-27", periods("2017-12", "2018-05"), self_acceptance="2018-06-28")
    state = readiness(story.programme, facts_of(story), D("2018-07-02"), CAL)
    assert state.ready and state.missing == ()
    assert state.earliest_pre_acceptance == D("2018-06-27") and state.stable_months == 6
    pre, formal = state.deadlines
    assert (pre.milestone_id, pre.effective_deadline, pre.can_make_it) == ("3.2", D("2018-07-31"), True)
    # Working days in (06-27, 07-31]: 06-28, 29 and July's 22.
    assert pre.slack_workdays == 24
    assert (formal.milestone_id, formal.effective_deadline) == ("3.3", D("2018-10-31"))
    assert formal.slack_workdays is not None and formal.slack_workdays > 0
    # No warning and no missed report all the way to pre-acceptance.
    actions = replay(judge(), story.histories, D("2017-12-27"), D("2018-07-02"))
    assert not [r for r in actions if r.action.level_id in ("readiness_warning", "missed_trial_report_criticism")]


def test_a_late_trial_start_is_warned_the_day_it_starts() -> None:
    story = story_on_trial("2018-03-01", [])
    facts = facts_of(story)
    state = readiness(story.programme, facts, D("2018-03-01"), CAL)
    assert state.earliest_pre_acceptance == D("2018-09-01") and state.latest_trial_start == D("2018-01-31")
    pre = state.deadlines[0]
    assert pre.can_make_it is False and pre.slack_workdays is not None and pre.slack_workdays < 0
    warned = [a for a in due_actions(judge(), facts, D("2018-03-01")) if a.level_id == "readiness_warning"]
    assert len(warned) == 1
    warning = warned[0]
    assert isinstance(warning, ActionIssued) and warning.due_on == D("2018-03-01")
    assert warning.milestone_id == "3.2" and warning.deadline == D("2018-07-31")
    assert "2018年3月1日才开始试运行" in warning.explanation_zh and "2018年1月31日" in warning.explanation_zh
    # Once: on record, not again.
    actions = replay(judge(), story.histories, D("2018-03-01"), D("2018-03-31"))
    assert [(r.day, r.action.level_id) for r in actions if r.action.level_id == "readiness_warning"] == [
        (D("2018-03-01"), "readiness_warning")
    ]
    # A start on 01-31 still makes it: no warning.
    on_the_day = facts_of(story_on_trial("2018-01-31", []))
    assert not [a for a in due_actions(judge(), on_the_day, D("2018-01-31")) if a.level_id == "readiness_warning"]


def test_a_missing_trial_month_moves_readiness_later_and_goes_up_the_ladder() -> None:
    reported = [p for p in periods("2017-12", "2018-05") if p != "2018-02"]
    story = story_on_trial("2017-12-27", reported, self_acceptance="2018-06-28")
    facts = facts_of(story)
    state = readiness(story.programme, facts, D("2018-07-02"), CAL)
    assert not state.ready
    assert state.run_started_on == D("2018-03-01") and state.earliest_pre_acceptance == D("2018-09-01")
    assert state.missing[0] == "2018-02试运行月报（应于2018-03-05前报送）"
    assert any(text.startswith("还需") for text in state.missing)
    actions = replay(judge(), story.histories, D("2017-12-27"), D("2018-07-02"))
    got = {
        (r.day, r.action.level_id, r.action.period or r.action.milestone_id)
        for r in actions
        if r.action.level_id in ("readiness_warning", "missed_trial_report_criticism")
    }
    assert got == {
        # Due Monday 03-05; +1 working day → 03-06, proposed like a missed progress table.
        (D("2018-03-06"), "missed_trial_report_criticism", "2018-02"),
        # The day after the report was due the count restarts on 03-01: six months end 09-01.
        (D("2018-03-06"), "readiness_warning", "3.2"),
    }
    criticism = next(r.action for r in actions if r.action.level_id == "missed_trial_report_criticism")
    assert (
        isinstance(criticism, ActionProposed)
        and "2018年2月试运行月报应于2018年3月5日前报送" in criticism.explanation_zh
    )
    # Filed late after all (and stable): the run is mended, the earliest day back to 06-27.
    story.report_trial("2018-03-20", COUNTY, "2018-02")
    assert readiness(story.programme, facts_of(story), D("2018-07-02"), CAL).earliest_pre_acceptance == D("2018-06-27")


def test_applying_early_is_a_procedure_finding_and_shows_in_readiness() -> None:
    story = story_on_trial("2017-12-27", periods("2017-12", "2018-04"), self_acceptance="2018-05-10")
    story.send("2018-05-15", COUNTY, {"kind": "request_review", "review_kind": "pre_acceptance"})
    facts = facts_of(story)
    assert [f.rule_id for f in facts.findings] == ["six-months-trial-before-pre-acceptance"]
    state = readiness(story.programme, facts, D("2018-05-15"), CAL)
    assert not state.ready and state.open_findings == 1 and "程序问题1项" in state.missing
    assert state.earliest_pre_acceptance == D("2018-06-27")


def test_no_trial_operation_yet_says_what_is_missing() -> None:
    story = Story()
    state = readiness(story.programme, facts_of(story), D("2017-12-01"), CAL)
    assert state.trial_started_on is None and state.earliest_pre_acceptance is None
    assert state.missing == ("系统试运行开始报告", "“自验”记录")
    assert state.latest_trial_start == D("2018-01-31")
    assert all(d.slack_workdays is None for d in state.deadlines)
