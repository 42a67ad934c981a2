"""The AsyncAPI 3.0.0 document: every NATS subject duban uses, what travels on it, what answers.

FastStream's AsyncAPI generator does not understand msgspec types, so the document is built
here: the message schemas come from msgspec (:func:`msgspec.json.schema_components`, each type
once under ``#/components/schemas/``), the addresses from the subject constants and functions of
``contracts``. ``duban schema`` writes it to ``contracts/asyncapi.json``; tests fail when the
committed file drifts from the code and when a subject constant in ``contracts`` has no channel.

The document describes duban as one application: it *receives* requests (submissions, queries,
ops commands, the NATS service protocol) and answers them, and it *sends* the facts, actions,
notification outcomes and refusals it stores in JetStream.

Adding a subject is one entry in :data:`CHANNELS`::

    Channel("notifierReplay", notifier.REPLAY_SUBJECT, (ReplayQuery,), (ReplayReport, OpsError),
            "Re-send an action's messages", OPS_USERS, "notifier"),

then ``duban schema``. A message type gets an example in the document when it can be built
with no arguments, or from :data:`EXAMPLES`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import msgspec
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from nats.micro.service import (
    DEFAULT_PREFIX,
    INFO_RESPONSE_TYPE,
    PING_RESPONSE_TYPE,
    STATS_RESPONSE_TYPE,
    ServiceVerb,
)

from contracts import audit, escalation, ledger, notifier, subjects
from contracts.audit import ChainHead, Checkpoint, ReadModelAudit
from contracts.commands import ReportProgress, Role, Submission, encode
from contracts.errors import ErrorCode
from contracts.escalation import (
    ActionList,
    ActionsQuery,
    ActionView,
    CheckpointList,
    ConfirmAction,
    EscalationStatus,
    OpsError,
    TickReport,
    WaiveAction,
    WhyQuery,
)
from contracts.events import (
    EVENT_SCHEMA_VERSIONS,
    EVENT_TYPES,
    ActionConfirmed,
    ActionIssued,
    ActionProposed,
    ActionWaived,
    Actor,
    EventEnvelope,
    EventPayload,
    IndexedRetraction,
    NotificationDelivered,
    NotificationFailed,
    NotificationQueued,
    NotificationSent,
    ProgressReported,
    encode_event,
    event_type_of,
)
from contracts.identifiers import COUNTY_CODE_PATTERN, PROGRAMME_ID_PATTERN
from contracts.ledger import (
    CountyDetail,
    CountyHistory,
    CountyQuery,
    OverdueList,
    ProgressTable,
    ProjectionStatus,
    QueryError,
    RebuildReport,
    TableQuery,
)
from contracts.notifier import NotifierStatus
from contracts.payloads import recorded_as
from contracts.replies import (
    Accepted,
    ParkedList,
    RefusalRecord,
    Refused,
    ReplayParkedReport,
    StatusQuery,
    StoredEvent,
    SubmissionsStatus,
    refused,
)

JSON = dict[str, Any]

ASYNCAPI_VERSION = "3.0.0"
ASYNCAPI_PATH = Path(__file__).parent / "asyncapi.json"
REGENERATE = "duban schema"  # the command that rewrites the committed document

JSON_CONTENT_TYPE = "application/json"
NATS_MSG_ID_HEADER = "Nats-Msg-Id"  # JetStream's de-duplication id
EMBEDDED_NATS_HOST = "127.0.0.1:4333"  # services/common/settings.py: embedded_nats_port
PRODUCTION_NATS_PORT = 4222  # deploy/nats/nats-server.conf: listen

SCHEMA_REF = "#/components/schemas/{name}"
REPLIES_CHANNEL = "replies"

# Who may publish, by NATS user (services/common/natsauth.py is the permission table).
SUBMITTERS = (
    "county systems (user `county-<code>`, only `county.<its own code>`), "
    "the `city` and `province` operators (only their role), `ops`, and the HTTP gateway "
    "(`svc-gateway`, for the county or operator its bearer token names)"
)
QUERY_USERS = "the `city` and `province` operators, `ops`, the services"
OPS_USERS = "the `city` operator, `ops`, the services"
SRV_USERS = "`ops` (`nats micro ls|info|stats`) and the services"


# ---------------------------------------------------------------------------------------------
# Messages that are not one msgspec type as it stands
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EventMessage:
    """An :class:`EventEnvelope` on a subject that carries only some event types."""

    name: str
    types: tuple[type[msgspec.Struct], ...]
    summary: str


@dataclass(frozen=True)
class RawMessage:
    """A message described by a JSON Schema written here (bytes, the NATS service protocol)."""

    name: str
    payload: JSON
    summary: str
    content_type: str = JSON_CONTENT_TYPE
    headers: JSON | None = None
    examples: tuple[Any, ...] = ()


MessageSpec = type[msgspec.Struct] | EventMessage | RawMessage


# ---------------------------------------------------------------------------------------------
# The catalogue: one entry per subject
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Channel:
    """A subject (``{name}`` marks a token that varies, see :data:`PARAMETERS`), what is
    published on it and, for request-reply subjects, what the answer may be."""

    id: str  # the channel's key in the document; its operation is named after it
    address: str  # built from the constants in contracts, never retyped
    messages: tuple[MessageSpec, ...]
    replies: tuple[MessageSpec, ...] = ()  # empty: not request-reply
    summary: str = ""
    publishers: str = ""  # who publishes here
    service: str = ""  # the duban service that answers (or writes the stream)

    @property
    def action(self) -> Literal["send", "receive"]:
        """duban's side: it receives requests and answers them; it sends what it stores."""
        return "receive" if self.replies else "send"

    @property
    def operation_id(self) -> str:
        return self.action + self.id[:1].upper() + self.id[1:]


ACTION_EVENTS: tuple[type[msgspec.Struct], ...] = (ActionIssued, ActionProposed, ActionConfirmed, ActionWaived)
NOTIFICATION_EVENTS: tuple[type[msgspec.Struct], ...] = (
    NotificationQueued,
    NotificationSent,
    NotificationDelivered,
    NotificationFailed,
)
# Everything else is a fact decided by the submissions service (the default for a new type).
FACT_EVENTS: tuple[type[msgspec.Struct], ...] = tuple(
    t for t in EVENT_TYPES.values() if t not in ACTION_EVENTS + NOTIFICATION_EVENTS
)

FACT_EVENT = EventMessage("FactEvent", FACT_EVENTS, "A fact about a county, decided from a submission")
ACTION_EVENT = EventMessage("ActionEvent", ACTION_EVENTS, "An accountability action, its confirmation or waiver")
NOTIFICATION_EVENT = EventMessage("NotificationEvent", NOTIFICATION_EVENTS, "One outcome of telling a person")

XLSX_REPORT = RawMessage(
    "ProgressTableXlsx",
    {
        "type": "string",
        "format": "binary",
        "contentMediaType": ledger.XLSX_CONTENT_TYPE,
        "description": "The 督查进度一览表 as an Excel workbook, print-ready (the bytes, not JSON).",
    },
    "The progress table as an .xlsx file",
    content_type=ledger.XLSX_CONTENT_TYPE,
    headers={
        "type": "object",
        "properties": {"Content-Type": {"type": "string", "const": ledger.XLSX_CONTENT_TYPE}},
    },
)

_SRV_IDENTITY: JSON = {
    "name": {"type": "string", "description": "the service name, e.g. duban-ledger"},
    "id": {"type": "string", "description": "this instance's id"},
    "version": {"type": "string"},
    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
}


def _srv_answer(name: str, type_: str, summary: str, extra: JSON, example: JSON | None = None) -> RawMessage:
    return RawMessage(
        name,
        {
            "type": "object",
            "description": f"{summary}. Defined by the NATS service protocol (ADR-32); loosely described here.",
            "properties": {"type": {"type": "string", "const": type_}, **_SRV_IDENTITY, **extra},
            "required": ["type", "name", "id", "version"],
            "additionalProperties": True,
        },
        summary,
        examples=(example,) if example else (),
    )


SRV_REQUEST = RawMessage(
    "ServiceProtocolRequest",
    {"description": "Ignored: send an empty body."},
    "A service discovery request (empty)",
)
SRV_PING = _srv_answer(
    "ServicePing",
    PING_RESPONSE_TYPE,
    "A running service instance",
    {},
    {"type": PING_RESPONSE_TYPE, "name": ledger.LEDGER_SERVICE, "id": "ABC123", "version": "0.1.0", "metadata": {}},
)
SRV_INFO = _srv_answer(
    "ServiceInfo",
    INFO_RESPONSE_TYPE,
    "A service instance's description and endpoints (name, subject, queue group)",
    {"description": {"type": ["string", "null"]}, "endpoints": {"type": "array", "items": {"type": "object"}}},
)
SRV_STATS = _srv_answer(
    "ServiceStats",
    STATS_RESPONSE_TYPE,
    "A service instance's request counts, errors and processing times per endpoint",
    {"started": {"type": "string", "format": "date-time"}, "endpoints": {"type": "array", "items": {"type": "object"}}},
)
SRV_ANSWERS: tuple[MessageSpec, ...] = (SRV_PING, SRV_INFO, SRV_STATS)

CHANNELS: tuple[Channel, ...] = (
    # -- submissions ---------------------------------------------------------------------------
    Channel(
        "submit",
        f"{subjects.SUBMIT_PREFIX}.{{role}}.{{county_code}}",
        (Submission,),
        (Accepted, Refused),
        "Post a submission; the answer says what was stored, or why it was refused",
        SUBMITTERS,
        "submissions",
    ),
    Channel(
        "submissionsStatus",
        subjects.SUBMISSIONS_STATUS_SUBJECT,
        (StatusQuery,),
        (SubmissionsStatus, OpsError),
        "The submissions service's state",
        OPS_USERS,
        "submissions",
    ),
    # -- the event stream (DUBAN_EVENTS) and refusals (DUBAN_REFUSALS) ------------------------------
    Channel(
        "events",
        subjects.aggregate_subject("{programme_id}", "{county_code}"),
        (FACT_EVENT,),
        summary=f"A county's facts in a programme, in the stream {subjects.EVENTS_STREAM}",
        publishers="the submissions service (user `svc-submissions`)",
        service="submissions",
    ),
    Channel(
        "eventsActions",
        subjects.actions_subject("{programme_id}", "{county_code}"),
        (ACTION_EVENT,),
        summary=f"Escalation's actions about a county, beside its facts in {subjects.EVENTS_STREAM}",
        publishers="the escalation service",
        service="escalation",
    ),
    Channel(
        "eventsNotifications",
        subjects.notifications_subject("{programme_id}", "{county_code}"),
        (NOTIFICATION_EVENT,),
        summary=f"Who was told what about an action, beside the county's facts in {subjects.EVENTS_STREAM}",
        publishers="the notifier service",
        service="notifier",
    ),
    Channel(
        "auditCheckpoints",
        subjects.CHECKPOINTS_SUBJECT,
        (Checkpoint,),
        summary=f"Signed checkpoints of every event chain's head, in the stream {subjects.AUDIT_STREAM}",
        publishers="the escalation service (the active instance)",
        service="escalation",
    ),
    Channel(
        "refusals",
        subjects.refusal_subject("{role_token}", "{county_token}"),
        (RefusalRecord,),
        summary=f"Every refused submission, as received, in the stream {subjects.REFUSALS_STREAM}",
        publishers="the submissions service (user `svc-submissions`)",
        service="submissions",
    ),
    Channel(
        "retractionIndex",
        subjects.retractions_subject("{programme_id}", "{county_code}"),
        (IndexedRetraction,),
        summary=(
            f"One entry per retraction stored in {subjects.EVENTS_STREAM}, in the stream"
            f" {subjects.RETRACTIONS_STREAM}: what a ledger rebuilding from nothing reads first"
        ),
        publishers="the submissions service (user `svc-submissions`)",
        service="submissions",
    ),
    # -- the ledger's queries and ops ----------------------------------------------------------
    Channel(
        "ledgerTable",
        ledger.TABLE_SUBJECT,
        (TableQuery,),
        (ProgressTable, QueryError),
        "The progress table with traffic lights, now or as of a moment",
        QUERY_USERS,
        "ledger",
    ),
    Channel(
        "ledgerCounty",
        ledger.COUNTY_SUBJECT,
        (CountyQuery,),
        (CountyDetail, QueryError),
        "A county's milestones, evidence, reviews and procedure findings",
        QUERY_USERS,
        "ledger",
    ),
    Channel(
        "ledgerHistory",
        ledger.HISTORY_SUBJECT,
        (CountyQuery,),
        (CountyHistory, QueryError),
        "Every event of a county: actor, occurred-at, recorded-at",
        QUERY_USERS,
        "ledger",
    ),
    Channel(
        "ledgerOverdue",
        ledger.OVERDUE_SUBJECT,
        (TableQuery,),
        (OverdueList, QueryError),
        "The overdue milestones",
        QUERY_USERS,
        "ledger",
    ),
    Channel(
        "ledgerReport",
        ledger.REPORT_SUBJECT,
        (TableQuery,),
        (XLSX_REPORT, QueryError),
        "The 督查进度一览表 as an Excel file (binary answer)",
        QUERY_USERS,
        "ledger",
    ),
    Channel(
        "ledgerRebuild",
        ledger.REBUILD_SUBJECT,
        (StatusQuery,),
        (RebuildReport, QueryError),
        "Drop the read model and rebuild it from the event stream",
        OPS_USERS,
        "ledger",
    ),
    Channel(
        "ledgerStatus",
        ledger.PROJECTION_STATUS_SUBJECT,
        (StatusQuery,),
        (ProjectionStatus, QueryError),
        "The read model's checkpoint and lag behind the stream",
        OPS_USERS,
        "ledger",
    ),
    Channel(
        "ledgerParked",
        ledger.PARKED_SUBJECT,
        (StatusQuery,),
        (ParkedList, QueryError),
        "Events the ledger could not apply, parked after bounded retries",
        OPS_USERS,
        "ledger",
    ),
    Channel(
        "ledgerAudit",
        ledger.AUDIT_SUBJECT,
        (StatusQuery,),
        (ReadModelAudit, QueryError),
        "Compare the read model with the stream: rows altered, missing, or explained by no event",
        OPS_USERS,
        "ledger",
    ),
    Channel(
        "ledgerReplayParked",
        ledger.REPLAY_PARKED_SUBJECT,
        (StatusQuery,),
        (ReplayParkedReport, QueryError),
        "Apply the parked events again, after a fix",
        OPS_USERS,
        "ledger",
    ),
    # -- escalation's ops ----------------------------------------------------------------------
    Channel(
        "escalationActions",
        escalation.ACTIONS_SUBJECT,
        (ActionsQuery,),
        (ActionList, OpsError),
        "List actions (by programme, county, state)",
        OPS_USERS,
        "escalation",
    ),
    Channel(
        "escalationConfirm",
        escalation.CONFIRM_SUBJECT,
        (ConfirmAction,),
        (ActionView, OpsError),
        "Confirm a proposed action: it is issued",
        OPS_USERS,
        "escalation",
    ),
    Channel(
        "escalationWaive",
        escalation.WAIVE_SUBJECT,
        (WaiveAction,),
        (ActionView, OpsError),
        "Waive a proposed action, with a reason",
        OPS_USERS,
        "escalation",
    ),
    Channel(
        "escalationWhy",
        escalation.WHY_SUBJECT,
        (WhyQuery,),
        (ActionView, OpsError),
        "An action and why: rule, deadline, working days",
        OPS_USERS,
        "escalation",
    ),
    Channel(
        "escalationTick",
        escalation.TICK_SUBJECT,
        (ActionsQuery,),
        (TickReport, OpsError),
        "Judge every county now instead of at the next tick",
        OPS_USERS,
        "escalation",
    ),
    Channel(
        "escalationStatus",
        escalation.STATUS_SUBJECT,
        (StatusQuery,),
        (EscalationStatus, OpsError),
        "Escalation's position in the stream and its actions by state",
        OPS_USERS,
        "escalation",
    ),
    Channel(
        "escalationCheckpoint",
        escalation.AUDIT_CHECKPOINT_SUBJECT,
        (StatusQuery,),
        (CheckpointList, OpsError),
        "Record a checkpoint of every chain's head now (empty when nothing moved)",
        OPS_USERS,
        "escalation",
    ),
    Channel(
        "escalationParked",
        escalation.PARKED_SUBJECT,
        (StatusQuery,),
        (ParkedList, OpsError),
        "Events escalation could not fold (tried again at its next start)",
        OPS_USERS,
        "escalation",
    ),
    # -- the notifier's ops --------------------------------------------------------------------
    Channel(
        "notifierStatus",
        notifier.STATUS_SUBJECT,
        (StatusQuery,),
        (NotifierStatus, OpsError),
        "The notifier's checkpoint, outbox and channels",
        OPS_USERS,
        "notifier",
    ),
    Channel(
        "notifierAudit",
        notifier.AUDIT_SUBJECT,
        (StatusQuery,),
        (ReadModelAudit, OpsError),
        "Compare the outbox with the stream: rows no action explains, sent messages whose row is gone or reset",
        OPS_USERS,
        "notifier",
    ),
    Channel(
        "notifierParked",
        notifier.PARKED_SUBJECT,
        (StatusQuery,),
        (ParkedList, OpsError),
        "Actions the notifier could not plan, parked after bounded retries",
        OPS_USERS,
        "notifier",
    ),
    Channel(
        "notifierReplayParked",
        notifier.REPLAY_PARKED_SUBJECT,
        (StatusQuery,),
        (ReplayParkedReport, OpsError),
        "Plan the parked actions again, after a fix",
        OPS_USERS,
        "notifier",
    ),
    # -- the NATS service protocol (every duban service is a NATS micro service) --------------
    Channel(
        "serviceProtocol",
        f"{DEFAULT_PREFIX}.{{verb}}",
        (SRV_REQUEST,),
        SRV_ANSWERS,
        "Every service instance answers (nats micro ls)",
        SRV_USERS,
        "nats",
    ),
    Channel(
        "serviceProtocolByName",
        f"{DEFAULT_PREFIX}.{{verb}}.{{service_name}}",
        (SRV_REQUEST,),
        SRV_ANSWERS,
        "Every instance of one service answers (nats micro info duban-ledger)",
        SRV_USERS,
        "nats",
    ),
    Channel(
        "serviceProtocolByInstance",
        f"{DEFAULT_PREFIX}.{{verb}}.{{service_name}}.{{service_id}}",
        (SRV_REQUEST,),
        SRV_ANSWERS,
        "One service instance answers",
        SRV_USERS,
        "nats",
    ),
)

SERVICE_TAGS: dict[str, str] = {
    "submissions": "validates, authorises and decides each submission; appends the facts",
    "ledger": "projects every county's milestone state and answers queries",
    "escalation": "turns deadlines, the calendar and the facts into accountability actions",
    "notifier": "tells the responsible people by SMS and e-mail and records every outcome",
    "nats": "the NATS service protocol, answered by every duban service",
}

MICRO_SERVICES = (
    subjects.SUBMISSIONS_SERVICE,
    ledger.LEDGER_SERVICE,
    escalation.ESCALATION_SERVICE,
    notifier.NOTIFIER_SERVICE,
)

# ---------------------------------------------------------------------------------------------
# Examples (the document shows them; a test validates each against its schema)
# ---------------------------------------------------------------------------------------------
_TZ = dt.timezone(dt.timedelta(hours=8))
_PROGRAMME = "puyang-2017-13"
_COUNTY = "410928"
_OTHER_COUNTY = "410922"
_ACTION_ID = f"{_PROGRAMME}:{_OTHER_COUNTY}:overdue_notice:1.2:2017-05-02"

EXAMPLE_SUBMISSION = Submission(
    submission_id=f"{_COUNTY}-progress-2017-06-001",
    programme_id=_PROGRAMME,
    county_code=_COUNTY,
    submitted_by="濮阳县数字城管建设办",
    command=ReportProgress(
        milestone_id="1.3",
        percent=60,
        note="财政评审批复已取得，项目已立项",
        steps_done=("fiscal_review_approved", "project_registered"),
    ),
)


def _envelope(
    payload: EventPayload, county_code: str, actor: Actor, event_id: str, submission_id: str
) -> EventEnvelope:
    at = dt.datetime(2017, 6, 20, 9, 30, tzinfo=_TZ)
    return EventEnvelope(
        event_id=event_id,
        schema_version=EVENT_SCHEMA_VERSIONS[event_type_of(payload)],
        programme_id=_PROGRAMME,
        county_code=county_code,
        occurred_at=at,
        recorded_at=at + dt.timedelta(seconds=1),
        actor=actor,
        submission_id=submission_id,
        submission_digest=hashlib.sha256(encode(EXAMPLE_SUBMISSION)).hexdigest(),
        causation_id=submission_id,
        correlation_id=submission_id,
        payload=payload,
    )


_SID = EXAMPLE_SUBMISSION.submission_id
EXAMPLES: dict[type[msgspec.Struct], tuple[msgspec.Struct, ...]] = {
    Submission: (EXAMPLE_SUBMISSION,),
    Checkpoint: (
        Checkpoint(
            number=12,
            taken_at=dt.datetime(2017, 6, 20, 18, 0, tzinfo=_TZ),
            stream_sequence=4211,
            heads=(
                ChainHead(subjects.aggregate_subject(_PROGRAMME, _COUNTY), 4207, "9f2c" + "0" * 60),
                ChainHead(subjects.actions_subject(_PROGRAMME, _OTHER_COUNTY), 4211, "41d8" + "0" * 60),
            ),
            previous="c0ffee" + "0" * 58,
            signer="UBK73XUJWWBPX2Q5D3XRD2MNHLZYXIPI73DU3OXP5EU2UGWHWJV4FN2C",
            signature="5e" * 64,
        ),
    ),
    Accepted: (Accepted(submission_id=_SID, events=(StoredEvent(f"{_SID}/0", "progress_reported", 42),)),),
    Refused: (refused(ErrorCode.UNKNOWN_MILESTONE, submission_id=_SID, field="$.command.milestone_id"),),
    EventEnvelope: (
        _envelope(
            recorded_as(ProgressReported, EXAMPLE_SUBMISSION.command),
            _COUNTY,
            Actor(role=Role.COUNTY.value, county_code=_COUNTY, user=EXAMPLE_SUBMISSION.submitted_by),
            f"{_SID}/0",
            _SID,
        ),
        _envelope(
            ActionIssued(
                action_id=_ACTION_ID,
                level_id="overdue_notice",
                level_name="逾期通知",
                policy_version="2017.1",
                due_on=dt.date(2017, 5, 3),
                addressed=("responsible_person", "unit_leader", "supervision_bureau"),
                explanation_zh="建设任务1.2应于2017-05-02完成，已逾期1个工作日",
                milestone_id="1.2",
                deadline=dt.date(2017, 5, 2),
                workdays=1,
                urgent=True,
            ),
            _OTHER_COUNTY,
            Actor(role="system", user="escalation"),
            _ACTION_ID,
            _ACTION_ID,
        ),
        _envelope(
            NotificationSent(
                message_id=f"{_ACTION_ID}:{_OTHER_COUNTY}-liu-bing:sms",
                action_id=_ACTION_ID,
                recipient_id=f"{_OTHER_COUNTY}-liu-bing",
                channel="sms",
                attempt=1,
                address_masked="138****0003",
                provider_message_id="aliyun-biz-0001",
            ),
            _OTHER_COUNTY,
            Actor(role="system", user="notifier"),
            f"{_ACTION_ID}:{_OTHER_COUNTY}-liu-bing:sms/notification_sent",
            "notification-0001",
        ),
    ),
    RefusalRecord: (
        RefusalRecord(
            received_at=dt.datetime(2017, 6, 20, 9, 30, tzinfo=_TZ),
            subject=subjects.submit_subject(Role.COUNTY, _COUNTY),
            refusal=refused(ErrorCode.MALFORMED, detail="Expected `object`, got `str`"),
            size=7,
            sha256=hashlib.sha256(b'"hello"').hexdigest(),
            body='"hello"',
        ),
    ),
    IndexedRetraction: (
        IndexedRetraction(
            stream_sequence=4711,
            event_id="410928-20170620-0007/0",
            programme_id=_PROGRAMME,
            county_code=_COUNTY,
            retracted_submission_id="410928-20170619-0003",
        ),
    ),
    CountyQuery: (CountyQuery(county_code=_COUNTY),),
    ConfirmAction: (ConfirmAction(action_id=_ACTION_ID, operator="市督查局 王科长"),),
    WaiveAction: (WaiveAction(action_id=_ACTION_ID, operator="市督查局 王科长", reason="已约谈"),),
    WhyQuery: (WhyQuery(action_id=_ACTION_ID),),
    QueryError: (QueryError(code="unknown_county", message_zh="该县不在本督办事项中", message_en="unknown county"),),
    OpsError: (OpsError(code="unknown_action", message_zh="找不到该督办措施", message_en="unknown action"),),
}

_SERVICE_ERROR_HEADERS: JSON = {
    "type": "object",
    "description": "Set on an error answer by the NATS service protocol.",
    "properties": {
        ERROR_CODE_HEADER: {"type": "string", "description": "HTTP-like: 400 malformed, 404 unknown, 409 refused, 500"},
        ERROR_HEADER: {"type": "string", "description": "the English message"},
    },
    "required": [ERROR_CODE_HEADER, ERROR_HEADER],
}
HEADERS: dict[type[msgspec.Struct], JSON] = {
    QueryError: _SERVICE_ERROR_HEADERS,
    OpsError: _SERVICE_ERROR_HEADERS,
    RefusalRecord: {
        "type": "object",
        "properties": {
            NATS_MSG_ID_HEADER: {
                "type": "string",
                "description": "refusal-<sha256 of the body>-<code>: a resent refusal is stored once",
            }
        },
        "required": [NATS_MSG_ID_HEADER],
    },
}

PARAMETERS: dict[str, JSON] = {
    "role": {
        "description": "Who sends: the role of the NATS user; the server lets each user publish only on its own.",
        "enum": [r.value for r in Role],
    },
    "county_code": {
        "description": f"The county's GB/T 2260 code (`{COUNTY_CODE_PATTERN}`).",
        "examples": [_COUNTY],
    },
    "programme_id": {"description": f"The programme's id (`{PROGRAMME_ID_PATTERN}`).", "examples": [_PROGRAMME]},
    "role_token": {
        "description": "The role token of the subject the refused submission came on, as received.",
        "examples": [Role.COUNTY.value],
    },
    "county_token": {
        "description": "The county token of the subject the refused submission came on, as received.",
        "examples": [_COUNTY],
    },
    "verb": {"description": "The NATS service protocol's request.", "enum": [v.value for v in ServiceVerb]},
    "service_name": {"description": "A duban micro service.", "enum": list(MICRO_SERVICES)},
    "service_id": {"description": "A running instance's id (`nats micro ls` lists them)."},
}

DESCRIPTION = f"""\
duban supervises a city programme across its counties: county systems and city/province \
operators post submissions, the **submissions** service decides them and appends the facts to \
the JetStream stream `{subjects.EVENTS_STREAM}`, the **ledger** answers queries about every \
county's milestones, **escalation** turns deadlines into accountability actions and the \
**notifier** tells the responsible people.

* Messages are JSON (UTF-8) unless a message says otherwise; unknown fields are refused.
* Request-reply subjects answer on the requester's NATS reply subject (each user has its own \
inbox prefix, `_INBOX_<role>[_<county_code>]`, the gateway's `_INBOX_gateway`); an error answer carries \
the NATS service error headers `{ERROR_CODE_HEADER}` and `{ERROR_HEADER}`.
* Every service is a NATS micro service (`nats micro ls`); each user may publish only where \
`deploy/nats/auth.conf` allows (one user per county).
* Refused submissions are kept in the stream `{subjects.REFUSALS_STREAM}`.

Generated from the code (`contracts/asyncapi.py`); regenerate with `{REGENERATE}`."""


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _schema_hook(type_: type) -> JSON:
    if type_ is object:
        return {"description": "any JSON value"}
    raise NotImplementedError


def _asyncapi_schema(node: Any) -> Any:
    """msgspec's schema as an AsyncAPI Schema Object: OpenAPI's discriminator object becomes the
    extension ``x-discriminator`` (AsyncAPI's ``discriminator`` is a property name whose values
    are schema names; ours are the tags, which each variant also states as an enum)."""
    if isinstance(node, dict):
        return {
            ("x-discriminator" if key == "discriminator" and isinstance(value, dict) else key): _asyncapi_schema(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_asyncapi_schema(item) for item in node]
    return node


def _summary(type_: type) -> str:
    doc = (type_.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split())


def _example(type_: type[msgspec.Struct]) -> tuple[msgspec.Struct, ...]:
    if type_ in EXAMPLES:
        return EXAMPLES[type_]
    try:
        return (type_(),)  # every field has a default
    except TypeError:
        return ()


def _tag(type_: type[msgspec.Struct]) -> str:
    return str(type_.__struct_config__.tag)


def _struct_types(specs: Iterable[MessageSpec]) -> list[type[msgspec.Struct]]:
    types: list[type[msgspec.Struct]] = []
    for spec in specs:
        found: list[type[msgspec.Struct]]
        if isinstance(spec, EventMessage):
            found = [EventEnvelope, *spec.types]
        elif isinstance(spec, RawMessage):
            found = []
        else:
            found = [spec]
        types += [t for t in found if t not in types]
    return types


def _parameters(address: str) -> list[str]:
    return re.findall(r"\{([a-z_]+)\}", address)


class _Builder:
    def __init__(self, channels: tuple[Channel, ...]) -> None:
        self.channels = channels
        specs = [spec for c in channels for spec in (*c.messages, *c.replies)]
        types = _struct_types(specs)
        refs, components = msgspec.json.schema_components(types, schema_hook=_schema_hook, ref_template=SCHEMA_REF)
        self.schemas: JSON = {name: _asyncapi_schema(schema) for name, schema in components.items()}
        self.names: dict[type[msgspec.Struct], str] = {}
        for type_, ref in zip(types, refs, strict=True):
            if set(ref) != {"$ref"}:
                raise ValueError(f"{type_.__name__} is not a named schema: {ref}")
            self.names[type_] = ref["$ref"].rsplit("/", 1)[1]
        self.messages: JSON = {}

    def ref(self, type_: type[msgspec.Struct]) -> JSON:
        return {"$ref": SCHEMA_REF.format(name=self.names[type_])}

    def message(self, spec: MessageSpec) -> str:
        """Add the message to components.messages once; returns its name."""
        if isinstance(spec, RawMessage):
            name, body = spec.name, self._raw(spec)
        elif isinstance(spec, EventMessage):
            name, body = spec.name, self._event(spec)
        else:
            name, body = self.names[spec], self._struct(spec)
        body = {"name": name, "title": name, **body}
        if self.messages.setdefault(name, body) != body:
            raise ValueError(f"two different messages are named {name}")
        return name

    def _struct(self, type_: type[msgspec.Struct]) -> JSON:
        body: JSON = {"contentType": JSON_CONTENT_TYPE, "payload": self.ref(type_)}
        if summary := _summary(type_):
            body["summary"] = summary
        if type_ in HEADERS:
            body["headers"] = HEADERS[type_]
        if examples := _example(type_):
            body["examples"] = [
                {"name": f"{self.names[type_]}{i + 1}", "payload": msgspec.to_builtins(e)}
                for i, e in enumerate(examples)
            ]
        return body

    def _event(self, spec: EventMessage) -> JSON:
        tags = [_tag(t) for t in spec.types]
        body: JSON = {
            "summary": spec.summary,
            "contentType": JSON_CONTENT_TYPE,
            "headers": {
                "type": "object",
                "properties": {
                    NATS_MSG_ID_HEADER: {
                        "type": "string",
                        "description": "Derived from the event id: a retried append is stored once.",
                    },
                    subjects.EVENT_TYPE_HEADER: {
                        "type": "string",
                        "enum": tags,
                        "description": "The payload's type, to filter without decoding.",
                    },
                    subjects.CORRELATION_HEADER: {
                        "type": "string",
                        "description": "The envelope's correlation id (the submission that started it).",
                    },
                    audit.CHAIN_PREV_HEADER: {
                        "type": "string",
                        "pattern": "^[0-9a-f]{64}$",
                        "description": "The chain hash of the previous event on this subject (64 zeros: the first).",
                    },
                    audit.CHAIN_HASH_HEADER: {
                        "type": "string",
                        "pattern": "^[0-9a-f]{64}$",
                        "description": "sha256 over 'duban-chain/1', the subject, the previous hash, the bytes",
                    },
                    audit.SIGNER_HEADER: {
                        "type": "string",
                        "description": "The public nkey that signed the chain hash (escalation's actions).",
                    },
                    audit.SIGNATURE_HEADER: {
                        "type": "string",
                        "description": "Hex Ed25519 signature of the chain hash by the signer.",
                    },
                },
                "required": [
                    NATS_MSG_ID_HEADER,
                    subjects.EVENT_TYPE_HEADER,
                    subjects.CORRELATION_HEADER,
                    audit.CHAIN_PREV_HEADER,
                    audit.CHAIN_HASH_HEADER,
                ],
            },
            "payload": {
                "allOf": [
                    self.ref(EventEnvelope),
                    {"properties": {"payload": {"anyOf": [self.ref(t) for t in spec.types]}}},
                ],
                "description": f"An event envelope whose payload is one of: {', '.join(tags)}.",
            },
        }
        examples = [e for e in EXAMPLES.get(EventEnvelope, ()) if isinstance(e, EventEnvelope) and e.event_type in tags]
        if examples:
            body["examples"] = [
                {
                    "name": e.event_type,
                    "headers": {
                        **subjects.event_headers(e.event_id, e.event_type, e.correlation_id),
                        **audit.chain_headers(
                            subjects.aggregate_subject(e.programme_id, e.county_code), audit.GENESIS, encode_event(e)
                        ),
                    },
                    "payload": msgspec.to_builtins(e),
                }
                for e in examples
            ]
        return body

    @staticmethod
    def _raw(spec: RawMessage) -> JSON:
        body: JSON = {"summary": spec.summary, "contentType": spec.content_type, "payload": spec.payload}
        if spec.headers is not None:
            body["headers"] = spec.headers
        if spec.examples:
            body["examples"] = [{"name": f"{spec.name}{i + 1}", "payload": e} for i, e in enumerate(spec.examples)]
        return body

    def document(self) -> JSON:
        channels: JSON = {}
        operations: JSON = {}
        replies: dict[str, JSON] = {}
        used_parameters: set[str] = set()
        for channel in self.channels:
            if channel.id in channels or channel.id == REPLIES_CHANNEL:
                raise ValueError(f"two channels are named {channel.id}")
            names = [self.message(m) for m in channel.messages]
            reply_names = [self.message(m) for m in channel.replies]
            params = _parameters(channel.address)
            unknown = [p for p in params if p not in PARAMETERS]
            if unknown:
                raise ValueError(f"channel {channel.id}: describe {unknown} in PARAMETERS")
            used_parameters.update(params)
            description = f"Published by {channel.publishers}." if channel.publishers else ""
            body: JSON = {
                "address": channel.address,
                "summary": channel.summary,
                "messages": {n: {"$ref": f"#/components/messages/{n}"} for n in names},
            }
            if description:
                body["description"] = description
            if params:
                body["parameters"] = {p: {"$ref": f"#/components/parameters/{p}"} for p in params}
            channels[channel.id] = body
            operation: JSON = {
                "action": channel.action,
                "channel": {"$ref": f"#/channels/{channel.id}"},
                "messages": [{"$ref": f"#/channels/{channel.id}/messages/{n}"} for n in names],
                "summary": channel.summary,
            }
            if description:
                operation["description"] = description
            if channel.service:
                operation["tags"] = [{"name": channel.service}]
            if reply_names:
                for n in reply_names:
                    replies[n] = {"$ref": f"#/components/messages/{n}"}
                operation["reply"] = {
                    "channel": {"$ref": f"#/channels/{REPLIES_CHANNEL}"},
                    "messages": [{"$ref": f"#/channels/{REPLIES_CHANNEL}/messages/{n}"} for n in reply_names],
                }
            operations[channel.operation_id] = operation
        channels[REPLIES_CHANNEL] = {
            "address": None,
            "summary": "Answers to requests",
            "description": (
                "The reply subject the requester gave (NATS request-reply): under its user's inbox prefix "
                "`_INBOX_<role>[_<county_code>]` (the gateway's: `_INBOX_gateway`), so one county cannot read "
                "another's answers."
            ),
            "messages": replies,
        }
        return {
            "asyncapi": ASYNCAPI_VERSION,
            "id": "urn:duban",
            "info": {
                "title": "duban 督办",
                "version": _package_version(),
                "description": DESCRIPTION,
                "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
                "tags": [{"name": n, "description": d} for n, d in SERVICE_TAGS.items()],
            },
            "defaultContentType": JSON_CONTENT_TYPE,
            "servers": _servers(),
            "channels": channels,
            "operations": operations,
            "components": {
                "schemas": self.schemas,
                "messages": self.messages,
                "parameters": {p: PARAMETERS[p] for p in sorted(used_parameters)},
                "securitySchemes": {
                    "natsUser": {
                        "type": "userPassword",
                        "description": (
                            "One NATS user per county system, operator role, the ops CLI and service "
                            "(`duban deploy nats-config`); each password comes from `DUBAN_NATS_PASSWORD_<USER>`."
                        ),
                    }
                },
            },
        }


def _servers() -> JSON:
    security = [{"$ref": "#/components/securitySchemes/natsUser"}]
    return {
        "embedded": {
            "host": EMBEDDED_NATS_HOST,
            "protocol": "nats",
            "summary": "The nats-server `duban up` starts when NATS_URL is not set",
            "description": (
                "Embedded, for one machine: JetStream with the per-user permissions; passwords generated "
                "into `.duban/secrets`; `DUBAN_EMBEDDED_NATS_PORT` moves it."
            ),
            "security": security,
        },
        "production": {
            "host": f"{{host}}:{PRODUCTION_NATS_PORT}",
            "protocol": "nats",
            "summary": "The nats-server NATS_URL names",
            "description": (
                "Production: nats-server >= 2.12.3 with `deploy/nats/nats-server.conf` (JetStream, fsync "
                "always, one user per county from `deploy/nats/auth.conf`); put TLS in front of the port."
            ),
            "variables": {"host": {"description": "The host of NATS_URL."}},
            "security": security,
        },
    }


def _package_version() -> str:
    try:
        return version("duban")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0.0.0"


def asyncapi_document() -> JSON:
    """The AsyncAPI document as a JSON-compatible dict."""
    return _Builder(CHANNELS).document()


def render_asyncapi() -> str:
    """The document as committed: pretty, keys sorted, UTF-8 as is, trailing newline."""
    return json.dumps(asyncapi_document(), ensure_ascii=False, indent=2, sort_keys=True) + "\n"


def write_asyncapi(path: Path = ASYNCAPI_PATH) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_asyncapi(), encoding="utf-8")
    return path
