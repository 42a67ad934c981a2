"""A county's record in one programme: the facts its stored events establish.

This is the submissions service's view of the aggregate, folded from the events on the
aggregate's subject: what the procedure rules need to know (milestones completed, steps done,
reviews requested and passed, trial operation) and which submission ids are already stored.
Pure: no I/O. A retraction removes the retracted submission's facts, so the facts are refolded
from the kept events; nothing stored is ever changed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from contracts.events import (
    EventEnvelope,
    EventPayload,
    ExtensionRequested,
    MilestoneCompleted,
    ProcedureFindingRecorded,
    ProgressReported,
    ReviewDecided,
    ReviewRequested,
    SubmissionRetracted,
    TrialOperationStarted,
)
from contracts.payloads import ReviewOutcome
from contracts.replies import FindingNotice, StoredEvent


@dataclass
class StoredSubmission:
    """A submission already stored: enough to answer a resend exactly as the first time."""

    digest: str
    events: list[StoredEvent] = field(default_factory=list)
    findings: list[FindingNotice] = field(default_factory=list)
    retracted: bool = False


@dataclass
class Facts:
    """What the kept (not retracted) events establish."""

    completed: dict[str, dt.date] = field(default_factory=dict)
    steps_done: dict[str, set[str]] = field(default_factory=dict)
    reviews_requested: dict[str, list[str]] = field(default_factory=dict)  # kind -> submission ids
    reviews_passed: dict[str, dt.date] = field(default_factory=dict)
    trial_started_on: dt.date | None = None
    extension_requests: dict[str, str] = field(default_factory=dict)  # submission id -> milestone


@dataclass
class CountyRecord:
    programme_id: str
    county_code: str
    last_sequence: int = 0  # stream sequence of the aggregate's last event (0: none yet)
    submissions: dict[str, StoredSubmission] = field(default_factory=dict)
    facts: Facts = field(default_factory=Facts)
    _events: list[EventEnvelope] = field(default_factory=list, repr=False)

    def apply(self, envelope: EventEnvelope, sequence: int) -> None:
        """Fold one stored event in (events arrive in stream order; a replay is ignored)."""
        if sequence <= self.last_sequence:
            return
        self._events.append(envelope)
        self.last_sequence = max(self.last_sequence, sequence)
        stored = self.submissions.get(envelope.submission_id)
        if stored is None:
            stored = StoredSubmission(envelope.submission_digest)
            self.submissions[envelope.submission_id] = stored
        stored.events.append(StoredEvent(envelope.event_id, envelope.event_type, sequence))
        payload = envelope.payload
        if isinstance(payload, ProcedureFindingRecorded):
            stored.findings.append(
                FindingNotice(payload.rule_id, payload.finding_zh, payload.finding_en, payload.milestone_id)
            )
        if isinstance(payload, SubmissionRetracted):
            target = self.submissions.get(payload.retracted_submission_id)
            if target is not None:
                target.retracted = True
            self.facts = self._refold()
        elif not stored.retracted:
            fold_fact(self.facts, envelope.payload, envelope.submission_id)

    def _refold(self) -> Facts:
        facts = Facts()
        for envelope in self._events:
            if not self.submissions[envelope.submission_id].retracted:
                fold_fact(facts, envelope.payload, envelope.submission_id)
        return facts

    def is_retracted(self, submission_id: str) -> bool:
        stored = self.submissions.get(submission_id)
        return stored is not None and stored.retracted


def fold_fact(facts: Facts, payload: EventPayload, submission_id: str) -> None:
    """Update ``facts`` with one kept event's payload."""
    match payload:
        case ProgressReported():
            facts.steps_done.setdefault(payload.milestone_id, set()).update(payload.steps_done)
        case MilestoneCompleted():
            facts.completed.setdefault(payload.milestone_id, payload.completed_on)
        case ReviewRequested():
            facts.reviews_requested.setdefault(payload.review_kind, []).append(submission_id)
        case ReviewDecided():
            if payload.outcome is ReviewOutcome.PASSED:
                facts.reviews_passed.setdefault(payload.review_kind, payload.decided_on)
            else:
                facts.reviews_passed.pop(payload.review_kind, None)
        case TrialOperationStarted():
            if facts.trial_started_on is None:
                facts.trial_started_on = payload.started_on
        case ExtensionRequested():
            facts.extension_requests[submission_id] = payload.milestone_id
        case _:
            pass
