"""The ledger's queries as a NATS micro service (``nats micro ls/info/stats`` see it).

Each endpoint takes a JSON query (an empty body means the defaults) and answers a contract type
as JSON; the Excel report answers the .xlsx bytes. A bad query gets a QueryError and the NATS
service error headers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import structlog
from nats.aio.client import Client as NatsClient
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

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
from services.ledger import views
from services.ledger.queries import LedgerReader
from services.ledger.status import LightSettings

log = structlog.get_logger(__name__)
Q = TypeVar("Q")
XLSX_CONTENT_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


class QueryFailed(Exception):
    def __init__(self, error: QueryError) -> None:
        super().__init__(error.message_en)
        self.error = error


def _error(code: str, zh: str, en: str, detail: str = "") -> QueryFailed:
    return QueryFailed(QueryError(code=code, message_zh=zh, message_en=en, detail=detail))


class LedgerQueries:
    """The queries, independent of NATS."""

    def __init__(
        self,
        reader: LedgerReader,
        programmes: dict[str, Programme],
        clock: Clock,
        calendar: WorkdayCalendar,
        settings: LightSettings,
    ) -> None:
        self._reader = reader
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
            raise _error("bad_request", "查询时间晚于当前时间", "as_of lies in the future", as_of.isoformat())
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

    async def report(self, query: TableQuery) -> bytes:
        from services.ledger.report import progress_table_xlsx  # openpyxl loads only when asked

        return progress_table_xlsx(await self.table(query))


def _endpoint(
    query_type: type[Q], answer: Callable[[Q], Awaitable[Any]], raw: bool = False
) -> Callable[[Request], Awaitable[None]]:
    decoder = msgspec.json.Decoder(query_type)

    async def handle(request: Request) -> None:
        try:
            query = decoder.decode(request.data or b"{}")
            result = await answer(query)
        except msgspec.ValidationError as exc:
            failure = _error("bad_request", "查询格式错误", "malformed query", str(exc))
            await request.respond_error("400", failure.error.message_en, msgspec.json.encode(failure.error))
            return
        except msgspec.DecodeError as exc:
            failure = _error("bad_request", "查询不是合法的JSON", "the query is not JSON", str(exc))
            await request.respond_error("400", failure.error.message_en, msgspec.json.encode(failure.error))
            return
        except QueryFailed as failed:
            await request.respond_error("404", failed.error.message_en, msgspec.json.encode(failed.error))
            return
        except Exception as exc:
            log.exception("ledger query failed")
            failure = _error("unavailable", "查询暂时无法完成", "the query failed", str(exc))
            await request.respond_error("500", failure.error.message_en, msgspec.json.encode(failure.error))
            return
        if raw:
            await request.respond(result, headers={"Content-Type": XLSX_CONTENT_TYPE})
        else:
            await request.respond(msgspec.json.encode(result))

    return handle


async def start_service(
    nc: NatsClient,
    queries: LedgerQueries,
    ops: dict[str, Callable[[Request], Awaitable[None]]],
    version: str,
) -> Service:
    service = await add_service(
        nc,
        name=LEDGER_SERVICE,
        version=version,
        description="duban ledger: the progress table, county detail and history, as of any date",
    )
    endpoints: list[tuple[str, str, Callable[[Request], Awaitable[None]]]] = [
        ("table", TABLE_SUBJECT, _endpoint(TableQuery, queries.table)),
        ("county", COUNTY_SUBJECT, _endpoint(CountyQuery, queries.county)),
        ("history", HISTORY_SUBJECT, _endpoint(CountyQuery, queries.history)),
        ("overdue", OVERDUE_SUBJECT, _endpoint(TableQuery, queries.overdue)),
        ("report", REPORT_SUBJECT, _endpoint(TableQuery, queries.report, raw=True)),
    ]
    for name, subject, handler in endpoints:
        await service.add_endpoint(name=name, subject=subject, handler=handler)
    for subject, handler in ops.items():
        await service.add_endpoint(name=subject.rsplit(".", 1)[-1], subject=subject, handler=handler)
    return service


__all__ = ["PROJECTION_STATUS_SUBJECT", "REBUILD_SUBJECT", "LedgerQueries", "start_service"]
