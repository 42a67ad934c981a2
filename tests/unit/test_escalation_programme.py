"""The whole 2017–2018 programme for the five counties, day by day under a simulated calendar,
against actions worked out by hand (dates and levels).

Calendar facts used below (State Council, 2017–2018): 2017-04-01 (Sat) a working day, 04-03/04
off (清明); 04-29–05-01 off (劳动节); 10-01–10-08 off, 09-30 (Sat) a working day (国庆/中秋);
2018-01-01 off; 02-15–02-21 off, 02-11 (Sun) and 02-24 (Sat) working days (春节).
"""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from contracts.commands import Role
from contracts.policy import Level, Policy, Trigger, load_default_policy
from contracts.workdays import WorkdayCalendar
from services.escalation.ladder import Judge, due_actions
from services.escalation.replay import ReplayedAction, compare, replay
from tests.story import Story

D = dt.date.fromisoformat
CAL = WorkdayCalendar.official()
POLICY = load_default_policy()
START, END = D("2017-03-01"), D("2018-11-30")
PERIODS = [f"{y}-{m:02d}" for y, m in [(2017, m) for m in range(3, 13)] + [(2018, m) for m in range(1, 11)]]


TRIAL_PERIODS = ["2017-12", *(f"2018-{m:02d}" for m in range(1, 7))]


def next_month_3rd(period: str) -> str:
    year, month = int(period[:4]), int(period[5:])
    return dt.date(year + month // 12, month % 12 + 1, 3).isoformat()


def judge(policy: Policy = POLICY) -> Judge:
    return Judge(Story().programme, {policy.version: policy}, policy, CAL)


def play_on_time(story: Story, county: str, *, skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """A county that does everything in order and on time (after the 5-day reminder)."""
    s = story
    s.complete("2017-03-27", county, "1.1")
    s.send("2017-04-05", county, {"kind": "request_review", "review_kind": "plan_pre_review"})
    s.decide_review("2017-04-10", county, "plan_pre_review", Role.CITY)
    s.send("2017-04-11", county, {"kind": "request_review", "review_kind": "provincial_plan_review"})
    if "late-plan" not in skip:
        s.decide_review("2017-04-25", county, "provincial_plan_review", Role.PROVINCE)  # completes 1.2
    if "no-tender-review" not in skip:
        s.send("2017-06-01", county, {"kind": "request_review", "review_kind": "tender_pre_review"})
        s.decide_review("2017-06-05", county, "tender_pre_review", Role.CITY)
    s.send(
        "2017-06-06",
        county,
        {"kind": "report_progress", "milestone_id": "1.3", "percent": 60, "steps_done": ["tender_published"]},
    )
    s.complete("2017-06-26", county, "1.3")
    if "2.1" not in skip:
        s.complete("2017-07-26", county, "2.1")
    s.complete("2017-08-28", county, "2.2")
    s.complete("2017-11-27", county, "2.3")
    if "late-trial" not in skip:
        s.send("2017-12-27", county, {"kind": "start_trial_operation", "started_on": "2017-12-27"})  # 3.1
        # Monthly trial-operation reports, stable, on the 3rd of the following month: 2017-12 to
        # 2018-06 (pre-acceptance passes on 2018-07-20: July's needs none).
        for period in TRIAL_PERIODS:
            s.report_trial(next_month_3rd(period), county, period)
        s.send("2018-06-28", county, {"kind": "request_review", "review_kind": "self_acceptance"})
        if "early-acceptance" not in skip:
            s.send("2018-07-02", county, {"kind": "request_review", "review_kind": "pre_acceptance"})
        s.decide_review("2018-07-20", county, "pre_acceptance", Role.PROVINCE)  # 3.2
        s.send("2018-10-10", county, {"kind": "request_review", "review_kind": "formal_acceptance"})
        s.decide_review("2018-10-25", county, "formal_acceptance", Role.PROVINCE)  # 3.3
    for period in PERIODS:
        if period not in skip:
            year, month = int(period[:4]), int(period[5:])
            filed = dt.date(year + month // 12, month % 12 + 1, 3)
            s.file_table(filed.isoformat(), county, period)


# Reminders an on-time county receives: 5 working days before each deadline it meets after
# that day. 1.1: 03-31 ← 03-24. 1.2: 04-30 rolls to 05-02 ← 04-28, 27, 26, 25, 24. 1.3: 06-30 ←
# 06-23. 2.1: 07-31 ← 07-24. 2.2: 08-31 ← 08-24. 2.3: 11-30 ← 11-23. 3.1: 12-31 rolls to
# 2018-01-02 ← 12-29, 28, 27, 26, 25. 3.3: 2018-10-31 ← 10-24. (3.2 passed on 07-20, before its
# reminder day 07-24.)
ON_TIME_REMINDERS = {
    ("2017-03-24", "reminder", "1.1"),
    ("2017-04-24", "reminder", "1.2"),
    ("2017-06-23", "reminder", "1.3"),
    ("2017-07-24", "reminder", "2.1"),
    ("2017-08-24", "reminder", "2.2"),
    ("2017-11-23", "reminder", "2.3"),
    ("2017-12-25", "reminder", "3.1"),
    ("2018-10-24", "reminder", "3.3"),
}


def summary(actions: list[ReplayedAction], county: str) -> set[tuple[str, str, str]]:
    return {
        (r.day.isoformat(), r.action.level_id, r.action.milestone_id or r.action.period or "")
        for r in actions
        if r.county_code == county
    }


@pytest.fixture(scope="module")
def programme_story() -> Story:
    story = Story()
    # 濮阳县: on time throughout.
    play_on_time(story, "410928")
    # 清丰县: late on the plan review; the province approves only on 2017-05-25. The city
    # confirms the 通报批评 on 05-10 and waives the 约谈 on 05-17.
    play_on_time(story, "410922", skip={"late-plan"})
    story.decide_review("2017-05-25", "410922", "provincial_plan_review", Role.PROVINCE)
    # 南乐县: publishes its tender documents with no passed tender pre-review.
    play_on_time(story, "410923", skip={"no-tender-review"})
    # 范县: misses the 2017-09 and 2017-10 tables; granted an extension of 3.1 to 2018-02-09 and
    # starts trial operation only on 2018-03-01.
    play_on_time(story, "410926", skip={"2017-09", "2017-10", "late-trial"})
    story.send(
        "2017-12-20",
        "410926",
        {
            "kind": "request_extension",
            "milestone_id": "3.1",
            "proposed_deadline": "2018-02-09",
            "reason": "设备到货延迟",
        },
        submission_id="ext-410926",
    )
    story.send(
        "2017-12-22",
        "410926",
        {
            "kind": "decide_extension",
            "milestone_id": "3.1",
            "outcome": "granted",
            "new_deadline": "2018-02-09",
            "request_submission_id": "ext-410926",
        },
        role=Role.CITY,
    )
    story.send("2018-03-01", "410926", {"kind": "start_trial_operation", "started_on": "2018-03-01"})
    for period in (f"2018-{m:02d}" for m in range(3, 11)):  # never pre-accepted: reports to the end
        story.report_trial(next_month_3rd(period), "410926", period)
    # 台前县: applies for pre-acceptance after under five months of trial operation; and its
    # completion of 2.1 is retracted by the city on 08-01 (wrong evidence), then reported again.
    play_on_time(story, "410927", skip={"early-acceptance", "2.1"})
    story.send("2018-05-15", "410927", {"kind": "request_review", "review_kind": "pre_acceptance"})
    retracted = story.complete("2017-07-26", "410927", "2.1")  # its own 2.1 report, replacing the baseline's
    story.send(
        "2017-08-01",
        "410927",
        {"kind": "retract_submission", "retracted_submission_id": retracted, "reason": "佐证材料有误"},
        role=Role.CITY,
    )
    story.complete("2017-08-03", "410927", "2.1")
    return story


def with_operator_decisions(story: Story, actions: list[ReplayedAction]) -> list[ReplayedAction]:
    """Record the city's confirmations and waiver (they name the replay's action ids) and replay."""
    ids = {
        (r.county_code, r.action.level_id, r.action.milestone_id or r.action.period): r.action.action_id
        for r in actions
    }
    decisions = [
        ("2017-05-10", "410922", "action_confirmed", ids[("410922", "public_criticism", "1.2")], {}),
        (
            "2017-05-17",
            "410922",
            "action_waived",
            ids[("410922", "admonitory_talk", "1.2")],
            {"reason": "已于5月25日前取得省级批复"},
        ),
        ("2017-10-11", "410926", "action_confirmed", ids[("410926", "missed_table_criticism", "2017-09")], {}),
        ("2017-11-08", "410926", "action_confirmed", ids[("410926", "missed_table_criticism", "2017-10")], {}),
    ]
    decided = Story()
    decided.histories = {k: list(v) for k, v in story.histories.items()}
    from contracts.events import ActionConfirmed, ActionWaived, Actor, EventEnvelope

    for n, (day, county, kind, action_id, extra) in enumerate(decisions, start=10_000):
        payload = (
            ActionConfirmed(action_id=action_id, operator="市督查局")
            if kind == "action_confirmed"
            else ActionWaived(action_id=action_id, operator="市督查局", **extra)
        )
        at = dt.datetime.fromisoformat(day).replace(hour=16, tzinfo=dt.timezone(dt.timedelta(hours=8)))
        decided.histories[county].append(
            (
                n,
                EventEnvelope(
                    event_id=f"op-{n}",
                    schema_version=1,
                    programme_id=story.programme.id,
                    county_code=county,
                    occurred_at=at,
                    recorded_at=at,
                    actor=Actor(role="city"),
                    submission_id=f"op-{n}",
                    submission_digest="",
                    causation_id=action_id,
                    correlation_id=action_id,
                    payload=payload,
                ),
            )
        )
    return replay(judge(), decided.histories, START, END)


@pytest.fixture(scope="module")
def actions(programme_story: Story) -> list[ReplayedAction]:
    first = replay(judge(), programme_story.histories, START, END)
    return with_operator_decisions(programme_story, first)


def test_a_county_on_time_gets_reminders_only(actions: list[ReplayedAction]) -> None:
    assert summary(actions, "410928") == ON_TIME_REMINDERS


def test_late_plan_review_climbs_the_ladder(actions: list[ReplayedAction]) -> None:
    # 1.2's deadline 2017-04-30 (Sun) rolls over 05-01 (holiday) to 05-02: urgent reminder 1
    # working day before (04-28; 04-29/30 rest days); overdue the first working day after (05-03);
    # 通报批评 at 5 working days (05-03, 04, 05, 08, 09); 约谈 at 10 (05-10, 11, 12, 15, 16).
    expected = ON_TIME_REMINDERS | {
        ("2017-04-28", "urgent_reminder", "1.2"),
        ("2017-05-03", "overdue_notice", "1.2"),
        ("2017-05-09", "public_criticism", "1.2"),
        ("2017-05-16", "admonitory_talk", "1.2"),
    }
    assert summary(actions, "410922") == expected
    kinds = {r.action.level_id: type(r.action).__name__ for r in actions if r.county_code == "410922"}
    assert kinds["public_criticism"] == kinds["admonitory_talk"] == "ActionProposed"
    assert kinds["overdue_notice"] == "ActionIssued"
    talk = next(r.action for r in actions if r.county_code == "410922" and r.action.level_id == "admonitory_talk")
    assert talk.workdays == 10 and talk.deadline == D("2017-05-02")
    assert "里程碑1.2《建设方案通过评审》完成时限2017年4月30日（遇休息日顺延至2017年5月2日）" in talk.explanation_zh
    assert "已逾期10个工作日" in talk.explanation_zh and "建设方案省级评审" in talk.explanation_zh


def test_confirmed_and_waived_proposals(programme_story: Story, actions: list[ReplayedAction]) -> None:
    # The confirmed 通报批评 is one offence: no second-offence talk for 清丰县; the waived 约谈
    # stays waived (nothing re-proposed).
    assert not [r for r in actions if r.county_code == "410922" and r.action.level_id == "second_offence_talk"]


def test_tender_without_pre_review_gets_a_procedure_notice(actions: list[ReplayedAction]) -> None:
    assert summary(actions, "410923") == ON_TIME_REMINDERS | {("2017-06-06", "procedure_notice", "1.3")}


def test_missed_tables_extension_and_second_offence(actions: list[ReplayedAction]) -> None:
    got = {a for a in summary(actions, "410926") if a[2] in ("2017-09", "2017-10", "3.1") or "offence" in a[1]}
    assert got == {
        # 2017-09's table is due 10-05, inside the National Day holiday: rolls to 10-09; +1 → 10-10.
        ("2017-10-10", "missed_table_criticism", "2017-09"),
        # 2017-10's is due 11-05 (Sun) → 11-06; +1 → 11-07.
        ("2017-11-07", "missed_table_criticism", "2017-10"),
        # Both confirmed (10-11, 11-08): the second is a second offence → 约谈 proposed that day.
        ("2017-11-08", "second_offence_talk", "2017-10"),
        # 3.1 extended to 2018-02-09 (Fri) before its first reminder: no reminder for 12-31.
        ("2018-02-02", "reminder", "3.1"),  # 02-05, 06, 07, 08, 09
        ("2018-02-08", "urgent_reminder", "3.1"),
        ("2018-02-11", "overdue_notice", "3.1"),  # Sunday 02-11 is a working day (春节调休)
        ("2018-02-22", "public_criticism", "3.1"),  # 02-11, 12, 13, 14, (15–21 off) 22
        ("2018-02-28", "admonitory_talk", "3.1"),  # 02-23, 24 (Sat, working), 26, 27, 28
    }
    overdue = next(
        r.action
        for r in actions
        if r.county_code == "410926" and r.action.level_id == "overdue_notice" and r.action.milestone_id == "3.1"
    )
    assert "已批准延期，原时限2017年12月31日" in overdue.explanation_zh


def test_early_acceptance_and_a_retraction_reopening_the_ladder(actions: list[ReplayedAction]) -> None:
    assert summary(actions, "410927") == ON_TIME_REMINDERS | {
        # Retracted on 08-01: 2.1 (deadline 07-31) is open again and overdue since 08-01.
        ("2017-08-01", "overdue_notice", "2.1"),
        # Pre-acceptance applied for on 2018-05-15, trial since 2017-12-27: under six months.
        ("2018-05-15", "procedure_notice", "3.2"),
    }


@pytest.mark.parametrize(
    ("roll", "expected"),
    [
        # 1.2: 04-30 → 05-02; 3.1: 12-31 → 2018-01-02 (01-01 holiday).
        (
            True,
            {
                ("2017-05-03", "overdue_notice", "1.2"),
                ("2017-05-09", "public_criticism", "1.2"),
                ("2017-05-16", "admonitory_talk", "1.2"),
                ("2018-01-03", "overdue_notice", "3.1"),
                ("2018-01-09", "public_criticism", "3.1"),
                ("2018-01-16", "admonitory_talk", "3.1"),
            },
        ),
        # Not rolled: counted from the Sunday itself. 1.2: +1 → 05-02, +5 → 05-08, +10 → 05-15.
        # 3.1: +1 → 01-02, +5 → 01-08, +10 → 01-15.
        (
            False,
            {
                ("2017-05-02", "overdue_notice", "1.2"),
                ("2017-05-08", "public_criticism", "1.2"),
                ("2017-05-15", "admonitory_talk", "1.2"),
                ("2018-01-02", "overdue_notice", "3.1"),
                ("2018-01-08", "public_criticism", "3.1"),
                ("2018-01-15", "admonitory_talk", "3.1"),
            },
        ),
    ],
)
def test_rest_day_deadlines_under_each_roll_setting(roll: bool, expected: set[tuple[str, str, str]]) -> None:
    story = Story()
    story.complete("2017-03-27", "410928", "1.1")  # nothing else: 1.2 and 3.1 are missed
    policy = msgspec.structs.replace(POLICY, roll_rest_day_deadlines=roll, version=f"roll-{roll}")
    actions = replay(judge(policy), story.histories, START, D("2018-01-20"))
    after = {
        a
        for a in summary(actions, "410928")
        if a[1] in ("overdue_notice", "public_criticism", "admonitory_talk") and a[2] in ("1.2", "3.1")
    }
    assert after == expected


def test_judging_the_same_facts_again_issues_nothing(programme_story: Story) -> None:
    j = judge()
    actions = replay(j, programme_story.histories, START, D("2017-06-30"))
    assert actions  # something was due
    # Re-judging a county whose actions are on record yields nothing new.
    from contracts.facts import fold

    facts = fold(j.programme, "410922", programme_story.histories["410922"])
    due = due_actions(j, facts, D("2017-05-16"))
    from services.escalation.replay import _record

    for action in due:
        _record(facts, action)
    assert due_actions(j, facts, D("2017-05-16")) == []


def test_whatif_with_a_stricter_policy_reports_exactly_the_added_actions(programme_story: Story) -> None:
    stricter = msgspec.structs.replace(
        POLICY,
        version="strict",
        levels=(
            *POLICY.levels,
            Level(
                id="early_warning",
                name="预警",
                trigger=Trigger.BEFORE_DEADLINE,
                workdays=10,
                addressed=POLICY.levels[0].addressed,
                milestones=("1.2",),
            ),
        ),
    )
    before = replay(judge(), programme_story.histories, START, END)
    after = replay(judge(stricter), programme_story.histories, START, END)
    diff = compare(before, after)
    # 10 working days before 05-02: 04-28, 27, 26, 25, 24, 21, 20, 19, 18, 17 → 04-17; every
    # county completed 1.2 on 04-25 or later, so all five are warned.
    assert {(r.county_code, r.day.isoformat(), r.action.level_id) for r in diff.added} == {
        (c, "2017-04-17", "early_warning") for c in ("410928", "410922", "410923", "410926", "410927")
    }
    assert diff.removed == [] and diff.moved == []


def test_a_trial_start_too_late_for_pre_acceptance_is_warned_that_day(actions: list[ReplayedAction]) -> None:
    # 范县 starts trial operation on 2018-03-01: six stable months end on 09-01, after 3.2's
    # 2018-07-31 (the last start that makes it is 01-31). The on-time counties report every
    # month and are never warned.
    assert [a for a in summary(actions, "410926") if a[1] == "readiness_warning"] == [
        ("2018-03-01", "readiness_warning", "3.2")
    ]
    assert not [r for r in actions if r.county_code != "410926" and r.action.level_id == "readiness_warning"]
    assert not [r for r in actions if r.action.level_id == "missed_trial_report_criticism"]
