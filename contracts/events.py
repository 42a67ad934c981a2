"""Events: the facts stored in the JetStream event stream, the single source of truth.

Every event travels in an :class:`EventEnvelope`: who (actor), when it happened as reported
(``occurred_at``) and when we stored it (``recorded_at``), which programme and county
(the aggregate), which submission caused it, and the payload, a tagged union on ``type``.

Stored events are never rewritten. When a payload's shape changes, its type's version in
:data:`EVENT_SCHEMA_VERSIONS` goes up and an upcaster in :data:`UPCASTERS` lifts old stored
versions on read.
"""

from __future__ import annotations

import datetime as dt
import reprlib
from collections.abc import Callable
from typing import Any

import msgspec

from contracts.identifiers import CountyCode, Instant, MilestoneId, ProgrammeId, SubmissionId
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
    decode_json,
)


class Actor(Fields, frozen=True):
    """The authenticated sender: its role (from the subject the server let it publish on), its
    county for county systems, and the user name it gave for the record."""

    role: str  # county | city | province | system
    county_code: CountyCode | None = None
    user: str | None = None


class ProgressReported(ProgressFields, tag_field="type", tag="progress_reported", frozen=True):
    pass


class MilestoneCompleted(CompletionFields, tag_field="type", tag="milestone_completed", frozen=True):
    # county: reported by the county; review:<kind>: a passed review completed it;
    # trial_operation_started: the start of trial operation completed it.
    via: str = "county"


class ReviewRequested(ReviewRequestFields, tag_field="type", tag="review_requested", frozen=True):
    pass


class ReviewDecided(ReviewDecisionFields, tag_field="type", tag="review_decided", frozen=True):
    pass


class TrialOperationStarted(TrialOperationFields, tag_field="type", tag="trial_operation_started", frozen=True):
    pass


class TrialOperationReported(TrialReportFields, tag_field="type", tag="trial_operation_reported", frozen=True):
    pass


class ProgressTableFiled(ProgressTableFields, tag_field="type", tag="progress_table_filed", frozen=True):
    pass


class ExtensionRequested(ExtensionRequestFields, tag_field="type", tag="extension_requested", frozen=True):
    pass


class ExtensionDecided(ExtensionDecisionFields, tag_field="type", tag="extension_decided", frozen=True):
    pass


class SubmissionRetracted(RetractionFields, tag_field="type", tag="submission_retracted", frozen=True):
    pass


class ProcedureFindingRecorded(Fields, tag_field="type", tag="procedure_finding_recorded", frozen=True):
    """A step reported out of the procedure's order: the fact stands, this finding says why it
    is irregular. The ledger shows it; escalation acts on it."""

    rule_id: str
    trigger_event_id: str
    finding_zh: str
    finding_en: str
    milestone_id: MilestoneId | None = None
    detail: str = ""


class ActionFields(Fields, frozen=True):
    """An accountability action and why: the rule, the deadline used, the days counted."""

    action_id: str  # deterministic: programme:county:level:subject[:deadline]
    level_id: str
    level_name: str
    policy_version: str
    due_on: dt.date  # the day the policy made it due
    addressed: tuple[str, ...]  # roles, resolved to people through the directory
    explanation_zh: str
    missing_zh: str = ""
    milestone_id: MilestoneId | None = None
    period: str | None = None  # a progress-table period
    finding_event_id: str | None = None
    deadline: dt.date | None = None  # the effective deadline the days are counted from
    workdays: int = 0  # working days left (before) or overdue (after)
    urgent: bool = False


class ActionIssued(ActionFields, tag_field="type", tag="action_issued", frozen=True):
    """Issued: the responsible people are told. Confirmed proposals are issued too."""

    confirmed_by: str | None = None


class ActionProposed(ActionFields, tag_field="type", tag="action_proposed", frozen=True):
    """Proposed (通报批评, 约谈, provincial measures): a city operator confirms or waives it."""


class ActionConfirmed(Fields, tag_field="type", tag="action_confirmed", frozen=True):
    action_id: str
    operator: str
    note: str = ""


class ActionWaived(Fields, tag_field="type", tag="action_waived", frozen=True):
    action_id: str
    operator: str
    reason: str


class NotificationRecorded(Fields, frozen=True):
    """One outcome of telling a person about an action: who, which channel, what happened."""

    message_id: str  # deterministic: action, recipient, channel
    action_id: str
    recipient_id: str  # a person id from the directory, never a name
    channel: str  # sms | email | webhook | file
    attempt: int
    address_masked: str  # 138****1234 / l***@example.org: the record never holds a full number
    detail: str = ""
    provider_message_id: str | None = None


class NotificationQueued(NotificationRecorded, tag_field="type", tag="notification_queued", frozen=True):
    pass


class NotificationSent(NotificationRecorded, tag_field="type", tag="notification_sent", frozen=True):
    pass


class NotificationDelivered(NotificationRecorded, tag_field="type", tag="notification_delivered", frozen=True):
    """A delivery receipt from the provider."""


class NotificationFailed(NotificationRecorded, tag_field="type", tag="notification_failed", frozen=True):
    """Failed for good on this channel/recipient (a fallback, if any, is queued separately)."""


EventPayload = (
    ProgressReported
    | MilestoneCompleted
    | ReviewRequested
    | ReviewDecided
    | TrialOperationStarted
    | TrialOperationReported
    | ProgressTableFiled
    | ExtensionRequested
    | ExtensionDecided
    | SubmissionRetracted
    | ProcedureFindingRecorded
    | ActionIssued
    | ActionProposed
    | ActionConfirmed
    | ActionWaived
    | NotificationQueued
    | NotificationSent
    | NotificationDelivered
    | NotificationFailed
)

EVENT_TYPES: dict[str, type[Fields]] = {
    t.__struct_config__.tag: t  # type: ignore[misc]
    for t in (
        ProgressReported,
        MilestoneCompleted,
        ReviewRequested,
        ReviewDecided,
        TrialOperationStarted,
        TrialOperationReported,
        ProgressTableFiled,
        ExtensionRequested,
        ExtensionDecided,
        SubmissionRetracted,
        ProcedureFindingRecorded,
        ActionIssued,
        ActionProposed,
        ActionConfirmed,
        ActionWaived,
        NotificationQueued,
        NotificationSent,
        NotificationDelivered,
        NotificationFailed,
    )
}

# Current payload version per event type. Bump one when its shape changes and register an
# upcaster from the previous version.
EVENT_SCHEMA_VERSIONS: dict[str, int] = dict.fromkeys(EVENT_TYPES, 1)

# (event type, stored version) -> function lifting that payload dict to version + 1.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}


def event_type_of(payload: EventPayload) -> str:
    return str(payload.__struct_config__.tag)


class EventEnvelope(Fields, frozen=True):
    event_id: str  # deterministic: "<submission_id>/<index in decision>"
    schema_version: int
    programme_id: ProgrammeId
    county_code: CountyCode
    occurred_at: Instant
    recorded_at: Instant
    actor: Actor
    submission_id: SubmissionId
    submission_digest: str  # sha256 of the submission as received: same id, same content?
    causation_id: str
    correlation_id: str
    payload: EventPayload

    @property
    def event_type(self) -> str:
        return event_type_of(self.payload)


_envelope_decoder = msgspec.json.Decoder(EventEnvelope)
_encoder = msgspec.json.Encoder()


def encode_event(envelope: EventEnvelope) -> bytes:
    return _encoder.encode(envelope)


_raw_decoder = msgspec.json.Decoder()


def decode_event(data: bytes | memoryview) -> EventEnvelope:
    """Decode a stored event, upcasting an older payload version to the current one.

    Raises ``msgspec.DecodeError`` or ``ValidationError`` for bytes that are not an event (the
    callers park or skip those), nothing else."""
    try:
        envelope = decode_json(_envelope_decoder, data)
    except msgspec.ValidationError:
        return _decode_upcasting(data)
    if envelope.schema_version != EVENT_SCHEMA_VERSIONS[envelope.event_type]:
        return _decode_upcasting(data)
    return envelope


def _decode_upcasting(data: bytes | memoryview) -> EventEnvelope:
    raw: Any = decode_json(_raw_decoder, data)
    if not isinstance(raw, dict):
        raise msgspec.ValidationError(f"an event is a JSON object, not {type(raw).__name__}")
    found = raw.get("payload")
    payload: dict[str, Any] = found if isinstance(found, dict) else {}
    event_type = payload.get("type")
    if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        raise msgspec.ValidationError(f"unknown event type {reprlib.repr(event_type)}")
    version = raw.get("schema_version", 1)
    if type(version) is not int:
        raise msgspec.ValidationError(f"schema_version is not an integer: {reprlib.repr(version)}")
    target = EVENT_SCHEMA_VERSIONS[event_type]
    if not 1 <= version <= target:
        raise msgspec.ValidationError(
            f"event {reprlib.repr(raw.get('event_id'))} has {event_type} v{version}; this code knows v1 to v{target}"
        )
    while version < target:
        payload = UPCASTERS[(event_type, version)](payload)
        version += 1
    raw["payload"], raw["schema_version"] = payload, version
    return msgspec.convert(raw, EventEnvelope)
