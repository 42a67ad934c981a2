"""Escalation's operations subjects: list actions, confirm or waive a proposal, ask why.

Request-reply on ``duban.ops.escalation.*`` (city operators and ops may publish there).
"""

from __future__ import annotations

import datetime as dt

from contracts.audit import Checkpoint
from contracts.identifiers import CountyCode, ProgrammeId
from contracts.payloads import Fields, Note, UserName

OPS_PREFIX = "duban.ops.escalation"
ACTIONS_SUBJECT = f"{OPS_PREFIX}.actions"
CONFIRM_SUBJECT = f"{OPS_PREFIX}.confirm"
WAIVE_SUBJECT = f"{OPS_PREFIX}.waive"
WHY_SUBJECT = f"{OPS_PREFIX}.why"
TICK_SUBJECT = f"{OPS_PREFIX}.tick"
STATUS_SUBJECT = f"{OPS_PREFIX}.status"
PARKED_SUBJECT = f"{OPS_PREFIX}.parked"  # events escalation could not fold (ParkedList); retried at each start
# Record an audit checkpoint of the chains' heads now (CheckpointList; empty when nothing moved).
AUDIT_CHECKPOINT_SUBJECT = f"{OPS_PREFIX}.checkpoint"
ESCALATION_SERVICE = "duban-escalation"


class ActionsQuery(Fields, frozen=True):
    programme_id: ProgrammeId | None = None
    county_code: CountyCode | None = None
    state: str | None = None  # proposed | issued | waived


# The operator's name, note and reason are stored in the action_confirmed / action_waived
# events: bounded, and never a NUL (see contracts.payloads.NO_NUL).
class ConfirmAction(Fields, frozen=True):
    action_id: str
    operator: UserName
    note: Note = ""


class WaiveAction(Fields, frozen=True):
    action_id: str
    operator: UserName
    reason: Note


class WhyQuery(Fields, frozen=True):
    action_id: str


class ActionView(Fields, frozen=True):
    action_id: str
    programme_id: str
    county_code: str
    level_id: str
    level_name: str
    state: str
    due_on: dt.date
    policy_version: str
    explanation_zh: str
    milestone_id: str | None = None
    period: str | None = None
    decided_by: str | None = None
    waive_reason: str = ""


class ActionList(Fields, frozen=True):
    items: tuple[ActionView, ...]


class TickReport(Fields, frozen=True):
    judged_on: dt.date
    counties: int
    new_actions: int


class EscalationStatus(Fields, frozen=True):
    observed_sequence: int  # the last event of the stream folded in
    stream_last_sequence: int
    lag: int
    caught_up: bool  # the backlog at start is folded in and judged
    judged_on: dt.date  # today, on the service's clock
    counties: int
    actions: dict[str, int]  # by state: proposed, issued, waived


class CheckpointList(Fields, frozen=True):
    items: tuple[Checkpoint, ...]


class OpsError(Fields, frozen=True):
    code: str  # bad_request | unknown_action | not_proposed | unavailable
    message_zh: str
    message_en: str
    detail: str = ""
