"""Commands: what county systems and city/province operators submit.

A :class:`Submission` wraps one command with who-sent-it metadata. Commands are a tagged union
on ``kind``. County commands travel on ``duban.submit.county.<county_code>``; operator commands
on ``duban.submit.city.<county_code>`` or ``duban.submit.province.<county_code>``
(see ``contracts.subjects``).
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from contracts.identifiers import CountyCode, Instant, ProgrammeId, SubmissionId
from contracts.payloads import (
    CompletionFields,
    ExtensionDecisionFields,
    ExtensionRequestFields,
    Fields,
    ProgressFields,
    ProgressTableFields,
    RetractionFields,
    ReviewDecisionFields,
    ReviewRequestFields,
    TrialOperationFields,
    TrialReportFields,
    UserName,
    decode_json,
)

SUBMISSION_SCHEMA_VERSION = 1
MAX_SUBMISSION_BYTES = 64 * 1024


class Role(enum.StrEnum):
    """Who may send what; the role is the subject's second token, enforced by the server."""

    COUNTY = "county"
    CITY = "city"
    PROVINCE = "province"


# -- county commands ----------------------------------------------------------------------------
class ReportProgress(ProgressFields, tag_field="kind", tag="report_progress", frozen=True):
    """Milestone progress: percent done, a note, named steps finished."""


class CompleteMilestone(CompletionFields, tag_field="kind", tag="complete_milestone", frozen=True):
    """A milestone is done, on this date, with this evidence."""


class RequestReview(ReviewRequestFields, tag_field="kind", tag="request_review", frozen=True):
    """Ask for a review (预审, 报审, 预验收, 正式验收) or report one done by the county (自验)."""


class StartTrialOperation(TrialOperationFields, tag_field="kind", tag="start_trial_operation", frozen=True):
    """The system went into trial operation (试运行) on this date."""


class ReportTrialOperation(TrialReportFields, tag_field="kind", tag="report_trial_operation", frozen=True):
    """A month of trial operation: cases reported, registered, dispatched, closed, on time, returned."""


class FileProgressTable(ProgressTableFields, tag_field="kind", tag="file_progress_table", frozen=True):
    """The periodic 督查进度一览表: one line per milestone."""


class RequestExtension(ExtensionRequestFields, tag_field="kind", tag="request_extension", frozen=True):
    """Ask for a later deadline (延期) for one milestone, with a reason."""


# -- operator commands --------------------------------------------------------------------------
class DecideReview(ReviewDecisionFields, tag_field="kind", tag="decide_review", frozen=True):
    """A review decision: passed (with the approval document) or returned with comments."""


class DecideExtension(ExtensionDecisionFields, tag_field="kind", tag="decide_extension", frozen=True):
    """An extension granted (with the new deadline) or refused (with a reason)."""


class RetractSubmission(RetractionFields, tag_field="kind", tag="retract_submission", frozen=True):
    """Withdraw an earlier submission's facts; nothing is edited, this is a new fact."""


CountyCommand = (
    ReportProgress
    | CompleteMilestone
    | RequestReview
    | StartTrialOperation
    | ReportTrialOperation
    | FileProgressTable
    | RequestExtension
)
OperatorCommand = DecideReview | DecideExtension | RetractSubmission
Command = CountyCommand | OperatorCommand

COUNTY_COMMANDS: tuple[type[Fields], ...] = (
    ReportProgress,
    CompleteMilestone,
    RequestReview,
    StartTrialOperation,
    ReportTrialOperation,
    FileProgressTable,
    RequestExtension,
)
OPERATOR_COMMANDS: tuple[type[Fields], ...] = (DecideReview, DecideExtension, RetractSubmission)


class Submission(Fields, frozen=True):
    """One command, as a county system or operator sends it."""

    submission_id: SubmissionId  # chosen by the sender; resending it is safe (idempotent)
    programme_id: ProgrammeId
    county_code: CountyCode
    command: Command
    # When it happened at the sender; defaults to when we receive it. Never in the future.
    occurred_at: Instant | None = None
    submitted_by: UserName | None = None  # the sender's own user or system name, for the record
    # The only version there is: a submission in a format this code does not know is refused,
    # not read as if it were this one.
    schema_version: Annotated[int, msgspec.Meta(ge=1, le=SUBMISSION_SCHEMA_VERSION)] = SUBMISSION_SCHEMA_VERSION


_submission_decoder = msgspec.json.Decoder(Submission)
_encoder = msgspec.json.Encoder()


def decode_submission(data: bytes) -> Submission:
    """Strict decode; raises ``msgspec.ValidationError`` naming the field, or ``DecodeError``
    (not JSON, not UTF-8), and nothing else, whatever the bytes."""
    return decode_json(_submission_decoder, data)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)
