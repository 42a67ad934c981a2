"""Replaying a recorded history under a policy, day by day, offline. Pure.

The same ladder as live judging: each day, the facts recorded by the end of that day are folded
in, then the ladder says which actions are due. Actions recorded in the history are ignored
(they are the live policy's output); operators' confirmations and waivers are applied on their
day when the action they name exists in the replay. Used by `duban whatif` and by the tests
that play the whole 2017–2018 programme.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from contracts.events import ActionConfirmed, ActionIssued, ActionProposed, ActionWaived, EventEnvelope
from contracts.facts import ActionFacts, CountyFacts, apply, fold, new_facts
from services.escalation.ladder import Judge, due_actions

ACTION_EVENTS = (ActionIssued, ActionProposed, ActionConfirmed, ActionWaived)


@dataclass(frozen=True)
class ReplayedAction:
    county_code: str
    day: dt.date  # the day the replay issued or proposed it
    action: ActionIssued | ActionProposed

    @property
    def key(self) -> tuple[str, str]:
        return self.county_code, self.action.action_id


def replay(
    judge: Judge,
    histories: Mapping[str, Iterable[tuple[int, EventEnvelope]]],
    start: dt.date,
    end: dt.date,
    operator_decisions: bool = True,
) -> list[ReplayedAction]:
    """Judge every county each day from ``start`` to ``end`` (inclusive) on its recorded facts."""
    zone = ZoneInfo(judge.programme.programme.timezone)
    out: list[ReplayedAction] = []
    for county in judge.programme.counties:
        events = sorted(histories.get(county.code, ()), key=lambda item: item[0])
        by_day: dict[dt.date, list[tuple[int, EventEnvelope]]] = {}
        for seq, envelope in events:
            by_day.setdefault(envelope.recorded_at.astimezone(zone).date(), []).append((seq, envelope))
        facts = new_facts(judge.programme, county.code)
        kept: list[tuple[int, EventEnvelope]] = []
        early = [item for day, items in by_day.items() if day < start for item in items]
        for seq, envelope in sorted(early, key=lambda item: item[0]):
            facts = _observe(judge, facts, kept, seq, envelope, operator_decisions)
        day = start
        while day <= end:
            for seq, envelope in by_day.get(day, ()):
                facts = _observe(judge, facts, kept, seq, envelope, operator_decisions)
            for action in due_actions(judge, facts, day):
                _record(facts, action)
                out.append(ReplayedAction(county.code, day, action))
            day += dt.timedelta(days=1)
    return out


def _observe(
    judge: Judge,
    facts: CountyFacts,
    kept: list[tuple[int, EventEnvelope]],
    seq: int,
    envelope: EventEnvelope,
    operator_decisions: bool,
) -> CountyFacts:
    payload = envelope.payload
    if isinstance(payload, ActionIssued | ActionProposed):
        return facts  # the live policy's output, not a fact
    if isinstance(payload, ActionConfirmed | ActionWaived):
        action = facts.actions.get(payload.action_id)
        if operator_decisions and action is not None and action.state == "proposed":
            if isinstance(payload, ActionConfirmed):
                action.state, action.decided_by = "issued", payload.operator
            else:
                action.state, action.decided_by, action.waive_reason = "waived", payload.operator, payload.reason
        return facts
    kept.append((seq, envelope))
    if apply(judge.programme, facts, seq, envelope):
        return facts
    actions = facts.actions  # a retraction: fold the kept facts again, keep the replay's actions
    refolded = fold(judge.programme, facts.county_code, kept)
    refolded.actions = actions
    return refolded


def _record(facts: CountyFacts, action: ActionIssued | ActionProposed) -> None:
    facts.actions[action.action_id] = ActionFacts(
        action_id=action.action_id,
        level_id=action.level_id,
        level_name=action.level_name,
        state="issued" if isinstance(action, ActionIssued) else "proposed",
        policy_version=action.policy_version,
        due_on=action.due_on,
        milestone_id=action.milestone_id,
        period=action.period,
        explanation_zh=action.explanation_zh,
    )


@dataclass(frozen=True)
class WhatIf:
    added: list[ReplayedAction]
    removed: list[ReplayedAction]
    moved: list[tuple[ReplayedAction, ReplayedAction]]  # (before, after): same level and subject, other day


def compare(before: list[ReplayedAction], after: list[ReplayedAction]) -> WhatIf:
    """Which actions another policy or calendar adds, removes, or moves to another day."""

    def subject(r: ReplayedAction) -> tuple[str, str, str]:
        a = r.action
        return r.county_code, a.level_id, a.milestone_id or a.period or a.finding_event_id or a.action_id

    def occurrences(actions: list[ReplayedAction]) -> dict[tuple[str, str, str, int], ReplayedAction]:
        # The n-th action on a subject pairs with the n-th under the other policy (an extension
        # gives a milestone a second ladder).
        seen: dict[tuple[str, str, str], int] = {}
        out = {}
        for r in sorted(actions, key=lambda r: (r.day, r.key)):
            n = seen[subject(r)] = seen.get(subject(r), 0) + 1
            out[(*subject(r), n)] = r
        return out

    old, new = occurrences(before), occurrences(after)
    moved = [(old[k], new[k]) for k in old.keys() & new.keys() if old[k].day != new[k].day]
    return WhatIf(
        added=sorted((new[k] for k in new.keys() - old.keys()), key=lambda r: (r.day, r.key)),
        removed=sorted((old[k] for k in old.keys() - new.keys()), key=lambda r: (r.day, r.key)),
        moved=sorted(moved, key=lambda pair: (pair[1].day, pair[1].key)),
    )
