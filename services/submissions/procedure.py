"""The procedure of the notice (第三条): which steps must come before which.

The rules themselves are data (``rules:`` in the programme file); this module says what a
trigger is and when a requirement is met. A step reported out of order is a fact all the same:
it is stored, and a procedure finding is stored beside it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from contracts.programme import Decider, ProcedureRule, Programme
from contracts.readiness import add_months, month_end
from services.submissions.record import Facts

__all__ = ["Breach", "Trigger", "add_months", "breaches", "month_end", "review_passed"]

TriggerKind = Literal[
    "review_requested", "step_done", "milestone_completed", "trial_operation_started", "trial_operation_reported"
]


@dataclass(frozen=True)
class Trigger:
    """Something a county reported that the rules look at, and the day it happened."""

    kind: TriggerKind
    on: dt.date  # the reported date (completed_on, started_on) or the day it was reported
    value: str = ""  # review kind, "milestone/step", milestone id, reported period "YYYY-MM"

    @property
    def milestone_id(self) -> str | None:
        """The milestone the trigger is about, when its value names one."""
        if self.kind in ("step_done", "milestone_completed"):
            return self.value.split("/")[0]
        return None


@dataclass(frozen=True)
class Breach:
    rule: ProcedureRule
    trigger: Trigger
    detail: str


def breaches(programme: Programme, facts: Facts, trigger: Trigger) -> Iterator[Breach]:
    """The rules that ``trigger`` breaks, with ``facts`` on record.

    A requirement must hold by the trigger's own date: phase-2 work completed on a date before the
    province's approval breaks the gate even when it is reported after the approval.
    """
    for rule in programme.rules:
        if _matches(rule, trigger):
            unmet = _unmet(programme, facts, rule, trigger.on)
            if unmet is not None:
                yield Breach(rule, trigger, unmet)


def _matches(rule: ProcedureRule, trigger: Trigger) -> bool:
    when = rule.when
    match trigger.kind:
        case "review_requested":
            return when.review_requested == trigger.value
        case "step_done":
            return when.step_done == trigger.value
        case "milestone_completed":
            return trigger.value in (when.milestone_completed or ())
        case "trial_operation_started":
            return bool(when.trial_operation_started)
        case "trial_operation_reported":
            return bool(when.trial_operation_reported)
    return False


def _unmet(programme: Programme, facts: Facts, rule: ProcedureRule, on: dt.date) -> str | None:
    """None when the rule's requirement holds; otherwise what is missing, in Chinese."""
    req = rule.requires
    if req.review_passed is not None:
        if review_passed(programme, facts, req.review_passed, on):
            return None
        review = programme.review(req.review_passed)
        name = review.name if review else req.review_passed
        return f"截至{on.isoformat()}未见“{name}”通过记录"
    if req.milestone_completed is not None:
        completed = facts.completed.get(req.milestone_completed)
        if completed is not None and completed <= on:
            return None
        return f"截至{on.isoformat()}建设任务{req.milestone_completed}尚未完成"
    if req.trial_operation_started:
        # ``on`` is the last day of the month reported: trial operation must have started by then.
        started = facts.trial_started_on
        if started is not None and started <= on:
            return None
        if started is None:
            return f"截至{on.isoformat()}未见系统试运行开始记录"
        return f"系统于{started.isoformat()}开始试运行，所报月份（至{on.isoformat()}）早于试运行开始"
    if req.trial_operation_months is not None:
        months = req.trial_operation_months
        started = facts.trial_started_on
        if started is None:
            return f"截至{on.isoformat()}未见系统试运行开始记录"
        earliest = add_months(started, months)
        if earliest <= on:
            return None
        return (
            f"系统于{started.isoformat()}开始试运行，至{on.isoformat()}不足{months}个月"
            f"（最早可于{earliest.isoformat()}申请）"
        )
    return None


def review_passed(programme: Programme, facts: Facts, kind: str, by: dt.date) -> bool:
    """Passed on or before ``by``. A review nobody decides (自验) counts once the county reports it."""
    passed_on = facts.reviews_passed.get(kind)
    if passed_on is not None:
        return passed_on <= by
    review = programme.review(kind)
    return review is not None and review.decided_by is Decider.NONE and kind in facts.reviews_requested
