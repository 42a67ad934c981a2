"""The ledger's answers as rich renderables for the terminal. Nothing here prints.

Colours follow the ledger's traffic light (green on track or done, yellow due soon, red overdue
or done late); the texts are those of the Excel report (:mod:`services.ledger.report`).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from zoneinfo import ZoneInfo

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from contracts.escalation import ActionList
from contracts.ledger import (
    CountyDetail,
    CountyHistory,
    Light,
    MilestoneDetail,
    MilestoneStatus,
    OverdueList,
    PeriodStatus,
    ProgressTable,
)
from contracts.programme import Programme
from services.escalation.replay import WhatIf
from services.ledger.report import (
    LIGHT_ZH,
    PERIOD_ZH,
    as_of_text,
    cell_notes,
    period_label,
    report_title,
    settings_text,
    status_text,
)

DISPLAY_TZ = ZoneInfo("Asia/Shanghai")

LIGHT_STYLES: dict[Light, str] = {Light.GREEN: "green", Light.YELLOW: "bold yellow", Light.RED: "bold red"}
PERIOD_STYLES: dict[PeriodStatus, str] = {
    PeriodStatus.ON_TIME: "green",
    PeriodStatus.LATE: "yellow",
    PeriodStatus.MISSING: "bold red",
    PeriodStatus.NOT_DUE: "dim",
}
ROLE_ZH: dict[str, str] = {"county": "县", "city": "市", "province": "省", "system": "系统"}
EVENT_ZH: dict[str, str] = {
    "progress_reported": "报告进度",
    "milestone_completed": "节点完成",
    "review_requested": "申请审查",
    "review_decided": "审查决定",
    "trial_operation_started": "开始试运行",
    "trial_operation_reported": "试运行月报",
    "progress_table_filed": "报送一览表",
    "extension_requested": "申请延期",
    "extension_decided": "延期决定",
    "submission_retracted": "撤回报送",
    "procedure_finding_recorded": "程序问题",
}
REVIEW_STATE_ZH: dict[str, str] = {"requested": "审查中", "passed": "通过", "returned": "退回修改"}


def _status_cell(status: MilestoneStatus, notes: list[str]) -> Text:
    text = Text(status_text(status), style=LIGHT_STYLES[status.light])
    for note in notes:
        text.append("\n" + note, style="dim")
    return text


def legend() -> Text:
    text = Text("图例：")
    for light in Light:
        text.append("■ ", style=LIGHT_STYLES[light])
        text.append(f"{LIGHT_ZH[light]}  ")
    return text


def table_view(table: ProgressTable, *, title: str | None = None) -> RenderableType:
    """The 督查进度一览表: milestones as rows, counties as columns, statuses coloured by light."""
    grid = Table(show_lines=True, expand=False)
    grid.add_column("序号", justify="center", no_wrap=True)
    grid.add_column("阶段", no_wrap=True)
    grid.add_column("建设任务")
    grid.add_column("完成时限", no_wrap=True)
    for county in table.counties:
        grid.add_column(f"{county.county_name}\n{county.responsible_person}", justify="center")
    for milestone in table.milestones:
        cells: list[RenderableType] = [
            milestone.milestone_id,
            milestone.phase,
            milestone.title,
            milestone.deadline_text or milestone.deadline.isoformat(),
        ]
        for county in table.counties:
            status = next((s for s in county.milestones if s.milestone_id == milestone.milestone_id), None)
            if status is None:
                cells.append(Text("—", style="dim"))
            else:
                cells.append(_status_cell(status, cell_notes(status, with_note=False)))
        grid.add_row(*cells)
    heading = Text(title or report_title(table), style="bold")
    setting = Text(f"{as_of_text(table)}　{settings_text(table)}", style="dim")
    return Group(heading, setting, grid, legend())


def _filings_line(detail: CountyDetail) -> Text:
    periods = detail.county.progress_tables
    counts = Counter(periods.values())
    text = Text("督查进度一览表报送：")
    for status in (PeriodStatus.ON_TIME, PeriodStatus.LATE, PeriodStatus.MISSING):
        text.append(f"{PERIOD_ZH[status]}{counts.get(status, 0)}期  ", style=PERIOD_STYLES[status])
    missing = [period_label(p) for p, s in sorted(periods.items()) if s == PeriodStatus.MISSING]
    if missing:
        text.append("未报：" + "、".join(missing), style="red")
    return text


def county_view(detail: CountyDetail) -> RenderableType:
    """One county: who answers for it, each milestone, reviews, findings, filings."""
    row = detail.county
    d = detail.today
    head = Text()
    head.append(f"{row.county_name}（{row.county_code}）", style="bold")
    head.append(f"　责任单位：{row.responsible_unit}　责任人：{row.responsible_person}")
    head.append(f"\n截至{d.year}年{d.month}月{d.day}日　程序问题：{row.open_findings}项")
    if detail.trial_started_on is not None:
        head.append(f"　试运行开始：{detail.trial_started_on.isoformat()}")
    ready = detail.readiness
    if ready is not None and ready.trial_started_on is not None and ready.earliest_pre_acceptance is not None:
        head.append(
            f"\n验收准备：稳定运行{ready.stable_months}/{ready.stable_months_required}个月，"
            f"最早可于{ready.earliest_pre_acceptance.isoformat()}申请预验收"
        )
        for slack in ready.deadlines:
            if slack.completed_on is None and slack.slack_workdays is not None:
                head.append(f"，{slack.milestone_id}余量{slack.slack_workdays}个工作日")
        if ready.missing:
            head.append(f"\n尚缺：{'；'.join(ready.missing)}", style="yellow")

    milestones = Table(title="建设任务", show_lines=False)
    for name in ("序号", "建设任务", "状态", "截止日期", "剩余工作日", "完成日期", "已完成步骤", "材料", "备注"):
        milestones.add_column(name, no_wrap=name in ("序号", "截止日期", "完成日期"))
    for m in detail.milestones:
        s = m.status
        left = "" if s.completed_on is not None else str(s.workdays_left)
        milestones.add_row(
            s.milestone_id,
            m.title,
            Text(status_text(s), style=LIGHT_STYLES[s.light]),
            s.effective_deadline.isoformat(),
            Text(left, style="red" if s.workdays_left < 0 and left else ""),
            s.completed_on.isoformat() if s.completed_on else "",
            "、".join(m.steps_done),
            str(len(m.evidence)) if m.evidence else "",
            "；".join(_detail_notes(m)),
        )

    parts: list[RenderableType] = [Panel(head, expand=False), milestones]
    if detail.reviews:
        reviews = Table(title="审查")
        for name in ("审查", "状态", "申请日期", "决定日期", "批复文号", "意见"):
            reviews.add_column(name)
        for r in detail.reviews:
            state_style = {"passed": "green", "returned": "red"}.get(r.state, "yellow")
            reviews.add_row(
                r.name,
                Text(REVIEW_STATE_ZH.get(r.state, r.state), style=state_style),
                r.requested_on.isoformat() if r.requested_on else "",
                r.decided_on.isoformat() if r.decided_on else "",
                r.approval_document_number or "",
                r.comments,
            )
        parts.append(reviews)
    if detail.findings:
        findings = Table(title="程序问题", title_style="bold red")
        for name in ("节点", "问题", "规则", "记录时间", "说明"):
            findings.add_column(name)
        for f in detail.findings:
            findings.add_row(
                f.milestone_id or "", Text(f.finding_zh, style="red"), f.rule_id, _when(f.recorded_at), f.detail
            )
        parts.append(findings)
    parts.append(_filings_line(detail))
    if detail.retracted_submissions:
        parts.append(Text("已撤回报送：" + "、".join(detail.retracted_submissions), style="dim"))
    return Group(*parts)


def _detail_notes(milestone: MilestoneDetail) -> list[str]:
    notes = cell_notes(milestone.status)
    if milestone.extension_requested is not None:
        notes.append(f"申请延期至{milestone.extension_requested.isoformat()}（待批）")
    return notes


def _when(instant: dt.datetime, tz: ZoneInfo = DISPLAY_TZ) -> str:
    return instant.astimezone(tz).strftime("%Y-%m-%d %H:%M")


def history_view(history: CountyHistory, *, tz: ZoneInfo = DISPLAY_TZ) -> RenderableType:
    """A county's events, one line each; retracted ones struck through and dimmed."""
    grid = Table(title=f"{history.county_code} 事件记录（{history.programme_id}）", show_lines=False)
    for name, no_wrap in (
        ("序号", True),
        ("发生时间", True),
        ("记录时间", True),
        ("操作方", True),
        ("类型", True),
        ("摘要", False),
    ):
        grid.add_column(name, no_wrap=no_wrap)
    for e in history.entries:
        actor = ROLE_ZH.get(e.actor_role, e.actor_role) + (f"/{e.actor_user}" if e.actor_user else "")
        kind = EVENT_ZH.get(e.event_type, e.event_type)
        summary = e.summary + ("（已撤回）" if e.retracted else "")
        grid.add_row(
            str(e.stream_sequence),
            _when(e.occurred_at, tz),
            _when(e.recorded_at, tz),
            actor,
            kind,
            summary,
            style="dim strike" if e.retracted else None,
        )
    if not history.entries:
        return Group(grid, Text("无事件记录", style="dim"))
    return grid


def overdue_view(overdue: OverdueList) -> RenderableType:
    """The milestones past their effective deadline and not done, with who answers for each."""
    when = _when(overdue.as_of)
    if not overdue.items:
        return Text(f"截至{when}，无逾期未完成事项。", style="green")
    grid = Table(title=f"逾期未完成事项（截至{when}）", title_style="bold red")
    for name in ("县", "责任人", "序号", "建设任务", "截止日期", "逾期工作日"):
        grid.add_column(name, no_wrap=name != "建设任务")
    for item in overdue.items:
        grid.add_row(
            item.county_name,
            item.responsible_person,
            item.milestone_id,
            item.title,
            item.effective_deadline.isoformat(),
            Text(str(item.workdays_overdue), style="bold red"),
        )
    return Group(grid, Text(f"共{len(overdue.items)}项", style="dim"))


_ACTION_STATE_ZH = {"issued": "已发出", "proposed": "待确认", "waived": "已免予处理"}
_ACTION_STATE_STYLE = {"issued": "green", "proposed": "bold yellow", "waived": "dim"}


def actions_view(actions: ActionList) -> RenderableType:
    """Accountability actions, oldest first: state, level, county, subject, explanation."""
    grid = Table(title="督办事项", show_lines=False, expand=False)
    for column in ("应发日期", "状态", "事项", "县", "任务/期", "编号", "说明"):
        grid.add_column(column, overflow="fold")
    for a in actions.items:
        grid.add_row(
            a.due_on.isoformat(),
            Text(_ACTION_STATE_ZH.get(a.state, a.state), style=_ACTION_STATE_STYLE.get(a.state, "")),
            a.level_name,
            a.county_code,
            a.milestone_id or a.period or "",
            Text(a.action_id, style="dim"),
            a.explanation_zh + (f"（{a.decided_by}：{a.waive_reason}）" if a.waive_reason else ""),
        )
    if not actions.items:
        return Text("无督办事项")
    return Group(
        grid,
        Text(f"共{len(actions.items)}项；待确认{sum(a.state == 'proposed' for a in actions.items)}项", style="dim"),
    )


def whatif_view(programme: Programme, before: str, after: str, diff: WhatIf) -> RenderableType:
    """What another policy would change: added, removed, moved actions."""
    names = {c.code: c.name for c in programme.counties}
    grid = Table(title=f"{programme.id}：督办政策 {before} → {after}")
    for column in ("变化", "县", "事项", "任务/期", "日期"):
        grid.add_column(column)
    for r in diff.added:
        grid.add_row(
            Text("新增", style="red"),
            names.get(r.county_code, r.county_code),
            r.action.level_name,
            r.action.milestone_id or r.action.period or "",
            r.day.isoformat(),
        )
    for r in diff.removed:
        grid.add_row(
            Text("取消", style="green"),
            names.get(r.county_code, r.county_code),
            r.action.level_name,
            r.action.milestone_id or r.action.period or "",
            r.day.isoformat(),
        )
    for old, new in diff.moved:
        grid.add_row(
            Text("改期", style="yellow"),
            names.get(new.county_code, new.county_code),
            new.action.level_name,
            new.action.milestone_id or new.action.period or "",
            f"{old.day.isoformat()} → {new.day.isoformat()}",
        )
    counts = f"新增{len(diff.added)}项，取消{len(diff.removed)}项，改期{len(diff.moved)}项"
    return Group(grid, Text(counts, style="bold"))
