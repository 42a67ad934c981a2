"""The demo's story (services/demo/story.yaml), played through the real submissions decisions and
the escalation ladder under the simulated calendar, against actions worked out by hand.

Calendar facts as in test_escalation_programme.py: 2017-04-29–05-01 off (劳动节), 10-01–10-08 off
and 09-30 (Sat) a working day (国庆/中秋); 2018-02-15–02-21 off, 02-11 (Sun) and 02-24 (Sat)
working days (春节).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from contracts.commands import Role, decode_submission
from contracts.events import (
    ActionConfirmed,
    ActionIssued,
    ActionProposed,
    ActionWaived,
    Actor,
    EventEnvelope,
    ExtensionDecided,
    ProcedureFindingRecorded,
)
from contracts.facts import CountyFacts, fold
from contracts.payloads import ExtensionOutcome, recorded_as
from contracts.policy import load_default_policy
from contracts.programme import load_default_programme
from contracts.workdays import WorkdayCalendar
from services.demo.script import (
    DEFAULT_AT,
    Decision,
    Step,
    StoryFileError,
    load_story,
    submission_body,
)
from services.demo.script import Story as DemoStory
from services.escalation.ladder import Judge
from services.escalation.replay import ReplayedAction, replay
from tests.story import Story

D = dt.date.fromisoformat
SHANGHAI = dt.timezone(dt.timedelta(hours=8))
CAL = WorkdayCalendar.official()
POLICY = load_default_policy()
PROGRAMME = load_default_programme()
ON_TIME = ("410928", "410927")

# An on-time county's reminders, 5 working days before each deadline it meets after that day
# (as in test_escalation_programme.py). 1.2: 04-30 rolls to 05-02 ← 04-28, 27, 26, 25, 24.
# 3.1: 12-31 rolls to 2018-01-02 ← 12-29, 28, 27, 26, 25. 3.2 is passed on 07-20, before its
# reminder day 07-24.
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
EXPECTED: dict[str, set[tuple[str, str, str]]] = {
    "410928": ON_TIME_REMINDERS,
    "410927": ON_TIME_REMINDERS,
    # 清丰县: the province returns the plan on 04-26 and approves it only on 05-25. 1.2's
    # deadline rolls to 05-02: 催办 1 working day before (04-28); 逾期 the first working day after
    # (05-03); 通报批评 at 5 (05-03, 04, 05, 08, 09); 约谈 at 10 (05-10, 11, 12, 15, 16).
    "410922": ON_TIME_REMINDERS
    | {
        ("2017-04-28", "urgent_reminder", "1.2"),
        ("2017-05-03", "overdue_notice", "1.2"),
        ("2017-05-09", "public_criticism", "1.2"),
        ("2017-05-16", "admonitory_talk", "1.2"),
    },
    # 南乐县: tender documents published on 06-06 with no tender pre-review.
    "410923": ON_TIME_REMINDERS | {("2017-06-06", "procedure_notice", "1.3")},
    # 范县: 2017-09's table is due 10-05, inside the National Day holiday: rolls to 10-09, +1 →
    # 10-10. 2017-10's is due 11-05 (Sun) → 11-06, +1 → 11-07; both confirmed (10-11, 11-08):
    # the second is a second offence → 约谈 proposed on 11-08 (and waived on 11-10). 3.1 extended
    # to 2018-02-09 (Fri) before its first reminder: reminded on 02-02 (02-05, 06, 07, 08, 09)
    # instead of 12-25, and trial operation starts 02-06. Pre-acceptance applied for on
    # 2018-07-09, five months after 02-06: a procedure finding; it is passed only on 07-27, after
    # its reminder day 07-24.
    "410926": (ON_TIME_REMINDERS - {("2017-12-25", "reminder", "3.1")})
    | {
        ("2017-10-10", "missed_table_criticism", "2017-09"),
        ("2017-11-07", "missed_table_criticism", "2017-10"),
        ("2017-11-08", "second_offence_talk", "2017-10"),
        ("2018-02-02", "reminder", "3.1"),
        # Trial operation from 2018-02-06: six months end on 08-06, after 3.2's 07-31.
        ("2018-02-06", "readiness_warning", "3.2"),
        ("2018-07-09", "procedure_notice", "3.2"),
        ("2018-07-24", "reminder", "3.2"),
    },
}
PROPOSED_LEVELS = {"public_criticism", "admonitory_talk", "missed_table_criticism", "second_offence_talk"}


def judge() -> Judge:
    return Judge(PROGRAMME, {POLICY.version: POLICY}, POLICY, CAL)


@dataclass(frozen=True)
class Played:
    histories: dict[str, list[tuple[int, EventEnvelope]]]  # the submissions' events
    decisions: dict[str, list[tuple[int, EventEnvelope]]]  # the operators' confirmations and waivers
    actions: list[ReplayedAction]
    resolved: dict[int, tuple[str, ...]]  # operator step (index in story.steps) -> the action ids it decides


def _decision(step: Step, action_id: str, n: int, shift: dt.timedelta) -> EventEnvelope:
    action = step.operator_action
    assert action is not None
    payload: ActionConfirmed | ActionWaived = (
        ActionConfirmed(action_id=action_id, operator=step.submitted_by, note=step.note)
        if action.decision is Decision.CONFIRM
        else ActionWaived(action_id=action_id, operator=step.submitted_by, reason=action.reason or step.note)
    )
    at = step.when + shift
    return EventEnvelope(
        event_id=f"op-{n}",
        schema_version=1,
        programme_id=PROGRAMME.id,
        county_code=step.county_code,
        occurred_at=at,
        recorded_at=at,
        actor=Actor(role="city", user=step.submitted_by),
        submission_id=f"op-{n}",
        submission_digest="",
        causation_id=action_id,
        correlation_id=action_id,
        payload=payload,
    )


def _resolve(story: DemoStory, actions: list[ReplayedAction], resolved: dict[int, tuple[str, ...]]) -> bool:
    """Name the proposals each operator step decides, as the runner will: the proposed actions of
    that county, level and milestone or period on record before the step's day. True if any new."""
    taken = {a for ids in resolved.values() for a in ids}
    found = False
    for index, step in enumerate(story.steps):
        action = step.operator_action
        if action is None or index in resolved:
            continue
        ids = tuple(
            r.action.action_id
            for r in actions
            if r.county_code == step.county_code
            and isinstance(r.action, ActionProposed)
            and r.action.level_id == action.level
            and (action.milestone_id is None or r.action.milestone_id == action.milestone_id)
            and (action.period is None or r.action.period == action.period)
            and r.day < step.day
            and r.action.action_id not in taken
        )
        if ids:
            resolved[index] = ids
            found = True
    return found


def play(story: DemoStory, *, judge_before_the_days_steps: bool = False) -> Played:
    """Every submission through the real decision, then the ladder day by day from the story's start
    to its end, with the operators' decisions on the proposals they name (replayed again until
    every decision has found its proposal: a confirmation can lead to a second-offence proposal).

    ``judge_before_the_days_steps``: each day is judged before that day's steps are seen (as the live
    services do at 09:00) rather than after them (as the replay does)."""
    written = Story(PROGRAMME)
    for step in story.submissions:
        assert step.command is not None
        written.send(step.day.isoformat(), step.county_code, step.command, step.role, step.submission_id)
    histories = written.histories
    shift = dt.timedelta(days=1 if judge_before_the_days_steps else 0)
    if judge_before_the_days_steps:
        histories = {
            county: [(seq, msgspec.structs.replace(env, recorded_at=env.recorded_at + shift)) for seq, env in events]
            for county, events in histories.items()
        }
    resolved: dict[int, tuple[str, ...]] = {}
    decisions: dict[str, list[tuple[int, EventEnvelope]]] = {}
    actions: list[ReplayedAction] = []
    for _ in range(len(story.operator_steps) + 1):
        decisions = {c.code: [] for c in PROGRAMME.counties}
        n = 1_000_000
        for index, ids in sorted(resolved.items()):
            for action_id in ids:
                n += 1
                step = story.steps[index]
                decisions[step.county_code].append((n, _decision(step, action_id, n, shift)))
        combined = {c: [*histories[c], *decisions[c]] for c in histories}
        actions = replay(judge(), combined, story.start, story.end)
        if not _resolve(story, actions, resolved):
            break
    return Played(histories, decisions, actions, resolved)


def summary(actions: list[ReplayedAction], county: str) -> set[tuple[str, str, str]]:
    return {
        (r.day.isoformat(), r.action.level_id, r.action.milestone_id or r.action.period or "")
        for r in actions
        if r.county_code == county
    }


def final_facts(played: Played, county: str) -> CountyFacts:
    """The county's facts at the end, with the replayed actions recorded on their day (09:00) and
    the operators' decisions applied."""
    timed: list[tuple[dt.datetime, int, EventEnvelope]] = []
    for seq, env in played.histories[county]:
        timed.append((env.recorded_at, seq, env))
    for n, r in enumerate((r for r in played.actions if r.county_code == county), start=500_000):
        at = dt.datetime.combine(r.day, dt.time(9, 0), SHANGHAI)
        env = msgspec.structs.replace(
            played.histories[county][0][1], event_id=f"a-{n}", occurred_at=at, recorded_at=at, payload=r.action
        )
        timed.append((at, n, env))
    proposals = {r.action.action_id: r.action for r in played.actions if isinstance(r.action, ActionProposed)}
    for seq, env in played.decisions[county]:
        timed.append((env.recorded_at, seq, env))
        if isinstance(env.payload, ActionConfirmed):  # the escalation service issues what is confirmed
            issued = recorded_as(ActionIssued, proposals[env.payload.action_id], confirmed_by=env.payload.operator)
            timed.append((env.recorded_at, seq, msgspec.structs.replace(env, payload=issued)))
    timed.sort(key=lambda item: (item[0], item[1]))
    return fold(PROGRAMME, county, [(i, env) for i, (_, _, env) in enumerate(timed, start=1)])


@pytest.fixture(scope="module")
def story() -> DemoStory:
    return load_story()


@pytest.fixture(scope="module")
def played(story: DemoStory) -> Played:
    return play(story)


# -- the story as data ---------------------------------------------------------------------------
def test_every_submission_decodes_as_a_county_system_would_post_it(story: DemoStory) -> None:
    assert story.programme_id == PROGRAMME.id
    assert (story.start, story.end) == (D("2017-03-01"), D("2018-12-31"))
    ids = [step.submission_id for step in story.steps]
    assert len(ids) == len(set(ids))
    for step in story.submissions:
        submission = decode_submission(submission_body(step, story.programme_id))
        assert submission.submission_id == step.submission_id
        assert (submission.county_code, submission.programme_id) == (step.county_code, PROGRAMME.id)
        assert submission.occurred_at == step.when
        assert submission.occurred_at is not None and submission.occurred_at.utcoffset() == dt.timedelta(hours=8)
        assert submission.submitted_by
    with pytest.raises(ValueError):
        submission_body(story.operator_steps[0], story.programme_id)


def test_steps_are_in_playing_order_and_days_cover_the_story(story: DemoStory) -> None:
    keys = [(step.day, step.at) for step in story.steps]
    assert keys == sorted(keys)
    days = list(story.days())
    assert days[0][0] == story.start and days[-1][0] == story.end
    assert len(days) == (story.end - story.start).days + 1
    assert [step for _, steps in days for step in steps] == list(story.steps)
    assert story.steps_on(D("2017-05-10")) == tuple(s for s in story.steps if s.day == D("2017-05-10"))
    assert [d for d, _ in story.days(until=D("2017-03-05"))][-1] == D("2017-03-05")


def test_every_county_files_its_tables_and_every_caption_names_its_county(story: DemoStory) -> None:
    names = {c.code: c.name for c in PROGRAMME.counties}
    for county in PROGRAMME.counties:
        tables = [s for s in story.county_steps(county.code) if s.kind == "file_progress_table"]
        assert len(tables) == (19 if county.code == "410926" else 20), county.code  # 范县 never files 2017-10
        for table in tables:
            assert table.command is not None and len(table.command["lines"]) == len(PROGRAMME.milestones)
    for step in story.steps:
        if step.kind != "file_progress_table" or step.submission_id == "demo-410926-table-2017-09":
            assert names[step.county_code] in step.note, step
        else:
            assert step.note == ""  # the routine monthly tables carry no caption


def test_a_table_reports_the_progress_of_its_day(story: DemoStory) -> None:
    table = next(s for s in story.steps if s.submission_id == "demo-410926-table-2017-11")
    assert table.command is not None and table.day == D("2017-12-03")
    percents = {line["milestone_id"]: line["percent"] for line in table.command["lines"]}
    assert percents == {
        "1.1": 100,
        "1.2": 100,
        "1.3": 100,
        "2.1": 100,
        "2.2": 100,
        "2.3": 100,
        "3.1": 0,
        "3.2": 0,
        "3.3": 0,
    }
    late = next(s for s in story.steps if s.submission_id == "demo-410926-table-2017-09")
    assert late.day == D("2017-10-16") and late.note == "范县：补报2017年9月督查进度一览表"


# -- the story played ------------------------------------------------------------------------------
@pytest.mark.parametrize("county", sorted(EXPECTED))
def test_each_county_gets_the_actions_worked_out_by_hand(played: Played, county: str) -> None:
    assert summary(played.actions, county) == EXPECTED[county]


def test_two_counties_on_time_throughout_get_reminders_only(played: Played) -> None:
    for county in ON_TIME:
        assert {r.action.level_id for r in played.actions if r.county_code == county} == {"reminder"}
        facts = final_facts(played, county)
        assert not facts.findings
        assert all(m.completed_on is not None for m in facts.milestones.values())
        for milestone in PROGRAMME.milestones:
            done = facts.milestones[milestone.id].completed_on
            assert done is not None and done <= milestone.deadline, (county, milestone.id)


def test_late_plan_climbs_the_ladder_and_the_city_confirms_criticism_and_talk(played: Played) -> None:
    ours = {
        r.action.level_id: r.action
        for r in played.actions
        if r.county_code == "410922" and r.action.milestone_id == "1.2"
    }
    assert isinstance(ours["overdue_notice"], ActionIssued)
    assert isinstance(ours["public_criticism"], ActionProposed) and isinstance(ours["admonitory_talk"], ActionProposed)
    facts = final_facts(played, "410922")
    for level in ("public_criticism", "admonitory_talk"):
        action = facts.actions[ours[level].action_id]
        assert (action.state, action.decided_by) == ("issued", "市督查局"), level
    assert facts.milestones["1.2"].completed_on == D("2017-05-25")
    assert "已逾期10个工作日" in ours["admonitory_talk"].explanation_zh


def test_tender_without_pre_review_gets_a_finding_and_a_procedure_notice(played: Played) -> None:
    findings = [e.payload for _, e in played.histories["410923"] if isinstance(e.payload, ProcedureFindingRecorded)]
    assert [f.rule_id for f in findings] == ["tender-pre-review-before-tender"]
    notice = next(
        r.action for r in played.actions if r.county_code == "410923" and r.action.level_id == "procedure_notice"
    )
    assert isinstance(notice, ActionIssued) and notice.finding_event_id
    assert "招标文件未经市城管综合执法局预审通过即发布" in notice.explanation_zh


def test_missed_tables_are_criticised_and_the_extension_moves_the_deadline(played: Played) -> None:
    facts = final_facts(played, "410926")
    assert "2017-10" not in facts.progress_tables
    assert facts.progress_tables["2017-09"].filed_on == D("2017-10-16")
    grants = [e.payload for _, e in played.histories["410926"] if isinstance(e.payload, ExtensionDecided)]
    assert [(g.outcome, g.new_deadline) for g in grants] == [(ExtensionOutcome.GRANTED, D("2018-02-09"))]
    assert facts.milestones["3.1"].extended_deadline == D("2018-02-09")
    assert facts.milestones["3.1"].completed_on == D("2018-02-06")
    reminder = next(r.action for r in played.actions if r.county_code == "410926" and r.action.milestone_id == "3.1")
    assert reminder.deadline == D("2018-02-09") and "已批准延期，原时限2017年12月31日" in reminder.explanation_zh
    by_level = {(a.level_id, a.period): a.state for a in facts.actions.values() if a.level_id in PROPOSED_LEVELS}
    assert by_level == {
        ("missed_table_criticism", "2017-09"): "issued",
        ("missed_table_criticism", "2017-10"): "issued",
        ("second_offence_talk", "2017-10"): "waived",
    }
    # The second-offence 约谈 exists only because the city confirmed both criticisms.
    undecided = replay(
        judge(),
        {c: [*played.histories[c], *played.decisions[c]] for c in played.histories},
        D("2017-03-01"),
        D("2018-12-31"),
        operator_decisions=False,
    )
    assert not [r for r in undecided if r.action.level_id == "second_offence_talk"]


def test_early_pre_acceptance_is_a_procedure_finding(played: Played) -> None:
    findings = [e.payload for _, e in played.histories["410926"] if isinstance(e.payload, ProcedureFindingRecorded)]
    assert [(f.rule_id, f.milestone_id) for f in findings] == [("six-months-trial-before-pre-acceptance", "3.2")]
    for county in ("410928", "410922", "410927"):
        assert not [e for _, e in played.histories[county] if isinstance(e.payload, ProcedureFindingRecorded)]


def test_every_operator_step_decides_exactly_one_proposal_made_before_its_day(story: DemoStory, played: Played) -> None:
    assert len(played.resolved) == len(story.operator_steps) == 5
    for index, ids in played.resolved.items():
        assert len(ids) == 1, story.steps[index]
    decided = {story.steps[i].operator_action: ids for i, ids in played.resolved.items()}
    assert {(a.decision.value, a.level, a.milestone_id or a.period) for a in decided if a is not None} == {
        ("confirm", "public_criticism", "1.2"),
        ("confirm", "admonitory_talk", "1.2"),
        ("confirm", "missed_table_criticism", "2017-09"),
        ("confirm", "missed_table_criticism", "2017-10"),
        ("waive", "second_offence_talk", "2017-10"),
    }


def test_every_county_completes_the_programme(played: Played) -> None:
    for county in PROGRAMME.counties:
        facts = final_facts(played, county.code)
        assert all(m.completed_on is not None for m in facts.milestones.values()), county.code
        assert not [
            r for r in played.actions if r.county_code == county.code and r.action.level_id == "provincial_measures"
        ]


def test_judging_before_or_after_the_days_steps_comes_to_the_same_actions(story: DemoStory, played: Played) -> None:
    """The live services judge each morning before the day's steps and again after each; the replay
    judges after them. No step may fall on a day the ladder acts for its county unless it is meant to."""
    before = play(story, judge_before_the_days_steps=True)
    assert len(before.resolved) == len(story.operator_steps)

    def key(r: ReplayedAction, with_day: bool) -> tuple[str, ...]:
        subject = r.action.milestone_id or r.action.period or ""
        return (r.county_code, r.action.level_id, subject, r.day.isoformat() if with_day else "")

    # Actions triggered by an event (a finding, a confirmation) come the day after in the emulation.
    evented = {"procedure_notice", "second_offence_talk", "readiness_warning"}
    after_keys = sorted(key(r, r.action.level_id not in evented) for r in played.actions)
    before_keys = sorted(key(r, r.action.level_id not in evented) for r in before.actions)
    assert before_keys == after_keys


# -- the loader's errors -----------------------------------------------------------------------------
HEADER = "format: duban.demo-story/v1\nprogramme: puyang-2017-13\nstart: 2017-03-01\nend: 2018-12-31\nsteps:\n"
GOOD_STEP = (
    '  - day: 2017-03-27\n    county: "410928"\n    note: 濮阳县：1.1完成\n'
    "    command: {kind: complete_milestone, milestone_id: '1.1', completed_on: 2017-03-27,"
    " evidence: [{title: 批复}]}\n"
)
PRE_REVIEW = "{kind: request_review, review_kind: plan_pre_review}"


def step(fields: str) -> str:
    """One step as a flow mapping, on line 6 of the file when it comes first."""
    return "  - {" + fields + "}\n"


@pytest.mark.parametrize(
    ("steps", "line", "message"),
    [
        (step(f"day: 2017-03-27, county: '410999', note: 某县, command: {PRE_REVIEW}"), 6, "not in the programme"),
        (
            step(
                "day: 2017-03-27, county: '410928', note: 濮阳县,"
                " command: {kind: report_progress, milestone_id: '1.1', percent: 120}"
            ),
            6,
            "$.steps[0].command.percent",
        ),
        (
            step(
                "day: 2017-03-27, county: '410928', as: county, note: 濮阳县, command: {kind: decide_review,"
                " review_kind: plan_pre_review, outcome: passed, decided_on: 2017-03-27}"
            ),
            6,
            "sent as city",
        ),
        (
            step("day: 2017-05-10, county: '410922', note: 清丰县, confirm: public_critcism, milestone: '1.2'"),
            6,
            "not a level",
        ),
        (step("day: 2017-05-10, county: '410922', note: 清丰县, confirm: public_criticism"), 6, "or its period"),
        (
            step(
                "day: 2017-05-10, at: '25:00', county: '410922', note: 清丰县, waive: admonitory_talk, period: 2017-05"
            ),
            6,
            "not a time of day",
        ),
        (step(f"day: 2019-01-01, county: '410928', note: 濮阳县, command: {PRE_REVIEW}"), 6, "outside the story"),
        (
            GOOD_STEP
            + step(
                "day: 2017-03-28, county: '410928', note: 濮阳县, command: {kind: decide_extension,"
                " milestone_id: '3.1', outcome: granted, new_deadline: 2018-02-09, request_submission_id: nope}"
            ),
            10,
            "no earlier submission",
        ),
        (
            GOOD_STEP
            + step(
                f"day: 2017-03-28, county: '410928', note: 濮阳县, submission_id: demo-410928-1, command: {PRE_REVIEW}"
            ),
            10,
            "used twice",
        ),
        (
            step(
                "day: 2017-03-26, county: '410928', note: 濮阳县,"
                " command: {kind: start_trial_operation, started_on: 2017-03-27}"
            ),
            6,
            "after the step's day",
        ),
    ],
)
def test_a_broken_story_is_refused_with_file_line_and_key(tmp_path: Path, steps: str, line: int, message: str) -> None:
    path = tmp_path / "story.yaml"
    path.write_text(HEADER + steps, encoding="utf-8")
    with pytest.raises(StoryFileError) as caught:
        load_story(path)
    assert f"{path}:{line}:" in str(caught.value)
    assert message in str(caught.value)


def test_a_small_story_loads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "story.yaml"
    path.write_text(
        HEADER
        + GOOD_STEP
        + step(
            "day: 2017-04-10, at: 15:30, county: '410928', note: 市城管综合执法局：濮阳县预审通过,"
            " command: {kind: decide_review, review_kind: plan_pre_review, outcome: passed, decided_on: 2017-04-10}"
        )
        + step(
            "day: 2017-05-10, county: '410922', note: 清丰县, waive: admonitory_talk, milestone: '1.2', reason: 已整改"
        )
        + 'progress_tables:\n  - {county: "410928", from: "2017-03", to: "2017-04", late: {"2017-04": 2017-05-08}}\n',
        encoding="utf-8",
    )
    story = load_story(path)
    first, decision = story.steps[0], story.steps[2]
    assert (first.at, first.role, first.submission_id, first.submitted_by) == (
        DEFAULT_AT,
        Role.COUNTY,
        "demo-410928-1",
        "濮阳县数字化城管系统",
    )
    assert (decision.at, decision.role, decision.submitted_by) == (dt.time(15, 30), Role.CITY, "市城管综合执法局")
    waiver = next(s for s in story.steps if s.operator_action is not None)
    assert waiver.operator_action is not None and waiver.operator_action.reason == "已整改"
    assert waiver.role is Role.CITY and waiver.command is None and waiver.kind == "waive"
    tables = [s for s in story.steps if s.kind == "file_progress_table"]
    assert [(t.day, t.submission_id) for t in tables] == [
        (D("2017-04-03"), "demo-410928-table-2017-03"),
        (D("2017-05-08"), "demo-410928-table-2017-04"),
    ]
    assert tables[0].command is not None and tables[0].command["lines"][0] == {
        "milestone_id": "1.1",
        "percent": 100,
        "note": "已完成",
    }
