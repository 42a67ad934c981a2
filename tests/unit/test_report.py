"""The 督查进度一览表 workbook: a known scenario written, reopened and checked cell by cell."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import msgspec
import openpyxl
import pytest
from openpyxl.worksheet.worksheet import Worksheet

from contracts.ledger import (
    CountyRow,
    Light,
    MilestoneInfo,
    MilestoneStatus,
    PeriodStatus,
    ProgressTable,
    Status,
)
from contracts.programme import Programme, load_default_programme
from contracts.workdays import WorkdayCalendar
from services.ledger.report import (
    LIGHT_FILLS,
    SHEET_FILINGS,
    SHEET_TABLE,
    extended_to,
    progress_table_xlsx,
    report_title,
)

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
AS_OF = dt.datetime(2017, 6, 26, 10, 0, tzinfo=SHANGHAI)  # a Monday; 1.3 is due Friday 2017-06-30
TODAY = AS_OF.date()
CALENDAR = WorkdayCalendar.official()

GREEN, YELLOW, RED = (f"00{LIGHT_FILLS[light]}" for light in (Light.GREEN, Light.YELLOW, Light.RED))

# the counties in the programme's order, by code
PUYANG, QINGFENG, NANLE, FANXIAN, TAIQIAN = "410928", "410922", "410923", "410926", "410927"
PERIODS = ("2017-03", "2017-04", "2017-05", "2017-06")


def _status(
    programme: Programme,
    milestone_id: str,
    status: Status = Status.NOT_STARTED,
    *,
    light: Light | None = None,
    percent: int = 0,
    completed_on: dt.date | None = None,
    extended_to: dt.date | None = None,
    note: str = "",
    findings: int = 0,
) -> MilestoneStatus:
    milestone = programme.milestone(milestone_id)
    assert milestone is not None
    effective = CALENDAR.next_workday(extended_to or milestone.deadline)
    left = CALENDAR.workdays_between(TODAY, effective)
    if light is None:
        light = Light.GREEN if left > 5 else Light.YELLOW
    return MilestoneStatus(
        milestone_id=milestone_id,
        status=status,
        light=light,
        deadline=milestone.deadline,
        effective_deadline=effective,
        workdays_left=left,
        percent=percent,
        completed_on=completed_on,
        note=note,
        open_findings=findings,
    )


def scenario_table() -> ProgressTable:
    """濮阳县 on time; 清丰县 overdue on 1.2; 南乐县 1.3 due soon with a finding; 范县 done late;
    台前县 has an extension on 1.2 and has not started 1.3 (due soon) or phase 2."""
    p = load_default_programme()
    done = Status.DONE
    special: dict[str, dict[str, MilestoneStatus]] = {
        PUYANG: {
            "1.1": _status(p, "1.1", done, light=Light.GREEN, completed_on=dt.date(2017, 3, 28), percent=100),
            "1.2": _status(p, "1.2", done, light=Light.GREEN, completed_on=dt.date(2017, 4, 26), percent=100),
            "1.3": _status(p, "1.3", Status.IN_PROGRESS, percent=80, note="招标已发布"),
        },
        QINGFENG: {
            "1.1": _status(p, "1.1", done, light=Light.GREEN, completed_on=dt.date(2017, 3, 30), percent=100),
            "1.2": _status(p, "1.2", Status.OVERDUE, light=Light.RED, percent=60, note="方案待省厅评审"),
            "1.3": _status(p, "1.3", Status.NOT_STARTED),
        },
        NANLE: {
            "1.1": _status(p, "1.1", done, light=Light.GREEN, completed_on=dt.date(2017, 3, 31), percent=100),
            "1.2": _status(p, "1.2", done, light=Light.GREEN, completed_on=dt.date(2017, 4, 28), percent=100),
            "1.3": _status(p, "1.3", Status.IN_PROGRESS, percent=50, findings=1),
        },
        FANXIAN: {
            "1.1": _status(p, "1.1", Status.DONE_LATE, light=Light.RED, completed_on=dt.date(2017, 4, 12)),
            "1.2": _status(p, "1.2", Status.DONE_LATE, light=Light.RED, completed_on=dt.date(2017, 5, 19)),
            "1.3": _status(p, "1.3", Status.IN_PROGRESS, percent=30),
        },
        TAIQIAN: {
            "1.1": _status(p, "1.1", done, light=Light.GREEN, completed_on=dt.date(2017, 3, 24), percent=100),
            "1.2": _status(p, "1.2", Status.AWAITING_REVIEW, percent=90, extended_to=dt.date(2017, 7, 31)),
            "1.3": _status(p, "1.3", Status.NOT_STARTED),
        },
    }
    filings: dict[str, dict[str, PeriodStatus]] = {
        code: {
            "2017-03": PeriodStatus.ON_TIME,
            "2017-04": PeriodStatus.ON_TIME,
            "2017-05": PeriodStatus.ON_TIME,
            "2017-06": PeriodStatus.NOT_DUE,
        }
        for code in special
    }
    filings[QINGFENG]["2017-05"] = PeriodStatus.MISSING
    filings[FANXIAN]["2017-04"] = PeriodStatus.LATE
    rows = []
    for county in p.counties:
        statuses = tuple(special[county.code].get(m.id) or _status(p, m.id) for m in p.milestones)
        rows.append(
            CountyRow(
                county_code=county.code,
                county_name=county.name,
                responsible_unit=county.responsible_unit,
                responsible_person=county.responsible_person.name,
                milestones=statuses,
                progress_tables=filings[county.code],
                open_findings=sum(s.open_findings for s in statuses),
            )
        )
    phases = {ph.id: ph.name for ph in p.phases}
    return ProgressTable(
        programme_id=p.id,
        title=p.programme.title,
        as_of=AS_OF,
        today=TODAY,
        roll_rest_day_deadlines=True,
        due_soon_workdays=5,
        milestones=tuple(
            MilestoneInfo(
                milestone_id=m.id,
                phase=phases[m.phase],
                title=m.title,
                task=m.task,
                deadline=m.deadline,
                deadline_text=m.deadline_text,
            )
            for m in p.milestones
        ),
        counties=tuple(rows),
    )


@pytest.fixture(scope="module")
def table() -> ProgressTable:
    return scenario_table()


@pytest.fixture(scope="module")
def workbook(table: ProgressTable, tmp_path_factory: pytest.TempPathFactory) -> openpyxl.Workbook:
    path: Path = tmp_path_factory.mktemp("report") / "table.xlsx"
    path.write_bytes(progress_table_xlsx(table))
    return openpyxl.load_workbook(path)


@pytest.fixture(scope="module")
def sheet(workbook: openpyxl.Workbook) -> Worksheet:
    ws = workbook[SHEET_TABLE]
    assert isinstance(ws, Worksheet)
    return ws


HEADER_TOP, HEADER_BOTTOM, FIRST_ROW = 3, 5, 6
COUNTY_ORDER = ("濮阳县", "清丰县", "南乐县", "范县", "台前县")


def _row_of(ws: Worksheet, milestone_id: str) -> int:
    for r in range(FIRST_ROW, ws.max_row + 1):
        if ws.cell(r, 1).value == milestone_id:
            return r
    raise AssertionError(f"no row for {milestone_id}")


def _county_col(ws: Worksheet, name: str) -> int:
    for c in range(1, ws.max_column + 1):
        if ws.cell(HEADER_TOP, c).value == name:
            return c
    raise AssertionError(f"no column for {name}")


def _fill(ws: Worksheet, row: int, col: int) -> str:
    return str(ws.cell(row, col).fill.start_color.rgb)


def test_title_is_derived_from_the_programme_title(table: ProgressTable, sheet: Worksheet) -> None:
    assert report_title(table) == "进一步加快县级数字化城市管理系统建设督查进度一览表"
    assert sheet.cell(1, 1).value == report_title(table)
    assert any(str(m.coord).startswith("A1:") for m in sheet.merged_cells.ranges)
    subtitle = str(sheet.cell(2, 1).value)
    assert "截至2017年6月26日" in subtitle
    assert "节假日截止日顺延至下一工作日：是" in subtitle
    assert "5个工作日" in subtitle


def test_title_can_be_given(table: ProgressTable) -> None:
    name = "濮阳市所辖县数字化城市管理系统建设督查进度一览表"
    ws = openpyxl.load_workbook(io.BytesIO(progress_table_xlsx(table, title=name)))[SHEET_TABLE]
    assert ws.cell(1, 1).value == name


def test_headers_follow_the_ledger_and_the_counties_in_order(sheet: Worksheet) -> None:
    assert [sheet.cell(HEADER_TOP, c).value for c in range(1, 5)] == ["序号", "阶段", "建设任务", "完成时限"]
    names = [sheet.cell(HEADER_TOP, 5 + 3 * i).value for i in range(5)]
    assert names == list(COUNTY_ORDER)
    for i in range(5):
        assert [sheet.cell(HEADER_BOTTOM, 5 + 3 * i + j).value for j in range(3)] == ["状态", "完成时间", "备注"]
    people = {name: str(sheet.cell(HEADER_TOP + 1, _county_col(sheet, name)).value) for name in COUNTY_ORDER}
    assert "责任单位：清丰县政府" in people["清丰县"] and "责任人：刘兵" in people["清丰县"]
    assert "责任单位：南乐县政府" in people["南乐县"] and "责任人：刘冰" in people["南乐县"]
    assert "刘冰" not in people["清丰县"] and "刘兵" not in people["南乐县"]
    assert "责任人：孙庆伟" in people["濮阳县"]
    assert "责任单位：范县政府" in people["范县"]  # the notice's padding "范  县" is gone
    merged = {str(m.coord) for m in sheet.merged_cells.ranges}
    assert "E3:G3" in merged and "E4:G4" in merged  # county name and people over their sub-columns
    assert "A3:A5" in merged


def test_one_row_per_milestone_with_task_and_deadline(table: ProgressTable, sheet: Worksheet) -> None:
    ids = [m.milestone_id for m in table.milestones]
    assert [sheet.cell(FIRST_ROW + i, 1).value for i in range(len(ids))] == ids
    row = _row_of(sheet, "1.1")
    assert sheet.cell(row, 2).value == "项目前期阶段"
    assert "成立建设工作机构" in str(sheet.cell(row, 3).value)
    assert "完成建设单位申请" in str(sheet.cell(row, 3).value)
    assert sheet.cell(row, 4).value == "2017年3月底完成"
    # 2017-04-30 is a Sunday before the May Day holiday: the roll is shown with the deadline
    assert sheet.cell(_row_of(sheet, "1.2"), 4).value == "2017年4月底完成\n（顺延至2017-05-02）"
    assert "B6:B8" in {str(m.coord) for m in sheet.merged_cells.ranges}  # phase written once


@pytest.mark.parametrize(
    ("county", "milestone", "text", "fill"),
    [
        ("濮阳县", "1.1", "已完成", GREEN),
        ("清丰县", "1.2", "逾期未完成 60%", RED),
        ("南乐县", "1.3", "推进中 50%", YELLOW),
        ("范县", "1.1", "逾期完成", RED),
        ("台前县", "2.1", "未开始", GREEN),
        ("台前县", "1.2", "待审查", GREEN),
        ("台前县", "1.3", "未开始", YELLOW),
        ("濮阳县", "1.3", "推进中 80%", YELLOW),
    ],
)
def test_status_cells_carry_text_and_light(sheet: Worksheet, county: str, milestone: str, text: str, fill: str) -> None:
    row, col = _row_of(sheet, milestone), _county_col(sheet, county)
    assert sheet.cell(row, col).value == text
    assert _fill(sheet, row, col) == fill


def test_completion_dates_are_real_dates(sheet: Worksheet) -> None:
    row, col = _row_of(sheet, "1.1"), _county_col(sheet, "濮阳县")
    value = sheet.cell(row, col + 1).value
    assert isinstance(value, dt.datetime) and value.date() == dt.date(2017, 3, 28)
    assert sheet.cell(row, col + 1).number_format == "yyyy-mm-dd"
    assert sheet.cell(_row_of(sheet, "1.2"), _county_col(sheet, "清丰县") + 1).value is None


def test_notes_show_note_extension_overdue_and_findings(sheet: Worksheet) -> None:
    def note(county: str, milestone: str) -> str:
        return str(sheet.cell(_row_of(sheet, milestone), _county_col(sheet, county) + 2).value or "")

    assert note("台前县", "1.2") == "延期至2017-07-31"
    assert "延期" not in note("濮阳县", "1.2")  # the rest-day roll is not an extension
    assert "延期" not in note("清丰县", "1.2")
    overdue = CALENDAR.workdays_between(dt.date(2017, 5, 2), TODAY)
    assert note("清丰县", "1.2") == f"方案待省厅评审；已逾期{overdue}个工作日"
    assert note("南乐县", "1.3") == "剩余4个工作日；程序问题1项"
    assert note("濮阳县", "1.3") == "招标已发布；剩余4个工作日"
    assert note("台前县", "2.1") == ""


def test_frozen_panes_and_print_setup(workbook: openpyxl.Workbook, sheet: Worksheet) -> None:
    assert sheet.freeze_panes == "E6"
    assert sheet.page_setup.orientation == "landscape"
    assert sheet.page_setup.fitToWidth == 1
    assert sheet.page_setup.fitToHeight == 0
    assert sheet.sheet_properties.pageSetUpPr is not None and sheet.sheet_properties.pageSetUpPr.fitToPage
    assert sheet.print_title_rows == "$3:$5"
    assert sheet.print_options.horizontalCentered
    assert sheet.oddFooter is not None and sheet.oddFooter.center.text == "第 &P 页 共 &N 页"
    assert sheet.cell(_row_of(sheet, "1.1"), 3).alignment.wrap_text
    assert sheet.cell(_row_of(sheet, "1.1"), 3).font.name == "宋体"
    assert sheet.cell(_row_of(sheet, "1.1"), 3).border.left.style == "thin"
    assert (sheet.column_dimensions["C"].width or 0) > 30
    filings = workbook[SHEET_FILINGS]
    assert filings.freeze_panes == "C4"
    assert filings.page_setup.orientation == "landscape"
    assert filings.print_title_rows == "$3:$3"


def test_filings_sheet(workbook: openpyxl.Workbook) -> None:
    ws = workbook[SHEET_FILINGS]
    assert [str(ws.cell(3, 3 + i).value).split("\n")[0] for i in range(5)] == list(COUNTY_ORDER)
    assert str(ws.cell(3, 4).value).endswith("刘兵") and str(ws.cell(3, 5).value).endswith("刘冰")
    periods = {ws.cell(r, 2).value: r for r in range(4, 4 + len(PERIODS))}
    assert list(periods) == ["2017年3月", "2017年4月", "2017年5月", "2017年6月"]

    def cell(period: str, county: int) -> tuple[object, str]:
        c = ws.cell(periods[period], 3 + county)
        return c.value, str(c.fill.start_color.rgb)

    assert cell("2017年5月", 1) == ("未报", RED)  # 清丰县
    assert cell("2017年4月", 3) == ("逾期", YELLOW)  # 范县
    assert cell("2017年3月", 0) == ("按时", GREEN)
    assert cell("2017年6月", 4)[0] == "未到期"
    summary = {ws.cell(r, 2).value: r for r in range(8, 11)}
    assert ws.cell(summary["未报（期）"], 4).value == 1
    assert ws.cell(summary["逾期（期）"], 6).value == 1
    assert ws.cell(summary["按时（期）"], 3).value == 3


def test_same_table_same_bytes(table: ProgressTable) -> None:
    assert progress_table_xlsx(table) == progress_table_xlsx(table)


def test_extension_is_told_from_the_rest_day_roll(table: ProgressTable) -> None:
    qingfeng = next(c for c in table.counties if c.county_name == "清丰县")
    taiqian = next(c for c in table.counties if c.county_name == "台前县")
    assert extended_to(qingfeng.milestones[1], CALENDAR) is None
    assert extended_to(taiqian.milestones[1], CALENDAR) == dt.date(2017, 7, 31)
    # the roll off: a deadline left on the ledger date is not an extension either
    on_the_day = msgspec.structs.replace(qingfeng.milestones[1], effective_deadline=dt.date(2017, 4, 30))
    assert extended_to(on_the_day, CALENDAR) is None
    # without calendar data for the year, only a move longer than any holiday counts
    far = msgspec.structs.replace(
        qingfeng.milestones[1], deadline=dt.date(2099, 3, 31), effective_deadline=dt.date(2099, 4, 3)
    )
    assert extended_to(far, WorkdayCalendar([])) is None
    assert extended_to(
        msgspec.structs.replace(far, effective_deadline=dt.date(2099, 6, 30)), WorkdayCalendar([])
    ) == dt.date(2099, 6, 30)
