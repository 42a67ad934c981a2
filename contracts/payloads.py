"""The field sets that a command and the event recording it have in common.

A county's command ("report progress") and the fact stored for it ("progress reported") carry
the same fields; they are written once here and tagged as command or event in
``contracts.commands`` and ``contracts.events``.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Annotated, Any, TypeVar

import msgspec

from contracts.identifiers import MilestoneId, SubmissionId

Percent = Annotated[int, msgspec.Meta(ge=0, le=100)]
Note = Annotated[str, msgspec.Meta(max_length=2000)]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
Title = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
# 濮政办〔2016〕23号, 豫城建联办〔2016〕27号 …: free text, bounded.
DocumentNumber = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
Url = Annotated[str, msgspec.Meta(pattern=r"^https?://\S+$", max_length=2000)]
StepId = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
ReviewKind = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Period = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$", description="YYYY-MM")]


class Fields(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Base of every message struct: strict (unknown fields refused), immutable."""


F = TypeVar("F", bound=Fields)


def recorded_as(target: type[F], source: Fields, **extra: Any) -> F:
    """``source``'s fields under another tag: the event recording a command, an issued proposal."""
    fields: dict[str, Any] = {name: getattr(source, name) for name in source.__struct_fields__}
    return target(**fields, **extra)


class Document(Fields, frozen=True):
    """A piece of evidence: a document, its number, and where to find or check it."""

    title: Title
    number: DocumentNumber | None = None
    sha256: Sha256 | None = None
    url: Url | None = None


class ProgressFields(Fields, frozen=True):
    milestone_id: MilestoneId
    percent: Percent
    note: Note = ""
    steps_done: Annotated[tuple[StepId, ...], msgspec.Meta(max_length=32)] = ()


class CompletionFields(Fields, frozen=True):
    milestone_id: MilestoneId
    completed_on: dt.date
    evidence: Annotated[tuple[Document, ...], msgspec.Meta(min_length=1, max_length=50)]
    note: Note = ""


class ReviewRequestFields(Fields, frozen=True):
    review_kind: ReviewKind
    documents: Annotated[tuple[Document, ...], msgspec.Meta(max_length=50)] = ()
    note: Note = ""


class TrialOperationFields(Fields, frozen=True):
    started_on: dt.date
    note: Note = ""


class ProgressTableLine(Fields, frozen=True):
    milestone_id: MilestoneId
    percent: Percent
    note: Note = ""


class ProgressTableFields(Fields, frozen=True):
    period: Period
    lines: Annotated[tuple[ProgressTableLine, ...], msgspec.Meta(min_length=1, max_length=100)]


class ExtensionRequestFields(Fields, frozen=True):
    milestone_id: MilestoneId
    proposed_deadline: dt.date
    reason: Reason


class ReviewOutcome(enum.StrEnum):
    PASSED = "passed"
    RETURNED = "returned"  # returned with comments (退回修改)


class ReviewDecisionFields(Fields, frozen=True):
    review_kind: ReviewKind
    outcome: ReviewOutcome
    decided_on: dt.date
    # The request this decides; None when the decision arrives with no request on record.
    request_submission_id: SubmissionId | None = None
    approval_document_number: DocumentNumber | None = None
    comments: Note = ""


class ExtensionOutcome(enum.StrEnum):
    GRANTED = "granted"
    REFUSED = "refused"


class ExtensionDecisionFields(Fields, frozen=True):
    milestone_id: MilestoneId
    outcome: ExtensionOutcome
    request_submission_id: SubmissionId | None = None
    new_deadline: dt.date | None = None  # required when granted
    reason: Note = ""


class RetractionFields(Fields, frozen=True):
    retracted_submission_id: SubmissionId
    reason: Reason
