"""The 督查进度一览表 as an Excel workbook, built in memory from a :class:`ProgressTable`. Pure.

Sheet "督查进度一览表" follows the notice's ledger (附件 工作台账): 序号, 阶段, 建设任务, 完成时限,
then one group of columns per county (状态, 完成时间, 备注) headed by the county, its 责任单位 and
its 责任人; one row per milestone, each status cell filled with its traffic light. Sheet "报送情况"
shows the progress-table filings per county and period. Sheet "验收准备" shows each county's
acceptance readiness (contracts.readiness): trial operation, stable months, the earliest day to
apply for pre-acceptance, the slack to the 3.2 and 3.3 deadlines and what is still missing.

The same table gives the same bytes: the workbook's document dates are the table's as-of
instant and the zip entries carry a fixed timestamp.

The texts shared with the terminal view (:func:`status_text`, :func:`cell_notes`) live here.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import math
import unicodedata
import zipfile
from collections.abc import Iterable, Sequence

from openpyxl import Workbook
from openpyxl.cell.cell import Cell
from openpyxl.styles import Alignment, Border, Font, PatternFill, Side
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.properties import PageSetupProperties
from openpyxl.worksheet.worksheet import Worksheet
from openpyxl.writer.excel import ExcelWriter

from contracts.ledger import (
    STATUS_ZH,
    CountyRow,
    Light,
    MilestoneInfo,
    MilestoneStatus,
    PeriodStatus,
    ProgressTable,
    Status,
)
from contracts.workdays import CalendarYearMissing, WorkdayCalendar

SHEET_TABLE = "督查进度一览表"
SHEET_FILINGS = "报送情况"
SHEET_READINESS = "验收准备"
REPORT_SUFFIX = "督查进度一览表"
FONT_NAME = "宋体"  # SimSun; Excel and WPS substitute a CJK serif where it is missing

# Excel's standard "Good" / "Neutral" / "Bad" cell styles: fill and font colour.
LIGHT_FILLS: dict[Light, str] = {Light.GREEN: "C6EFCE", Light.YELLOW: "FFEB9C", Light.RED: "FFC7CE"}
LIGHT_FONT_COLOURS: dict[Light, str] = {Light.GREEN: "006100", Light.YELLOW: "9C5700", Light.RED: "9C0006"}
LIGHT_ZH: dict[Light, str] = {Light.GREEN: "正常或按期完成", Light.YELLOW: "临近截止", Light.RED: "逾期"}

PERIOD_ZH: dict[PeriodStatus, str] = {
    PeriodStatus.ON_TIME: "按时",
    PeriodStatus.LATE: "逾期",
    PeriodStatus.MISSING: "未报",
    PeriodStatus.NOT_DUE: "未到期",
}
PERIOD_LIGHT: dict[PeriodStatus, Light | None] = {
    PeriodStatus.ON_TIME: Light.GREEN,
    PeriodStatus.LATE: Light.YELLOW,
    PeriodStatus.MISSING: Light.RED,
    PeriodStatus.NOT_DUE: None,
}

COUNTY_SUBCOLUMNS: tuple[tuple[str, float], ...] = (("状态", 13.0), ("完成时间", 12.0), ("备注", 22.0))
FIXED_COLUMNS: tuple[tuple[str, float], ...] = (("序号", 6.0), ("阶段", 13.0), ("建设任务", 42.0), ("完成时限", 19.0))
DATE_FORMAT = "yyyy-mm-dd"
PAGE_FOOTER = "第 &P 页 共 &N 页"
CellValue = str | int | float | dt.date | None
_ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)
_LINE_HEIGHT = 15.0  # points per wrapped line at 10.5-11 pt
_LONGEST_ROLL = dt.timedelta(days=9)  # 国庆+中秋: the longest run of rest days


# -- texts shared with the terminal view ------------------------------------------------------------
def report_title(table: ProgressTable) -> str:
    """The report's title from the programme's title.

    A notice is titled "关于<subject>的通知"; its progress table is "<subject>督查进度一览表".
    A title not of that shape is used whole. The programme file may name the table itself.
    """
    if table.report_title:
        return table.report_title
    subject = table.title.strip()
    if subject.startswith("关于"):
        for ending in ("的通知", "的决定", "的意见", "的方案", "通知"):
            if subject.endswith(ending) and len(subject) > len("关于") + len(ending):
                subject = subject[len("关于") : -len(ending)]
                break
    return subject if subject.endswith(REPORT_SUFFIX) else f"{subject}{REPORT_SUFFIX}"


def status_text(status: MilestoneStatus) -> str:
    """The Chinese status, with the percent when work is under way."""
    text = STATUS_ZH[status.status]
    if status.status is Status.IN_PROGRESS or (status.status is Status.OVERDUE and status.percent > 0):
        return f"{text} {status.percent}%"
    return text


@functools.cache
def _official_calendar() -> WorkdayCalendar:
    return WorkdayCalendar.official()


def rolled_deadline(deadline: dt.date, calendar: WorkdayCalendar | None = None) -> dt.date | None:
    """The first working day on or after ``deadline``; None if the calendar lacks the year."""
    try:
        return (calendar or _official_calendar()).next_workday(deadline)
    except CalendarYearMissing:
        return None


def extended_to(status: MilestoneStatus, calendar: WorkdayCalendar | None = None) -> dt.date | None:
    """The effective deadline when a granted extension moved it, else None.

    The effective deadline is the ledger's, or the extension's, rolled off a rest day when the
    roll is on. Neither the ledger date nor its roll means an extension moved it.
    """
    effective, deadline = status.effective_deadline, status.deadline
    if effective == deadline:
        return None
    rolled = rolled_deadline(deadline, calendar)
    if rolled is None:  # no calendar for the year: a move no longer than a holiday is taken as the roll
        return effective if effective - deadline > _LONGEST_ROLL else None
    return effective if effective != rolled else None


def cell_notes(
    status: MilestoneStatus, *, with_note: bool = True, calendar: WorkdayCalendar | None = None
) -> list[str]:
    """The remarks of one county's milestone: its note, a granted extension, days left/overdue, findings."""
    parts: list[str] = []
    if with_note and status.note.strip():
        parts.append(status.note.strip())
    moved = extended_to(status, calendar)
    if moved is not None:
        parts.append(f"延期至{moved.isoformat()}")
    if status.status is Status.OVERDUE:
        parts.append(f"已逾期{-status.workdays_left}个工作日")
    elif status.completed_on is None and status.light is Light.YELLOW:
        parts.append(f"剩余{status.workdays_left}个工作日")
    if status.open_findings > 0:
        parts.append(f"程序问题{status.open_findings}项")
    return parts


def deadline_text(table: ProgressTable, milestone: MilestoneInfo, calendar: WorkdayCalendar | None = None) -> str:
    """The ledger's wording of the deadline, and where the rest-day roll moves it."""
    text = milestone.deadline_text or milestone.deadline.isoformat()
    rolled = rolled_deadline(milestone.deadline, calendar) if table.roll_rest_day_deadlines else None
    if rolled is not None and rolled != milestone.deadline:
        text += f"\n（顺延至{rolled.isoformat()}）"
    return text


def as_of_text(table: ProgressTable) -> str:
    d = table.today
    return f"截至{d.year}年{d.month}月{d.day}日"


def settings_text(table: ProgressTable) -> str:
    roll = "是" if table.roll_rest_day_deadlines else "否"
    return f"节假日截止日顺延至下一工作日：{roll}　临近截止提醒：截止前{table.due_soon_workdays}个工作日内"


def period_label(period: str) -> str:
    return f"{int(period[:4])}年{int(period[5:])}月" if len(period) == 7 and period[4] == "-" else period


# -- the workbook ------------------------------------------------------------------------------------
_THIN = Side(style="thin", color="000000")
_BORDER = Border(left=_THIN, right=_THIN, top=_THIN, bottom=_THIN)
_CENTER = Alignment(horizontal="center", vertical="center", wrap_text=True)
_LEFT = Alignment(horizontal="left", vertical="center", wrap_text=True)
_HEADER_FILL = PatternFill(fill_type="solid", start_color="D9D9D9", end_color="D9D9D9")
_BODY_FONT = Font(name=FONT_NAME, size=10.5)
_HEADER_FONT = Font(name=FONT_NAME, size=10.5, bold=True)
_TITLE_FONT = Font(name=FONT_NAME, size=16, bold=True)
_SUBTITLE_FONT = Font(name=FONT_NAME, size=10.5)


def _fill(colour: str) -> PatternFill:
    return PatternFill(fill_type="solid", start_color=colour, end_color=colour)


def _light_style(cell: Cell, light: Light | None, *, bold: bool = False) -> None:
    if light is None:
        return
    cell.fill = _fill(LIGHT_FILLS[light])
    cell.font = Font(name=FONT_NAME, size=10.5, bold=bold, color=LIGHT_FONT_COLOURS[light])


def _put(
    ws: Worksheet, row: int, col: int, value: CellValue, *, font: Font = _BODY_FONT, align: Alignment = _CENTER
) -> Cell:
    cell = ws.cell(row=row, column=col, value=value)
    cell.font = font
    cell.alignment = align
    cell.border = _BORDER
    return cell


def _merge(ws: Worksheet, row1: int, col1: int, row2: int, col2: int) -> None:
    """Merge a block, keeping the borders of every cell in it (Excel draws the merged cells' own)."""
    for r in range(row1, row2 + 1):
        for c in range(col1, col2 + 1):
            ws.cell(row=r, column=c).border = _BORDER
    if (row1, col1) != (row2, col2):
        ws.merge_cells(start_row=row1, start_column=col1, end_row=row2, end_column=col2)


def _display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _lines(text: str, width: float) -> int:
    per_line = max(1, int(width) - 1)
    return sum(max(1, math.ceil(_display_width(p) / per_line)) for p in text.split("\n"))


def _row_height(cells: Iterable[tuple[str, float]]) -> float:
    return max((_lines(text, width) for text, width in cells), default=1) * _LINE_HEIGHT + 4


def _title_rows(ws: Worksheet, title: str, subtitle: str, last_col: int) -> None:
    _put(ws, 1, 1, title, font=_TITLE_FONT).border = Border()
    ws.merge_cells(start_row=1, start_column=1, end_row=1, end_column=last_col)
    ws.row_dimensions[1].height = 30
    _put(
        ws, 2, 1, subtitle, font=_SUBTITLE_FONT, align=Alignment(horizontal="left", vertical="center")
    ).border = Border()
    ws.merge_cells(start_row=2, start_column=1, end_row=2, end_column=last_col)
    ws.row_dimensions[2].height = 20


def _page_setup(ws: Worksheet, header_rows: str, title: str) -> None:
    ws.page_setup.orientation = "landscape"
    ws.page_setup.paperSize = ws.PAPERSIZE_A3
    ws.page_setup.fitToWidth = 1
    ws.page_setup.fitToHeight = 0
    ws.sheet_properties.pageSetUpPr = PageSetupProperties(fitToPage=True)
    ws.print_options.horizontalCentered = True
    ws.print_title_rows = header_rows
    ws.page_margins.left = ws.page_margins.right = 0.4
    ws.page_margins.top = ws.page_margins.bottom = 0.8
    ws.page_margins.header = ws.page_margins.footer = 0.3
    for part, text in ((ws.oddHeader, title), (ws.oddFooter, PAGE_FOOTER)):
        assert part is not None
        part.center.text = text
        part.center.size = 9
        part.center.font = FONT_NAME


def _table_sheet(ws: Worksheet, table: ProgressTable, title: str, calendar: WorkdayCalendar | None) -> None:
    n_fixed, n_sub = len(FIXED_COLUMNS), len(COUNTY_SUBCOLUMNS)
    last_col = n_fixed + n_sub * len(table.counties)
    _title_rows(ws, title, f"{as_of_text(table)}　　{settings_text(table)}", last_col)

    # three header rows: county name / 责任单位 and 责任人 / 状态 完成时间 备注
    top, bottom = 3, 5
    for col, (name, width) in enumerate(FIXED_COLUMNS, start=1):
        _put(ws, top, col, name, font=_HEADER_FONT).fill = _HEADER_FILL
        _merge(ws, top, col, bottom, col)
        ws.column_dimensions[get_column_letter(col)].width = width
    for i, county in enumerate(table.counties):
        first = n_fixed + 1 + i * n_sub
        _put(ws, top, first, county.county_name, font=_HEADER_FONT).fill = _HEADER_FILL
        _merge(ws, top, first, top, first + n_sub - 1)
        people = f"责任单位：{county.responsible_unit}\n责任人：{county.responsible_person}"
        _put(ws, top + 1, first, people, font=_BODY_FONT).fill = _HEADER_FILL
        _merge(ws, top + 1, first, top + 1, first + n_sub - 1)
        for j, (name, width) in enumerate(COUNTY_SUBCOLUMNS):
            _put(ws, bottom, first + j, name, font=_HEADER_FONT).fill = _HEADER_FILL
            ws.column_dimensions[get_column_letter(first + j)].width = width
    ws.row_dimensions[top].height = 22
    ws.row_dimensions[top + 1].height = 2 * _LINE_HEIGHT + 6
    ws.row_dimensions[bottom].height = 20

    widths = {name: width for name, width in (*FIXED_COLUMNS, *COUNTY_SUBCOLUMNS)}
    row = bottom + 1
    phase_start = row
    for index, milestone in enumerate(table.milestones):
        task = f"{milestone.title}\n{milestone.task}"
        deadline = deadline_text(table, milestone, calendar)
        _put(ws, row, 1, milestone.milestone_id)
        _put(ws, row, 2, milestone.phase)
        _put(ws, row, 3, task, align=_LEFT)
        _put(ws, row, 4, deadline)
        sized: list[tuple[str, float]] = [(task, widths["建设任务"]), (deadline, widths["完成时限"])]
        for i, county in enumerate(table.counties):
            first = n_fixed + 1 + i * n_sub
            status = _status_of(county, milestone.milestone_id, index)
            if status is None:
                for j in range(n_sub):
                    _put(ws, row, first + j, None)
                continue
            text = status_text(status)
            _light_style(_put(ws, row, first, text), status.light, bold=True)
            done = _put(ws, row, first + 1, status.completed_on)
            if status.completed_on is not None:
                done.number_format = DATE_FORMAT
            notes = "；".join(cell_notes(status, calendar=calendar))
            _put(ws, row, first + 2, notes or None, align=_LEFT)
            sized += [(text, widths["状态"]), (notes, widths["备注"])]
        ws.row_dimensions[row].height = _row_height(sized)
        following = table.milestones[index + 1].phase if index + 1 < len(table.milestones) else None
        if following != milestone.phase:  # the notice writes a phase once, over its milestones
            _merge(ws, phase_start, 2, row, 2)
            phase_start = row + 1
        row += 1

    _legend(ws, row + 1, table)
    ws.freeze_panes = f"{get_column_letter(n_fixed + 1)}{bottom + 1}"
    _page_setup(ws, f"{top}:{bottom}", title)


def _status_of(county: CountyRow, milestone_id: str, index: int) -> MilestoneStatus | None:
    if index < len(county.milestones) and county.milestones[index].milestone_id == milestone_id:
        return county.milestones[index]
    return next((s for s in county.milestones if s.milestone_id == milestone_id), None)


def _legend(ws: Worksheet, row: int, table: ProgressTable) -> None:
    """The colours' meaning under the table, one per line in the task column."""
    ws.cell(row=row, column=2, value="图例").font = _HEADER_FONT
    texts = {
        Light.GREEN: "绿：正常推进或按期完成",
        Light.YELLOW: f"黄：距截止{table.due_soon_workdays}个工作日以内，尚未完成",
        Light.RED: "红：逾期未完成或逾期完成",
    }
    for offset, light in enumerate(Light):
        _light_style(_put(ws, row + offset, 3, texts[light], align=_LEFT), light)
    note = ws.cell(row=row + len(texts), column=3, value="备注列注明延期、剩余或逾期工作日及程序问题。")
    note.font = _SUBTITLE_FONT


def _periods(counties: Sequence[CountyRow]) -> list[str]:
    return sorted({p for c in counties for p in c.progress_tables})


def _filings_sheet(ws: Worksheet, table: ProgressTable, title: str) -> None:
    counties = table.counties
    last_col = 2 + len(counties)
    _title_rows(ws, f"{title}报送情况", f"{as_of_text(table)}　　{SHEET_TABLE}按期报送情况", last_col)
    header = 3
    for col, (name, width) in enumerate((("序号", 6.0), ("报送期", 14.0)), start=1):
        _put(ws, header, col, name, font=_HEADER_FONT).fill = _HEADER_FILL
        ws.column_dimensions[get_column_letter(col)].width = width
    for i, county in enumerate(counties):
        col = 3 + i
        text = f"{county.county_name}\n{county.responsible_person}"
        _put(ws, header, col, text, font=_HEADER_FONT).fill = _HEADER_FILL
        ws.column_dimensions[get_column_letter(col)].width = 14
    ws.row_dimensions[header].height = 2 * _LINE_HEIGHT + 6

    row = header + 1
    for n, period in enumerate(_periods(counties), start=1):
        ws.row_dimensions[row].height = 20
        _put(ws, row, 1, n)
        _put(ws, row, 2, period_label(period))
        for i, county in enumerate(counties):
            status = county.progress_tables.get(period)
            cell = _put(ws, row, 3 + i, PERIOD_ZH[status] if status is not None else None)
            if status is not None:
                _light_style(cell, PERIOD_LIGHT[status])
        row += 1

    for status in (PeriodStatus.ON_TIME, PeriodStatus.LATE, PeriodStatus.MISSING):
        ws.row_dimensions[row].height = 20
        _put(ws, row, 1, None).fill = _HEADER_FILL
        _put(ws, row, 2, f"{PERIOD_ZH[status]}（期）", font=_HEADER_FONT).fill = _HEADER_FILL
        for i, county in enumerate(counties):
            count = sum(1 for s in county.progress_tables.values() if s == status)
            cell = _put(ws, row, 3 + i, count)
            if count:
                _light_style(cell, PERIOD_LIGHT[status])
        row += 1

    ws.freeze_panes = f"C{header + 1}"
    _page_setup(ws, f"{header}:{header}", f"{title}报送情况")
    ws.page_setup.paperSize = ws.PAPERSIZE_A4


READINESS_COLUMNS: tuple[tuple[str, float], ...] = (
    ("序号", 6.0),
    ("县（市、区）", 12.0),
    ("责任人", 10.0),
    ("试运行开始", 12.0),
    ("稳定运行月数", 12.0),
    ("最早可申请预验收", 14.0),
    ("预验收时限", 12.0),
    ("预验收余量（工作日）", 12.0),
    ("正式验收时限", 12.0),
    ("正式验收余量（工作日）", 12.0),
    ("尚缺事项", 50.0),
)


def _slack_light(slack: int | None, due_soon: int) -> Light | None:
    if slack is None:
        return None
    if slack < 0:
        return Light.RED
    return Light.YELLOW if slack <= due_soon else Light.GREEN


def _readiness_sheet(ws: Worksheet, table: ProgressTable, title: str) -> None:
    """One row per county: its acceptance readiness as of the table's day."""
    last_col = len(READINESS_COLUMNS)
    _title_rows(ws, f"{title}验收准备情况", f"{as_of_text(table)}　　试运行满稳定运行月数后方可申请预验收", last_col)
    header = 3
    for col, (name, width) in enumerate(READINESS_COLUMNS, start=1):
        _put(ws, header, col, name, font=_HEADER_FONT).fill = _HEADER_FILL
        ws.column_dimensions[get_column_letter(col)].width = width
    ws.row_dimensions[header].height = 2 * _LINE_HEIGHT + 6
    row = header + 1
    for n, county in enumerate(table.counties, start=1):
        r = county.readiness
        _put(ws, row, 1, n)
        _put(ws, row, 2, county.county_name)
        _put(ws, row, 3, county.responsible_person)
        if r is None:
            for col in range(4, last_col + 1):
                _put(ws, row, col, None)
            row += 1
            continue
        values: list[CellValue] = [
            r.trial_started_on,
            f"{r.stable_months}/{r.stable_months_required}" if r.trial_started_on else None,
            r.earliest_pre_acceptance,
        ]
        for col, value in enumerate(values, start=4):
            cell = _put(ws, row, col, value)
            if isinstance(value, dt.date):
                cell.number_format = DATE_FORMAT
        col = 7
        for slack in r.deadlines[:2]:
            _put(ws, row, col, slack.effective_deadline).number_format = DATE_FORMAT
            done = slack.completed_on is not None
            text: CellValue = f"已完成{slack.completed_on.isoformat()}" if slack.completed_on else slack.slack_workdays
            cell = _put(ws, row, col + 1, text)
            _light_style(cell, Light.GREEN if done else _slack_light(slack.slack_workdays, table.due_soon_workdays))
            col += 2
        missing = "；".join(r.missing) or ("可申请预验收" if r.ready else "")
        _put(ws, row, last_col, missing or None, align=_LEFT)
        ws.row_dimensions[row].height = _row_height([(missing, READINESS_COLUMNS[-1][1])])
        row += 1
    ws.freeze_panes = f"D{header + 1}"
    _page_setup(ws, f"{header}:{header}", f"{title}验收准备情况")


def progress_table_xlsx(
    table: ProgressTable, *, title: str | None = None, calendar: WorkdayCalendar | None = None
) -> bytes:
    """The progress table as an .xlsx file's bytes.

    ``title`` overrides :func:`report_title` (e.g. the notice's own name for the table);
    ``calendar`` is the working-day calendar used to tell a rest-day roll from an extension
    (default: the official one).
    """
    heading = title or report_title(table)
    wb = Workbook()
    ws = wb.active
    assert ws is not None
    ws.title = SHEET_TABLE
    _table_sheet(ws, table, heading, calendar)
    _filings_sheet(wb.create_sheet(SHEET_FILINGS), table, heading)
    if any(c.readiness is not None for c in table.counties):
        _readiness_sheet(wb.create_sheet(SHEET_READINESS), table, heading)

    stamp = table.as_of.astimezone(dt.UTC).replace(tzinfo=None, microsecond=0)
    wb.properties.creator = "duban"
    wb.properties.title = heading
    wb.properties.created = stamp
    wb.properties.modified = stamp
    wb.properties.lastModifiedBy = "duban"

    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as archive:
        ExcelWriter(wb, archive).write_data()  # not save_workbook: it stamps "modified" with the clock
    return _fixed_zip_times(raw.getvalue())


def _fixed_zip_times(data: bytes) -> bytes:
    """Rewrite the archive with a constant entry timestamp, so equal tables give equal bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            entry = zipfile.ZipInfo(info.filename, date_time=_ZIP_TIMESTAMP)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = info.external_attr
            dst.writestr(entry, src.read(info.filename))
    return out.getvalue()
