"""The ledger's queries as a NATS micro service (``nats micro ls/info/stats`` see it).

Each endpoint takes a JSON query (an empty body means the defaults) and answers a contract type
as JSON; the Excel report answers the .xlsx bytes. A bad query gets a QueryError and the NATS
service error headers.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import structlog
from nats.aio.client import Client as NatsClient

from contracts.audit import FILE_SIGNATURE_HEADER
from contracts.facts import CountyFacts, new_facts
from contracts.ledger import (
    COUNTY_SUBJECT,
    HISTORY_SUBJECT,
    LEDGER_SERVICE,
    OVERDUE_SUBJECT,
    PROJECTION_STATUS_SUBJECT,
    REBUILD_SUBJECT,
    REPORT_SUBJECT,
    TABLE_SUBJECT,
    XLSX_CONTENT_TYPE,
    CountyDetail,
    CountyHistory,
    CountyQuery,
    OverdueList,
    ProgressTable,
    QueryError,
    TableQuery,
)
from contracts.programme import County, Programme
from contracts.workdays import WorkdayCalendar
from services.common.clock import Clock
from services.common.micro import BytesAnswer, Endpoint, EndpointFailure, MicroService, json_endpoint, start_micro
from services.common.signing import Signer, file_signature_header, sign_file
from services.ledger import views
from services.ledger.queries import LedgerReader
from services.ledger.status import LightSettings

log = structlog.get_logger(__name__)


def _error(code: str, zh: str, en: str, detail: str = "", status: str = "404") -> EndpointFailure:
    return EndpointFailure(code, zh, en, detail, status)


REPORT_FILE_NAME = "督查进度一览表.xlsx"


class LedgerQueries:
    """The queries, independent of NATS."""

    def __init__(
        self,
        reader: LedgerReader,
        programmes: dict[str, Programme],
        clock: Clock,
        calendar: WorkdayCalendar,
        settings: LightSettings,
        signer: Signer | None = None,
    ) -> None:
        self._reader = reader
        self._signer = signer  # signs each 一览表 export
        self._programmes = programmes
        self._clock = clock
        self._calendar = calendar
        self._settings = settings

    def programme(self, programme_id: str | None) -> Programme:
        if programme_id is None:
            return next(iter(self._programmes.values()))
        found = self._programmes.get(programme_id)
        if found is None:
            raise _error("unknown_programme", "未知的督办事项", "unknown programme", programme_id)
        return found

    def _county(self, programme: Programme, county_code: str) -> County:
        county = programme.county(county_code)
        if county is None:
            raise _error("unknown_county", "该县不在本督办事项中", "unknown county", county_code)
        return county

    async def _ledgers(
        self, programme: Programme, as_of: dt.datetime | None
    ) -> tuple[dict[str, CountyFacts], dt.datetime]:
        now = self._clock.now()
        if as_of is None:
            return await self._reader.states(programme), now
        if as_of > now:
            raise _error("bad_request", "查询时间晚于当前时间", "as_of lies in the future", as_of.isoformat(), "400")
        # A day the views cannot judge is the query's fault (400), not the service's (a 500, which
        # the gateway answers as a retryable 503): out of range, or before the working-day calendar.
        try:
            day = as_of.astimezone(dt.UTC).astimezone(ZoneInfo(programme.programme.timezone)).date()
        except OverflowError:
            raise _error("bad_request", "查询时间超出范围", "as_of is out of range", as_of.isoformat(), "400") from None
        years = self._calendar.years
        if day.year not in years:
            raise _error(
                "bad_request",
                "查询日期不在工作日历范围内",
                "as_of lies outside the working-day calendar",
                f"{as_of.isoformat()}: the calendar knows {years[0]}–{years[-1]}",
                "400",
            )
        return await self._reader.states_as_of(programme, as_of), as_of

    def _context(self, programme: Programme, as_of: dt.datetime) -> views.ViewContext:
        return views.ViewContext(programme, as_of, self._calendar, self._settings)

    async def table(self, query: TableQuery) -> ProgressTable:
        programme = self.programme(query.programme_id)
        ledgers, as_of = await self._ledgers(programme, query.as_of)
        return views.progress_table(self._context(programme, as_of), ledgers)

    async def county(self, query: CountyQuery) -> CountyDetail:
        programme = self.programme(query.programme_id)
        county = self._county(programme, query.county_code)
        ledgers, as_of = await self._ledgers(programme, query.as_of)
        ledger = ledgers.get(county.code) or new_facts(programme, county.code)
        return views.county_detail(self._context(programme, as_of), county, ledger)

    async def history(self, query: CountyQuery) -> CountyHistory:
        programme = self.programme(query.programme_id)
        county = self._county(programme, query.county_code)
        events = await self._reader.history(programme, county.code)
        if query.as_of is not None:
            events = [(seq, e) for seq, e in events if e.recorded_at <= query.as_of]
        retracted = {
            str(getattr(e.payload, "retracted_submission_id", ""))
            for _, e in events
            if e.event_type == "submission_retracted"
        }
        return views.county_history(programme, county.code, events, retracted)

    async def overdue(self, query: TableQuery) -> OverdueList:
        programme = self.programme(query.programme_id)
        ledgers, as_of = await self._ledgers(programme, query.as_of)
        return views.overdue_list(self._context(programme, as_of), ledgers)

    async def report(self, query: TableQuery) -> BytesAnswer:
        """The 督查进度一览表 as .xlsx, with its detached signature in a header when the ledger has a key."""
        from services.ledger.report import progress_table_xlsx  # openpyxl loads only when asked

        table = await self.table(query)
        data = progress_table_xlsx(table)
        if self._signer is None:
            return BytesAnswer(data)
        what = f"{table.report_title or '督查进度一览表'} {table.programme_id} as of {table.as_of.isoformat()}"
        signature = sign_file(self._signer, what, REPORT_FILE_NAME, data, self._clock.now())
        return BytesAnswer(data, {FILE_SIGNATURE_HEADER: file_signature_header(signature)})


async def start_service(nc: NatsClient, queries: LedgerQueries, ops: list[Endpoint], version: str) -> MicroService:
    return await start_micro(
        nc,
        name=LEDGER_SERVICE,
        version=version,
        description="duban ledger: the progress table, county detail and history, as of any date",
        endpoints=[
            json_endpoint("table", TABLE_SUBJECT, TableQuery, queries.table, QueryError),
            json_endpoint("county", COUNTY_SUBJECT, CountyQuery, queries.county, QueryError),
            json_endpoint("history", HISTORY_SUBJECT, CountyQuery, queries.history, QueryError),
            json_endpoint("overdue", OVERDUE_SUBJECT, TableQuery, queries.overdue, QueryError),
            json_endpoint(
                "report", REPORT_SUBJECT, TableQuery, queries.report, QueryError, content_type=XLSX_CONTENT_TYPE
            ),
            *ops,
        ],
    )


__all__ = ["PROJECTION_STATUS_SUBJECT", "REBUILD_SUBJECT", "LedgerQueries", "start_service"]
