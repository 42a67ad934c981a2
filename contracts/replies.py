"""Replies to a submission: accepted (what was stored, where) or refused (why, in both languages)."""

from __future__ import annotations

import datetime as dt

import msgspec

from contracts.errors import ERROR_TEXT, RETRYABLE, ErrorCode
from contracts.events import decode_event
from contracts.identifiers import Instant
from contracts.payloads import Fields, decode_json


class StoredEvent(Fields, frozen=True):
    event_id: str
    event_type: str
    stream_sequence: int


class FindingNotice(Fields, frozen=True):
    rule_id: str
    finding_zh: str
    finding_en: str
    milestone_id: str | None = None


class Accepted(Fields, tag_field="status", tag="accepted", frozen=True):
    submission_id: str
    events: tuple[StoredEvent, ...]
    findings: tuple[FindingNotice, ...] = ()
    duplicate: bool = False  # this id was already stored; nothing new was written


class Refused(Fields, tag_field="status", tag="refused", frozen=True):
    code: ErrorCode
    message_zh: str
    message_en: str
    submission_id: str | None = None
    field: str | None = None  # "$.command.completed_on"
    detail: str = ""
    retryable: bool = False


Reply = Accepted | Refused

_reply_decoder: msgspec.json.Decoder[Accepted | Refused] = msgspec.json.Decoder(Reply)


def refused(
    code: ErrorCode, *, submission_id: str | None = None, field: str | None = None, detail: str = ""
) -> Refused:
    zh, en = ERROR_TEXT[code]
    return Refused(
        code=code,
        message_zh=zh,
        message_en=en,
        submission_id=submission_id,
        field=field,
        detail=detail,
        retryable=code in RETRYABLE,
    )


def decode_reply(data: bytes) -> Accepted | Refused:
    return decode_json(_reply_decoder, data)


class RefusalRecord(Fields, frozen=True):
    """A refused submission as kept in the refusals stream: what came, on which subject, why.

    The body is kept as received (UTF-8 text, or base64 when it is not text) up to
    ``body_limit`` bytes; its size and sha256 always describe the whole of it.
    """

    received_at: Instant
    subject: str
    refusal: Refused
    size: int
    sha256: str
    body: str
    body_encoding: str = "utf-8"  # or "base64"
    body_truncated: bool = False


class StatusQuery(Fields, frozen=True):
    """An ops status request: it takes no arguments (an empty body or ``{}``)."""


class SubmissionsStatus(Fields, frozen=True):
    """The submissions service's answer on ``duban.ops.submissions.status``."""

    programmes: tuple[str, ...]
    records_cached: int  # county records held in memory (each caught up from the stream)
    in_flight: int  # submissions being decided right now in this instance
    instance: str  # the micro service instance id that answered


class ParkedEvent(Fields, frozen=True):
    """A stored event a projection could not apply: kept aside, the checkpoint moved past it,
    until an operator replays it after a fix (``duban parked``, ``duban replay-parked``)."""

    projection: str  # ledger | notifier | escalation
    stream_sequence: int
    reason: str
    parked_at: Instant
    event_id: str | None = None  # None: the bytes do not even decode
    event_type: str | None = None
    county_code: str | None = None
    size: int = 0


class ParkedList(Fields, frozen=True):
    items: tuple[ParkedEvent, ...]


class ReplayParkedReport(Fields, frozen=True):
    projection: str
    replayed: tuple[int, ...]  # stream sequences now applied
    still_parked: int


def parked_event(projection: str, sequence: int, data: bytes, reason: str, parked_at: dt.datetime) -> ParkedEvent:
    """What ops are shown of a parked event: its identity when its bytes still decode."""
    try:
        envelope = decode_event(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ParkedEvent(
            projection=projection, stream_sequence=sequence, reason=reason, parked_at=parked_at, size=len(data)
        )
    return ParkedEvent(
        projection=projection,
        stream_sequence=sequence,
        reason=reason,
        parked_at=parked_at,
        event_id=envelope.event_id,
        event_type=envelope.event_type,
        county_code=envelope.county_code,
        size=len(data),
    )
