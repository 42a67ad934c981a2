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
import re
import reprlib
import types
from collections.abc import Callable
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

import msgspec

from contracts.identifiers import CountyCode, Instant, MilestoneId, ProgrammeId, SubmissionId
from contracts.payloads import (
    NO_NUL,
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


class IndexedRetraction(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An entry of the retraction index (``DUBAN_RETRACTIONS``, see contracts.subjects): the
    retraction stored in ``DUBAN_EVENTS`` at ``stream_sequence``."""

    stream_sequence: int
    event_id: str
    programme_id: ProgrammeId
    county_code: CountyCode
    retracted_submission_id: SubmissionId


def indexed_retraction(envelope: EventEnvelope, stream_sequence: int) -> IndexedRetraction | None:
    """The index entry of a stored event that retracts a submission (None for any other event)."""
    payload = envelope.payload
    if not isinstance(payload, SubmissionRetracted):
        return None
    return IndexedRetraction(
        stream_sequence=stream_sequence,
        event_id=envelope.event_id,
        programme_id=envelope.programme_id,
        county_code=envelope.county_code,
        retracted_submission_id=payload.retracted_submission_id,
    )


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


# -- Stored events, decoded without running the same regular expressions again ---------------
#
# A projection rebuilding from the stream decodes millions of stored events, and msgspec checks
# each string's pattern with a Python regex call: most of ``decode_event``'s time. The decoder
# below gives exactly ``decode_event``'s answer, cheaper:
#
# - the same types with the ``pattern`` constraints left out (every other constraint — lengths,
#   ranges, ``tz``, unknown fields, tags — is still checked by msgspec), decoded as subclasses of
#   the event types ("Stored…": ``isinstance`` and ``match`` treat them as the event types);
# - the free text's ``NO_NUL`` (``^[^\x00]*$``, matched from the start only, and no character
#   but NUL stops ``[^\x00]*``): checked as ``"\x00" not in value``, the same answer;
# - every other pattern (identifiers, periods, hashes, URLs): checked in Python, ``re.search``
#   as msgspec does, remembering values that passed (county codes, milestone ids and the like
#   repeat across millions of events; bounded);
# - anything else — a failed check, bytes that do not decode, an older schema version to
#   upcast — goes to ``decode_event``, which decides (and says why).


class _Pattern:
    """A ``pattern`` constraint, checked as msgspec checks it, with the values seen to pass."""

    LIMIT = 10_000  # values remembered per pattern

    def __init__(self, pattern: str) -> None:
        self.seen: set[str] = set()
        self._search = re.compile(pattern).search

    def check(self, value: str) -> bool:
        if self._search(value) is None:
            return False
        if len(self.seen) < self.LIMIT:
            self.seen.add(value)
        return True


class _StoredTypes:
    """Each type with its patterns taken out, and a check of those patterns on a decoded value.

    A check is built as one Python expression per struct type (about three times faster than
    nested closures), with ``{v}`` standing for the value checked."""

    # Every attribute of a constraint but its pattern is kept (whatever msgspec's version has).
    _META = tuple(a for a in dir(msgspec.Meta) if not a.startswith("_") and a != "pattern")

    def __init__(self) -> None:
        self.patterns: dict[str, _Pattern] = {}
        self.structs: dict[type, tuple[type, Callable[[Any], bool] | None]] = {}
        self._struct_checks: dict[type, str | None] = {}  # the expression for a struct's fields
        self._single: dict[str, tuple[str, str]] = {}  # expression of one pattern -> (seen, check)
        self._names: dict[str, Any] = {"_true": lambda value: True, "_NUL": "\x00"}

    def _name(self, obj: Any, prefix: str) -> str:
        name = f"_{prefix}{len(self._names)}"
        self._names[name] = obj
        return name

    def _function(self, expression: str) -> Callable[[Any], bool]:
        return eval(f"lambda v: {expression.format(v='v')}", dict(self._names))  # type: ignore[no-any-return]

    def relax(self, tp: Any) -> tuple[Any, str | None]:
        """(``tp`` without pattern constraints, the expression checking them, or None)."""
        origin = get_origin(tp)
        if origin is Annotated:
            inner, *metas = get_args(tp)
            relaxed, check = self.relax(inner)
            kept: list[Any] = []
            checks = [check] if check else []
            for meta in metas:
                if not isinstance(meta, msgspec.Meta) or meta.pattern is None:
                    kept.append(meta)
                    continue
                rest = {a: getattr(meta, a) for a in self._META if getattr(meta, a) is not None}
                if rest:
                    kept.append(msgspec.Meta(**rest))
                if meta.pattern == NO_NUL:
                    checks.append("(_NUL not in {v})")
                else:
                    pattern = self.patterns.setdefault(meta.pattern, _Pattern(meta.pattern))
                    seen, passes = self._name(pattern.seen, "seen"), self._name(pattern.check, "check")
                    checks.append(f"({{v}} in {seen} or {passes}({{v}}))")
                    self._single[checks[-1]] = (seen, passes)
            return (Annotated[(relaxed, *kept)] if kept else relaxed), " and ".join(checks) or None
        if origin is Union or origin is types.UnionType:
            members = [self.relax(arg) for arg in get_args(tp)]
            relaxed = Union[tuple(m for m, _ in members)]  # noqa: UP007 (built from a list)
            checked = [(m, c) for m, c in members if c]
            if not checked:
                return relaxed, None
            if len(members) == 2 and type(None) in get_args(tp):  # X | None
                return relaxed, f"({{v}} is None or {checked[0][1]})"
            if not all(isinstance(m, type) and issubclass(m, msgspec.Struct) for m, _ in members):
                raise TypeError(f"no pattern check for a union of {tp!r}")
            by_type = {m: self._function(c) for m, c in checked}  # a tagged union: by the decoded type
            return relaxed, f"{self._name(by_type, 'by_type')}.get(type({{v}}), _true)({{v}})"
        if origin is tuple:
            args = get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:
                item, check = self.relax(args[0])
                sequence: Any = tuple[item, ...]  # type: ignore[valid-type]
                if check is None:
                    return sequence, None
                if check in self._single:  # all seen before (or none at all), else each checked
                    seen, passes = self._single[check]
                    return sequence, f"({seen}.issuperset({{v}}) or all(map({passes}, {{v}})))"
                return sequence, f"(not {{v}} or all(map({self._name(self._function(check), 'item')}, {{v}})))"
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            relaxed, _ = self.struct(tp)
            check = self._struct_checks[tp]
            return relaxed, (f"({check})" if check else None)  # inline: a call costs more than a check
        if origin is not None and any(self.relax(arg)[1] for arg in get_args(tp)):
            raise TypeError(f"no pattern check for {tp!r}")  # (lists, dicts: none in events yet)
        return tp, None

    def struct(self, cls: type) -> tuple[type, Callable[[Any], bool] | None]:
        if cls in self.structs:
            return self.structs[cls]
        hints = get_type_hints(cls, include_extras=True)
        overrides: list[Any] = []
        checks: list[str] = []
        for field in msgspec.structs.fields(cls):
            relaxed, check = self.relax(hints[field.name])
            if relaxed == hints[field.name]:
                continue
            default: dict[str, Any] = {}
            if field.default is not msgspec.NODEFAULT:
                default["default"] = field.default
            if field.default_factory is not msgspec.NODEFAULT:
                default["default_factory"] = field.default_factory
            overrides.append((field.name, relaxed, msgspec.field(**default)) if default else (field.name, relaxed))
            if check:
                checks.append(check.format(v=f"{{v}}.{field.name}"))
        self._struct_checks[cls] = " and ".join(checks) or None
        if not overrides:
            self.structs[cls] = (cls, None)
            return self.structs[cls]
        config = cls.__struct_config__  # type: ignore[attr-defined]
        stored = msgspec.defstruct(
            f"Stored{cls.__name__}",
            overrides,
            bases=(cls,),
            module=__name__,
            frozen=config.frozen,
            **({"tag": config.tag} if config.tag is not None else {}),
        )
        self.structs[cls] = (stored, self._function(" and ".join(checks)) if checks else None)
        return self.structs[cls]


_stored_types = _StoredTypes()
StoredEventEnvelope, _stored_check = _stored_types.struct(EventEnvelope)
_stored_decoder: msgspec.json.Decoder[EventEnvelope] = msgspec.json.Decoder(StoredEventEnvelope)
_stored_tags: dict[type, str] = {  # the payload types as decoded -> their tags
    stored: cls.__struct_config__.tag  # type: ignore[attr-defined]
    for cls, (stored, _) in _stored_types.structs.items()
    if isinstance(cls.__struct_config__.tag, str)  # type: ignore[attr-defined]
}


def decode_stored_event(data: bytes | memoryview) -> EventEnvelope:
    """``decode_event(data)``, faster for events that were valid when stored: the same answer
    (the same field values, or the same error), see above. The envelope and the structs in it may
    be "Stored…" subclasses of the event types (``==`` tells them from the event types: compare
    encoded forms)."""
    try:
        envelope: EventEnvelope = _stored_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return decode_event(data)  # which says why
    if envelope.schema_version == EVENT_SCHEMA_VERSIONS.get(_stored_tags[type(envelope.payload)]) and (
        _stored_check is None or _stored_check(envelope)
    ):
        return envelope
    return decode_event(data)
