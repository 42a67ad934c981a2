"""The submissions service against a real nats-server: every command kind accepted and stored,
every refusal kind refused and recorded, idempotency, concurrency, procedure findings."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import structlog.testing

from contracts.commands import MAX_SUBMISSION_BYTES, Role
from contracts.errors import ErrorCode
from contracts.events import IndexedRetraction
from contracts.replies import Accepted, Refused
from contracts.subjects import EVENTS_STREAM, submit_subject
from services.common.jetstream import indexed_retractions
from services.submissions import store as store_module
from services.submissions.service import SubmissionsService
from services.submissions.store import EventStore
from tests.harness import NOW, Harness, new_id, start_service

pytestmark = pytest.mark.integration

EVIDENCE = [{"title": "关于同意建设数字化城管系统的批复", "number": "濮政办〔2016〕23号"}]

COUNTY_COMMANDS: list[tuple[dict[str, Any], list[str]]] = [
    (
        {"kind": "report_progress", "milestone_id": "1.1", "percent": 60, "note": "项目部已组建"},
        ["progress_reported"],
    ),
    (
        {
            "kind": "complete_milestone",
            "milestone_id": "1.1",
            "completed_on": "2017-03-28",
            "evidence": EVIDENCE,
        },
        ["milestone_completed"],
    ),
    (
        {
            "kind": "request_review",
            "review_kind": "plan_pre_review",
            "documents": [{"title": "建设方案（送审稿）"}],
        },
        ["review_requested"],
    ),
    (
        {
            "kind": "file_progress_table",
            "period": "2017-05",
            "lines": [{"milestone_id": "1.1", "percent": 100}],
        },
        ["progress_table_filed"],
    ),
    (
        {
            "kind": "request_extension",
            "milestone_id": "1.3",
            "proposed_deadline": "2017-08-31",
            "reason": "招标流标",
        },
        ["extension_requested"],
    ),
    # Trial operation before 2.3 is done is a procedure finding (it follows its fact); it completes 3.1.
    (
        {"kind": "start_trial_operation", "started_on": "2017-06-01"},
        ["trial_operation_started", "procedure_finding_recorded", "milestone_completed"],
    ),
]


@pytest.mark.parametrize(("command", "types"), COUNTY_COMMANDS, ids=[c["kind"] for c, _ in COUNTY_COMMANDS])
async def test_each_county_command_is_accepted_and_stored(
    harness: Harness, command: dict[str, Any], types: list[str]
) -> None:
    reply = await harness.send(command, submission_id="c-1", submitted_by="puyang-county-system")
    assert isinstance(reply, Accepted), reply
    assert [e.event_type for e in reply.events] == types
    stored = await harness.events("410928")
    assert [seq for seq, _ in stored] == [e.stream_sequence for e in reply.events]
    first = stored[0][1]
    assert first.submission_id == "c-1" and first.actor.role == "county" and first.actor.county_code == "410928"
    assert first.actor.user == "puyang-county-system"
    assert first.recorded_at == NOW and first.correlation_id == "c-1"


async def test_each_operator_command_is_accepted_and_stored(harness: Harness) -> None:
    plan = await harness.send({"kind": "request_review", "review_kind": "plan_pre_review"}, submission_id="plan")
    assert isinstance(plan, Accepted)
    passed = await harness.send(
        {
            "kind": "decide_review",
            "review_kind": "plan_pre_review",
            "outcome": "passed",
            "decided_on": "2017-04-10",
            "request_submission_id": "plan",
        },
        role=Role.CITY,
        submitted_by="city-operator-zhang",
    )
    assert isinstance(passed, Accepted) and [e.event_type for e in passed.events] == ["review_decided"]

    prov = await harness.send({"kind": "request_review", "review_kind": "provincial_plan_review"})
    assert isinstance(prov, Accepted) and prov.findings == ()
    approved = await harness.send(
        {
            "kind": "decide_review",
            "review_kind": "provincial_plan_review",
            "outcome": "passed",
            "decided_on": "2017-04-28",
            "approval_document_number": "豫建城〔2017〕45号",
        },
        role=Role.PROVINCE,
    )
    # The province's approval completes milestone 1.2 (DOMAIN.md: 报审), in one atomic batch.
    assert isinstance(approved, Accepted), approved
    assert [e.event_type for e in approved.events] == ["review_decided", "milestone_completed"]
    assert approved.events[1].stream_sequence == approved.events[0].stream_sequence + 1

    ext = await harness.send(
        {
            "kind": "request_extension",
            "milestone_id": "1.3",
            "proposed_deadline": "2017-08-31",
            "reason": "流标",
        },
        submission_id="ext",
    )
    assert isinstance(ext, Accepted)
    granted = await harness.send(
        {
            "kind": "decide_extension",
            "milestone_id": "1.3",
            "outcome": "granted",
            "new_deadline": "2017-08-31",
            "request_submission_id": "ext",
        },
        role=Role.CITY,
    )
    assert isinstance(granted, Accepted) and [e.event_type for e in granted.events] == ["extension_decided"]

    retract = await harness.send(
        {"kind": "retract_submission", "retracted_submission_id": "ext", "reason": "县政府撤回申请"},
        role=Role.CITY,
    )
    assert isinstance(retract, Accepted) and [e.event_type for e in retract.events] == ["submission_retracted"]

    stored = await harness.events("410928")
    actors = {env.submission_id: env.actor for _, env in stored}
    assert actors[approved.submission_id].role == "province"
    assert actors[passed.submission_id].user == "city-operator-zhang"
    assert len(stored) == 8


async def index_entries(harness: Harness) -> list[IndexedRetraction]:
    entries = await indexed_retractions(harness.js, 10**9)
    assert entries is not None, "a new deployment's index covers the stream from its first event"
    return entries


async def test_a_retraction_goes_into_the_retraction_index_once_and_a_failure_there_refuses_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    for submission_id in ("p1", "p2"):
        report = {"kind": "report_progress", "milestone_id": "1.3", "percent": 30}
        assert isinstance(await harness.send(report, submission_id=submission_id), Accepted)
    retraction = {"kind": "retract_submission", "retracted_submission_id": "p1", "reason": "误报"}
    first = await harness.send(retraction, role=Role.CITY, submission_id="r-p1")
    assert isinstance(first, Accepted)
    again = await harness.send(retraction, role=Role.CITY, submission_id="r-p1")  # a resend: stored once
    assert isinstance(again, Accepted) and again.events == first.events
    assert [(e.stream_sequence, e.county_code, e.retracted_submission_id) for e in await index_entries(harness)] == [
        (first.events[0].stream_sequence, "410928", "p1")
    ]

    async def unavailable(*args: object) -> int:
        raise TimeoutError("no answer")

    monkeypatch.setattr(store_module, "index_retractions", unavailable)
    retraction = {"kind": "retract_submission", "retracted_submission_id": "p2", "reason": "误报"}
    with structlog.testing.capture_logs() as logs:
        reply = await harness.send(retraction, role=Role.CITY, submission_id="r-p2")
    assert isinstance(reply, Accepted), reply
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["retraction not indexed"]
    assert [e.submission_id for _, e in await harness.events("410928")][-1] == "r-p2"  # stored all the same
    assert len(await index_entries(harness)) == 1


async def _assert_refused_and_recorded(
    harness: Harness, reply: Accepted | Refused, code: ErrorCode, field: str | None
) -> None:
    assert isinstance(reply, Refused), reply
    assert reply.code is code
    assert reply.field == field
    assert reply.message_zh and reply.message_en
    assert await harness.events() == []  # nothing stored as a fact
    refusals = await harness.refusals()
    assert [r.refusal.code for r in refusals] == [code]  # but the refusal is on record


async def test_malformed_json_is_refused(harness: Harness) -> None:
    reply = await harness.send_raw(Role.COUNTY, "410928", b'{"submission_id": "x", ')
    await _assert_refused_and_recorded(harness, reply, ErrorCode.MALFORMED, None)
    assert (await harness.refusals())[0].body == '{"submission_id": "x", '


async def test_wrong_type_is_refused_naming_the_field(harness: Harness) -> None:
    reply = await harness.send({"kind": "report_progress", "milestone_id": "1.1", "percent": "half"})
    await _assert_refused_and_recorded(harness, reply, ErrorCode.MALFORMED, "$.command.percent")


async def test_oversized_is_refused(harness: Harness) -> None:
    note = "很" * (MAX_SUBMISSION_BYTES // 3 + 10)  # 3 bytes each in UTF-8
    reply = await harness.send({"kind": "report_progress", "milestone_id": "1.1", "percent": 5, "note": note})
    await _assert_refused_and_recorded(harness, reply, ErrorCode.OVERSIZED, None)
    record = (await harness.refusals())[0]
    assert record.size > MAX_SUBMISSION_BYTES and len(record.sha256) == 64


async def test_unknown_county_is_refused(harness: Harness) -> None:
    reply = await harness.send({"kind": "report_progress", "milestone_id": "1.1", "percent": 5}, county="410901")
    await _assert_refused_and_recorded(harness, reply, ErrorCode.UNKNOWN_COUNTY, "$.county_code")


async def test_unknown_programme_is_refused(harness: Harness) -> None:
    reply = await harness.send(
        {"kind": "report_progress", "milestone_id": "1.1", "percent": 5}, programme_id="anyang-2017-1"
    )
    await _assert_refused_and_recorded(harness, reply, ErrorCode.UNKNOWN_PROGRAMME, "$.programme_id")


async def test_unknown_milestone_is_refused(harness: Harness) -> None:
    reply = await harness.send({"kind": "report_progress", "milestone_id": "4.1", "percent": 5})
    await _assert_refused_and_recorded(harness, reply, ErrorCode.UNKNOWN_MILESTONE, "$.command.milestone_id")


async def test_county_mismatch_is_refused(harness: Harness) -> None:
    # Sent on 清丰县's subject with 濮阳县 in the payload.
    reply = await harness.send(
        {"kind": "report_progress", "milestone_id": "1.1", "percent": 5},
        county="410922",
        county_code="410928",
    )
    await _assert_refused_and_recorded(harness, reply, ErrorCode.COUNTY_MISMATCH, "$.county_code")


async def test_operator_command_from_a_county_is_refused(harness: Harness) -> None:
    reply = await harness.send(
        {
            "kind": "decide_review",
            "review_kind": "plan_pre_review",
            "outcome": "passed",
            "decided_on": "2017-04-10",
        }
    )
    await _assert_refused_and_recorded(harness, reply, ErrorCode.NOT_AUTHORISED, "$.command.kind")


async def test_county_command_from_an_operator_is_refused(harness: Harness) -> None:
    reply = await harness.send({"kind": "report_progress", "milestone_id": "1.1", "percent": 5}, role=Role.CITY)
    await _assert_refused_and_recorded(harness, reply, ErrorCode.NOT_AUTHORISED, "$.command.kind")


async def test_completion_date_in_the_future_is_refused(harness: Harness) -> None:
    reply = await harness.send(
        {
            "kind": "complete_milestone",
            "milestone_id": "1.3",
            "completed_on": "2017-06-16",
            "evidence": EVIDENCE,
        }
    )
    await _assert_refused_and_recorded(harness, reply, ErrorCode.DATE_IN_FUTURE, "$.command.completed_on")


async def test_the_same_submission_twice_is_stored_once_with_the_same_answer(harness: Harness) -> None:
    command = {
        "kind": "report_progress",
        "milestone_id": "1.3",
        "percent": 40,
        "steps_done": ["tender_published"],
    }
    first = await harness.send(command, submission_id="dup-1")
    second = await harness.send(command, submission_id="dup-1")
    assert isinstance(first, Accepted) and isinstance(second, Accepted)
    assert second.duplicate and not first.duplicate
    assert second.events == first.events and second.findings == first.findings
    assert len(await harness.events()) == 2  # the fact and its finding, once


async def test_a_resend_is_answered_from_the_stream_by_a_fresh_instance_after_later_events(harness: Harness) -> None:
    # A record keeps only where each submission's events start; the answer to a resend is read
    # back from the stream, and must stop at the submission's own events (not the county's
    # next submission, nor other counties' events stored in between).
    tender = {"kind": "report_progress", "milestone_id": "1.3", "percent": 40, "steps_done": ["tender_published"]}
    first = await harness.send(tender, submission_id="old-1")
    await harness.send({"kind": "report_progress", "milestone_id": "1.1", "percent": 10}, county="410923")
    later = await harness.send(tender | {"percent": 60}, submission_id="later-1")
    assert isinstance(first, Accepted) and isinstance(later, Accepted) and len(first.events) == 2
    fresh = SubmissionsService(
        EventStore(harness.nc, harness.js), {harness.programme.id: harness.programme}, harness.clock
    )
    body = {"submission_id": "old-1", "programme_id": harness.programme.id, "county_code": "410928", "command": tender}
    subject = submit_subject(Role.COUNTY, "410928")
    again = await fresh.handle(subject, json.dumps(body).encode())
    assert isinstance(again, Accepted) and again.duplicate
    assert (again.events, again.findings) == (first.events, first.findings)
    conflict = await fresh.handle(subject, json.dumps(body | {"command": tender | {"percent": 41}}).encode())
    assert isinstance(conflict, Refused) and conflict.code is ErrorCode.SUBMISSION_ID_CONFLICT
    assert len(await harness.events("410928")) == 3  # the fact and its finding, the later fact: nothing again


async def test_a_reused_id_with_other_content_is_refused(harness: Harness) -> None:
    assert isinstance(
        await harness.send({"kind": "report_progress", "milestone_id": "1.1", "percent": 40}, submission_id="r"),
        Accepted,
    )
    reply = await harness.send({"kind": "report_progress", "milestone_id": "1.1", "percent": 90}, submission_id="r")
    assert isinstance(reply, Refused) and reply.code is ErrorCode.SUBMISSION_ID_CONFLICT
    assert len(await harness.events()) == 1


async def test_a_step_out_of_order_is_stored_with_its_finding(harness: Harness) -> None:
    reply = await harness.send(
        {"kind": "report_progress", "milestone_id": "1.3", "percent": 50, "steps_done": ["tender_published"]}
    )
    assert isinstance(reply, Accepted)
    assert [f.rule_id for f in reply.findings] == ["tender-pre-review-before-tender"]
    stored = [env for _, env in await harness.events()]
    assert [e.event_type for e in stored] == ["progress_reported", "procedure_finding_recorded"]
    finding = stored[1]
    assert finding.causation_id == stored[0].event_id
    assert finding.payload.trigger_event_id == stored[0].event_id  # type: ignore[union-attr]


async def test_concurrent_submissions_for_one_county_are_all_stored_in_order(harness: Harness, nats_url: str) -> None:
    # A second service instance in the same queue group: the two decide against their own
    # cached records, so appends race and the expected-sequence check must serialise them.
    micro, nc = await start_service(nats_url, harness.clock)
    try:
        ids = [new_id("conc") for _ in range(40)]
        replies = await asyncio.gather(
            *(
                harness.send({"kind": "report_progress", "milestone_id": "2.1", "percent": i % 100}, submission_id=sid)
                for i, sid in enumerate(ids)
            )
        )
    finally:
        await micro.stop()
        await nc.close()
    assert all(isinstance(r, Accepted) and not r.duplicate for r in replies), replies
    stored = await harness.events("410928")
    assert sorted(env.submission_id for _, env in stored) == sorted(ids)  # none lost, none twice
    sequences = [seq for seq, _ in stored]
    assert sequences == sorted(sequences) and len(set(sequences)) == 40
    by_id = {r.submission_id: r.events[0].stream_sequence for r in replies if isinstance(r, Accepted)}
    assert by_id == {env.submission_id: seq for seq, env in stored}


async def test_event_stream_is_durable_and_append_only(harness: Harness) -> None:
    info = await harness.js.stream_info(EVENTS_STREAM)
    config = info.config
    assert config.deny_delete and config.deny_purge and config.allow_atomic
    assert config.storage == "file" and config.max_age in (0, None)
    assert config.duplicate_window and config.duplicate_window >= 60


async def test_refusal_keeps_non_utf8_bodies(harness: Harness) -> None:
    reply = await harness.send_raw(Role.COUNTY, "410928", b"\xff\xfe\x00garbage")
    assert isinstance(reply, Refused) and reply.code is ErrorCode.MALFORMED
    record = (await harness.refusals())[0]
    assert record.body_encoding == "base64"


async def test_log_lines_carry_the_submissions_correlation_id(harness: Harness) -> None:
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        accepted = await harness.send(
            {"kind": "report_progress", "milestone_id": "1.1", "percent": 10}, submission_id="corr-1"
        )
        refused = await harness.send(
            {"kind": "report_progress", "milestone_id": "9.9", "percent": 10}, submission_id="corr-2"
        )
    assert isinstance(accepted, Accepted) and isinstance(refused, Refused)
    by_event = {line["event"]: line for line in logs}
    assert by_event["submission accepted"]["correlation_id"] == "corr-1"
    assert by_event["submission accepted"]["county_code"] == "410928"
    assert by_event["submission refused"]["correlation_id"] == "corr-2"
