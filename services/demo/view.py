"""The demo's live terminal view: pure rich renderables. Nothing here prints, waits or talks to NATS.

:class:`DemoView` is fed what the runner observes — the simulated day and its captions, the
ledger's progress table after each day, every stored event — and renders on demand: a header
(the simulated date, how far through 2017–2018, the speed), the progress table (counties ×
milestones, coloured by the ledger's traffic light, with the progress-table periods missing),
the latest accountability actions and notifications, and the captions of recent story steps.
At the end, :meth:`DemoView.summary` tallies per county: actions by level, decisions, findings,
notifications. Colours and texts follow ``duban status`` (:mod:`services.cli.render`).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from contracts.events import (
    ActionConfirmed,
    ActionIssued,
    ActionProposed,
    ActionWaived,
    EventEnvelope,
    NotificationDelivered,
    NotificationFailed,
    NotificationSent,
    ProcedureFindingRecorded,
)
from contracts.ledger import CountyRow, Light, MilestoneStatus, PeriodStatus, ProgressTable, Status
from contracts.programme import Programme
from services.cli.render import LIGHT_STYLES, PERIOD_STYLES, legend
from services.ledger.report import extended_to

DISPLAY_TZ = ZoneInfo("Asia/Shanghai")
WEEKDAYS_ZH = ("一", "二", "三", "四", "五", "六", "日")

# The ledger's statuses, short enough for nine columns.
STATUS_SHORT: dict[Status, str] = {
    Status.NOT_STARTED: "未开始",
    Status.IN_PROGRESS: "推进中",
    Status.AWAITING_REVIEW: "待审查",
    Status.DONE: "已完成",
    Status.DONE_LATE: "逾期完成",
    Status.OVERDUE: "逾期未完成",
}
# Level names as the feed shows them (the policy's own names are sentences for two of them).
LEVEL_SHORT: dict[str, str] = {
    "missed_table_criticism": "通报批评（一览表）",
    "second_offence_talk": "约谈（再次通报）",
    "procedure_notice": "程序问题提示",
    "provincial_measures": "省级问责建议",
    "missed_trial_report_criticism": "通报批评（试运行月报）",
    "readiness_warning": "验收准备预警",
}
# The order of the summary's levels: the default ladder, then anything else by name.
LEVEL_ORDER = (
    "reminder",
    "urgent_reminder",
    "overdue_notice",
    "public_criticism",
    "admonitory_talk",
    "missed_table_criticism",
    "second_offence_talk",
    "procedure_notice",
    "missed_trial_report_criticism",
    "readiness_warning",
    "provincial_measures",
)
LEVEL_STYLES: dict[str, str] = {
    "reminder": "cyan",
    "urgent_reminder": "yellow",
    "overdue_notice": "red",
    "public_criticism": "bold red",
    "admonitory_talk": "bold red",
    "missed_table_criticism": "bold red",
    "second_offence_talk": "bold red",
    "procedure_notice": "magenta",
    "missed_trial_report_criticism": "bold red",
    "readiness_warning": "yellow",
    "provincial_measures": "bold white on red",
}
STATE_ZH: dict[str, str] = {"issued": "发出", "proposed": "待确认", "confirmed": "已确认", "waived": "免予处理"}
STATE_STYLES: dict[str, str] = {"issued": "green", "proposed": "bold yellow", "confirmed": "bold red", "waived": "dim"}
# The demo writes its SMS to a file (the "file" channel).
CHANNEL_ZH: dict[str, str] = {"sms": "短信", "email": "邮件", "file": "短信", "webhook": "接口"}
OUTCOME_ZH: dict[str, str] = {"sent": "已发送", "delivered": "已送达", "failed": "失败"}
OUTCOME_STYLES: dict[str, str] = {"sent": "green", "delivered": "bold green", "failed": "bold red"}
FINDING_MARK = "!"  # a milestone with an open procedure finding
EXTENDED_MARK = "延"  # a milestone whose deadline a granted extension moved


@dataclass(frozen=True)
class ActionLine:
    """One accountability event as the feed shows it."""

    day: dt.date
    county_code: str
    level_id: str
    level_name: str
    state: str  # issued | proposed | confirmed | waived
    subject: str  # milestone or period
    text: str  # the explanation's first sentence, or the operator's decision


@dataclass(frozen=True)
class NotificationLine:
    day: dt.date
    county_code: str
    channel: str
    address_masked: str
    outcome: str  # sent | delivered | failed
    action: str  # the action's level and subject
    detail: str


@dataclass
class CountyTally:
    """What happened to one county: its actions (by id: level, state), findings, notifications."""

    code: str
    name: str
    actions: dict[str, tuple[str, str]] = field(default_factory=dict)  # action id -> (level id, state)
    level_names: dict[str, str] = field(default_factory=dict)  # level id -> name
    findings: int = 0
    notifications: Counter[str] = field(default_factory=Counter)  # sent | delivered | failed

    def by_level(self) -> Counter[str]:
        """Actions per level id (each action once, whatever became of it)."""
        return Counter(level for level, _ in self.actions.values())

    def by_state(self) -> Counter[str]:
        return Counter(state for _, state in self.actions.values())


@dataclass(frozen=True)
class _Known:
    level_id: str
    level_name: str
    subject: str


class DemoView:
    """The state of the live view; :meth:`render` draws it, :meth:`summary` tallies the end."""

    def __init__(
        self,
        programme: Programme,
        *,
        start: dt.date,
        end: dt.date,
        speed: float = 0.0,
        max_actions: int = 8,
        max_notifications: int = 6,
        max_captions: int = 6,
    ) -> None:
        self.programme = programme
        self.start = start
        self.end = end
        self.speed = speed
        self.day: dt.date | None = None
        self.table: ProgressTable | None = None
        self.names = {c.code: c.name for c in programme.counties}
        self.actions: deque[ActionLine] = deque(maxlen=max_actions)
        self.notifications: deque[NotificationLine] = deque(maxlen=max_notifications)
        self.captions: deque[tuple[dt.date, str]] = deque(maxlen=max_captions)
        self.counties = {c.code: CountyTally(c.code, c.name) for c in programme.counties}
        self._known: dict[str, _Known] = {}  # action id -> what it is, for decisions and notifications

    # -- feeding -----------------------------------------------------------------------------------
    def set_day(self, day: dt.date, captions: str | Iterable[str] = ()) -> None:
        """The simulated day now shown, and the captions of the steps played on it."""
        self.day = day
        for caption in [captions] if isinstance(captions, str) else captions:
            if caption:
                self.captions.append((day, caption))

    def set_speed(self, speed: float) -> None:
        self.speed = speed

    def update_table(self, table: ProgressTable) -> None:
        self.table = table
        for row in table.counties:
            self.names[row.county_code] = row.county_name

    def observe(self, kind: str, value: object) -> None:
        """The runner's observer: ("day", (date, captions)), ("table", ProgressTable), ("event", envelope)."""
        if kind == "day" and isinstance(value, tuple):
            day, captions = value
            self.set_day(day, captions)
        elif kind == "table" and isinstance(value, ProgressTable):
            self.update_table(value)
        elif kind == "event" and isinstance(value, EventEnvelope):
            self.add_event(value)

    def add_event(self, envelope: EventEnvelope) -> None:
        """Any stored event: actions and notification outcomes go to their feeds, findings are
        counted; everything else is left to the progress table."""
        payload = envelope.payload
        if isinstance(payload, ActionIssued | ActionProposed | ActionConfirmed | ActionWaived):
            self.add_action(envelope)
        elif isinstance(payload, NotificationSent | NotificationDelivered | NotificationFailed):
            self.add_notification(envelope)
        elif isinstance(payload, ProcedureFindingRecorded):
            self._tally(envelope.county_code).findings += 1

    def add_action(self, envelope: EventEnvelope) -> None:
        payload = envelope.payload
        tally = self._tally(envelope.county_code)
        day = _local_day(envelope)
        if isinstance(payload, ActionIssued | ActionProposed):
            subject = payload.milestone_id or payload.period or ""
            self._known[payload.action_id] = _Known(payload.level_id, payload.level_name, subject)
            tally.level_names[payload.level_id] = payload.level_name
            if isinstance(payload, ActionIssued) and payload.confirmed_by is not None:
                already = tally.actions.get(payload.action_id, ("", ""))[1] == "confirmed"
                tally.actions[payload.action_id] = (payload.level_id, "confirmed")
                if already:
                    return  # the confirmation is on the feed already
                state, text = "confirmed", f"{payload.confirmed_by}确认，发出"
            else:
                state = "issued" if isinstance(payload, ActionIssued) else "proposed"
                tally.actions[payload.action_id] = (payload.level_id, state)
                text = _first_sentence(payload.explanation_zh)
            self.actions.append(
                ActionLine(day, envelope.county_code, payload.level_id, payload.level_name, state, subject, text)
            )
            return
        if not isinstance(payload, ActionConfirmed | ActionWaived):
            return
        known = self._known.get(payload.action_id) or _from_action_id(payload.action_id)
        if isinstance(payload, ActionConfirmed):
            state, text = "confirmed", f"{payload.operator}确认" + (f"：{payload.note}" if payload.note else "")
        else:
            state, text = "waived", f"{payload.operator}免予处理：{payload.reason}"
        tally.actions[payload.action_id] = (known.level_id, state)
        tally.level_names.setdefault(known.level_id, known.level_name)
        self.actions.append(
            ActionLine(day, envelope.county_code, known.level_id, known.level_name, state, known.subject, text)
        )

    def add_notification(self, envelope: EventEnvelope) -> None:
        payload = envelope.payload
        if not isinstance(payload, NotificationSent | NotificationDelivered | NotificationFailed):
            return
        outcome = envelope.event_type.removeprefix("notification_")
        self._tally(envelope.county_code).notifications[outcome] += 1
        known = self._known.get(payload.action_id) or _from_action_id(payload.action_id)
        about = _level_text(known.level_id, known.level_name) + (f" {known.subject}" if known.subject else "")
        self.notifications.append(
            NotificationLine(
                _local_day(envelope),
                envelope.county_code,
                payload.channel,
                payload.address_masked,
                outcome,
                about,
                payload.detail,
            )
        )

    def tallies(self) -> dict[str, CountyTally]:
        return dict(self.counties)

    def _tally(self, county_code: str) -> CountyTally:
        if county_code not in self.counties:
            self.counties[county_code] = CountyTally(county_code, self.names.get(county_code, county_code))
        return self.counties[county_code]

    # -- drawing -----------------------------------------------------------------------------------
    def render(self) -> RenderableType:
        return Group(
            self._header(),
            Panel(self._table(), title="督查进度一览表", title_align="left", border_style="blue"),
            Panel(self._actions(), title="督办事项（最新在上）", title_align="left", border_style="red"),
            Panel(self._notifications(), title="通知（最新在上）", title_align="left", border_style="green"),
            Panel(self._captions(), title="进展", title_align="left", border_style="dim"),
        )

    def _header(self) -> RenderableType:
        total = (self.end - self.start).days + 1
        day = self.day or self.start
        done = min(max((day - self.start).days + 1, 0), total) if self.day else 0
        grid = Table.grid(expand=True, padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column(ratio=1)
        grid.add_column(no_wrap=True, justify="right")
        when = Text("模拟日期 ", style="bold")
        when.append(f"{day.year}年{day.month}月{day.day}日（星期{WEEKDAYS_ZH[day.weekday()]}）", style="bold cyan")
        span = Text(f"{self.start.year}—{self.end.year}  第{done}天/共{total}天  ", style="dim")
        span.append("全速" if self.speed <= 0 else f"{self.speed:g}天/秒", style="bold")
        grid.add_row(when, ProgressBar(total=total, completed=done), span)
        title = Text(f"{self.programme.programme.document_number}  {self.programme.programme.title}", style="dim")
        return Panel(Group(grid, title), title="duban 督办演示", title_align="left", border_style="cyan")

    def _table(self) -> RenderableType:
        if self.table is None:
            return Text("等待台账……", style="dim")
        table = self.table
        grid = Table(box=box.SIMPLE_HEAD, pad_edge=False, expand=False)
        grid.add_column("县", no_wrap=True)
        for m in table.milestones:
            deadline = m.deadline
            grid.add_column(
                f"{m.milestone_id}\n{deadline.year % 100}年{deadline.month}月", justify="center", no_wrap=True
            )
        grid.add_column("一览表未报", no_wrap=True)
        for row in table.counties:
            by_id = {s.milestone_id: s for s in row.milestones}
            cells: list[RenderableType] = [Text(row.county_name, style="bold")]
            for m in table.milestones:
                status = by_id.get(m.milestone_id)
                cells.append(status_cell(status) if status is not None else Text("—", style="dim"))
            cells.append(periods_cell(row))
            grid.add_row(*cells)
        marks = Text(f"  {EXTENDED_MARK} 已批准延期  {FINDING_MARK} 有程序问题", style="dim")
        return Group(grid, Text.assemble(legend(), marks))

    def _actions(self) -> RenderableType:
        if not self.actions:
            return Text("暂无督办事项", style="dim")
        grid = Table(box=None, pad_edge=False, expand=True, show_header=False)
        grid.add_column(no_wrap=True)  # day
        grid.add_column(no_wrap=True)  # county
        grid.add_column(no_wrap=True)  # level
        grid.add_column(no_wrap=True)  # state
        grid.add_column(no_wrap=True)  # subject
        grid.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
        for line in reversed(self.actions):
            grid.add_row(
                line.day.isoformat(),
                self.names.get(line.county_code, line.county_code),
                Text(_level_text(line.level_id, line.level_name), style=LEVEL_STYLES.get(line.level_id, "")),
                Text(STATE_ZH.get(line.state, line.state), style=STATE_STYLES.get(line.state, "")),
                line.subject,
                Text(line.text, style="dim" if line.state == "waived" else ""),
            )
        return grid

    def _notifications(self) -> RenderableType:
        if not self.notifications:
            return Text("暂无通知", style="dim")
        grid = Table(box=None, pad_edge=False, expand=True, show_header=False)
        for _ in range(5):
            grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
        for line in reversed(self.notifications):
            grid.add_row(
                line.day.isoformat(),
                self.names.get(line.county_code, line.county_code),
                CHANNEL_ZH.get(line.channel, line.channel),
                line.address_masked,
                Text(OUTCOME_ZH.get(line.outcome, line.outcome), style=OUTCOME_STYLES.get(line.outcome, "")),
                line.action + (f"（{line.detail}）" if line.detail and line.outcome == "failed" else ""),
            )
        return grid

    def _captions(self) -> RenderableType:
        if not self.captions:
            return Text("……", style="dim")
        text = Text()
        for i, (day, caption) in enumerate(reversed(self.captions)):
            if i:
                text.append("\n")
            text.append(f"{day.isoformat()}  ", style="dim")
            text.append(caption, style="bold" if i == 0 else "")
        return text

    # -- the end -------------------------------------------------------------------------------------
    def summary(self) -> RenderableType:
        """Per county: actions by level, still proposed / confirmed / waived, findings, notifications."""
        grid = Table(title="演示结果：各县督办情况", box=box.SIMPLE_HEAD, show_lines=False)
        for name in ("县", "督办事项", "待确认", "已确认", "免予处理", "程序问题", "通知 已发送/已送达/失败"):
            grid.add_column(name, no_wrap=name != "督办事项")
        totals = CountyTally("", "合计")
        for tally in self.counties.values():
            levels, states = tally.by_level(), tally.by_state()
            grid.add_row(
                Text(self.names.get(tally.code, tally.name), style="bold"),
                _levels_text(levels, tally.level_names),
                _count(states["proposed"], "bold yellow"),
                _count(states["confirmed"], "bold red"),
                _count(states["waived"], "dim"),
                _count(tally.findings, "magenta"),
                _notifications_text(tally.notifications),
            )
            totals.actions.update(tally.actions)
            totals.level_names.update(tally.level_names)
            totals.findings += tally.findings
            totals.notifications.update(tally.notifications)
        states = totals.by_state()
        grid.add_section()
        grid.add_row(
            Text("合计", style="bold"),
            _levels_text(totals.by_level(), totals.level_names),
            _count(states["proposed"], "bold yellow"),
            _count(states["confirmed"], "bold red"),
            _count(states["waived"], "dim"),
            _count(totals.findings, "magenta"),
            _notifications_text(totals.notifications),
        )
        return grid


# -- cells -------------------------------------------------------------------------------------------
def status_cell(status: MilestoneStatus) -> Text:
    """One county's milestone: the short status coloured by its light, the percent while under way,
    a mark for a granted extension and for an open procedure finding."""
    label = STATUS_SHORT[status.status]
    if status.status is Status.IN_PROGRESS and status.percent > 0:
        label += f"{status.percent}%"
    text = Text(label, style=LIGHT_STYLES[status.light])
    if extended_to(status) is not None:
        text.append(EXTENDED_MARK, style="cyan")
    if status.open_findings > 0:
        text.append(FINDING_MARK, style="bold magenta")
    return text


def periods_cell(row: CountyRow, shown: int = 2) -> Text:
    """The progress-table periods due and not filed (the latest ``shown``), and how many came late."""
    missing = sorted(p for p, s in row.progress_tables.items() if s is PeriodStatus.MISSING)
    late = sum(1 for s in row.progress_tables.values() if s is PeriodStatus.LATE)
    text = Text()
    if missing:
        listed = " ".join(missing[-shown:])
        text.append(
            f"{len(missing)}期 {listed}" + (" …" if len(missing) > shown else ""),
            style=PERIOD_STYLES[PeriodStatus.MISSING],
        )
    if late:
        text.append(("  " if missing else "") + f"迟报{late}期", style=PERIOD_STYLES[PeriodStatus.LATE])
    if not text:
        text.append("—", style=LIGHT_STYLES[Light.GREEN])
    return text


def _level_text(level_id: str, level_name: str) -> str:
    return LEVEL_SHORT.get(level_id, level_name)


def _levels_text(levels: Counter[str], names: dict[str, str]) -> Text:
    order = {level: i for i, level in enumerate(LEVEL_ORDER)}
    text = Text()
    for level in sorted(levels, key=lambda lv: (order.get(lv, len(order)), names.get(lv, lv))):
        if text:
            text.append("  ")
        text.append(f"{_level_text(level, names.get(level, level))}×{levels[level]}", style=LEVEL_STYLES.get(level, ""))
    return text if text else Text("—", style="dim")


def _count(n: int, style: str) -> Text:
    return Text(str(n), style=style) if n else Text("0", style="dim")


def _notifications_text(counts: Counter[str]) -> Text:
    text = Text()
    for i, outcome in enumerate(("sent", "delivered", "failed")):
        if i:
            text.append("/")
        text.append(str(counts[outcome]), style=OUTCOME_STYLES[outcome] if counts[outcome] else "dim")
    return text


def _first_sentence(text: str) -> str:
    first, stop, _ = text.partition("。")
    return first + stop


def _local_day(envelope: EventEnvelope) -> dt.date:
    return envelope.occurred_at.astimezone(DISPLAY_TZ).date()


def _from_action_id(action_id: str) -> _Known:
    """An action seen only through a decision or a notification: its id says its level and subject
    (``programme:county:level:subject[:deadline]``)."""
    parts = action_id.split(":")
    level = parts[2] if len(parts) > 2 else action_id
    subject = parts[3] if len(parts) > 3 else ""
    return _Known(level, LEVEL_SHORT.get(level, level), subject)
