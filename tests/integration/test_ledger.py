"""The ledger against a real nats-server and PostgreSQL: statuses and lights, time travel,
history, rebuild equal to live processing, and a database outage that delays but loses nothing."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import itertools
import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from itertools import starmap
from pathlib import Path
from typing import Any

import msgspec
import openpyxl
import pytest
import structlog

from contracts.commands import Role
from contracts.events import IndexedRetraction, decode_event
from contracts.facts import retraction_of
from contracts.ledger import (
    COUNTY_SUBJECT,
    HISTORY_SUBJECT,
    OVERDUE_SUBJECT,
    REPORT_SUBJECT,
    TABLE_SUBJECT,
    CountyDetail,
    CountyHistory,
    Light,
    OverdueList,
    PeriodStatus,
    ProgressTable,
    Status,
)
from contracts.replies import Accepted
from contracts.subjects import RETRACTIONS_COVER_FROM, RETRACTIONS_STREAM, aggregate_subject, retractions_subject
from services.common import jetstream
from services.common.embedded import EmbeddedPostgres
from services.common.jetstream import complete_retraction_index, ensure_streams, indexed_retractions
from services.common.runtime import Runtime
from services.common.settings import Settings
from services.ledger import consumer as ledger_consumer
from services.ledger.consumer import read_stream
from services.ledger.projection import GapError, RebuildResult, Reread, StoredMessage
from services.submissions import main as submissions_main
from tests.harness import (
    PROGRAMME,
    Harness,
    clean_service_environment,  # noqa: F401 (autouse: the service reads passwords from the environment)
    start_task,
    stop_task,
)
from tests.ledger_harness import Ledger, start_ledger, stop_ledger

pytestmark = pytest.mark.integration
SHANGHAI = dt.timezone(dt.timedelta(hours=8))
EVIDENCE = [{"title": "县政府常务会议纪要", "number": "濮县政〔2017〕5号"}]


def at(day: str, hour: int = 10) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(hour=hour, tzinfo=SHANGHAI)


async def accepted(harness: Harness, command: dict[str, object], **kw: object) -> Accepted:
    reply = await harness.send(command, **kw)  # type: ignore[arg-type]
    assert isinstance(reply, Accepted), reply
    return reply


def cell(table: ProgressTable, county: str, milestone: str) -> tuple[Status, Light, int]:
    row = next(r for r in table.counties if r.county_code == county)
    s = next(m for m in row.milestones if m.milestone_id == milestone)
    return s.status, s.light, s.workdays_left


async def play_spring_2017(harness: Harness) -> None:
    """濮阳县 (410928) on time with 1.1, late with 1.2; 清丰县 (410922) silent."""
    harness.clock.set(at("2017-03-28"))
    await accepted(
        harness,
        {"kind": "complete_milestone", "milestone_id": "1.1", "completed_on": "2017-03-28", "evidence": EVIDENCE},
    )
    await accepted(harness, {"kind": "request_review", "review_kind": "plan_pre_review"}, submission_id="plan-410928")
    harness.clock.set(at("2017-04-12"))
    await accepted(
        harness,
        {"kind": "decide_review", "review_kind": "plan_pre_review", "outcome": "passed", "decided_on": "2017-04-12"},
        role=Role.CITY,
    )
    await accepted(harness, {"kind": "request_review", "review_kind": "provincial_plan_review"})
    harness.clock.set(at("2017-05-09"))
    await accepted(
        harness,
        {
            "kind": "decide_review",
            "review_kind": "provincial_plan_review",
            "outcome": "passed",
            "decided_on": "2017-05-09",
            "approval_document_number": "豫建城〔2017〕45号",
        },
        role=Role.PROVINCE,
    )


async def test_progress_table_statuses_and_lights(harness: Harness, ledger: Ledger) -> None:
    await play_spring_2017(harness)
    await ledger.caught_up(harness)
    table = await ledger.ask(TABLE_SUBJECT, ProgressTable)
    # 1.1 done 2017-03-28, deadline 2017-03-31: on time.
    assert cell(table, "410928", "1.1")[:2] == (Status.DONE, Light.GREEN)
    # 1.2 deadline Sunday 2017-04-30 rolls over the Labour Day holiday to Tuesday 2017-05-02;
    # the province approved on 2017-05-09: done late, red.
    status, light, _ = cell(table, "410928", "1.2")
    assert (status, light) == (Status.DONE_LATE, Light.RED)
    row = next(r for r in table.counties if r.county_code == "410928")
    assert row.milestones[1].effective_deadline == dt.date(2017, 5, 2)
    # 清丰县 sent nothing: 1.2 is overdue by the working days 05-03, 04, 05, 08, 09.
    assert cell(table, "410922", "1.2") == (Status.OVERDUE, Light.RED, -5)
    # 1.3 (deadline 2017-06-30) is weeks away: not started, green.
    assert cell(table, "410922", "1.3")[:2] == (Status.NOT_STARTED, Light.GREEN)
    # The progress table for 2017-03 was due 2017-04-05 and never filed.
    assert (
        next(r for r in table.counties if r.county_code == "410922").progress_tables["2017-03"] is PeriodStatus.MISSING
    )
    assert table.roll_rest_day_deadlines and table.today == dt.date(2017, 5, 9)
    names = [(r.county_name, r.responsible_person) for r in table.counties]
    assert names[1:3] == [("清丰县", "刘兵"), ("南乐县", "刘冰")]


async def test_as_of_before_and_after_an_extension_and_a_retraction(harness: Harness, ledger: Ledger) -> None:
    harness.clock.set(at("2017-06-01"))
    await accepted(
        harness,
        {"kind": "request_extension", "milestone_id": "1.1", "proposed_deadline": "2017-06-20", "reason": "机构改革"},
        county="410922",
        submission_id="ext-410922",
    )
    harness.clock.set(at("2017-06-05"))
    await accepted(
        harness,
        {
            "kind": "decide_extension",
            "milestone_id": "1.1",
            "outcome": "granted",
            "new_deadline": "2017-06-20",
            "request_submission_id": "ext-410922",
        },
        county="410922",
        role=Role.CITY,
    )
    harness.clock.set(at("2017-06-08"))
    await accepted(
        harness,
        {"kind": "report_progress", "milestone_id": "1.3", "percent": 60, "note": "已立项"},
        county="410922",
        submission_id="p-410922",
    )
    harness.clock.set(at("2017-06-12"))
    await accepted(
        harness,
        {"kind": "retract_submission", "retracted_submission_id": "p-410922", "reason": "数据有误"},
        county="410922",
        role=Role.CITY,
    )
    harness.clock.set(at("2017-06-15"))
    await ledger.caught_up(harness)

    async def table_at(day: str) -> ProgressTable:
        return await ledger.ask(TABLE_SUBJECT, ProgressTable, {"as_of": at(day, 18).isoformat()})

    before_grant = await table_at("2017-06-02")
    assert cell(before_grant, "410922", "1.1")[:2] == (Status.OVERDUE, Light.RED)
    after_grant = await table_at("2017-06-06")
    # Extended to 2017-06-20: 06-07, 08, 09, 12, 13, 14, 15, 16, 19, 20 → 10 working days left.
    assert cell(after_grant, "410922", "1.1") == (Status.NOT_STARTED, Light.GREEN, 10)
    row = next(r for r in after_grant.counties if r.county_code == "410922")
    assert row.milestones[0].effective_deadline == dt.date(2017, 6, 20)
    before_retraction = await table_at("2017-06-09")
    assert cell(before_retraction, "410922", "1.3")[0] is Status.IN_PROGRESS
    assert next(r for r in before_retraction.counties if r.county_code == "410922").milestones[2].percent == 60
    after_retraction = await table_at("2017-06-13")
    assert cell(after_retraction, "410922", "1.3")[0] is Status.NOT_STARTED
    now = await ledger.ask(TABLE_SUBJECT, ProgressTable)
    # 2017-06-15: five working days to 06-20 (16, 19, 20 → 3): due soon, yellow.
    assert cell(now, "410922", "1.1") == (Status.NOT_STARTED, Light.YELLOW, 3)
    detail = await ledger.ask(COUNTY_SUBJECT, CountyDetail, {"county_code": "410922"})
    assert detail.retracted_submissions == ("p-410922",)


async def test_county_history_lists_every_event_with_actor_and_times(harness: Harness, ledger: Ledger) -> None:
    await play_spring_2017(harness)
    await ledger.caught_up(harness)
    history = await ledger.ask(HISTORY_SUBJECT, CountyHistory, {"county_code": "410928"})
    types = [e.event_type for e in history.entries]
    assert types == [
        "milestone_completed",
        "review_requested",
        "review_decided",
        "review_requested",
        "review_decided",
        "milestone_completed",
    ]
    roles = [e.actor_role for e in history.entries]
    assert roles == ["county", "county", "city", "county", "province", "province"]
    assert history.entries[0].recorded_at == at("2017-03-28")
    assert "1.2《建设方案通过评审》完成于2017-05-09" in history.entries[-1].summary
    detail = await ledger.ask(COUNTY_SUBJECT, CountyDetail, {"county_code": "410928"})
    assert [r.state for r in detail.reviews] == ["passed", "passed"]
    assert detail.milestones[1].evidence[0].number == "豫建城〔2017〕45号"


async def test_overdue_list_and_findings(harness: Harness, ledger: Ledger) -> None:
    harness.clock.set(at("2017-07-03"))
    await accepted(
        harness,
        {"kind": "report_progress", "milestone_id": "1.3", "percent": 70, "steps_done": ["tender_published"]},
        county="410923",
    )
    await ledger.caught_up(harness)
    overdue = await ledger.ask(OVERDUE_SUBJECT, OverdueList)
    # Five counties × 1.1, 1.2, 1.3 overdue on 2017-07-03.
    assert len(overdue.items) == 15
    assert {i.county_code for i in overdue.items} == {"410928", "410922", "410923", "410926", "410927"}
    detail = await ledger.ask(COUNTY_SUBJECT, CountyDetail, {"county_code": "410923"})
    assert [f.rule_id for f in detail.findings] == ["tender-pre-review-before-tender"]
    assert detail.milestones[2].status.open_findings == 1


async def test_report_query_returns_an_xlsx(harness: Harness, ledger: Ledger) -> None:
    await play_spring_2017(harness)
    await ledger.caught_up(harness)
    msg = await ledger.nc.request(REPORT_SUBJECT, b"{}", timeout=10)
    workbook = openpyxl.load_workbook(io.BytesIO(msg.data))
    text = " ".join(str(c.value) for row in workbook.worksheets[0].iter_rows() for c in row if c.value)
    assert "濮阳县" in text and "逾期完成" in text and "孙庆伟" in text


async def test_bad_queries_get_clear_errors(harness: Harness, ledger: Ledger) -> None:
    for query, code in (
        ({"county_code": "999999"}, "unknown_county"),
        ({"county_code": "410928", "programme_id": "nowhere-1"}, "unknown_programme"),
        ({"county_code": 410928}, "bad_request"),
        ({"county_code": "410928", "as_of": "2030-01-01T00:00:00+08:00"}, "bad_request"),
    ):
        msg = await ledger.nc.request(COUNTY_SUBJECT, json.dumps(query).encode(), timeout=5)
        assert msg.headers and msg.headers.get("Nats-Service-Error-Code")
        assert json.loads(msg.data)["code"] == code


async def test_nats_service_protocol_answers(ledger: Ledger) -> None:
    msg = await ledger.nc.request("$SRV.INFO.duban-ledger", b"", timeout=5)
    info = json.loads(msg.data)
    assert {e["subject"] for e in info["endpoints"]} >= {TABLE_SUBJECT, COUNTY_SUBJECT, HISTORY_SUBJECT, REPORT_SUBJECT}


async def test_rebuild_equals_live_processing(harness: Harness, ledger: Ledger) -> None:
    await play_spring_2017(harness)
    harness.clock.set(at("2017-06-01"))
    await accepted(
        harness, {"kind": "report_progress", "milestone_id": "1.3", "percent": 30}, county="410926", submission_id="r1"
    )
    await accepted(
        harness,
        {"kind": "retract_submission", "retracted_submission_id": "r1", "reason": "误报"},
        county="410926",
        role=Role.CITY,
    )
    await accepted(
        harness,
        {"kind": "file_progress_table", "period": "2017-05", "lines": [{"milestone_id": "1.1", "percent": 100}]},
    )
    await ledger.caught_up(harness)
    live = await ledger.snapshot()
    # Redelivering everything changes nothing.
    batches = [batch async for batch in read_stream(harness.js, batch_size=3)]
    for batch in batches:
        await ledger.projection.apply_batch(list(starmap(StoredMessage, batch)))
    assert await ledger.snapshot() == live

    async def again() -> object:
        for batch in batches:
            yield batch

    result = await ledger.projection.rebuild(again())  # type: ignore[arg-type]
    assert result.events == sum(len(b) for b in batches)
    assert await ledger.snapshot() == live


async def test_a_query_asked_during_a_rebuild_waits_for_it_and_gets_the_rebuilt_answer(
    harness: Harness, ledger: Ledger
) -> None:
    # The rebuild truncates the read model in its transaction: a reader waits for the commit
    # (PostgreSQL's ACCESS EXCLUSIVE lock), it never sees the tables half built or empty.
    await play_spring_2017(harness)
    await ledger.caught_up(harness)
    live = await ledger.ask(TABLE_SUBJECT, ProgressTable)
    batches = [batch async for batch in read_stream(harness.js, batch_size=5)]
    halfway = asyncio.Event()
    go_on = asyncio.Event()

    async def slow_feed() -> AsyncIterator[list[tuple[int, bytes]]]:
        for i, batch in enumerate(batches):
            if i == len(batches) // 2:
                halfway.set()
                await go_on.wait()
            yield batch

    rebuilding = asyncio.create_task(ledger.projection.rebuild(slow_feed()))
    await halfway.wait()
    asked = asyncio.create_task(ledger.ask(TABLE_SUBJECT, ProgressTable))
    await asyncio.sleep(1.0)
    assert not asked.done(), "answered while the rebuild was half way"
    go_on.set()
    await rebuilding
    assert await asked == live


async def spring_with_reports_to_retract(harness: Harness) -> None:
    """The spring of 2017, then a progress report from 410926 ("r1") and from 410922 ("r2")."""
    await play_spring_2017(harness)
    harness.clock.set(at("2017-06-01"))
    for county, submission_id in (("410926", "r1"), ("410922", "r2")):
        await accepted(
            harness,
            {"kind": "report_progress", "milestone_id": "1.3", "percent": 30},
            county=county,
            submission_id=submission_id,
        )


async def retract(harness: Harness, county: str, submission_id: str) -> None:
    await accepted(
        harness,
        {"kind": "retract_submission", "retracted_submission_id": submission_id, "reason": "误报"},
        county=county,
        role=Role.CITY,
    )


async def test_a_rebuild_takes_what_the_replaced_read_model_says_was_retracted_as_a_hint_only(
    harness: Harness, ledger: Ledger
) -> None:
    # A rebuild starts each county's fold with the retractions the old county_state names, and
    # folds a county again only where the stream's retractions turn out different. Whatever the
    # old read model claims, the rebuilt one equals the live one.
    await spring_with_reports_to_retract(harness)
    # Not an event (it is parked, live and in every rebuild), on a subject read again.
    await harness.js.publish(aggregate_subject(PROGRAMME.id, "410926"), b"{not json")
    await retract(harness, "410926", "r1")
    await ledger.caught_up(harness)
    live = await ledger.snapshot()
    claims: dict[str, dict[str, list[str]]] = {
        "as it is": {},
        "410926 retracted nothing": {"410926": []},
        "410922 retracted r2, which stands": {"410922": ["r2"]},
        "410926 retracted r2 as well": {"410926": ["r1", "r2"]},
    }
    end = int((await harness.js.stream_info("DUBAN_EVENTS")).state.last_seq)
    rebuilds: dict[str, Callable[[], Awaitable[RebuildResult]]] = {
        "folding again from the log": lambda: ledger.projection.rebuild(read_stream(harness.js)),
        "folding again from the stream": lambda: ledger_consumer.rebuild(harness.js, ledger.projection, end),
    }
    for (claim, retracted), (how, rebuild) in itertools.product(claims.items(), rebuilds.items()):
        async with ledger.pool.acquire() as conn:
            for county, ids in retracted.items():
                await conn.execute(
                    "UPDATE ledger.county_state SET state = jsonb_set(state, '{retracted}', $2::jsonb)"
                    " WHERE county_code = $1",
                    county,
                    json.dumps(ids),
                )
        await rebuild()
        assert await ledger.snapshot() == live, f"{claim}, {how}"


async def test_a_county_the_stream_gives_other_events_than_its_log_is_folded_from_the_log(
    harness: Harness, ledger: Ledger
) -> None:
    # What a county is folded again from must be its log: read again from the stream, an event
    # missing or one more than the log holds sends that county back to its log.
    await spring_with_reports_to_retract(harness)
    await retract(harness, "410926", "r1")
    await retract(harness, "410922", "r2")
    await ledger.caught_up(harness)
    live = await ledger.snapshot()
    stream = [item async for batch in read_stream(harness.js) for item in batch]
    asked: list[list[tuple[str, str]]] = []

    def rereading(change: Callable[[list[tuple[int, bytes]]], list[tuple[int, bytes]]]) -> Reread:
        async def reread(keys: Sequence[tuple[str, str]], upto: int) -> AsyncIterable[Sequence[tuple[int, bytes]]]:
            asked.append(list(keys))

            async def batches() -> AsyncIterator[Sequence[tuple[int, bytes]]]:
                yield change([(seq, data) for seq, data in stream if seq <= upto])

            return batches()

        return reread

    async def truncate_states() -> None:  # nothing foreseen: every county with a retraction refolds
        async with ledger.pool.acquire() as conn:
            await conn.execute("UPDATE ledger.county_state SET state = jsonb_set(state, '{retracted}', '[]')")

    for change in (
        lambda items: items,  # the stream as it is (all of it, other counties too: they are skipped)
        lambda items: items[:-1],  # the last event missing
        lambda items: [*items, items[-1]],  # one event twice
    ):
        await truncate_states()
        await ledger.projection.rebuild(read_stream(harness.js), reread=rereading(change))
        assert await ledger.snapshot() == live
    assert [sorted(k[1] for k in keys) for keys in asked] == [["410922", "410926"]] * 3


async def empty_read_model(ledger: Ledger) -> None:
    async with ledger.pool.acquire() as conn:
        await conn.execute("TRUNCATE ledger.event_log, ledger.county_state, ledger.milestones, ledger.checkpoint")


async def two_counties_retracting(harness: Harness, ledger: Ledger) -> tuple[dict[str, list[tuple[Any, ...]]], int]:
    """410926 retracts r1, 410922 r2, with a message that is not an event between; the live
    ledger's read model once caught up, and the stream's last sequence."""
    await spring_with_reports_to_retract(harness)
    await harness.js.publish(aggregate_subject(PROGRAMME.id, "410926"), b"{not json")
    await retract(harness, "410926", "r1")
    await retract(harness, "410922", "r2")
    await ledger.caught_up(harness)
    return await ledger.snapshot(), int((await harness.js.stream_info("DUBAN_EVENTS")).state.last_seq)


def recording_reads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The subjects kept by each read of the event stream through ``read_subjects`` (None: all,
    the read-ahead; a set: counties read again), recorded as the reads begin."""
    reads: list[object] = []
    real_read_subjects = jetstream.read_subjects

    async def read_subjects(*args: object, **kw: object) -> object:
        reads.append(args[3])
        return await real_read_subjects(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ledger_consumer, "read_subjects", read_subjects)  # counties read again
    monkeypatch.setattr(jetstream, "read_subjects", read_subjects)  # the read-ahead
    return reads


async def test_an_empty_read_model_takes_the_retractions_from_the_index_and_reads_the_stream_once(
    harness: Harness, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The submissions service adds every retraction it stores to the retraction index. With no
    # read model to say what was retracted, the rebuild reads that index: every county's fold
    # starts right, the event stream is read once, and no county is read again.
    live, end = await two_counties_retracting(harness, ledger)
    retractions = [
        (sequence, envelope)
        for batch in [b async for b in read_stream(harness.js)]
        for sequence, envelope in ((seq, decode_event(data)) for seq, data in batch if b"submission_retracted" in data)
    ]
    indexed = await indexed_retractions(harness.js, end)
    assert indexed is not None
    assert [(e.stream_sequence, e.event_id, e.county_code, e.retracted_submission_id) for e in indexed] == [
        (sequence, envelope.event_id, envelope.county_code, retracted)
        for sequence, envelope in retractions
        if (retracted := retraction_of(envelope)) is not None
    ]
    assert [e.retracted_submission_id for e in indexed] == ["r1", "r2"]
    await ensure_streams(harness.js)  # declared again, as every service does when it starts
    info = await harness.js.stream_info(RETRACTIONS_STREAM)
    assert (info.config.metadata or {})[RETRACTIONS_COVER_FROM] == "1"
    assert await ledger_consumer.foresee_retractions(harness.js, end) == {
        (PROGRAMME.id, "410926"): {"r1"},
        (PROGRAMME.id, "410922"): {"r2"},
    }
    assert await ledger_consumer.foresee_retractions(harness.js, end - 1) == {(PROGRAMME.id, "410926"): {"r1"}}
    reads = recording_reads(monkeypatch)
    await empty_read_model(ledger)
    with structlog.testing.capture_logs() as logs:
        await ledger_consumer.rebuild(harness.js, ledger.projection, end)
    assert await ledger.snapshot() == live
    assert [e["entries"] for e in logs if e["event"] == "retractions foreseen from the retraction index"] == [2]
    assert reads == [], "nothing read ahead, no county read again"
    # The index is a hint: an entry naming a submission that stands, and one that is not an
    # entry at all, only make the rebuild fold that county again, to the same read model.
    await harness.js.publish(
        retractions_subject(PROGRAMME.id, "410928"),
        msgspec.json.encode(
            IndexedRetraction(
                stream_sequence=end,
                event_id="made-up/0",
                programme_id=PROGRAMME.id,
                county_code="410928",
                retracted_submission_id="s-39",
            )
        ),
    )
    await harness.js.publish(retractions_subject(PROGRAMME.id, "410928"), b"not an entry")
    await empty_read_model(ledger)
    await ledger_consumer.rebuild(harness.js, ledger.projection, end)
    assert await ledger.snapshot() == live
    assert reads == [{aggregate_subject(PROGRAMME.id, "410928")}]


async def test_without_an_index_from_the_first_event_an_empty_read_model_reads_the_retractions_ahead(
    harness: Harness, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An index created after events were stored (a deployment from before the index, or one
    # restored without it) does not cover the earlier retractions: the rebuild reads the
    # stream's retractions ahead (one quick pass over its bytes) and folds no county twice.
    live, end = await two_counties_retracting(harness, ledger)
    await harness.js.delete_stream(RETRACTIONS_STREAM)
    await ensure_streams(harness.js)  # as a service starting finds it: created, from the next event on
    info = await harness.js.stream_info(RETRACTIONS_STREAM)
    assert (info.config.metadata or {})[RETRACTIONS_COVER_FROM] == str(end + 1)
    assert await indexed_retractions(harness.js, end) is None
    assert await ledger_consumer.foresee_retractions(harness.js, end) == {
        (PROGRAMME.id, "410926"): {"r1"},
        (PROGRAMME.id, "410922"): {"r2"},
    }
    reads = recording_reads(monkeypatch)
    await empty_read_model(ledger)
    with structlog.testing.capture_logs() as logs:
        await ledger_consumer.rebuild(harness.js, ledger.projection, end)
    assert await ledger.snapshot() == live
    assert [e["counties"] for e in logs if e["event"] == "retractions read ahead"] == [2]
    assert reads == [None], "the read-ahead (every subject) and no county read again"
    # Replacing a read model, what it names is taken instead: nothing is read ahead.
    with structlog.testing.capture_logs() as logs:
        await ledger_consumer.rebuild(harness.js, ledger.projection, end)
    assert await ledger.snapshot() == live
    assert [e for e in logs if e["event"] == "retractions read ahead"] == []
    # Where the retractions cannot be foreseen (a connection the replay does not speak), the
    # counties with retractions are folded again instead, to the same read model.
    await empty_read_model(ledger)

    async def cannot_foresee(js: object, upto: int) -> None:
        return None

    monkeypatch.setattr(ledger_consumer, "foresee_retractions", cannot_foresee)
    reads.clear()
    await ledger_consumer.rebuild(harness.js, ledger.projection, end)
    assert await ledger.snapshot() == live
    assert reads == [{aggregate_subject(PROGRAMME.id, county) for county in ("410922", "410926")}]


async def test_a_submissions_service_starting_completes_an_index_created_after_events_were_stored(
    harness: Harness, ledger: Ledger, nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A deployment that had events before it had the index: its index covers only the events
    # after its creation, and rebuilds read the retractions ahead. A submissions service starting
    # indexes the earlier ones and marks the index as covering the stream from its first event.
    live, end = await two_counties_retracting(harness, ledger)
    as_stored = await indexed_retractions(harness.js, end)
    assert as_stored is not None and [e.retracted_submission_id for e in as_stored] == ["r1", "r2"]
    await harness.js.delete_stream(RETRACTIONS_STREAM)
    await ensure_streams(harness.js)
    assert await indexed_retractions(harness.js, end) is None
    # A completion that stopped part way left the first entry (and the server has forgotten its id).
    await harness.js.publish(retractions_subject(PROGRAMME.id, "410926"), msgspec.json.encode(as_stored[0]))
    runtime = Runtime(Settings(state_dir=tmp_path), {PROGRAMME.id: PROGRAMME}, nats_url, None)
    with structlog.testing.capture_logs() as logs:
        task, stop = await start_task(
            "submissions", lambda stop, ready: submissions_main.run(runtime, harness.clock, stop, ready)
        )
        try:
            for _ in range(200):
                if (covered := await indexed_retractions(harness.js, end)) is not None:
                    break
                await asyncio.sleep(0.05)
        finally:
            await stop_task(task, stop)
    assert covered == as_stored, "each retraction once, with its stream sequence"
    assert [e["added"] for e in logs if e["event"] == "retraction index completed"] == [1]
    assert await complete_retraction_index(harness.js) is None, "once per deployment"
    await ensure_streams(harness.js)  # declared again, as every service does when it starts
    assert (await indexed_retractions(harness.js, end)) == as_stored
    reads = recording_reads(monkeypatch)
    await empty_read_model(ledger)
    await ledger_consumer.rebuild(harness.js, ledger.projection, end)
    assert await ledger.snapshot() == live
    assert reads == [], "the rebuild took the index: nothing read ahead, no county read again"


CAUGHT_UP_BY_REBUILD = "read model caught up by a rebuild"


async def test_an_empty_read_model_is_filled_by_a_rebuild_then_followed_live(
    harness: Harness, ledger: Ledger, nats_url: str, fresh_database_sync: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_consumer, "FILL_BY_REBUILD_FROM", 1)  # (a long stream, in production)
    await play_spring_2017(harness)
    await ledger.caught_up(harness)
    live = await ledger.snapshot()
    await stop_ledger(ledger)  # one live consumer at a time on the durable (leadership, in production)
    with structlog.testing.capture_logs() as logs:
        fresh = await start_ledger(nats_url, fresh_database_sync, harness.clock)
        try:
            checkpoint = await fresh.caught_up(harness)
            filled = [e for e in logs if e["event"] == CAUGHT_UP_BY_REBUILD]
            assert len(filled) == 1 and filled[0]["events"] == checkpoint
            assert await fresh.snapshot() == live
            # and then it follows the stream as any live consumer does
            await accepted(harness, {"kind": "report_progress", "milestone_id": "1.3", "percent": 50}, county="410926")
            assert await fresh.caught_up(harness) == checkpoint + 1
        finally:
            await stop_ledger(fresh)


async def test_a_read_model_behind_by_more_than_half_the_stream_catches_up_by_a_rebuild(
    harness: Harness, ledger: Ledger, nats_url: str, fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database restored from an old backup, a ledger down for long: a rebuild applies events
    # 15-40 times as fast as the live consumer. A short lag is left to the live consumer.
    monkeypatch.setattr(ledger_consumer, "FILL_BY_REBUILD_FROM", 1)
    await play_spring_2017(harness)
    applied = await ledger.caught_up(harness)
    await stop_ledger(ledger)

    async def report(count: int, offset: int) -> None:
        for i in range(count):
            body = {"kind": "report_progress", "milestone_id": "1.3", "percent": (offset + i) % 100}
            await accepted(harness, body, county="410923")

    async def restart() -> tuple[Ledger, int, list[dict[str, object]]]:
        with structlog.testing.capture_logs() as logs:
            again = await start_ledger(nats_url, fresh_database, harness.clock)
            checkpoint = await again.caught_up(harness)
        return again, checkpoint, [e for e in logs if e["event"] == CAUGHT_UP_BY_REBUILD]

    await report(applied + 1, 0)  # more than half of the stream not applied
    restarted, checkpoint, rebuilds = await restart()
    try:
        assert [e["events"] for e in rebuilds] == [checkpoint] and checkpoint == 2 * applied + 1
        history = await restarted.ask(HISTORY_SUBJECT, CountyHistory, {"county_code": "410923"})
        assert [e.payload["percent"] for e in history.entries] == [i % 100 for i in range(applied + 1)]
    finally:
        await stop_ledger(restarted)
    await report(3, applied + 1)  # a short lag
    restarted, later, rebuilds = await restart()
    try:
        assert rebuilds == [] and later == checkpoint + 3
    finally:
        await stop_ledger(restarted)


async def test_postgres_outage_delays_events_but_loses_none(harness: Harness, nats_url: str, tmp_path: Path) -> None:
    async with EmbeddedPostgres(tmp_path / "pg", durable=False) as postgres:
        own = await start_ledger(nats_url, postgres.dsn, harness.clock)
        try:
            await play_spring_2017(harness)
            await own.caught_up(harness)
            await postgres.stop()
            harness.clock.set(at("2017-05-20"))
            for i in range(5):
                await accepted(
                    harness, {"kind": "report_progress", "milestone_id": "1.3", "percent": 10 + i}, county="410927"
                )
            await postgres.start()
            checkpoint = await own.caught_up(harness, timeout=30)
            history = await own.ask(HISTORY_SUBJECT, CountyHistory, {"county_code": "410927"})
            assert [e.payload["percent"] for e in history.entries] == [10, 11, 12, 13, 14]
            info = await harness.js.stream_info("DUBAN_EVENTS")
            assert checkpoint == info.state.last_seq
        finally:
            await stop_ledger(own)


async def test_ledger_keeps_following_after_idle_periods(harness: Harness, ledger: Ledger) -> None:
    # An idle pull consumer sees its pull requests expire (status messages, empty fetches);
    # the ledger must still apply what comes afterwards.
    with structlog.testing.capture_logs() as logs:
        await accepted(harness, {"kind": "report_progress", "milestone_id": "1.1", "percent": 10})
        await ledger.caught_up(harness)
        await asyncio.sleep(3)
        await accepted(harness, {"kind": "report_progress", "milestone_id": "1.1", "percent": 20})
        await ledger.caught_up(harness, timeout=5)
    assert not ledger.task.done()
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []


async def test_the_stream_reader_never_drops_messages_for_a_slow_reader(harness: Harness) -> None:
    # A push consumer drops what exceeds its pending limit while the reader is busy; the
    # rebuild's reader pulls, so a slow reader still gets every message, in order.
    from nats.js.api import StreamConfig

    from services.common.jetstream import read_all

    await harness.js.add_stream(StreamConfig(name="T_READ", subjects=["t.read.>"]))
    try:
        acks = [await harness.js.publish_async(f"t.read.{i % 7}", b"x" * 200) for i in range(3000)]
        await asyncio.gather(*acks)
        seen: list[int] = []
        async for batch in read_all(harness.js, "T_READ", "t.read.>", batch_size=100):
            await asyncio.sleep(0.01)  # a reader busy with its database
            seen.extend(seq for seq, _ in batch)
        assert seen == list(range(1, 3001))
    finally:
        await harness.js.delete_stream("T_READ")


async def test_a_rebuild_refuses_a_stream_with_holes(harness: Harness, ledger: Ledger) -> None:
    await play_spring_2017(harness)
    await ledger.caught_up(harness)
    before = await ledger.snapshot()
    batches = [batch async for batch in read_stream(harness.js, batch_size=2)]
    holed = [batches[0], batches[1][1:], *batches[2:]]  # one event lost on the way

    async def feed() -> AsyncIterator[Sequence[tuple[int, bytes]]]:
        for batch in holed:
            yield batch

    with pytest.raises(GapError):
        await ledger.projection.rebuild(feed())
    last = batches[-1][-1][0]

    async def short() -> AsyncIterator[Sequence[tuple[int, bytes]]]:
        yield batches[0]

    with pytest.raises(GapError):  # stopped before the stream's end
        await ledger.projection.rebuild(short(), expected_last=last)
    assert await ledger.snapshot() == before  # nothing committed


async def test_the_log_keeps_each_event_exactly_as_stored(harness: Harness, ledger: Ledger) -> None:
    # COPY's text format escapes backslashes, tabs and newlines: a note full of them comes back intact.
    note = 'C:\\路径\\文件\t制表\n换行 "引号" \\u4e2d'
    reply = await harness.send({"kind": "report_progress", "milestone_id": "2.1", "percent": 5, "note": note})
    assert isinstance(reply, Accepted)
    await ledger.caught_up(harness)
    stored = dict((seq, data) for seq, data in [(s, e) for s, e in await harness.events("410928")])
    for rebuilt in (False, True):
        if rebuilt:
            await ledger.projection.rebuild(read_stream(harness.js))
        async with ledger.pool.acquire() as conn:
            rows = await conn.fetch("SELECT stream_sequence, envelope::text AS e FROM ledger.event_log")
        logged = {r["stream_sequence"]: json.loads(r["e"]) for r in rows}
        assert set(logged) == set(stored)
        for seq, envelope in stored.items():
            assert logged[seq]["event_id"] == envelope.event_id
            assert logged[seq]["payload"] == json.loads(msgspec.json.encode(envelope.payload))
        assert any(entry["payload"].get("note") == note for entry in logged.values())
