"""Answers to the ledger's queries, built from folded county ledgers on a given day. Pure."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from zoneinfo import ZoneInfo

import msgspec

from contracts.events import EventEnvelope
from contracts.facts import CountyFacts, new_facts
from contracts.ledger import (
    CountyDetail,
    CountyHistory,
    CountyRow,
    Finding,
    HistoryEntry,
    MilestoneDetail,
    MilestoneInfo,
    OverdueItem,
    OverdueList,
    ProgressTable,
    ReviewState,
    Status,
)
from contracts.programme import County, Programme
from contracts.readiness import readiness
from contracts.workdays import WorkdayCalendar
from services.ledger.status import LightSettings, milestone_status, period_status


class ViewContext:
    """The day a view is judged on, and how."""

    def __init__(
        self, programme: Programme, as_of: dt.datetime, calendar: WorkdayCalendar, settings: LightSettings
    ) -> None:
        self.programme = programme
        self.as_of = as_of
        self.today = as_of.astimezone(ZoneInfo(programme.programme.timezone)).date()
        self.calendar = calendar
        self.settings = settings

    def county_row(self, county: County, ledger: CountyFacts) -> CountyRow:
        statuses = tuple(
            milestone_status(self.programme, ledger, m, self.today, self.calendar, self.settings)
            for m in self.programme.milestones
        )
        return CountyRow(
            county_code=county.code,
            county_name=county.name,
            responsible_unit=county.responsible_unit,
            responsible_person=county.responsible_person.name,
            milestones=statuses,
            progress_tables={
                period: period_status(self.programme, ledger, period, self.today)
                for period in self.programme.reporting_periods()
            },
            open_findings=len(ledger.findings),
            readiness=readiness(
                self.programme,
                ledger,
                self.today,
                self.calendar,
                roll_rest_days=self.settings.roll_rest_day_deadlines,
            ),
        )


def _ledger_of(programme: Programme, ledgers: Mapping[str, CountyFacts], county_code: str) -> CountyFacts:
    return ledgers.get(county_code) or new_facts(programme, county_code)


def progress_table(ctx: ViewContext, ledgers: Mapping[str, CountyFacts]) -> ProgressTable:
    programme = ctx.programme
    return ProgressTable(
        programme_id=programme.id,
        title=programme.programme.title,
        as_of=ctx.as_of,
        today=ctx.today,
        roll_rest_day_deadlines=ctx.settings.roll_rest_day_deadlines,
        due_soon_workdays=ctx.settings.due_soon_workdays,
        milestones=tuple(
            MilestoneInfo(
                milestone_id=m.id,
                phase=next((p.name for p in programme.phases if p.id == m.phase), m.phase),
                title=m.title,
                task=m.task,
                deadline=m.deadline,
                deadline_text=m.deadline_text,
            )
            for m in programme.milestones
        ),
        counties=tuple(ctx.county_row(c, _ledger_of(programme, ledgers, c.code)) for c in programme.counties),
        report_title=programme.progress_table.title,
    )


def county_detail(ctx: ViewContext, county: County, ledger: CountyFacts) -> CountyDetail:
    row = ctx.county_row(county, ledger)
    programme = ctx.programme
    details = []
    for status, milestone in zip(row.milestones, programme.milestones, strict=True):
        facts = ledger.milestones[milestone.id]
        details.append(
            MilestoneDetail(
                status=status,
                title=milestone.title,
                steps_done=tuple(facts.steps_done),
                evidence=tuple(facts.evidence),
                completed_via=facts.completed_via,
                extension_requested=facts.extension_requested,
                reported_at=facts.reported_at,
            )
        )
    return CountyDetail(
        programme_id=programme.id,
        as_of=ctx.as_of,
        today=ctx.today,
        county=row,
        milestones=tuple(details),
        reviews=tuple(
            ReviewState(
                review_kind=r.review_kind,
                name=_review_name(programme, r.review_kind),
                state=r.state,
                requested_on=r.requested_on,
                decided_on=r.decided_on,
                approval_document_number=r.approval_document_number,
                comments=r.comments,
            )
            for r in ledger.reviews.values()
        ),
        findings=tuple(Finding(**msgspec.structs.asdict(f)) for f in ledger.findings),
        trial_started_on=ledger.trial_started_on,
        retracted_submissions=tuple(ledger.retracted),
        readiness=row.readiness,
    )


def _review_name(programme: Programme, kind: str) -> str:
    review = programme.review(kind)
    return review.name if review else kind


def overdue_list(ctx: ViewContext, ledgers: Mapping[str, CountyFacts]) -> OverdueList:
    table = progress_table(ctx, ledgers)
    titles = {m.milestone_id: m.title for m in table.milestones}
    items = [
        OverdueItem(
            county_code=row.county_code,
            county_name=row.county_name,
            responsible_person=row.responsible_person,
            milestone_id=s.milestone_id,
            title=titles[s.milestone_id],
            effective_deadline=s.effective_deadline,
            workdays_overdue=-s.workdays_left,
        )
        for row in table.counties
        for s in row.milestones
        if s.status is Status.OVERDUE
    ]
    items.sort(key=lambda i: (-i.workdays_overdue, i.county_code, i.milestone_id))
    return OverdueList(programme_id=ctx.programme.id, as_of=ctx.as_of, items=tuple(items))


def county_history(
    programme: Programme, county_code: str, events: Iterable[tuple[int, EventEnvelope]], retracted: set[str]
) -> CountyHistory:
    entries = tuple(
        HistoryEntry(
            stream_sequence=seq,
            event_id=e.event_id,
            event_type=e.event_type,
            occurred_at=e.occurred_at,
            recorded_at=e.recorded_at,
            actor_role=e.actor.role,
            actor_user=e.actor.user,
            submission_id=e.submission_id,
            retracted=e.submission_id in retracted,
            summary=summarise(programme, e),
            payload=msgspec.to_builtins(e.payload),
        )
        for seq, e in events
    )
    return CountyHistory(programme_id=programme.id, county_code=county_code, entries=entries)


_CHANNEL_ZH = {"sms": "短信", "email": "电子邮件", "webhook": "接口推送", "file": "演示文件"}


def summarise(programme: Programme, e: EventEnvelope) -> str:
    """One line in Chinese saying what the event records."""
    p = msgspec.to_builtins(e.payload)
    milestone = programme.milestone(str(p.get("milestone_id", "")))
    m = f"{milestone.id}《{milestone.title}》" if milestone else ""
    r = _review_name(programme, str(p.get("review_kind", "")))
    who = f"{p.get('recipient_id')}（{_CHANNEL_ZH.get(str(p.get('channel')), p.get('channel'))}）"
    texts = {
        "progress_reported": f"报告{m}进度{p.get('percent')}%",
        "milestone_completed": f"{m}完成于{p.get('completed_on')}",
        "review_requested": f"申请{r}",
        "review_decided": f"{r}{'通过' if p.get('outcome') == 'passed' else '退回修改'}",
        "trial_operation_started": f"系统于{p.get('started_on')}开始试运行",
        "progress_table_filed": f"报送{p.get('period')}督查进度一览表",
        "trial_operation_reported": (
            f"报送{p.get('period')}试运行月报：上报{p.get('cases_reported')}件，立案{p.get('cases_registered')}件，"
            f"结案{p.get('cases_closed')}件（按期{p.get('cases_closed_on_time')}件）"
        ),
        "extension_requested": f"申请{m}延期至{p.get('proposed_deadline')}",
        "extension_decided": (
            f"{m}延期{'获批至' + str(p.get('new_deadline')) if p.get('outcome') == 'granted' else '未获批准'}"
        ),
        "submission_retracted": f"撤回报送{p.get('retracted_submission_id')}",
        "procedure_finding_recorded": f"程序问题：{p.get('finding_zh')}",
        "action_issued": f"发出“{p.get('level_name')}”{m}",
        "action_proposed": f"拟“{p.get('level_name')}”{m}（待市级确认）",
        "action_confirmed": f"{p.get('operator')}确认督办事项",
        "action_waived": f"{p.get('operator')}免予处理：{p.get('reason')}",
        "notification_queued": f"通知{who}已排队",
        "notification_sent": f"已通知{who}，{p.get('address_masked')}",
        "notification_delivered": f"{who}已收到",
        "notification_failed": f"通知{who}失败：{p.get('detail')}",
    }
    return texts.get(e.event_type, e.event_type)
