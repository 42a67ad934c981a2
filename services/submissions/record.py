"""A county's record in one programme: the facts its stored events establish.

This is the submissions service's view of the aggregate, folded from the events on the
aggregate's subject: what the procedure rules need to know (milestones completed, steps done,
reviews requested and passed, trial operation) and which submission ids are already stored.
Pure: no I/O. A retraction removes the retracted submission's facts, so the facts are refolded
from the kept events; nothing stored is ever changed.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass, field

import msgspec

from contracts.audit import GENESIS
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
    TrialOperationReported,
    TrialOperationStarted,
)
from contracts.payloads import ReviewOutcome
from contracts.replies import FindingNotice, StoredEvent


class StoredSubmission(msgspec.Struct, frozen=True, gc=False):
    """A submission already stored, as its events in the stream say: enough to answer a resend
    exactly as the first time. Built when one is stored, and again from the stream when its
    submission id comes back (``stored_submission``); records do not keep it."""

    digest: str
    events: tuple[StoredEvent, ...]
    findings: tuple[FindingNotice, ...] = ()


def stored_submission(stored: list[tuple[EventEnvelope, int]]) -> StoredSubmission:
    """What one submission's events (with their stream sequences, in order) stored."""
    return StoredSubmission(
        digest=stored[0][0].submission_digest,
        events=tuple(StoredEvent(envelope.event_id, envelope.event_type, sequence) for envelope, sequence in stored),
        findings=tuple(
            FindingNotice(payload.rule_id, payload.finding_zh, payload.finding_en, payload.milestone_id)
            for payload in (envelope.payload for envelope, _ in stored)
            if isinstance(payload, ProcedureFindingRecorded)
        ),
    )


@dataclass
class Facts:
    """What the kept (not retracted) events establish."""

    completed: dict[str, dt.date] = field(default_factory=dict)
    steps_done: dict[str, set[str]] = field(default_factory=dict)
    reviews_requested: dict[str, list[str]] = field(default_factory=dict)  # kind -> submission ids
    reviews_passed: dict[str, dt.date] = field(default_factory=dict)
    trial_started_on: dt.date | None = None
    extension_requests: dict[str, str] = field(default_factory=dict)  # submission id -> milestone
    trial_reports: dict[str, str] = field(default_factory=dict)  # period -> submission id

    def copy(self) -> Facts:
        """An independent copy (what ``copy.deepcopy`` gives, at a tenth of its cost: it runs once
        per decision). Dates and strings are immutable, so only the containers are copied."""
        return Facts(
            completed=dict(self.completed),
            steps_done={milestone: set(steps) for milestone, steps in self.steps_done.items()},
            reviews_requested={kind: list(ids) for kind, ids in self.reviews_requested.items()},
            reviews_passed=dict(self.reviews_passed),
            trial_started_on=self.trial_started_on,
            extension_requests=dict(self.extension_requests),
            trial_reports=dict(self.trial_reports),
        )


@dataclass
class CountyRecord:
    programme_id: str
    county_code: str
    last_sequence: int = 0  # stream sequence of the aggregate's last event (0: none yet)
    chain_head: str = GENESIS  # the hash chaining the next event to the last (contracts.audit)
    # Submission id -> stream sequence of its first event. A record is held for as long as its
    # county is cached and grows with every submission, so it keeps per submission just what
    # deciding needs (~150 bytes; a resend's answer is read back from the stream at that
    # sequence) and nothing the cyclic collector walks: tracked objects per submission made
    # each full collection walk every stored submission, and those pauses were the service's
    # latency tail (tests/bench/README.md, "Submissions").
    submissions: dict[str, int] = field(default_factory=dict)
    retracted: set[str] = field(default_factory=set)  # submissions retracted
    retractions: set[str] = field(default_factory=set)  # submissions that are retractions
    facts: Facts = field(default_factory=Facts)
    # What a refold after a retraction needs: the submission ids and payloads of the events
    # fold_fact reads, in stream order; not the envelopes (most of a record's memory, and this
    # record is held for as long as its county is cached). Two lists, not a list of pairs: a
    # pair holding a payload struct stays tracked by the cyclic collector for good.
    _folded_ids: list[str] = field(default_factory=list, repr=False)
    _folded_payloads: list[EventPayload] = field(default_factory=list, repr=False)

    def apply(self, envelope: EventEnvelope, sequence: int) -> None:
        """Fold one stored event in (events arrive in stream order; a replay is ignored)."""
        if sequence <= self.last_sequence:
            return
        kept = _for_refold(envelope.payload)
        if kept is not None:
            self._folded_ids.append(envelope.submission_id)
            self._folded_payloads.append(kept)
        self.last_sequence = max(self.last_sequence, sequence)
        self.submissions.setdefault(envelope.submission_id, sequence)
        payload = envelope.payload
        if isinstance(payload, SubmissionRetracted):
            self.retractions.add(envelope.submission_id)
            if payload.retracted_submission_id in self.submissions:
                self.retracted.add(payload.retracted_submission_id)
            self.facts = self._refold()
        elif envelope.submission_id not in self.retracted:
            fold_fact(self.facts, payload, envelope.submission_id)

    def _refold(self) -> Facts:
        facts = Facts()
        for submission_id, payload in zip(self._folded_ids, self._folded_payloads, strict=True):
            if submission_id not in self.retracted:
                fold_fact(facts, payload, submission_id)
        return facts

    def is_retracted(self, submission_id: str) -> bool:
        return submission_id in self.retracted


@functools.lru_cache(maxsize=4096)
def _progress_for_refold(milestone_id: str, steps_done: tuple[str, ...]) -> ProgressReported:
    """One shared payload per (milestone, steps): a county reports the same steps again and again."""
    return ProgressReported(milestone_id=milestone_id, percent=0, steps_done=steps_done)


def _for_refold(payload: EventPayload) -> EventPayload | None:
    """The part of a payload fold_fact reads, or None if it reads nothing of it."""
    match payload:
        case ProgressReported():
            return _progress_for_refold(payload.milestone_id, payload.steps_done) if payload.steps_done else None
        case (
            MilestoneCompleted() | ReviewRequested() | ReviewDecided() | TrialOperationStarted() | ExtensionRequested()
        ):
            return payload
        case TrialOperationReported():
            return payload
        case _:
            return None


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
        case TrialOperationReported():
            facts.trial_reports.setdefault(payload.period, submission_id)
        case _:
            pass
