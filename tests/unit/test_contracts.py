"""Wire contracts: strict submission decoding, event envelopes round-trip, upcasting old events."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import msgspec
import pytest

from contracts import events as ev
from contracts.commands import (
    CompleteMilestone,
    ReportProgress,
    Submission,
    decode_submission,
    encode,
)
from contracts.errors import ERROR_TEXT, ErrorCode
from contracts.events import (
    EVENT_SCHEMA_VERSIONS,
    EVENT_TYPES,
    UPCASTERS,
    Actor,
    EventPayload,
    decode_event,
    encode_event,
)
from contracts.payloads import (
    Document,
    ExtensionOutcome,
    ProgressTableLine,
    ReviewOutcome,
)
from contracts.replies import Accepted, FindingNotice, StoredEvent, decode_reply, refused
from tests.samples import sample_envelope

SHANGHAI = dt.timezone(dt.timedelta(hours=8))


def submission_json(command: dict[str, Any] | None = None, **top: Any) -> bytes:
    body: dict[str, Any] = {
        "submission_id": "qf-2017-0001",
        "programme_id": "puyang-2017-13",
        "county_code": "410922",
        "command": command
        if command is not None
        else {"kind": "report_progress", "milestone_id": "1.3", "percent": 50},
    }
    body.update(top)
    return json.dumps(body, ensure_ascii=False).encode()


def rejected(data: bytes) -> str:
    with pytest.raises(msgspec.ValidationError) as info:
        decode_submission(data)
    return str(info.value)


# -- submissions ---------------------------------------------------------------------------------
def test_valid_submission_decodes() -> None:
    sub = decode_submission(
        submission_json(
            {
                "kind": "report_progress",
                "milestone_id": "1.3",
                "percent": 60,
                "steps_done": ["tender_published"],
            },
            occurred_at="2017-06-10T09:30:00+08:00",
            submitted_by="清丰县数字城管系统",
        )
    )
    assert isinstance(sub.command, ReportProgress)
    assert sub.command.steps_done == ("tender_published",)
    assert sub.occurred_at == dt.datetime(2017, 6, 10, 9, 30, tzinfo=SHANGHAI)
    assert sub.schema_version == 1


def test_submission_round_trips() -> None:
    sub = Submission(
        submission_id="qf-1",
        programme_id="puyang-2017-13",
        county_code="410922",
        command=CompleteMilestone(
            milestone_id="1.1",
            completed_on=dt.date(2017, 3, 30),
            evidence=(Document(title="批复", number="清政〔2017〕1号", sha256="a" * 64),),
        ),
        occurred_at=dt.datetime(2017, 3, 30, 12, tzinfo=SHANGHAI),
    )
    assert decode_submission(encode(sub)) == sub


def test_unknown_top_level_field_is_refused() -> None:
    assert "unknown field `priority`" in rejected(submission_json(priority="high"))


def test_unknown_command_field_is_refused_with_its_path() -> None:
    message = rejected(submission_json({"kind": "report_progress", "milestone_id": "1.3", "percent": 5, "pct": 5}))
    assert "unknown field `pct`" in message and "$.command" in message


def test_unknown_command_kind_is_refused() -> None:
    assert "$.command.kind" in rejected(submission_json({"kind": "delete_everything"}))


@pytest.mark.parametrize(
    ("command", "path"),
    [
        ({"kind": "report_progress", "milestone_id": "1.3", "percent": "50"}, "$.command.percent"),
        ({"kind": "report_progress", "milestone_id": 1.3, "percent": 50}, "$.command.milestone_id"),
        (
            {"kind": "complete_milestone", "milestone_id": "1.1", "completed_on": "2017-03-30",
             "evidence": [{"title": 1}]},
            "$.command.evidence[0].title",
        ),
        (
            {"kind": "report_progress", "milestone_id": "1.3", "percent": 5, "steps_done": "tender"},
            "$.command.steps_done",
        ),
    ],
)  # fmt: skip
def test_wrong_type_is_refused_with_the_field_path(command: dict[str, Any], path: str) -> None:
    message = rejected(submission_json(command))
    assert message.startswith("Expected")
    assert f"at `{path}`" in message


def test_unquoted_county_code_is_refused() -> None:
    assert "at `$.county_code`" in rejected(submission_json(county_code=410922))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("county_code", "41092"),
        ("county_code", "010922"),
        ("programme_id", "Puyang.2017"),
        ("submission_id", "-leading-dash"),
        ("submission_id", "with space"),
    ],
)
def test_identifier_patterns_are_enforced(field: str, value: str) -> None:
    assert f"at `$.{field}`" in rejected(submission_json(None, **{field: value}))


def test_naive_occurred_at_is_refused() -> None:
    message = rejected(submission_json(occurred_at="2017-06-10T09:30:00"))
    assert "timezone" in message and "$.occurred_at" in message


@pytest.mark.parametrize("percent", [101, -1])
def test_percent_out_of_range_is_refused(percent: int) -> None:
    message = rejected(submission_json({"kind": "report_progress", "milestone_id": "1.3", "percent": percent}))
    assert "$.command.percent" in message


def test_percent_bounds_are_inclusive() -> None:
    for percent in (0, 100):
        sub = decode_submission(submission_json({"kind": "report_progress", "milestone_id": "1.3", "percent": percent}))
        assert isinstance(sub.command, ReportProgress) and sub.command.percent == percent


def test_completion_needs_evidence() -> None:
    message = rejected(
        submission_json(
            {"kind": "complete_milestone", "milestone_id": "1.1", "completed_on": "2017-03-30", "evidence": []}
        )
    )
    assert "$.command.evidence" in message


def test_bad_period_is_refused() -> None:
    message = rejected(
        submission_json(
            {"kind": "file_progress_table", "period": "2017-13", "lines": [{"milestone_id": "1.1", "percent": 1}]}
        )
    )
    assert "$.command.period" in message


def test_review_outcome_is_an_enum() -> None:
    message = rejected(
        submission_json(
            {"kind": "decide_review", "review_kind": "plan_pre_review", "outcome": "maybe",
             "decided_on": "2017-04-01"}
        )
    )  # fmt: skip
    assert "$.command.outcome" in message


def test_not_json_is_a_decode_error() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_submission(b"{not json")


# -- events --------------------------------------------------------------------------------------
EVIDENCE = (Document(title="批复", number="豫建城〔2017〕1号", url="https://example.invalid/a"),)

ONE_OF_EACH: list[EventPayload] = [
    ev.ProgressReported(milestone_id="1.3", percent=60, note="招标中", steps_done=("tender_published",)),
    ev.MilestoneCompleted(
        milestone_id="1.2", completed_on=dt.date(2017, 4, 25), evidence=EVIDENCE, via="review:provincial_plan_review"
    ),
    ev.ReviewRequested(review_kind="plan_pre_review", documents=EVIDENCE, note="送审"),
    ev.ReviewDecided(
        review_kind="plan_pre_review",
        outcome=ReviewOutcome.RETURNED,
        decided_on=dt.date(2017, 4, 2),
        request_submission_id="qf-1",
        comments="不符合9+X标准",
    ),
    ev.TrialOperationStarted(started_on=dt.date(2017, 12, 1)),
    ev.TrialOperationReported(
        period="2018-01",
        cases_reported=120,
        cases_registered=110,
        cases_dispatched=108,
        cases_closed=100,
        cases_closed_on_time=90,
        cases_returned=3,
    ),
    ev.ProgressTableFiled(
        period="2017-04",
        lines=(ProgressTableLine(milestone_id="1.1", percent=100), ProgressTableLine(milestone_id="1.2", percent=40)),
    ),
    ev.ExtensionRequested(milestone_id="1.3", proposed_deadline=dt.date(2017, 7, 31), reason="流标"),
    ev.ExtensionDecided(
        milestone_id="1.3",
        outcome=ExtensionOutcome.GRANTED,
        request_submission_id="qf-2",
        new_deadline=dt.date(2017, 7, 15),
    ),
    ev.SubmissionRetracted(retracted_submission_id="qf-3", reason="误报"),
    ev.ProcedureFindingRecorded(
        rule_id="tender-pre-review-before-tender",
        trigger_event_id="qf-4/0",
        finding_zh="招标文件未经预审即发布",
        finding_en="tender documents were published without a passed city pre-review",
        milestone_id="1.3",
        detail="截至2017-06-10未见“招标文件预审”通过记录",
    ),
    ev.ActionIssued(
        action_id="puyang-2017-13:410922:overdue_notice:1.2:2017-05-02",
        level_id="overdue_notice",
        level_name="逾期通知",
        policy_version="2017.1",
        due_on=dt.date(2017, 5, 3),
        addressed=("responsible_person", "unit_leader"),
        explanation_zh="里程碑1.2《建设方案通过评审》完成时限2017年4月30日，已逾期1个工作日。",
        milestone_id="1.2",
        deadline=dt.date(2017, 5, 2),
        workdays=1,
        urgent=True,
    ),
    ev.ActionProposed(
        action_id="puyang-2017-13:410922:missed_table_criticism:2017-03",
        level_id="missed_table_criticism",
        level_name="未按时报送督查进度一览表通报批评",
        policy_version="2017.1",
        due_on=dt.date(2017, 4, 6),
        addressed=("responsible_person",),
        explanation_zh="2017年3月督查进度一览表应于2017年4月5日前报送。",
        period="2017-03",
    ),
    ev.ActionConfirmed(action_id="puyang-2017-13:410922:missed_table_criticism:2017-03", operator="市督查局张三"),
    ev.NotificationQueued(
        message_id="m1",
        action_id="a1",
        recipient_id="410923-liu-bing",
        channel="sms",
        attempt=0,
        address_masked="138****0005",
    ),
    ev.NotificationSent(
        message_id="m1",
        action_id="a1",
        recipient_id="410923-liu-bing",
        channel="sms",
        attempt=1,
        address_masked="138****0005",
        provider_message_id="biz-1",
    ),
    ev.NotificationDelivered(
        message_id="m1",
        action_id="a1",
        recipient_id="410923-liu-bing",
        channel="sms",
        attempt=1,
        address_masked="138****0005",
    ),
    ev.NotificationFailed(
        message_id="m2",
        action_id="a1",
        recipient_id="410923-liu-bing",
        channel="email",
        attempt=8,
        address_masked="l***@example.org",
        detail="550 mailbox unavailable",
    ),
    ev.ActionWaived(
        action_id="puyang-2017-13:410922:public_criticism:1.1:2017-03-31", operator="市督查局张三", reason="已批准延期"
    ),
]


def test_one_of_each_covers_every_event_type() -> None:
    assert sorted(ev.event_type_of(p) for p in ONE_OF_EACH) == sorted(EVENT_TYPES)


@pytest.mark.parametrize("payload", ONE_OF_EACH, ids=lambda p: ev.event_type_of(p))
def test_event_envelope_round_trips(payload: EventPayload) -> None:
    original = sample_envelope(payload)
    data = encode_event(original)
    decoded = decode_event(data)
    assert decoded == original
    assert decoded.event_type == ev.event_type_of(payload)
    assert json.loads(data)["payload"]["type"] == ev.event_type_of(payload)
    assert decode_event(memoryview(data)) == original


def test_unknown_event_type_is_refused() -> None:
    raw = json.loads(encode_event(sample_envelope(ONE_OF_EACH[0])))
    raw["payload"]["type"] = "county_deleted"
    with pytest.raises(msgspec.ValidationError, match="unknown event type"):
        decode_event(json.dumps(raw).encode())


def test_event_from_a_newer_version_is_refused() -> None:
    data = encode_event(sample_envelope(ONE_OF_EACH[0], version=2))
    with pytest.raises(msgspec.ValidationError, match="v2; this code knows v1"):
        decode_event(data)


def _rename_pct(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 → v2 of progress_reported: ``pct`` became ``percent``."""
    lifted = dict(payload)
    lifted["percent"] = lifted.pop("pct")
    return lifted


def _old_progress_event() -> bytes:
    raw = json.loads(encode_event(sample_envelope(ONE_OF_EACH[0], version=1)))
    raw["payload"]["pct"] = raw["payload"].pop("percent")  # the v1 shape
    return json.dumps(raw, ensure_ascii=False).encode()


def test_old_stored_event_is_upcast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EVENT_SCHEMA_VERSIONS, "progress_reported", 2)
    monkeypatch.setitem(UPCASTERS, ("progress_reported", 1), _rename_pct)
    decoded = decode_event(_old_progress_event())
    assert decoded.schema_version == 2
    assert isinstance(decoded.payload, ev.ProgressReported)
    assert decoded.payload.percent == 60
    assert decoded.payload.steps_done == ("tender_published",)
    assert decoded.occurred_at == dt.datetime(2017, 6, 10, 9, 30, tzinfo=SHANGHAI)
    assert decoded.actor == Actor(role="county", county_code="410922", user="qf-system")


def test_old_event_that_still_decodes_is_upcast_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A v1 payload that happens to fit the v2 struct still goes through its upcaster."""
    calls: list[dict[str, Any]] = []

    def lift(payload: dict[str, Any]) -> dict[str, Any]:
        calls.append(payload)
        return {**payload, "note": payload["note"] + "（v2）"}

    monkeypatch.setitem(EVENT_SCHEMA_VERSIONS, "progress_reported", 2)
    monkeypatch.setitem(UPCASTERS, ("progress_reported", 1), lift)
    decoded = decode_event(encode_event(sample_envelope(ONE_OF_EACH[0], version=1)))
    assert len(calls) == 1
    assert decoded.schema_version == 2
    assert isinstance(decoded.payload, ev.ProgressReported) and decoded.payload.note == "招标中（v2）"


def test_upcasters_chain_over_several_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EVENT_SCHEMA_VERSIONS, "progress_reported", 3)
    monkeypatch.setitem(UPCASTERS, ("progress_reported", 1), _rename_pct)
    monkeypatch.setitem(UPCASTERS, ("progress_reported", 2), lambda p: {**p, "note": p["note"] or "（无）"})
    decoded = decode_event(_old_progress_event())
    assert decoded.schema_version == 3
    assert isinstance(decoded.payload, ev.ProgressReported) and decoded.payload.percent == 60


def test_current_events_skip_the_upcasters(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(payload: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("a current event must not be upcast")

    monkeypatch.setitem(UPCASTERS, ("progress_reported", 1), boom)
    original = sample_envelope(ONE_OF_EACH[0])
    assert decode_event(encode_event(original)) == original


def test_upcast_event_must_still_be_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EVENT_SCHEMA_VERSIONS, "progress_reported", 2)
    monkeypatch.setitem(UPCASTERS, ("progress_reported", 1), lambda p: p)  # forgets the rename
    with pytest.raises(msgspec.ValidationError):
        decode_event(_old_progress_event())


def test_naive_instants_are_refused_in_events() -> None:
    raw = json.loads(encode_event(sample_envelope(ONE_OF_EACH[0])))
    raw["recorded_at"] = "2017-06-10T01:31:00"
    with pytest.raises(msgspec.ValidationError):
        decode_event(json.dumps(raw).encode())


# -- replies -------------------------------------------------------------------------------------
def test_replies_round_trip() -> None:
    accepted = Accepted(
        submission_id="qf-1",
        events=(StoredEvent("qf-1/0", "progress_reported", 7),),
        findings=(FindingNotice("tender-pre-review-before-tender", "中", "en", "1.3"),),
    )
    assert decode_reply(encode(accepted)) == accepted
    refusal = refused(ErrorCode.UNAVAILABLE, submission_id="qf-1")
    assert refusal.retryable is True
    assert decode_reply(encode(refusal)) == refusal


def test_every_error_code_has_both_texts() -> None:
    for code in ErrorCode:
        zh, en = ERROR_TEXT[code]
        assert zh and en
        r = refused(code, field="$.x")
        assert (r.message_zh, r.message_en, r.field) == (zh, en, "$.x")
