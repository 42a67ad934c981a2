"""What refolding a county reads of its events, packed: the envelopes themselves are not kept.

Escalation folds each event into the county's facts as it arrives (``contracts.facts.apply``);
only a retraction makes it fold the county again from all its events (``contracts.facts.fold``),
and only a confirmation needs an earlier event back (the ``ActionProposed`` it issues). Keeping
every decoded envelope for that cost ~1.3 kB of heap per event (1.7 GB with 1M events in the
stream). A ``CountyHistory`` keeps, per event and in stream order, exactly what ``fold`` reads:

- the submission id (the bytes it does not share with the one before) and ``occurred_at``
  (wall-clock microseconds and a time-zone number), packed in arrays: ~20 bytes an event;
- of the stream sequences, the greatest (``fold`` reads no other);
- the payload, without the fields ``fold`` does not read, its repeated values shared: a progress
  report is one payload shared with every equal report (a county reports the same milestone,
  percent and steps again and again), a progress table keeps its period and number of lines, a
  review request its kind, a notification (which ``fold`` ignores) is a placeholder; level ids
  and names, dates and the like are shared between actions;
- ``event_id`` and ``recorded_at`` of procedure findings, the only events ``fold`` reads them of.

``events()`` gives the events back as envelopes carrying those fields (the others are blank), so
``fold(programme, county, history.events())`` is the fold of the original envelopes, and
``append`` returns the payload kept so that the live facts are folded from (and share) it too.
"""

from __future__ import annotations

import datetime as dt
import functools
import sys
from array import array
from collections.abc import Iterator
from typing import Any

import msgspec

from contracts.events import (
    ActionIssued,
    ActionProposed,
    Actor,
    EventEnvelope,
    EventPayload,
    ExtensionDecided,
    ExtensionRequested,
    MilestoneCompleted,
    NotificationDelivered,
    NotificationFailed,
    NotificationQueued,
    NotificationRecorded,
    NotificationSent,
    ProcedureFindingRecorded,
    ProgressReported,
    ProgressTableFiled,
    ReviewDecided,
    ReviewRequested,
    SubmissionRetracted,
    TrialOperationStarted,
)
from contracts.payloads import ProgressTableLine

_WALL_ZERO = dt.datetime.min  # occurred_at is kept as microseconds of wall time since this …
_MICROSECOND = dt.timedelta(microseconds=1)
_ZoneKey = tuple[dt.tzinfo | None, str | None, int]  # … with its time zone (and name, fold) by number
_zone_numbers: dict[_ZoneKey, int] = {}
_zones: list[_ZoneKey] = []

_BLANK_ACTOR = Actor(role="system", user="-")


class CountyHistory:
    """One county's events as ``fold`` reads them, in the order they were appended."""

    __slots__ = (
        "_findings",
        "_id_shared",
        "_id_tail_lengths",
        "_id_tails",
        "_last_id",
        "_last_sequence",
        "_long_tails",
        "_payloads",
        "_undo",
        "_walls",
        "_zones",
    )

    def __init__(self) -> None:
        # fold reads the events' sequences only for the greatest: that is all that is kept.
        self._last_sequence = 0
        # The submission ids, UTF-8: each as the bytes it shares with the one before (a county's
        # ids mostly differ in a counter at the end) and the rest (its tail), this long (255:
        # longer, the length in _long_tails).
        self._id_shared = array("B")
        self._id_tails = bytearray()
        self._id_tail_lengths = array("B")
        self._long_tails: dict[int, int] = {}
        self._last_id = b""
        # The greatest sequence and the last id before the last append, until it is undone.
        self._undo: tuple[int, bytes] | None = None
        self._walls = array("q")  # occurred_at: wall-clock microseconds since _WALL_ZERO …
        self._zones = array("B")  # … and its time zone, a number in _zones (made "H" past 255)
        self._payloads: list[EventPayload] = []
        self._findings: dict[int, tuple[str, dt.datetime]] = {}  # index -> (event_id, recorded_at)

    def __len__(self) -> int:
        return len(self._payloads)

    def append(self, sequence: int, envelope: EventEnvelope) -> EventPayload:
        """Keep one more event (all or nothing: a failure keeps nothing of it); returns the
        payload kept, which folds as the envelope's does."""
        occurred = envelope.occurred_at
        wall = (occurred.replace(tzinfo=None, fold=0) - _WALL_ZERO) // _MICROSECOND
        zone = _zone_number(occurred)
        submission_id = envelope.submission_id.encode("utf-8", "surrogatepass")
        shared = _shared_prefix(self._last_id, submission_id)
        payload = _slim(envelope.payload)
        index = len(self._payloads)
        self._undo = (self._last_sequence, self._last_id)
        self._last_sequence = max(self._last_sequence, sequence)
        self._last_id = submission_id
        tail = len(submission_id) - shared
        self._id_shared.append(shared)
        self._id_tails += submission_id[shared:]
        self._id_tail_lengths.append(min(tail, 255))
        if tail >= 255:
            self._long_tails[index] = tail
        if zone > 0xFF and self._zones.typecode == "B":
            self._zones = array("H", self._zones)
        self._walls.append(wall)
        self._zones.append(zone)
        self._payloads.append(payload)
        if isinstance(payload, ProcedureFindingRecorded):
            self._findings[index] = (envelope.event_id, envelope.recorded_at)
        return payload

    def pop(self) -> None:
        """Forget the event appended last (once: what was appended before it stays)."""
        index = len(self._payloads) - 1
        if index < 0 or self._undo is None:
            raise IndexError("nothing to undo: pop forgets the last event appended, once")
        (self._last_sequence, self._last_id), self._undo = self._undo, None
        self._payloads.pop()
        self._walls.pop()
        self._zones.pop()
        self._id_shared.pop()
        tail = self._long_tails.pop(index, self._id_tail_lengths.pop())
        del self._id_tails[len(self._id_tails) - tail :]
        self._findings.pop(index, None)

    def events(self) -> Iterator[tuple[int, EventEnvelope]]:
        """The events, in order, as (sequence, envelope) with the fields ``fold`` reads; the
        sequence is the greatest of them all for each (``fold`` reads no other)."""
        start = 0
        encoded = b""
        for index, payload in enumerate(self._payloads):
            tail = self._id_tail_lengths[index]
            end = start + (tail if tail < 255 else self._long_tails[index])
            encoded = encoded[: self._id_shared[index]] + self._id_tails[start:end]
            submission_id = encoded.decode("utf-8", "surrogatepass")
            start = end
            tzinfo, _, fold = _zones[self._zones[index]]
            occurred = (_WALL_ZERO + self._walls[index] * _MICROSECOND).replace(tzinfo=tzinfo, fold=fold)
            event_id, recorded = self._findings.get(index, ("", occurred))
            yield (
                self._last_sequence,
                EventEnvelope(
                    event_id=event_id,
                    schema_version=0,
                    programme_id="",
                    county_code="",
                    occurred_at=occurred,
                    recorded_at=recorded,
                    actor=_BLANK_ACTOR,
                    submission_id=submission_id,
                    submission_digest="",
                    causation_id="",
                    correlation_id="",
                    payload=payload,
                ),
            )

    def proposal(self, action_id: str) -> ActionProposed | None:
        """The latest ``ActionProposed`` of this action (kept as decoded)."""
        for payload in reversed(self._payloads):
            if isinstance(payload, ActionProposed) and payload.action_id == action_id:
                return payload
        return None


def _shared_prefix(before: bytes, after: bytes) -> int:
    """How many leading bytes ``after`` shares with ``before`` (at most 255)."""
    limit = min(len(before), len(after), 255)
    n = 0
    while n < limit and before[n] == after[n]:
        n += 1
    return n


def _zone_number(instant: dt.datetime) -> int:
    tzinfo = instant.tzinfo  # None (naive) is kept as such too
    key = (tzinfo, tzinfo.tzname(None) if isinstance(tzinfo, dt.timezone) else None, instant.fold)
    number = _zone_numbers.get(key)
    if number is None:
        if len(_zones) > 0xFFFF:
            raise ValueError(f"more than 65,536 time zones: {tzinfo!r}")
        number = _zone_numbers[key] = len(_zones)
        _zones.append(key)
    return number


def _slim(payload: EventPayload) -> EventPayload:
    """The payload with only what ``fold`` reads, its repeated values shared with equal ones."""
    try:
        return _slimmed(payload)
    except TypeError:  # an unhashable value (a list for a tuple: built in code, not decoded)
        return payload


def _slimmed(payload: EventPayload) -> EventPayload:
    match payload:
        case ProgressReported():
            return _shared_progress(payload.milestone_id, payload.percent, payload.note, payload.steps_done)
        case ProgressTableFiled():
            return _shared_table(payload.period, len(payload.lines))
        case ReviewRequested():
            return _shared_review_request(payload.review_kind)  # fold reads the kind only
        case ActionIssued():
            # fold reads neither whom it addresses, nor what is missing, nor the days counted.
            return msgspec.structs.replace(
                payload,
                addressed=(),
                missing_zh="",
                finding_event_id=None,
                deadline=None,
                workdays=0,
                urgent=False,
                **_shared_action_fields(payload),
            )
        case ActionProposed():
            # Kept whole (a confirmation issues it as it is), its repeated values shared.
            return msgspec.structs.replace(
                payload,
                addressed=_shared_roles(payload.addressed),
                missing_zh=_intern(payload.missing_zh),
                deadline=None if payload.deadline is None else _date(payload.deadline),
                **_shared_action_fields(payload),
            )
        case ReviewDecided():
            return msgspec.structs.replace(
                payload,
                review_kind=_intern(payload.review_kind),
                decided_on=_date(payload.decided_on),
                request_submission_id=None,  # not read
                comments=_intern(payload.comments),
            )
        case MilestoneCompleted():
            return msgspec.structs.replace(
                payload,
                milestone_id=_intern(payload.milestone_id),
                completed_on=_date(payload.completed_on),
                via=_intern(payload.via),
                note=_intern(payload.note),
            )
        # fold reads neither reasons nor the requests decided nor a finding's trigger.
        case ExtensionRequested():
            return msgspec.structs.replace(payload, reason="")
        case ExtensionDecided():
            return msgspec.structs.replace(payload, request_submission_id=None, reason="")
        case SubmissionRetracted():
            return msgspec.structs.replace(payload, reason="")
        case TrialOperationStarted():
            return msgspec.structs.replace(payload, note="")
        case ProcedureFindingRecorded():
            return msgspec.structs.replace(payload, trigger_event_id="")
        case NotificationQueued() | NotificationSent() | NotificationDelivered() | NotificationFailed():
            # (isinstance, not type(): a payload may be decoded as a subclass of its event type)
            return next(placeholder for kind, placeholder in _NOTIFICATIONS.items() if isinstance(payload, kind))
        case _:
            return payload


def _shared_action_fields(action: ActionIssued | ActionProposed) -> dict[str, Any]:
    """Level ids and names, policy versions, periods, days: a few values, each in thousands of actions."""
    return {
        "level_id": _intern(action.level_id),
        "level_name": _intern(action.level_name),
        "policy_version": _intern(action.policy_version),
        "due_on": _date(action.due_on),
        "milestone_id": _optional_text(action.milestone_id),
        "period": _optional_text(action.period),
    }


def _intern(text: str) -> str:
    """One copy of a repeated text (``sys.intern`` takes exact ``str`` only)."""
    return sys.intern(text) if type(text) is str else text


def _optional_text(value: str | None) -> str | None:
    return None if value is None else _intern(value)


@functools.lru_cache(maxsize=4096)
def _date(day: dt.date) -> dt.date:
    return day


@functools.lru_cache(maxsize=1024)
def _shared_roles(roles: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_intern(role) for role in roles)


@functools.lru_cache(maxsize=1024)
def _shared_review_request(review_kind: str) -> ReviewRequested:
    return ReviewRequested(review_kind=review_kind)


@functools.lru_cache(maxsize=8192)
def _shared_progress(milestone_id: str, percent: int, note: str, steps_done: tuple[str, ...]) -> ProgressReported:
    return ProgressReported(milestone_id=milestone_id, percent=percent, note=note, steps_done=steps_done)


_BLANK_LINE = ProgressTableLine(milestone_id="-", percent=0)


@functools.lru_cache(maxsize=1024)
def _shared_table(period: str, lines: int) -> ProgressTableFiled:
    """``fold`` reads a table's period and how many lines it has."""
    return ProgressTableFiled(period=period, lines=(_BLANK_LINE,) * lines)


# ``fold`` reads nothing of a notification: one placeholder per type.
_NOTIFICATIONS: dict[type[NotificationRecorded], EventPayload] = {
    kind: kind(message_id="-", action_id="-", recipient_id="-", channel="-", attempt=0, address_masked="-")
    for kind in (NotificationQueued, NotificationSent, NotificationDelivered, NotificationFailed)
}
