"""Acceptance readiness (验收准备): when a county may apply for pre-acceptance, what it still
lacks, and how much slack it has to the ledger's acceptance deadlines. Pure: facts in, answer out.

The notice (第三条（三）): "系统试运行6个月后，向市城管综合执法局提出预验收申请". We read six months
of trial operation as six months of *stable* operation, month by month from the county's own
monthly reports (试运行月报) against the programme's thresholds (``trial_operation:`` in the
programme file). How the months are counted is :func:`stable_run`, and nowhere else.

Shown by the ledger (a county's detail, the 一览表's 验收准备 sheet); judged by escalation (the
``readiness_lost`` and ``missed_trial_report`` triggers).
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from contracts.facts import CountyFacts, TrialReportFacts
from contracts.payloads import Fields
from contracts.programme import Decider, Milestone, Programme
from contracts.workdays import CalendarYearMissing, WorkdayCalendar


# -- months ----------------------------------------------------------------------------------------
def add_months(day: dt.date, months: int) -> dt.date:
    """The same day ``months`` calendar months later, clamped to the month's end (8-31 → 2-28)."""
    index = day.month - 1 + months
    year, month = day.year + index // 12, index % 12 + 1
    return dt.date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def month_end(period: str) -> dt.date:
    """The last day of a "YYYY-MM" period."""
    year, month = int(period[:4]), int(period[5:])
    return dt.date(year, month, calendar.monthrange(year, month)[1])


def period_of(day: dt.date) -> str:
    return f"{day.year:04d}-{day.month:02d}"


def next_period(period: str) -> str:
    year, month = int(period[:4]), int(period[5:])
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return f"{year:04d}-{month:02d}"


def _first_day(period: str) -> dt.date:
    return dt.date(int(period[:4]), int(period[5:]), 1)


# -- a month of trial operation --------------------------------------------------------------------
class TrialMonth(Fields, frozen=True):
    """One month of trial operation as the readiness count sees it."""

    period: str
    # stable | unstable | missing (its report is overdue) | pending (not yet due, or not yet over)
    state: str
    due_on: dt.date  # the day its report is due
    filed_on: dt.date | None = None
    dispatch_rate: float | None = None  # dispatched / registered
    closure_rate: float | None = None  # closed / dispatched
    on_time_rate: float | None = None  # closed on time / closed
    shortfalls: tuple[str, ...] = ()  # which thresholds it missed, in Chinese
    counted: bool = False  # part of the current run of stable months


def _rate(part: int, whole: int) -> float | None:
    return None if whole == 0 else part / whole


def _report_due(programme: Programme, period: str, calendar: WorkdayCalendar | None) -> dt.date:
    due = programme.trial_report_due(period)
    if calendar is None:
        return due
    try:
        return calendar.next_workday(due)
    except CalendarYearMissing:
        return due


def judge_month(
    programme: Programme, report: TrialReportFacts, due_on: dt.date | None = None
) -> tuple[bool, TrialMonth]:
    """Whether a reported month met the programme's thresholds (a rate with a zero denominator
    counts as met: nothing was there to dispatch or close)."""
    spec = programme.trial_operation
    rates = (
        ("派遣率", _rate(report.cases_dispatched, report.cases_registered), spec.min_dispatch_rate),
        ("结案率", _rate(report.cases_closed, report.cases_dispatched), spec.min_closure_rate),
        ("按期结案率", _rate(report.cases_closed_on_time, report.cases_closed), spec.min_on_time_rate),
    )
    shortfalls = tuple(
        f"{name}{value:.1%}低于{threshold:.0%}"
        for name, value, threshold in rates
        if value is not None and value < threshold
    )
    stable = not shortfalls
    return stable, TrialMonth(
        period=report.period,
        state="stable" if stable else "unstable",
        due_on=due_on or programme.trial_report_due(report.period),
        filed_on=report.filed_on,
        dispatch_rate=rates[0][1],
        closure_rate=rates[1][1],
        on_time_rate=rates[2][1],
        shortfalls=shortfalls,
    )


@dataclass(frozen=True)
class StableRun:
    run_started_on: dt.date  # the day the current count of stable months runs from
    known_on: dt.date  # the day the facts put the run's start there (trial start, or the last break)
    earliest_application: dt.date
    stable_months: int  # months of the current run reported and stable
    months: tuple[TrialMonth, ...]  # from the start month to the run's last month or today's


def stable_run(
    programme: Programme,
    started_on: dt.date,
    reports: Mapping[str, TrialReportFacts],
    today: dt.date,
    calendar: WorkdayCalendar | None = None,
) -> StableRun:
    """The current run of stable trial operation and the earliest day to apply for pre-acceptance.

    **How "six months" is counted** (N = ``trial_operation.stable_months``, 6): calendar months
    from the day trial operation started, the procedure rule's count — the county may apply on
    ``add_months(start, N)`` (started 2017-12-27 → 2018-06-27; started 2018-01-31 → 2018-07-31;
    started 2018-02-01 → 2018-08-01). Every calendar month the run touches before then must be
    stable: the start month (even when only partly run) and the N-1 months after it, each reported
    and meeting the thresholds. So every month's report can be on record by the day the county
    may apply.

    A month that is reported and not stable, or whose report is overdue and missing, breaks the
    run: it restarts on the first day of the following month, and the earliest day moves to
    N months after that (a missing 2018-02 for a start on 2017-12-27: 2018-03-01 → 2018-09-01).
    A missing report filed late and stable mends the break. Months not yet over or not yet due
    are pending: assumed stable for the earliest date, not counted as stable months. With a
    ``calendar``, a report due on a rest day is due on the next working day (as the ladder counts).
    """
    needed = programme.trial_operation.stable_months
    run_start, known_on = started_on, started_on
    months: list[TrialMonth] = []
    run: list[int] = []  # indexes into months of the current run
    period = period_of(started_on)
    while len(run) < needed and _first_day(period) <= today:
        report = reports.get(period)
        due = _report_due(programme, period, calendar)
        if report is not None:
            stable, month = judge_month(programme, report, due)
            if not stable:
                run, run_start, known_on = [], _first_day(next_period(period)), report.filed_on
                months.append(month)
                period = next_period(period)
                continue
        elif today > due:
            months.append(TrialMonth(period=period, state="missing", due_on=due))
            run, run_start, known_on = [], _first_day(next_period(period)), due + dt.timedelta(days=1)
            period = next_period(period)
            continue
        else:
            month = TrialMonth(period=period, state="pending", due_on=due)
        run.append(len(months))
        months.append(month)
        period = next_period(period)
    counted = set(run)
    months = [msgspec.structs.replace(m, counted=i in counted) for i, m in enumerate(months)]
    return StableRun(
        run_started_on=run_start,
        known_on=known_on,
        earliest_application=add_months(run_start, needed),
        stable_months=sum(1 for i in run if months[i].state == "stable"),
        months=tuple(months),
    )


# -- readiness -------------------------------------------------------------------------------------
class DeadlineSlack(Fields, frozen=True):
    milestone_id: str
    title: str
    deadline: dt.date  # the ledger's
    effective_deadline: dt.date  # after a granted extension and the rest-day roll
    completed_on: dt.date | None
    counted_from: dt.date | None  # the earliest day the county can apply for it
    slack_workdays: int | None  # working days from counted_from to the deadline; negative: cannot make it
    can_make_it: bool | None


class Readiness(Fields, frozen=True):
    """A county's acceptance readiness on a given day."""

    today: dt.date
    trial_started_on: dt.date | None
    stable_months_required: int
    stable_months: int  # in the current run
    run_started_on: dt.date | None
    run_known_on: dt.date | None  # the day the facts put the run's start there (trial start, last break)
    earliest_pre_acceptance: dt.date | None  # the earliest day it may apply for pre-acceptance
    latest_trial_start: dt.date | None  # the latest start that could still make the pre-acceptance deadline
    prerequisites_done: bool  # self-acceptance (自验) and any other review the rules require first
    open_findings: int
    months: tuple[TrialMonth, ...]
    deadlines: tuple[DeadlineSlack, ...]  # pre-acceptance, then formal acceptance
    missing: tuple[str, ...]  # what is still missing, in Chinese
    ready: bool  # everything on record to apply for pre-acceptance today


@dataclass(frozen=True)
class AcceptanceSteps:
    """Which review kinds and milestones are pre-acceptance and formal acceptance, from the rules."""

    pre_kind: str | None
    formal_kind: str | None
    prerequisites: tuple[str, ...]  # review kinds that must be passed before applying

    @classmethod
    def of(cls, programme: Programme) -> AcceptanceSteps:
        pre = next(
            (r.when.review_requested for r in programme.rules if r.requires.trial_operation_months is not None), None
        )
        formal = next(
            (r.when.review_requested for r in programme.rules if pre and r.requires.review_passed == pre),
            None,
        )
        prerequisites = tuple(
            r.requires.review_passed
            for r in programme.rules
            if pre and r.when.review_requested == pre and r.requires.review_passed is not None
        )
        return cls(pre, formal, prerequisites)

    def milestone(self, programme: Programme, kind: str | None) -> Milestone | None:
        review = programme.review(kind) if kind else None
        return programme.milestone(review.milestone) if review and review.milestone else None


def _review_done(programme: Programme, facts: CountyFacts, kind: str, today: dt.date) -> bool:
    review = facts.reviews.get(kind)
    if review is None:
        return False
    if review.state == "passed":
        return review.decided_on is None or review.decided_on <= today
    spec = programme.review(kind)
    return spec is not None and spec.decided_by is Decider.NONE and review.state == "requested"


def effective_deadline(
    facts: CountyFacts, milestone: Milestone, calendar: WorkdayCalendar, *, roll_rest_days: bool
) -> dt.date:
    day = facts.milestones[milestone.id].extended_deadline or milestone.deadline
    if not roll_rest_days:
        return day
    try:
        return calendar.next_workday(day)
    except CalendarYearMissing:
        return day


def _slack(
    facts: CountyFacts,
    milestone: Milestone,
    counted_from: dt.date | None,
    calendar: WorkdayCalendar,
    *,
    roll_rest_days: bool,
) -> DeadlineSlack:
    deadline = effective_deadline(facts, milestone, calendar, roll_rest_days=roll_rest_days)
    workdays: int | None = None
    if counted_from is not None:
        try:
            workdays = calendar.workdays_between(counted_from, deadline)
        except CalendarYearMissing:
            workdays = None
    return DeadlineSlack(
        milestone_id=milestone.id,
        title=milestone.title,
        deadline=milestone.deadline,
        effective_deadline=deadline,
        completed_on=facts.milestones[milestone.id].completed_on,
        counted_from=counted_from,
        slack_workdays=workdays,
        can_make_it=None if counted_from is None else counted_from <= deadline,
    )


def readiness(
    programme: Programme,
    facts: CountyFacts,
    today: dt.date,
    calendar: WorkdayCalendar,
    *,
    roll_rest_days: bool = True,
) -> Readiness:
    """A county's readiness to apply for pre-acceptance on ``today``, from its facts.

    Slack is in working days (``calendar``) from the earliest day the county may apply to the
    effective deadline (after a granted extension, rolled off a rest day when ``roll_rest_days``):
    for pre-acceptance from :func:`stable_run`'s earliest day, for formal acceptance from the day
    pre-acceptance passed, or else from the same earliest day. Negative: the deadline cannot be
    made. ``months`` lists the trial months up to today (or to the run's N-th month).
    """
    steps = AcceptanceSteps.of(programme)
    needed = programme.trial_operation.stable_months
    missing: list[str] = []
    started = facts.trial_started_on if facts.trial_started_on and facts.trial_started_on <= today else None
    pre_m = steps.milestone(programme, steps.pre_kind)
    formal_m = steps.milestone(programme, steps.formal_kind)
    pre_deadline = (
        effective_deadline(facts, pre_m, calendar, roll_rest_days=roll_rest_days) if pre_m is not None else None
    )
    run: StableRun | None = None
    if started is None:
        missing.append("系统试运行开始报告")
    else:
        run = stable_run(programme, started, facts.trial_reports, today, calendar if roll_rest_days else None)
        for month in run.months:
            if month.state == "missing":
                missing.append(f"{month.period}试运行月报（应于{month.due_on.isoformat()}前报送）")
            elif month.state == "unstable":
                missing.append(f"{month.period}未达到稳定运行标准（{'，'.join(month.shortfalls)}）")
        if run.stable_months < needed:
            last = period_of(add_months(run.run_started_on, needed - 1))
            missing.append(
                f"还需{needed - run.stable_months}个月稳定运行"
                f"（{period_of(run.run_started_on)}至{last}，最早可于{run.earliest_application.isoformat()}申请预验收）"
            )
    prerequisites_done = True
    for kind in steps.prerequisites:
        if not _review_done(programme, facts, kind, today):
            prerequisites_done = False
            review = programme.review(kind)
            missing.append(f"“{review.name if review else kind}”记录")
    if facts.findings:
        missing.append(f"程序问题{len(facts.findings)}项")
    earliest = run.earliest_application if run is not None else None
    deadlines: list[DeadlineSlack] = []
    if pre_m is not None:
        deadlines.append(_slack(facts, pre_m, earliest, calendar, roll_rest_days=roll_rest_days))
    if formal_m is not None:
        pre_passed = facts.reviews.get(steps.pre_kind or "")
        from_day = pre_passed.decided_on if pre_passed and pre_passed.state == "passed" else earliest
        deadlines.append(_slack(facts, formal_m, from_day, calendar, roll_rest_days=roll_rest_days))
    ready = (
        run is not None
        and run.stable_months >= needed
        and earliest is not None
        and earliest <= today
        and prerequisites_done
    )
    return Readiness(
        today=today,
        trial_started_on=started,
        stable_months_required=needed,
        stable_months=run.stable_months if run else 0,
        run_started_on=run.run_started_on if run else None,
        run_known_on=run.known_on if run else None,
        earliest_pre_acceptance=earliest,
        latest_trial_start=add_months(pre_deadline, -needed) if pre_deadline is not None else None,
        prerequisites_done=prerequisites_done,
        open_findings=len(facts.findings),
        months=run.months if run else (),
        deadlines=tuple(deadlines),
        missing=tuple(missing),
        ready=ready,
    )
