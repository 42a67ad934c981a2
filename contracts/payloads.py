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

# Free text is stored as it came (SQL, HTML, newlines, escapes are all just text), but never
# with U+0000: PostgreSQL refuses a NUL in text and jsonb, so a fact carrying one could never be
# projected (a poison event). Refused on decoding, and said so in the JSON Schema.
NO_NUL = r"^[^\x00]*$"
NUL_MESSAGE = "Expected `str` without U+0000 (NUL), which cannot be stored"

Percent = Annotated[int, msgspec.Meta(ge=0, le=100)]
LONGEST_NOTE = 2000  # characters: the longest free text any field allows
Note = Annotated[str, msgspec.Meta(max_length=LONGEST_NOTE, pattern=NO_NUL)]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=LONGEST_NOTE, pattern=NO_NUL)]
Title = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_NUL)]
# 濮政办〔2016〕23号, 豫城建联办〔2016〕27号 …: free text, bounded.
DocumentNumber = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=NO_NUL)]
# A person's or system's own name for the record (``submitted_by``, an operator's name).
UserName = Annotated[str, msgspec.Meta(max_length=200, pattern=NO_NUL)]
# (``$(?!\n)``: the end of the value for Python and JSON Schema alike, see contracts.identifiers)
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$(?!\n)")]
Url = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s\x00-\x1f\x7f]+$(?!\n)", max_length=2000)]
StepId = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$(?!\n)")]
ReviewKind = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$(?!\n)")]
# (A year from 1000: the first day of "0000-01" is no date, and no programme runs before then.)
Period = Annotated[str, msgspec.Meta(pattern=r"^[1-9][0-9]{3}-(0[1-9]|1[0-2])$(?!\n)", description="YYYY-MM")]


class Fields(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Base of every message struct: strict (unknown fields refused), immutable."""


F = TypeVar("F", bound=Fields)
T = TypeVar("T")

_NUL_PATTERN_MESSAGE = f"Expected `str` matching regex {NO_NUL!r}"


def decode_json(decoder: msgspec.json.Decoder[T], data: bytes | memoryview) -> T:
    """``decoder.decode(data)`` that fails only with ``msgspec.DecodeError`` (or its subclass
    ``ValidationError``, naming the field), whatever the bytes: msgspec reports invalid UTF-8
    inside a string as a bare ``UnicodeDecodeError``, and untyped values nested too deeply as a
    ``RecursionError``. A NUL is refused in words, not as the regex that refuses it."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if message.startswith(_NUL_PATTERN_MESSAGE):
            raise msgspec.ValidationError(NUL_MESSAGE + message.removeprefix(_NUL_PATTERN_MESSAGE)) from None
        raise
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(f"JSON is malformed: a string is not valid UTF-8 ({exc.reason})") from None
    except RecursionError:
        raise msgspec.DecodeError("JSON is malformed: nested too deeply") from None


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


# A month's case count (案件数): never negative, bounded so a typo cannot overflow a report.
CaseCount = Annotated[int, msgspec.Meta(ge=0, le=100_000_000)]


class TrialReportFields(Fields, frozen=True):
    """A month of trial operation (试运行月报) as the county's own system counted it.

    Consistent totals: registered ≤ reported, dispatched ≤ registered, closed ≤ dispatched,
    closed_on_time ≤ closed, returned ≤ dispatched (checked by the decision, naming the field).
    """

    period: Period
    cases_reported: CaseCount  # 上报
    cases_registered: CaseCount  # 立案
    cases_dispatched: CaseCount  # 派遣
    cases_closed: CaseCount  # 结案
    cases_closed_on_time: CaseCount  # 按期结案
    cases_returned: CaseCount  # 返工（退回重办）
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
