"""The accountability ladder: which actions are due for a county today, and why. Pure.

(county's facts, policies, working-day calendar, today) → new actions. Every action has a
deterministic id, so judging the same facts again — twice, after a restart, in a replay —
yields nothing new. Completion stops a milestone's ladder; a granted extension moves it (the
deadline is part of the id, so the new deadline gets its own reminders); a retraction re-opens it
(the facts are folded without the retracted submission).

A milestone is judged under the policy version of its first action: a later policy file does
not change the rules half-way up a ladder, unless an operator records a migration.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from contracts.events import ActionIssued, ActionProposed
from contracts.facts import CountyFacts
from contracts.policy import Level, Policy, Trigger
from contracts.programme import Milestone, Programme
from contracts.readiness import AcceptanceSteps, month_end, next_period, period_of, readiness
from contracts.workdays import WorkdayCalendar


@dataclass(frozen=True)
class Judge:
    """How a county is judged: the programme, the policies by version, the current one, the calendar."""

    programme: Programme
    policies: Mapping[str, Policy]
    current: Policy
    calendar: WorkdayCalendar
    _table_deadlines: dict[tuple[str, str], list[tuple[str, dt.date, dt.date]]] = field(
        default_factory=dict, repr=False, compare=False
    )
    # Dates and texts every county shares, computed once per judge: a first tick over thousands
    # of counties that missed everything makes 10⁵ actions from a few dozen distinct ones.
    _shifted: dict[tuple[dt.date, int], dt.date] = field(default_factory=dict, repr=False, compare=False)
    _deadlines: dict[tuple[bool, dt.date], dt.date] = field(default_factory=dict, repr=False, compare=False)
    _level_fields: dict[tuple[str, str], dict[str, object]] = field(default_factory=dict, repr=False, compare=False)
    _missing: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def pinned_policies(self, facts: CountyFacts) -> dict[str, Policy]:
        """Milestone → the policy of its first action (recorded actions keep stream order)."""
        pins: dict[str, Policy] = {}
        for action in facts.actions.values():
            if action.milestone_id and action.milestone_id not in pins:
                pins[action.milestone_id] = self.policies.get(action.policy_version, self.current)
        return pins

    def table_deadlines(self, policy: Policy, level: Level) -> list[tuple[str, dt.date, dt.date]]:
        """(period, due date, action due on) for every reporting period, computed once per judge."""
        key = (policy.version, level.id)
        cached = self._table_deadlines.get(key)
        if cached is None:
            cached = []
            for period in self.programme.reporting_periods():
                due = self.deadline(policy, self.programme.progress_table_due(period))
                cached.append((period, due, self.shifted(due, level.workdays)))
            self._table_deadlines[key] = cached
        return cached

    def deadline(self, policy: Policy, day: dt.date) -> dt.date:
        key = (policy.roll_rest_day_deadlines, day)
        found = self._deadlines.get(key)
        if found is None:
            found = self._deadlines[key] = self.calendar.next_workday(day) if policy.roll_rest_day_deadlines else day
        return found

    def shifted(self, day: dt.date, workdays: int) -> dt.date:
        """``calendar.add_workdays``, remembered."""
        found = self._shifted.get((day, workdays))
        if found is None:
            found = self._shifted[(day, workdays)] = self.calendar.add_workdays(day, workdays)
        return found

    def level_fields(self, level: Level, policy: Policy) -> dict[str, object]:
        """The fields every action of ``level`` under ``policy`` shares."""
        key = (policy.version, level.id)
        found = self._level_fields.get(key)
        if found is None:
            found = self._level_fields[key] = {
                "level_id": level.id,
                "level_name": level.name,
                "policy_version": policy.version,
                "addressed": tuple(role.value for role in level.addressed),
                "urgent": level.urgent,
            }
        return found

    def missing(self, milestone: Milestone) -> str:
        found = self._missing.get(milestone.id)
        if found is None:
            found = self._missing[milestone.id] = _missing(self.programme, milestone)
        return found


def due_actions(judge: Judge, facts: CountyFacts, today: dt.date) -> list[ActionIssued | ActionProposed]:
    """The actions due today that are not on record yet, in a stable order."""
    found: dict[str, ActionIssued | ActionProposed] = {}
    for action in _all_due(judge, facts, today):
        if action.action_id not in facts.actions and action.action_id not in found:
            found[action.action_id] = action
    return sorted(found.values(), key=lambda a: (a.due_on, a.action_id))


def _all_due(judge: Judge, facts: CountyFacts, today: dt.date) -> Iterator[ActionIssued | ActionProposed]:
    pins = judge.pinned_policies(facts)
    for milestone in judge.programme.milestones:
        yield from _milestone_actions(judge, facts, milestone, today, pins.get(milestone.id, judge.current))
    yield from _progress_table_actions(judge, facts, today)
    yield from _trial_report_actions(judge, facts, today)
    yield from _readiness_actions(judge, facts, today)
    yield from _finding_actions(judge, facts, today)
    yield from _second_offence_actions(judge, facts, today)


def _make(judge: Judge, level: Level, policy: Policy, fields: dict[str, object]) -> ActionIssued | ActionProposed:
    common = {**judge.level_fields(level, policy), **fields}
    return ActionProposed(**common) if level.confirm else ActionIssued(**common)  # type: ignore[arg-type]


def _action_id(judge: Judge, facts: CountyFacts, *parts: str) -> str:
    return ":".join((judge.programme.id, facts.county_code, *parts))


def _milestone_actions(
    judge: Judge, facts: CountyFacts, milestone: Milestone, today: dt.date, policy: Policy
) -> Iterator[ActionIssued | ActionProposed]:
    state = facts.milestones[milestone.id]
    if state.completed_on is not None:
        return  # completion stops the ladder
    ledger_deadline = state.extended_deadline or milestone.deadline
    deadline = judge.deadline(policy, ledger_deadline)
    cal = judge.calendar
    for level in policy.levels:
        if level.milestones and milestone.id not in level.milestones:
            continue
        if level.trigger not in (Trigger.BEFORE_DEADLINE, Trigger.AFTER_DEADLINE, Trigger.PROGRAMME_FAILED):
            continue
        action_id = _action_id(judge, facts, level.id, milestone.id, deadline.isoformat())
        if action_id in facts.actions:
            continue  # on record: judged before
        if level.trigger is Trigger.BEFORE_DEADLINE:
            due_on = judge.shifted(deadline, -level.workdays)
            if not due_on <= today <= deadline:
                continue
            workdays = cal.workdays_between(today, deadline)
        else:
            due_on = judge.shifted(deadline, level.workdays)
            if today < due_on:
                continue
            workdays = cal.workdays_between(deadline, today)
        yield _make(
            judge,
            level,
            policy,
            {
                "action_id": action_id,
                "due_on": due_on,
                "milestone_id": milestone.id,
                "deadline": deadline,
                "workdays": workdays,
                "missing_zh": judge.missing(milestone),
                "explanation_zh": _explain_milestone(
                    judge.programme,
                    milestone,
                    level,
                    policy,
                    ledger_deadline,
                    deadline,
                    today,
                    workdays,
                    extended=state.extended_deadline is not None,
                ),
            },
        )


def _progress_table_actions(
    judge: Judge, facts: CountyFacts, today: dt.date
) -> Iterator[ActionIssued | ActionProposed]:
    policy = judge.current
    for level in policy.levels:
        if level.trigger is not Trigger.MISSED_PROGRESS_TABLE:
            continue
        for period, due, due_on in judge.table_deadlines(policy, level):
            if today < due_on:
                break  # periods are in order: later ones are not due either
            action_id = _action_id(judge, facts, level.id, period)
            if action_id in facts.actions:
                continue
            filed = facts.progress_tables.get(period)
            if filed is not None and filed.filed_on <= due:
                continue
            yield _missed_report(
                judge,
                level,
                policy,
                action_id,
                period,
                due,
                due_on,
                today,
                filed.filed_on if filed else None,
                "督查进度一览表",
            )


def _missed_report(
    judge: Judge,
    level: Level,
    policy: Policy,
    action_id: str,
    period: str,
    due: dt.date,
    due_on: dt.date,
    today: dt.date,
    filed_on: dt.date | None,
    report_zh: str,
) -> ActionIssued | ActionProposed:
    """A monthly report (progress table, trial-operation report) not filed by its due date."""
    late = f"于{_zh(filed_on)}逾期报送" if filed_on else "截至目前仍未报送"
    return _make(
        judge,
        level,
        policy,
        {
            "action_id": action_id,
            "due_on": due_on,
            "period": period,
            "deadline": due,
            "workdays": judge.calendar.workdays_between(due, today),
            "missing_zh": f"{period}{report_zh}",
            "explanation_zh": (
                f"{_period_zh(period)}{report_zh}应于{_zh(due)}前报送，{late}，"
                f"依据督办政策{policy.version}“{level.name}”，{_confirm_zh(level)}"
            ),
        },
    )


def _trial_report_actions(judge: Judge, facts: CountyFacts, today: dt.date) -> Iterator[ActionIssued | ActionProposed]:
    """A monthly trial-operation report not filed by its due date, judged like a missed progress
    table: every month from the month trial operation started until pre-acceptance is done (a
    month is required when it ended before the pre-acceptance milestone was completed)."""
    policy = judge.current
    levels = [lv for lv in policy.levels if lv.trigger is Trigger.MISSED_TRIAL_REPORT]
    started = facts.trial_started_on
    if not levels or started is None:
        return
    programme = judge.programme
    steps = AcceptanceSteps.of(programme)
    pre = steps.milestone(programme, steps.pre_kind)
    finished = facts.milestones[pre.id].completed_on if pre is not None else None
    for level in levels:
        period = period_of(started)
        while True:
            if finished is not None and month_end(period) >= finished:
                break  # pre-acceptance done: the month it was done in, and later ones, need no report
            due = judge.deadline(policy, programme.trial_report_due(period))
            due_on = judge.shifted(due, level.workdays)
            if today < due_on:
                break  # months are in order: later ones are not due either
            action_id = _action_id(judge, facts, level.id, period)
            filed = facts.trial_reports.get(period)
            if action_id not in facts.actions and (filed is None or filed.filed_on > due):
                yield _missed_report(
                    judge,
                    level,
                    policy,
                    action_id,
                    period,
                    due,
                    due_on,
                    today,
                    filed.filed_on if filed else None,
                    "试运行月报",
                )
            period = next_period(period)


def _readiness_actions(judge: Judge, facts: CountyFacts, today: dt.date) -> Iterator[ActionIssued | ActionProposed]:
    """Warn the day the slack to the pre-acceptance deadline is gone: trial operation started too
    late for six stable months before it, or a missing or unstable month moved the earliest day
    past it. Once per effective deadline (a granted extension re-arms it)."""
    policy = judge.current
    levels = [lv for lv in policy.levels if lv.trigger is Trigger.READINESS_LOST]
    if not levels or facts.trial_started_on is None:
        return
    programme = judge.programme
    steps = AcceptanceSteps.of(programme)
    pre = steps.milestone(programme, steps.pre_kind)
    if pre is None or facts.milestones[pre.id].completed_on is not None:
        return
    state = readiness(programme, facts, today, judge.calendar, roll_rest_days=policy.roll_rest_day_deadlines)
    slack = next((d for d in state.deadlines if d.milestone_id == pre.id), None)
    earliest, since = state.earliest_pre_acceptance, state.run_known_on
    if slack is None or earliest is None or since is None or slack.can_make_it is not False:
        return
    deadline = slack.effective_deadline
    for level in levels:
        action_id = _action_id(judge, facts, level.id, pre.id, deadline.isoformat())
        if action_id in facts.actions or today < since:
            continue
        if state.run_started_on == facts.trial_started_on:
            latest = _zh(state.latest_trial_start or deadline)
            why = f"系统于{_zh(facts.trial_started_on)}才开始试运行（最迟应于{latest}开始）"
        else:
            broken = next((m for m in reversed(state.months) if m.state in ("missing", "unstable")), None)
            what = "未按期报送" if broken is not None and broken.state == "missing" else "未达到稳定运行标准"
            month = _period_zh(broken.period) if broken else ""
            restart = _zh(state.run_started_on or since)
            started = _zh(facts.trial_started_on)
            why = f"系统于{started}开始试运行，{month}试运行月报{what}，稳定运行须自{restart}重新计算"
        yield _make(
            judge,
            level,
            policy,
            {
                "action_id": action_id,
                "due_on": since,
                "milestone_id": pre.id,
                "deadline": deadline,
                "workdays": slack.slack_workdays or 0,
                "missing_zh": f"{state.stable_months_required}个月稳定试运行",
                "explanation_zh": (
                    f"{why}，须稳定运行{state.stable_months_required}个月后方可申请预验收，最早于{_zh(earliest)}，"
                    f"已晚于里程碑{pre.id}《{pre.title}》完成时限{_zh(deadline)}"
                    f"（余量{slack.slack_workdays if slack.slack_workdays is not None else '—'}个工作日），"
                    f"按期完成预验收已无可能，请及早采取措施或申请延期。"
                    f"依据督办政策{policy.version}“{level.name}”，{_confirm_zh(level)}"
                ),
            },
        )


def _finding_actions(judge: Judge, facts: CountyFacts, today: dt.date) -> Iterator[ActionIssued | ActionProposed]:
    policy = judge.current
    zone = ZoneInfo(judge.programme.programme.timezone)
    for level in policy.levels:
        if level.trigger is not Trigger.PROCEDURE_FINDING:
            continue
        for finding in facts.findings:
            action_id = _action_id(judge, facts, level.id, finding.event_id.replace("/", "."))
            found_on = finding.recorded_at.astimezone(zone).date()
            if action_id in facts.actions or found_on > today:
                continue
            milestone = judge.programme.milestone(finding.milestone_id or "")
            about = f"里程碑{milestone.id}《{milestone.title}》" if milestone else ""
            yield _make(
                judge,
                level,
                policy,
                {
                    "action_id": action_id,
                    "due_on": found_on,
                    "milestone_id": finding.milestone_id,
                    "finding_event_id": finding.event_id,
                    "explanation_zh": (
                        f"{about}程序问题：{finding.finding_zh}（{finding.detail}）。{_confirm_zh(level)}"
                    ),
                },
            )


def _second_offence_actions(
    judge: Judge, facts: CountyFacts, today: dt.date
) -> Iterator[ActionIssued | ActionProposed]:
    policy = judge.current
    offence_levels = {lv.id for lv in policy.levels if lv.offence}
    offences = sorted(
        (a for a in facts.actions.values() if a.level_id in offence_levels and a.state == "issued"),
        key=lambda a: (a.due_on, a.action_id),
    )
    for level in policy.levels:
        if level.trigger is not Trigger.SECOND_OFFENCE:
            continue
        for nth, offence in enumerate(offences[1:], start=2):
            action_id = _action_id(judge, facts, level.id, offence.action_id.split(":", 2)[-1])
            if action_id in facts.actions:
                continue
            yield _make(
                judge,
                level,
                policy,
                {
                    "action_id": action_id,
                    "due_on": offence.due_on,
                    "milestone_id": offence.milestone_id,
                    "period": offence.period,
                    "explanation_zh": (
                        f"该县已第{nth}次被{offence.level_name}（{offence.explanation_zh.split('，')[0]}），"
                        f"依据督办政策{policy.version}“{level.name}”，{_confirm_zh(level)}"
                    ),
                },
            )


# -- explanations --------------------------------------------------------------------------------
def _zh(day: dt.date) -> str:
    return f"{day.year}年{day.month}月{day.day}日"


def _period_zh(period: str) -> str:
    return f"{period[:4]}年{int(period[5:])}月"


def _confirm_zh(level: Level) -> str:
    return "拟予提出，待市级确认后发出。" if level.confirm else "现予发出。"


def _missing(programme: Programme, milestone: Milestone) -> str:
    if milestone.completed_by.startswith("review:"):
        review = programme.review(milestone.completed_by.removeprefix("review:"))
        return f"“{review.name if review else milestone.completed_by}”通过记录"
    if milestone.completed_by == "trial_operation_started":
        return "系统试运行开始报告"
    return "完成报告及佐证材料"


def _explain_milestone(
    programme: Programme,
    milestone: Milestone,
    level: Level,
    policy: Policy,
    ledger_deadline: dt.date,
    deadline: dt.date,
    today: dt.date,
    workdays: int,
    *,
    extended: bool,
) -> str:
    text = f"里程碑{milestone.id}《{milestone.title}》完成时限{_zh(ledger_deadline)}"
    if extended:
        text += f"（已批准延期，原时限{_zh(milestone.deadline)}）"
    if deadline != ledger_deadline:
        text += f"（遇休息日顺延至{_zh(deadline)}）"
    if level.trigger is Trigger.BEFORE_DEADLINE:
        text += f"，截至{_zh(today)}距截止还有{workdays}个工作日，尚未收到{_missing(programme, milestone)}。"
    else:
        text += f"，截至{_zh(today)}已逾期{workdays}个工作日，未收到{_missing(programme, milestone)}。"
    return text + f"依据督办政策{policy.version}“{level.name}”，{_confirm_zh(level)}"
