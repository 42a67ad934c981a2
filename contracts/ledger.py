"""The ledger's queries and answers: the 督查进度一览表, a county's detail and history, the
overdue list, all as of now or any past moment. Request-reply on ``duban.query.ledger.*``.
"""

from __future__ import annotations

import datetime as dt
import enum

from contracts.identifiers import CountyCode, Instant, ProgrammeId
from contracts.payloads import Document, Fields
from contracts.readiness import Readiness

QUERY_PREFIX = "duban.query.ledger"
TABLE_SUBJECT = f"{QUERY_PREFIX}.table"
COUNTY_SUBJECT = f"{QUERY_PREFIX}.county"
HISTORY_SUBJECT = f"{QUERY_PREFIX}.history"
OVERDUE_SUBJECT = f"{QUERY_PREFIX}.overdue"
REPORT_SUBJECT = f"{QUERY_PREFIX}.report"
LEDGER_SERVICE = "duban-ledger"
XLSX_CONTENT_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"  # the report's answer


class Status(enum.StrEnum):
    NOT_STARTED = "not_started"
    IN_PROGRESS = "in_progress"
    AWAITING_REVIEW = "awaiting_review"
    DONE = "done"
    DONE_LATE = "done_late"
    OVERDUE = "overdue"


STATUS_ZH: dict[Status, str] = {
    Status.NOT_STARTED: "未开始",
    Status.IN_PROGRESS: "推进中",
    Status.AWAITING_REVIEW: "待审查",
    Status.DONE: "已完成",
    Status.DONE_LATE: "逾期完成",
    Status.OVERDUE: "逾期未完成",
}


class Light(enum.StrEnum):
    GREEN = "green"  # on track, or done on time
    YELLOW = "yellow"  # due soon
    RED = "red"  # overdue, or done late


class PeriodStatus(enum.StrEnum):
    ON_TIME = "on_time"
    LATE = "late"
    MISSING = "missing"  # due and not filed
    NOT_DUE = "not_due"


# -- queries -------------------------------------------------------------------------------------
class TableQuery(Fields, frozen=True):
    programme_id: ProgrammeId | None = None  # None: the only (or first) programme
    as_of: Instant | None = None  # None: now


class CountyQuery(Fields, frozen=True):
    county_code: CountyCode
    programme_id: ProgrammeId | None = None
    as_of: Instant | None = None


# -- answers -------------------------------------------------------------------------------------
class MilestoneStatus(Fields, frozen=True):
    milestone_id: str
    status: Status
    light: Light
    deadline: dt.date  # the ledger's
    effective_deadline: dt.date  # after a granted extension and the rest-day roll
    workdays_left: int  # negative: working days overdue
    percent: int
    completed_on: dt.date | None
    note: str
    open_findings: int


class MilestoneInfo(Fields, frozen=True):
    milestone_id: str
    phase: str
    title: str
    task: str
    deadline: dt.date
    deadline_text: str


class CountyRow(Fields, frozen=True):
    county_code: str
    county_name: str
    responsible_unit: str
    responsible_person: str
    milestones: tuple[MilestoneStatus, ...]
    progress_tables: dict[str, PeriodStatus]  # period -> status
    open_findings: int
    readiness: Readiness | None = None  # acceptance readiness (验收准备), see contracts.readiness


class ProgressTable(Fields, frozen=True):
    programme_id: str
    title: str  # the programme's (the notice's) title
    as_of: Instant
    today: dt.date  # the local day the lights are judged on
    roll_rest_day_deadlines: bool
    due_soon_workdays: int
    milestones: tuple[MilestoneInfo, ...]
    counties: tuple[CountyRow, ...]
    report_title: str = ""  # the table's own name, when the programme gives it


class ReviewState(Fields, frozen=True):
    review_kind: str
    name: str
    state: str  # requested | passed | returned
    requested_on: dt.date | None
    decided_on: dt.date | None
    approval_document_number: str | None
    comments: str


class Finding(Fields, frozen=True):
    event_id: str
    rule_id: str
    finding_zh: str
    finding_en: str
    detail: str
    milestone_id: str | None
    recorded_at: Instant


class MilestoneDetail(Fields, frozen=True):
    status: MilestoneStatus
    title: str
    steps_done: tuple[str, ...]
    evidence: tuple[Document, ...]
    completed_via: str | None
    extension_requested: dt.date | None
    reported_at: Instant | None


class CountyDetail(Fields, frozen=True):
    programme_id: str
    as_of: Instant
    today: dt.date
    county: CountyRow
    milestones: tuple[MilestoneDetail, ...]
    reviews: tuple[ReviewState, ...]
    findings: tuple[Finding, ...]
    trial_started_on: dt.date | None
    retracted_submissions: tuple[str, ...]
    # Trial operation month by month, the earliest day to apply for pre-acceptance, what is
    # missing and the slack to the acceptance deadlines (the same as ``county.readiness``).
    readiness: Readiness | None = None


class HistoryEntry(Fields, frozen=True):
    stream_sequence: int
    event_id: str
    event_type: str
    occurred_at: Instant
    recorded_at: Instant
    actor_role: str
    actor_user: str | None
    submission_id: str
    retracted: bool
    summary: str  # one line in Chinese
    payload: dict[str, object]


class CountyHistory(Fields, frozen=True):
    programme_id: str
    county_code: str
    entries: tuple[HistoryEntry, ...]


class OverdueItem(Fields, frozen=True):
    county_code: str
    county_name: str
    responsible_person: str
    milestone_id: str
    title: str
    effective_deadline: dt.date
    workdays_overdue: int


class OverdueList(Fields, frozen=True):
    programme_id: str
    as_of: Instant
    items: tuple[OverdueItem, ...]


class QueryError(Fields, frozen=True):
    code: str  # bad_request | unknown_programme | unknown_county | unavailable
    message_zh: str
    message_en: str
    detail: str = ""


OPS_PREFIX = "duban.ops.ledger"
REBUILD_SUBJECT = f"{OPS_PREFIX}.rebuild"
PROJECTION_STATUS_SUBJECT = f"{OPS_PREFIX}.status"
PARKED_SUBJECT = f"{OPS_PREFIX}.parked"  # events the ledger could not apply (ParkedList)
AUDIT_SUBJECT = f"{OPS_PREFIX}.audit"  # the read model compared with the stream (contracts.audit.ReadModelAudit)
REPLAY_PARKED_SUBJECT = f"{OPS_PREFIX}.replay-parked"  # try them again after a fix (ReplayParkedReport)


class RebuildReport(Fields, frozen=True):
    events: int
    last_sequence: int
    seconds: float
    events_per_second: float


class ProjectionStatus(Fields, frozen=True):
    checkpoint: int  # last stream sequence applied to the read model
    stream_last_sequence: int
    lag: int  # events appended and not yet applied
