"""Trial-operation reports through the real submissions service, and the acceptance readiness the
ledger shows for them in the county's detail and the 一览表 (real nats-server and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import io

import openpyxl
import pytest

from contracts.commands import Role
from contracts.errors import ErrorCode
from contracts.ledger import COUNTY_SUBJECT, REPORT_SUBJECT, CountyDetail
from contracts.replies import Accepted, Refused
from services.ledger.report import SHEET_READINESS
from tests.harness import Harness
from tests.ledger_harness import Ledger

pytestmark = pytest.mark.integration
SHANGHAI = dt.timezone(dt.timedelta(hours=8))
COUNTY = "410927"
FIGURES = {
    "cases_reported": 300,
    "cases_registered": 290,
    "cases_dispatched": 285,
    "cases_closed": 270,
    "cases_closed_on_time": 250,
    "cases_returned": 5,
}


def at(day: str) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(hour=10, tzinfo=SHANGHAI)


async def accepted(harness: Harness, command: dict[str, object], **kw: object) -> Accepted:
    reply = await harness.send(command, county=COUNTY, **kw)  # type: ignore[arg-type]
    assert isinstance(reply, Accepted), reply
    return reply


async def test_trial_reports_make_the_readiness_in_the_county_detail(harness: Harness, ledger: Ledger) -> None:
    harness.clock.set(at("2017-12-27"))
    await accepted(harness, {"kind": "start_trial_operation", "started_on": "2017-12-27"})
    for period, filed in [("2017-12", "2018-01-03"), ("2018-01", "2018-02-03"), ("2018-02", "2018-03-03")]:
        harness.clock.set(at(filed))
        await accepted(harness, {"kind": "report_trial_operation", "period": period, **FIGURES})
    # A second March report is refused as a duplicate period; inconsistent totals name the field.
    harness.clock.set(at("2018-03-04"))
    again = await harness.send({"kind": "report_trial_operation", "period": "2018-02", **FIGURES}, county=COUNTY)
    assert isinstance(again, Refused) and again.code == ErrorCode.DUPLICATE_PERIOD
    wrong = {**FIGURES, "cases_closed": 290}
    bad = await harness.send({"kind": "report_trial_operation", "period": "2018-02", **wrong}, county=COUNTY)
    assert isinstance(bad, Refused) and (bad.code, bad.field) == (
        ErrorCode.INCONSISTENT_TOTALS,
        "$.command.cases_closed",
    )
    # March never comes (due 04-08 … the 5th is 清明; not filed by 04-10): the count restarts on 04-01.
    harness.clock.set(at("2018-04-10"))
    await ledger.caught_up(harness)
    detail = await ledger.ask(COUNTY_SUBJECT, CountyDetail, {"county_code": COUNTY})
    readiness = detail.readiness
    assert readiness is not None and readiness == detail.county.readiness
    assert readiness.trial_started_on == dt.date(2017, 12, 27)
    assert [(m.period, m.state) for m in readiness.months] == [
        ("2017-12", "stable"),
        ("2018-01", "stable"),
        ("2018-02", "stable"),
        ("2018-03", "missing"),
        ("2018-04", "pending"),
    ]
    assert readiness.run_started_on == dt.date(2018, 4, 1)
    assert readiness.earliest_pre_acceptance == dt.date(2018, 10, 1)
    pre, formal = readiness.deadlines
    assert pre.milestone_id == "3.2" and pre.can_make_it is False and (pre.slack_workdays or 0) < 0
    assert formal.milestone_id == "3.3" and formal.can_make_it is True
    assert readiness.missing[0].startswith("2018-03试运行月报")
    # The correction path: the city retracts February, the county reports it again.
    first_february = next(
        e.submission_id
        for _, e in await harness.events(COUNTY)
        if e.event_type == "trial_operation_reported" and getattr(e.payload, "period", "") == "2018-02"
    )
    await accepted(
        harness,
        {"kind": "retract_submission", "retracted_submission_id": first_february, "reason": "数据更正"},
        role=Role.CITY,
    )
    await accepted(harness, {"kind": "report_trial_operation", "period": "2018-02", **FIGURES, "cases_closed": 280})
    await ledger.caught_up(harness)
    # And the 一览表 has its 验收准备 sheet.
    msg = await ledger.nc.request(REPORT_SUBJECT, b"{}", timeout=10)
    workbook = openpyxl.load_workbook(io.BytesIO(msg.data))
    sheet = workbook[SHEET_READINESS]
    text = " ".join(str(c.value) for row in sheet.iter_rows() for c in row if c.value is not None)
    assert "台前县" in text and "2018-03试运行月报" in text
