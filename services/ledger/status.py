"""Where each milestone stands on a given day: status and traffic light. Pure.

The status depends on the day it is judged (a deadline passes), so it is computed when asked,
from the folded facts, the working-day calendar and the light thresholds — never stored.
"""

from __future__ import annotations

import datetime as dt

import msgspec

from contracts.facts import CountyFacts, MilestoneFacts
from contracts.ledger import Light, MilestoneStatus, PeriodStatus, Status
from contracts.programme import Milestone, Programme
from contracts.workdays import WorkdayCalendar


class LightSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Thresholds of the traffic light. A deadline on a rest day may roll to the next working day."""

    due_soon_workdays: int = 5
    roll_rest_day_deadlines: bool = True


def effective_deadline(
    milestone: Milestone, facts: MilestoneFacts, calendar: WorkdayCalendar, settings: LightSettings
) -> dt.date:
    deadline = facts.extended_deadline or milestone.deadline
    return calendar.next_workday(deadline) if settings.roll_rest_day_deadlines else deadline


def milestone_status(
    programme: Programme,
    ledger: CountyFacts,
    milestone: Milestone,
    today: dt.date,
    calendar: WorkdayCalendar,
    settings: LightSettings,
) -> MilestoneStatus:
    facts = ledger.milestones[milestone.id]
    due = effective_deadline(milestone, facts, calendar, settings)
    left = calendar.workdays_between(today, due)
    if facts.completed_on is not None:
        late = facts.completed_on > due
        status, light = (Status.DONE_LATE, Light.RED) if late else (Status.DONE, Light.GREEN)
    elif today > due:
        status, light = Status.OVERDUE, Light.RED
    else:
        kinds = {r.kind for r in programme.reviews if r.milestone == milestone.id}
        pending_review = any(r.state == "requested" and r.review_kind in kinds for r in ledger.reviews.values())
        if pending_review:
            status = Status.AWAITING_REVIEW
        elif facts.percent > 0 or facts.steps_done:
            status = Status.IN_PROGRESS
        else:
            status = Status.NOT_STARTED
        light = Light.YELLOW if left <= settings.due_soon_workdays else Light.GREEN
    return MilestoneStatus(
        milestone_id=milestone.id,
        status=status,
        light=light,
        deadline=milestone.deadline,
        effective_deadline=due,
        workdays_left=left,
        percent=facts.percent,
        completed_on=facts.completed_on,
        note=facts.note,
        open_findings=sum(1 for f in ledger.findings if f.milestone_id == milestone.id),
    )


def period_status(programme: Programme, ledger: CountyFacts, period: str, today: dt.date) -> PeriodStatus:
    due = programme.progress_table_due(period)
    filed = ledger.progress_tables.get(period)
    if filed is not None and filed.filed_on <= today:
        return PeriodStatus.ON_TIME if filed.filed_on <= due else PeriodStatus.LATE
    return PeriodStatus.MISSING if today > due else PeriodStatus.NOT_DUE
