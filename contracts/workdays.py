"""Mainland China's official working-day calendar, with its 调休 make-up days, as data.

Years 2004–2026 come from the ``chinesecalendar`` package (the State Council's announcements).
Any other year is loaded from an operator's year file (format ``duban.calendar/v1``, below).
Asking about a day in a year with no data raises :class:`CalendarYearMissing`: a silent
weekend-only guess would put a deadline on the wrong day.

Year file::

    format: duban.calendar/v1
    year: 2027
    holidays:            # rest days that would otherwise be working days
      - {from: 2027-01-01, to: 2027-01-01, name: 元旦}
    workdays:            # weekend days that are working days (调休)
      - 2027-02-07
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec

from contracts.yamlfile import DataFileError, load_yaml_struct

CALENDAR_FORMAT = "duban.calendar/v1"
_ONE_DAY = dt.timedelta(days=1)


class CalendarYearMissing(LookupError):
    """No calendar data for this year: add a year file (format duban.calendar/v1)."""

    def __init__(self, year: int, known: Iterable[int]) -> None:
        self.year = year
        years = sorted(known)
        span = f"{years[0]}–{years[-1]}" if years else "none"
        super().__init__(
            f"no working-day calendar for {year} (known years: {span}); "
            f"add a year file in format {CALENDAR_FORMAT} with that year's holidays and 调休 working days"
        )


class HolidaySpan(msgspec.Struct, forbid_unknown_fields=True, frozen=True, rename={"start": "from", "end": "to"}):
    start: dt.date
    end: dt.date
    name: str = ""


class YearFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    format: str
    year: Annotated[int, msgspec.Meta(ge=1949, le=2200)]
    holidays: tuple[HolidaySpan, ...] = ()
    workdays: tuple[dt.date, ...] = ()


class CalendarFileError(DataFileError):
    pass


@dataclass(frozen=True)
class YearDays:
    """One year's exceptions to "Monday–Friday work": rest weekdays and working weekend days."""

    year: int
    rest_weekdays: frozenset[dt.date]
    working_weekend_days: frozenset[dt.date]
    source: str


class WorkdayCalendar:
    """Working-day arithmetic in O(1): a cumulative count of working days over every known day.

    ``_count[i]`` is the number of working days from the first known day up to and including
    day ``i``; ``_workdays[k]`` is the k-th working day. A day in a year with no data raises.
    """

    def __init__(self, years: Iterable[YearDays]) -> None:
        self._years = {y.year: y for y in years}
        self._contiguous = not self._years or len(self._years) == max(self._years) - min(self._years) + 1
        if not self._years:
            self._first = dt.date(1970, 1, 1)
            self._count: list[int] = []
            self._workdays: list[dt.date] = []
            return
        first_year, last_year = min(self._years), max(self._years)
        self._first = dt.date(first_year, 1, 1)
        count, total = [], 0
        workdays = []
        day = self._first
        end = dt.date(last_year, 12, 31)
        while day <= end:
            year = self._years.get(day.year)
            working = year is not None and _is_workday(year, day)
            if working:
                total += 1
                workdays.append(day)
            count.append(total)
            day += _ONE_DAY
        self._count, self._workdays = count, workdays

    @classmethod
    def official(cls, year_files: Iterable[Path] = ()) -> WorkdayCalendar:
        """The package's years, then operator year files (which win for the same year)."""
        years = {y.year: y for y in _package_years()}
        for path in year_files:
            loaded = load_year_file(path)
            years[loaded.year] = loaded
        return cls(years.values())

    @property
    def years(self) -> list[int]:
        return sorted(self._years)

    def source_of(self, year: int) -> str:
        return self._year(year).source

    def _year(self, year: int) -> YearDays:
        found = self._years.get(year)
        if found is None:
            raise CalendarYearMissing(year, self._years)
        return found

    def _index(self, day: dt.date) -> int:
        self._year(day.year)  # a year with no data is an error, never a guess
        return (day - self._first).days

    def _check_span(self, start: dt.date, end: dt.date) -> None:
        lo, hi = min(start.year, end.year), max(start.year, end.year)
        self._year(lo)
        self._year(hi)
        if not self._contiguous:  # a gap between known years: check every year of the span
            for year in range(lo + 1, hi):
                self._year(year)

    def _nth(self, k: int, towards: dt.date) -> dt.date:
        if 0 <= k < len(self._workdays):
            return self._workdays[k]
        beyond = max(self._years) + 1 if k >= 0 else min(self._years) - 1
        raise CalendarYearMissing(beyond if towards.year in self._years else towards.year, self._years)

    def is_workday(self, day: dt.date) -> bool:
        i = self._index(day)
        return self._count[i] - (self._count[i - 1] if i else 0) == 1

    def next_workday(self, day: dt.date) -> dt.date:
        """``day`` itself if it is a working day, else the first working day after it."""
        if self.is_workday(day):
            return day
        return self._nth(self._count[self._index(day)], day)

    def add_workdays(self, day: dt.date, count: int) -> dt.date:
        """The ``count``-th working day after ``day`` (before it when negative); 0 gives ``day``."""
        if count == 0:
            return day
        i = self._index(day)
        up_to = self._count[i]  # working days up to and including ``day``
        if count > 0:
            return self._nth(up_to + count - 1, day)
        before = up_to - (1 if self.is_workday(day) else 0)
        return self._nth(before + count, day)

    def workdays_between(self, start: dt.date, end: dt.date) -> int:
        """Working days in (start, end]; negative when end is before start."""
        self._check_span(start, end)  # both years known: index directly (a tick asks this ~10⁵ times)
        first = self._first
        return self._count[(end - first).days] - self._count[(start - first).days]


def _is_workday(year: YearDays, day: dt.date) -> bool:
    if day.weekday() >= 5:
        return day in year.working_weekend_days
    return day not in year.rest_weekdays


def _package_years() -> list[YearDays]:
    from chinese_calendar import constants

    rest: dict[int, set[dt.date]] = {}
    work: dict[int, set[dt.date]] = {}
    for day in constants.holidays:
        if day.weekday() < 5:
            rest.setdefault(day.year, set()).add(day)
    for day in constants.workdays:
        if day.weekday() >= 5:
            work.setdefault(day.year, set()).add(day)
    first, last = min(constants.holidays).year, max(constants.holidays).year
    return [
        YearDays(y, frozenset(rest.get(y, ())), frozenset(work.get(y, ())), "chinesecalendar")
        for y in range(first, last + 1)
    ]


def load_year_file(path: Path) -> YearDays:
    data, locate = load_yaml_struct(Path(path), YearFile, CalendarFileError)
    if data.format != CALENDAR_FORMAT:
        raise CalendarFileError(Path(path), locate("$.format"), "$.format", f"expected {CALENDAR_FORMAT!r}")
    rest: set[dt.date] = set()
    for i, span in enumerate(data.holidays):
        if span.end < span.start or span.start.year != data.year or span.end.year != data.year:
            key = f"$.holidays[{i}]"
            raise CalendarFileError(Path(path), locate(key), key, f"a span within {data.year}, from ≤ to")
        day = span.start
        while day <= span.end:
            if day.weekday() < 5:
                rest.add(day)
            day += _ONE_DAY
    for i, day in enumerate(data.workdays):
        if day.year != data.year or day.weekday() < 5:
            key = f"$.workdays[{i}]"
            raise CalendarFileError(Path(path), locate(key), key, f"{day} is not a weekend day of {data.year}")
    return YearDays(data.year, frozenset(rest), frozenset(data.workdays), str(path))
