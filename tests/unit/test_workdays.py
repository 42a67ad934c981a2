"""The working-day calendar against chinesecalendar's own answers, day by day (an independent
reference), plus the calendar facts the notice's deadlines depend on and operator year files."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import chinese_calendar
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.workdays import CalendarFileError, CalendarYearMissing, WorkdayCalendar

CAL = WorkdayCalendar.official()
ONE = dt.timedelta(days=1)
# Spans of up to 400 days either way stay inside the years the package knows (2004–2026).
days = st.dates(min_value=dt.date(2005, 3, 1), max_value=dt.date(2025, 10, 1))


def reference_add(day: dt.date, n: int) -> dt.date:
    step = ONE if n >= 0 else -ONE
    while n:
        day += step
        if chinese_calendar.is_workday(day):
            n -= 1 if n > 0 else -1
    return day


@settings(max_examples=400, deadline=None)
@given(day=days, n=st.integers(-30, 30))
def test_add_workdays_matches_the_reference(day: dt.date, n: int) -> None:
    assert CAL.add_workdays(day, n) == reference_add(day, n)


@settings(max_examples=400, deadline=None)
@given(a=days, delta=st.integers(-400, 400))
def test_workdays_between_matches_the_reference(a: dt.date, delta: int) -> None:
    b = a + dt.timedelta(days=delta)
    lo, hi = min(a, b), max(a, b)
    expected = sum(chinese_calendar.is_workday(lo + ONE * i) for i in range(1, (hi - lo).days + 1))
    assert CAL.workdays_between(a, b) == (expected if b >= a else -expected)


@pytest.mark.parametrize(
    ("day", "working"),
    [
        ("2017-04-01", True),  # Saturday, 清明 make-up day
        ("2017-04-03", False),
        ("2017-05-01", False),
        ("2017-09-30", True),  # Saturday, National Day make-up day
        ("2017-10-05", False),
        ("2018-02-11", True),  # Sunday, Spring Festival make-up day
        ("2018-02-16", False),
        ("2018-02-24", True),
    ],
)
def test_holidays_and_make_up_days(day: str, working: bool) -> None:
    assert CAL.is_workday(dt.date.fromisoformat(day)) is working


def test_rest_day_deadlines_roll() -> None:
    assert CAL.next_workday(dt.date(2017, 4, 30)) == dt.date(2017, 5, 2)
    assert CAL.next_workday(dt.date(2017, 12, 31)) == dt.date(2018, 1, 2)


def test_a_year_without_data_is_a_loud_error() -> None:
    with pytest.raises(CalendarYearMissing, match="2027"):
        CAL.is_workday(dt.date(2027, 3, 1))
    with pytest.raises(CalendarYearMissing):
        CAL.add_workdays(dt.date(2026, 12, 28), 10)
    with pytest.raises(CalendarYearMissing):
        CAL.workdays_between(dt.date(2026, 12, 1), dt.date(2027, 1, 5))


def test_an_operator_year_file_adds_a_year(tmp_path: Path) -> None:
    year = tmp_path / "2027.yaml"
    year.write_text(
        "format: duban.calendar/v1\nyear: 2027\nholidays:\n  - {from: 2027-01-01, to: 2027-01-03, name: 元旦}\n"
        "workdays: [2027-01-09]\n",
        encoding="utf-8",
    )
    cal = WorkdayCalendar.official([year])
    assert not cal.is_workday(dt.date(2027, 1, 1)) and cal.is_workday(dt.date(2027, 1, 9))
    assert cal.add_workdays(dt.date(2026, 12, 31), 1) == dt.date(2027, 1, 4)
    assert cal.source_of(2027) == str(year)


def test_a_bad_year_file_names_the_line(tmp_path: Path) -> None:
    year = tmp_path / "2027.yaml"
    year.write_text("format: duban.calendar/v1\nyear: 2027\nworkdays: [2027-01-05]\n", encoding="utf-8")
    with pytest.raises(CalendarFileError) as caught:
        WorkdayCalendar.official([year])
    assert caught.value.key == "$.workdays[0]" and caught.value.line == 3
