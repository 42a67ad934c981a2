"""The terminal views: rendered into a recording console, checked for their texts."""

from __future__ import annotations

import datetime as dt
import re

import msgspec
from rich.console import Console, RenderableType

from contracts.ledger import (
    CountyDetail,
    CountyHistory,
    Finding,
    HistoryEntry,
    MilestoneDetail,
    OverdueItem,
    OverdueList,
    PeriodStatus,
    ReviewState,
)
from contracts.payloads import Document
from services.cli.render import county_view, history_view, overdue_view, table_view
from tests.unit.test_report import AS_OF, COUNTY_ORDER, TODAY, scenario_table

UTC = dt.UTC


def _render(renderable: RenderableType) -> str:
    console = Console(record=True, width=200, color_system="truecolor")
    console.print(renderable)
    return console.export_text()


def _render_styled(renderable: RenderableType) -> str:
    console = Console(record=True, width=200, color_system="truecolor", force_terminal=True)
    console.print(renderable)
    return console.export_text(styles=True)


def test_table_view_shows_counties_statuses_legend_and_date() -> None:
    out = _render(table_view(scenario_table()))
    positions = [out.index(name) for name in COUNTY_ORDER]
    assert positions == sorted(positions)  # counties left to right in the ledger's order
    for person in ("孙庆伟", "刘兵", "刘冰", "赵丽玲", "王俊海"):
        assert person in out
    for text in ("已完成", "逾期未完成 60%", "推进中 50%", "逾期完成", "未开始", "待审查"):
        assert text in out
    assert "延期至2017-07-31" in out
    assert "程序问题1项" in out
    assert "截至2017年6月26日" in out
    assert "图例" in out and "临近截止" in out
    assert "督查进度一览表" in out
    assert "成立建设工作机构" in out and "2017年3月底完成" in out


def test_table_view_colours_follow_the_light() -> None:
    styled = _render_styled(table_view(scenario_table()))
    # red for 逾期未完成, yellow for due soon, green for done on time
    assert re.search(r"\x1b\[1;31m *逾期未完成 60%", styled)
    assert re.search(r"\x1b\[1;33m *推进中 50%", styled)
    assert re.search(r"\x1b\[32m *已完成", styled)


def _detail() -> CountyDetail:
    table = scenario_table()
    row = next(c for c in table.counties if c.county_name == "南乐县")
    milestones = tuple(
        MilestoneDetail(
            status=s,
            title=m.title,
            steps_done=("fiscal_review_approved", "tender_published") if s.milestone_id == "1.3" else (),
            evidence=(Document(title="立项批复", number="南发改〔2017〕1号"),) if s.milestone_id == "1.3" else (),
            completed_via=None,
            extension_requested=dt.date(2017, 7, 31) if s.milestone_id == "1.3" else None,
            reported_at=None,
        )
        for s, m in zip(row.milestones, table.milestones, strict=True)
    )
    return CountyDetail(
        programme_id=table.programme_id,
        as_of=AS_OF,
        today=TODAY,
        county=row,
        milestones=milestones,
        reviews=(
            ReviewState(
                review_kind="provincial_plan_review",
                name="建设方案省级评审",
                state="passed",
                requested_on=dt.date(2017, 4, 10),
                decided_on=dt.date(2017, 4, 28),
                approval_document_number="豫建城〔2017〕99号",
                comments="",
            ),
            ReviewState(
                review_kind="tender_pre_review",
                name="招标文件预审",
                state="returned",
                requested_on=dt.date(2017, 6, 1),
                decided_on=dt.date(2017, 6, 8),
                approval_document_number=None,
                comments="存在排他性条款",
            ),
        ),
        findings=(
            Finding(
                event_id="e-1",
                rule_id="tender-pre-review-before-tender",
                finding_zh="招标文件未经市城管综合执法局预审通过即发布",
                finding_en="tender documents were published without a passed city pre-review",
                detail="",
                milestone_id="1.3",
                recorded_at=dt.datetime(2017, 6, 12, 1, 30, tzinfo=UTC),
            ),
        ),
        trial_started_on=None,
        retracted_submissions=("nanle-2017-06-02",),
    )


def test_county_view() -> None:
    out = _render(county_view(_detail()))
    for text in (
        "南乐县",
        "410923",
        "南乐县政府",
        "刘冰",
        "推进中 50%",
        "程序问题1项",
        "申请延期至2017-07-31（待批）",
        "建设方案省级评审",
        "通过",
        "豫建城〔2017〕99号",
        "退回修改",
        "存在排他性条款",
        "招标文件未经市城管综合执法局预审通过即发布",
        "2017-06-12 09:30",  # recorded_at shown in Beijing time
        "按时3期",
        "nanle-2017-06-02",
    ):
        assert text in out, text
    assert "刘兵" not in out


def test_county_view_lists_missing_filings() -> None:
    detail = _detail()
    county = msgspec.structs.replace(
        detail.county, progress_tables={**detail.county.progress_tables, "2017-05": PeriodStatus.MISSING}
    )
    out = _render(county_view(msgspec.structs.replace(detail, county=county)))
    assert "未报1期" in out and "未报：2017年5月" in out


def _entry(seq: int, event_type: str, summary: str, *, retracted: bool = False) -> HistoryEntry:
    return HistoryEntry(
        stream_sequence=seq,
        event_id=f"e-{seq}",
        event_type=event_type,
        occurred_at=dt.datetime(2017, 6, seq, 2, 0, tzinfo=UTC),
        recorded_at=dt.datetime(2017, 6, seq, 2, 5, tzinfo=UTC),
        actor_role="county",
        actor_user="nanle-operator",
        submission_id=f"s-{seq}",
        retracted=retracted,
        summary=summary,
        payload={},
    )


def test_history_view_one_line_per_event_and_retractions_struck() -> None:
    history = CountyHistory(
        programme_id="puyang-2017-13",
        county_code="410923",
        entries=(
            _entry(3, "progress_reported", "报告1.3《立项及招投标》进度50%"),
            _entry(4, "milestone_completed", "报告1.3完成", retracted=True),
            _entry(5, "submission_retracted", "撤回s-4"),
        ),
    )
    out = _render(history_view(history))
    lines = [line for line in out.splitlines() if "报告1.3" in line or "撤回s-4" in line]
    assert len(lines) == 3
    assert "2017-06-03 10:00" in lines[0] and "2017-06-03 10:05" in lines[0]
    assert "县/nanle-operator" in lines[0] and "报告进度" in lines[0]
    assert "（已撤回）" in lines[1]
    styled = _render_styled(history_view(history))
    struck = next(line for line in styled.splitlines() if "报告1.3完成" in line)
    assert "\x1b[2;9m" in struck  # dim + strike


def test_history_view_empty() -> None:
    out = _render(history_view(CountyHistory(programme_id="p", county_code="410923", entries=())))
    assert "无事件记录" in out


def test_overdue_view() -> None:
    overdue = OverdueList(
        programme_id="puyang-2017-13",
        as_of=AS_OF,
        items=(
            OverdueItem(
                county_code="410922",
                county_name="清丰县",
                responsible_person="刘兵",
                milestone_id="1.2",
                title="建设方案通过评审",
                effective_deadline=dt.date(2017, 5, 2),
                workdays_overdue=38,
            ),
        ),
    )
    out = _render(overdue_view(overdue))
    for text in ("逾期未完成事项", "清丰县", "刘兵", "1.2", "建设方案通过评审", "2017-05-02", "38", "共1项"):
        assert text in out, text
    assert "无逾期未完成事项" in _render(overdue_view(msgspec.structs.replace(overdue, items=())))
