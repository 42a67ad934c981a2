"""The notifier's operations subject: what it has been asked to send and what it did.

Request-reply on ``duban.ops.notifier.*`` (ops and city operators).
"""

from __future__ import annotations

from contracts.payloads import Fields
from contracts.replies import StatusQuery

NOTIFIER_SERVICE = "duban-notifier"
OPS_PREFIX = "duban.ops.notifier"
STATUS_SUBJECT = f"{OPS_PREFIX}.status"
PARKED_SUBJECT = f"{OPS_PREFIX}.parked"  # actions the notifier could not plan (ParkedList)
REPLAY_PARKED_SUBJECT = f"{OPS_PREFIX}.replay-parked"  # plan them again after a fix (ReplayParkedReport)
AUDIT_SUBJECT = f"{OPS_PREFIX}.audit"  # the outbox compared with the stream (contracts.audit.ReadModelAudit)


__all__ = [
    "AUDIT_SUBJECT",
    "NOTIFIER_SERVICE",
    "PARKED_SUBJECT",
    "REPLAY_PARKED_SUBJECT",
    "STATUS_SUBJECT",
    "NotifierStatus",
    "StatusQuery",
]


class NotifierStatus(Fields, frozen=True):
    checkpoint: int  # last stream sequence of an action turned into outbox rows
    stream_last_sequence: int
    outbox: dict[str, int]  # outbox rows by state (pending, sent, delivered, failed, …)
    channels: tuple[str, ...]  # channels in use, in fallback order
    events_unpublished: int  # outcomes recorded and not yet on the event stream
    due_now: int  # pending rows due at the service's current time (quiet hours and backoff wait)
