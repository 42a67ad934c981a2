"""Every NATS subject and stream name duban uses, defined once.

Submissions: ``duban.submit.<role>.<county_code>`` (request-reply). The server lets a county's
user publish only on its own ``duban.submit.county.<code>``, and operators only on their role's
subjects, so the role and county tokens of a received subject are trustworthy.

Events: one subject per aggregate, a county's part in a programme:
``duban.events.<programme_id>.<county_code>``, in the stream ``DUBAN_EVENTS``.
Refusals: ``duban.refusals.<role>.<county token>`` in ``DUBAN_REFUSALS``, so an operator can list
everything that was sent and not accepted.
The retraction index: ``duban.retractions.<programme_id>.<county_code>`` in ``DUBAN_RETRACTIONS``,
one entry per retraction stored in ``DUBAN_EVENTS``.
"""

from __future__ import annotations

from contracts.commands import Role

SUBMIT_PREFIX = "duban.submit"
SUBMIT_ALL = f"{SUBMIT_PREFIX}.*.*"
SUBMISSIONS_QUEUE = "duban-submissions"
SUBMISSIONS_SERVICE = "duban-submissions"  # its NATS micro service name
SUBMISSIONS_OPS_PREFIX = "duban.ops.submissions"
SUBMISSIONS_STATUS_SUBJECT = f"{SUBMISSIONS_OPS_PREFIX}.status"

EVENTS_STREAM = "DUBAN_EVENTS"
EVENTS_PREFIX = "duban.events"
EVENTS_ALL = f"{EVENTS_PREFIX}.>"

REFUSALS_STREAM = "DUBAN_REFUSALS"
REFUSALS_PREFIX = "duban.refusals"
REFUSALS_ALL = f"{REFUSALS_PREFIX}.>"

# An index of the retractions stored in DUBAN_EVENTS (contracts.events.IndexedRetraction), written
# by the submissions service after each retraction it stores. A ledger rebuilding into an empty
# database reads it to learn which submissions each county retracted before it folds, instead
# of reading the whole event stream ahead (a retraction's type is in its data, never in its
# subject: a county's facts share one subject, which its appends' concurrency check relies on).
# A hint only: an entry missing or wrong makes the rebuild fold that county again.
RETRACTIONS_STREAM = "DUBAN_RETRACTIONS"
RETRACTIONS_PREFIX = "duban.retractions"
RETRACTIONS_ALL = f"{RETRACTIONS_PREFIX}.>"
# The stream's metadata key: the first DUBAN_EVENTS sequence the index covers (the events stream's
# next sequence when the index was created). An index that does not cover from 1 is not used.
RETRACTIONS_COVER_FROM = "duban_covers_from"

# Signed checkpoints of the event chains' heads (contracts.audit): a stream of their own, since
# the projections rely on DUBAN_EVENTS' sequences having no holes under their filter.
AUDIT_STREAM = "DUBAN_AUDIT"
AUDIT_PREFIX = "duban.audit"
AUDIT_ALL = f"{AUDIT_PREFIX}.>"
CHECKPOINTS_SUBJECT = f"{AUDIT_PREFIX}.checkpoints"

# Header carrying the event type, so consumers and `nats` users can filter without decoding.
EVENT_TYPE_HEADER = "Duban-Event-Type"
CORRELATION_HEADER = "Duban-Correlation-Id"


def event_headers(event_id: str, event_type: str, correlation_id: str) -> dict[str, str]:
    """The headers every stored event carries: its id (JetStream deduplicates on it), its type
    and the submission (or action) it follows from, so `nats stream view` shows both."""
    return {"Nats-Msg-Id": event_id, EVENT_TYPE_HEADER: event_type, CORRELATION_HEADER: correlation_id}


def submit_subject(role: Role | str, county_code: str) -> str:
    return f"{SUBMIT_PREFIX}.{Role(role).value}.{county_code}"


def parse_submit_subject(subject: str) -> tuple[str, str] | None:
    """(role token, county token) of a submission subject, or None if it is not one."""
    parts = subject.split(".")
    if len(parts) != 4 or ".".join(parts[:2]) != SUBMIT_PREFIX:
        return None
    return parts[2], parts[3]


def aggregate_subject(programme_id: str, county_code: str) -> str:
    return f"{EVENTS_PREFIX}.{programme_id}.{county_code}"


def retractions_subject(programme_id: str, county_code: str) -> str:
    return f"{RETRACTIONS_PREFIX}.{programme_id}.{county_code}"


def actions_subject(programme_id: str, county_code: str) -> str:
    """Escalation's actions about a county: beside its facts, in the same stream."""
    return f"{EVENTS_PREFIX}.{programme_id}.{county_code}.actions"


def notifications_subject(programme_id: str, county_code: str) -> str:
    """The notifier's record of who was told what, beside the county's facts and actions."""
    return f"{EVENTS_PREFIX}.{programme_id}.{county_code}.notifications"


ACTIONS_ALL = f"{EVENTS_PREFIX}.*.*.actions"
NOTIFICATIONS_ALL = f"{EVENTS_PREFIX}.*.*.notifications"


def refusal_subject(role_token: str, county_token: str) -> str:
    return f"{REFUSALS_PREFIX}.{role_token}.{county_token}"


def inbox_prefix(role: Role | str, county_code: str | None = None) -> str:
    """Per-user reply inbox prefix, so one county cannot read another's replies."""
    suffix = f"_{county_code}" if county_code else ""
    return f"_INBOX_{Role(role).value}{suffix}"
