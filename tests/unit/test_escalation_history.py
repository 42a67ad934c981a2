"""Escalation keeps, per county, only what a refold reads (services/escalation/history.py), not the
decoded envelopes: a refold after a retraction must give exactly the facts that folding the
envelopes gives, as it did when the envelopes were kept."""

from __future__ import annotations

import datetime as dt
import random
import tracemalloc
from typing import Any, cast
from zoneinfo import ZoneInfo

import msgspec
import pytest
from nats.js import JetStreamContext

from contracts.events import (
    EVENT_SCHEMA_VERSIONS,
    ActionConfirmed,
    ActionIssued,
    ActionProposed,
    ActionWaived,
    Actor,
    EventEnvelope,
    EventPayload,
    ExtensionDecided,
    ExtensionRequested,
    MilestoneCompleted,
    NotificationDelivered,
    NotificationQueued,
    NotificationSent,
    ProcedureFindingRecorded,
    ProgressReported,
    ProgressTableFiled,
    ReviewDecided,
    ReviewRequested,
    SubmissionRetracted,
    TrialOperationReported,
    TrialOperationStarted,
    decode_event,
    encode_event,
    event_type_of,
)
from contracts.facts import CountyFacts, apply, fold, new_facts
from contracts.payloads import Document, ExtensionOutcome, ProgressTableLine, ReviewOutcome
from contracts.policy import load_default_policy
from contracts.programme import Programme, load_default_programme
from contracts.workdays import WorkdayCalendar
from services.common.clock import SimulatedClock
from services.escalation.history import CountyHistory
from services.escalation.ladder import Judge
from services.escalation.service import EscalationService

PROGRAMME = load_default_programme()
COUNTIES = [c.code for c in PROGRAMME.counties[:2]]
ZONES: list[dt.tzinfo] = [
    dt.timezone(dt.timedelta(hours=8)),
    dt.UTC,
    dt.timezone(dt.timedelta(hours=-5, minutes=-30)),
    ZoneInfo("Asia/Shanghai"),
]
NOTES = ("按计划推进", "正在协调资金", "", "设备到货安装中")


def _doc(rng: random.Random) -> Document:
    return Document(title=f"证明{rng.randint(1, 99)}", number=f"濮政办〔2017〕{rng.randint(1, 999)}号")


def _payload(rng: random.Random, programme: Programme, earlier: list[str], action_ids: list[str]) -> EventPayload:
    """A random event of any type escalation folds or ignores, mostly progress reports."""
    milestone = rng.choice(programme.milestones)
    review = rng.choice(programme.reviews)
    period = f"2017-{rng.randint(3, 12):02d}"
    day = dt.date(2017, 3, 1) + dt.timedelta(days=rng.randint(0, 600))
    action_id = rng.choice(action_ids) if action_ids and rng.random() < 0.7 else f"a{rng.randint(0, 10**6)}"
    action: dict[str, Any] = {
        "action_id": action_id,
        "level_id": rng.choice(["remind", "warn", "criticise"]),
        "level_name": "提醒",
        "policy_version": "v1",
        "due_on": day,
        "addressed": ("responsible_person",),
        "explanation_zh": f"说明{rng.randint(0, 9)}",
        "milestone_id": milestone.id if rng.random() < 0.5 else None,
        "period": period if rng.random() < 0.3 else None,
    }
    notified: dict[str, Any] = {
        "message_id": f"m{rng.randint(0, 999)}",
        "action_id": action_id,
        "recipient_id": "p1",
        "channel": "sms",
        "attempt": 1,
        "address_masked": "138****0000",
    }
    kind = rng.choices(range(19), weights=[60, 3, 3, 3, 1, 2, 3, 2, 2, 4, 2, 3, 3, 1, 1, 1, 1, 1, 4])[0]
    match kind:
        case 0:
            steps = tuple(s.id for s in milestone.steps if rng.random() < 0.5)
            return ProgressReported(
                milestone_id=milestone.id, percent=rng.randint(0, 100), note=rng.choice(NOTES), steps_done=steps
            )
        case 1:
            return MilestoneCompleted(
                milestone_id=milestone.id,
                completed_on=day,
                evidence=tuple(_doc(rng) for _ in range(rng.randint(1, 3))),
                note=rng.choice(NOTES),
                via=rng.choice(["county", "review:x"]),
            )
        case 2:
            return ReviewRequested(review_kind=review.kind, documents=(_doc(rng),))
        case 3:
            return ReviewDecided(
                review_kind=review.kind,
                outcome=rng.choice(list(ReviewOutcome)),
                decided_on=day,
                approval_document_number=rng.choice([None, "豫审〔2017〕1号"]),
                comments=rng.choice(NOTES),
            )
        case 4:
            return TrialOperationStarted(started_on=day)
        case 5:
            n = rng.randint(0, 100)
            return TrialOperationReported(
                period=period,
                cases_reported=n,
                cases_registered=n,
                cases_dispatched=n // 2,
                cases_closed=n // 3,
                cases_closed_on_time=n // 4,
                cases_returned=n // 5,
            )
        case 6:
            lines = tuple(
                ProgressTableLine(milestone_id=m.id, percent=rng.randint(0, 100), note=rng.choice(NOTES))
                for m in programme.milestones[: rng.randint(1, 8)]
            )
            return ProgressTableFiled(period=period, lines=lines)
        case 7:
            return ExtensionRequested(milestone_id=milestone.id, proposed_deadline=day, reason="资金未到位")
        case 8:
            granted = rng.random() < 0.5
            return ExtensionDecided(
                milestone_id=milestone.id,
                outcome=ExtensionOutcome.GRANTED if granted else ExtensionOutcome.REFUSED,
                new_deadline=day if granted or rng.random() < 0.2 else None,
            )
        case 9:
            # Mostly an earlier submission; sometimes a retraction, one not yet stored, or none.
            target = rng.choice(earlier) if earlier and rng.random() < 0.85 else f"s-{rng.randint(0, 400)}"
            return SubmissionRetracted(retracted_submission_id=target, reason="填报有误，撤回")
        case 10:
            return ProcedureFindingRecorded(
                rule_id=f"R{rng.randint(1, 9)}",
                trigger_event_id=f"e{rng.randint(0, 99)}",
                finding_zh="顺序不符",
                finding_en="out of order",
                milestone_id=rng.choice([None, milestone.id]),
                detail=rng.choice(["", "synthetic"]),
            )
        case 11:
            return ActionIssued(**action, confirmed_by=rng.choice([None, "op-1"]))
        case 12:
            return ActionProposed(**action)
        case 13:
            return ActionConfirmed(action_id=action_id, operator="op-2", note="同意")
        case 14:
            return ActionWaived(action_id=action_id, operator="op-3", reason="情况特殊")
        case 15:
            return NotificationQueued(**notified)
        case 16:
            return NotificationSent(**notified)
        case 17:
            return NotificationDelivered(**notified)
        case _:
            steps = tuple(s.id for s in milestone.steps[:1])
            return ProgressReported(milestone_id=milestone.id, percent=100, note="已完成", steps_done=steps)


def random_events(seed: int, count: int, programme: Programme = PROGRAMME) -> list[tuple[int, EventEnvelope]]:
    """Interleaved histories of two counties: (stream sequence, envelope), as decoded from the stream."""
    rng = random.Random(seed)
    out: list[tuple[int, EventEnvelope]] = []
    submissions: dict[str, list[str]] = {code: [] for code in COUNTIES}
    action_ids: list[str] = []
    sequence = rng.randint(1, 50)
    instant = dt.datetime(2017, 3, 1, 9, tzinfo=dt.UTC)
    for _ in range(count):
        county = rng.choice(COUNTIES)
        earlier = submissions[county]
        payload = _payload(rng, programme, earlier, action_ids)
        if isinstance(payload, ActionIssued | ActionProposed):
            action_ids.append(payload.action_id)
        if earlier and rng.random() < 0.15:  # a further event of an earlier submission
            submission_id = rng.choice(earlier[-3:])
        else:
            submission_id = f"s-{rng.randint(0, 400)}" if rng.random() < 0.05 else f"{county}-{len(earlier):05d}"
            earlier.append(submission_id)
        instant += dt.timedelta(seconds=rng.randint(0, 40_000), microseconds=rng.randint(0, 999_999))
        zone = rng.choice(ZONES)
        occurred = instant.astimezone(zone)
        recorded = (instant + dt.timedelta(seconds=rng.random())).astimezone(rng.choice(ZONES))
        event_type = event_type_of(payload)
        envelope = EventEnvelope(
            event_id=f"{submission_id}/{rng.randint(0, 3)}",
            schema_version=EVENT_SCHEMA_VERSIONS[event_type],
            programme_id=programme.id,
            county_code=county,
            occurred_at=occurred,
            recorded_at=recorded,
            actor=Actor(role="county", county_code=county, user=f"sys-{county}"),
            submission_id=submission_id,
            submission_digest="0" * 64,
            causation_id=submission_id,
            correlation_id=submission_id,
            payload=payload,
        )
        if not isinstance(zone, ZoneInfo):  # through the stream: as escalation reads it
            envelope = decode_event(encode_event(envelope))
        sequence += rng.randint(1, 3)
        out.append((sequence, envelope))
    return out


def same(a: CountyFacts, b: CountyFacts) -> None:
    assert a == b
    assert msgspec.json.encode(a) == msgspec.json.encode(b)  # time zones too


@pytest.mark.parametrize("seed", range(40))
def test_a_refold_from_the_kept_history_is_the_fold_of_the_envelopes(seed: int) -> None:
    events = random_events(seed, 400)
    assert sum(isinstance(e.payload, SubmissionRetracted) for _, e in events) >= 3
    for county in COUNTIES:
        mine = [(s, e) for s, e in events if e.county_code == county]
        history = CountyHistory()
        for n, (sequence, envelope) in enumerate(mine, start=1):
            history.append(sequence, envelope)
            if isinstance(envelope.payload, SubmissionRetracted) or n == len(mine) or n % 50 == 0:
                same(fold(PROGRAMME, county, history.events()), fold(PROGRAMME, county, mine[:n]))
        assert len(history) == len(mine)


def test_events_decoded_as_subclasses_of_their_types_are_kept_alike() -> None:
    """A stored event may be decoded as a subclass of its event type (contracts/events.py)."""
    import contracts.events

    decode = getattr(contracts.events, "decode_stored_event", None)
    if decode is None:
        pytest.skip("no decoder of stored events here")
    for seed in range(5):
        events = [(s, e) for s, e in random_events(seed, 300) if not isinstance(e.occurred_at.tzinfo, ZoneInfo)]
        for county in COUNTIES:
            stored = [(s, decode(encode_event(e))) for s, e in events if e.county_code == county]
            history = CountyHistory()
            for sequence, envelope in stored:
                history.append(sequence, envelope)
            same(fold(PROGRAMME, county, history.events()), fold(PROGRAMME, county, stored))


def test_pop_forgets_the_last_event_only() -> None:
    events = [(s, e) for s, e in random_events(7, 300) if e.county_code == COUNTIES[0]]
    history = CountyHistory()
    for n, (sequence, envelope) in enumerate(events, start=1):
        history.append(sequence, envelope)
        if n % 3 == 0:
            history.pop()
            history.append(sequence, envelope)
        if n % 5 == 0:
            history.pop()
            same(fold(PROGRAMME, COUNTIES[0], history.events()), fold(PROGRAMME, COUNTIES[0], events[: n - 1]))
            history.append(sequence, envelope)
    same(fold(PROGRAMME, COUNTIES[0], history.events()), fold(PROGRAMME, COUNTIES[0], events))
    history.pop()
    with pytest.raises(IndexError):  # only the last append can be undone
        history.pop()
    with pytest.raises(IndexError):
        CountyHistory().pop()


def test_non_ascii_submission_ids_are_kept_exactly() -> None:
    events = [(s, e) for s, e in random_events(3, 200) if e.county_code == COUNTIES[0]]
    events = [
        (s, msgspec.structs.replace(e, submission_id=f"{'县' * (n % 3 * 100)}{e.submission_id}"))  # up to 600 bytes
        for n, (s, e) in enumerate(events)
    ]
    events += [
        (s + 10_000, msgspec.structs.replace(e, submission_id="county/x"))
        for s, e in events[-3:]
        if not isinstance(e.payload, SubmissionRetracted)
    ]
    history = CountyHistory()
    for sequence, envelope in events:
        history.append(sequence, envelope)
        history.pop()
        history.append(sequence, envelope)
    assert [e.submission_id for _, e in history.events()] == [e.submission_id for _, e in events]
    same(fold(PROGRAMME, COUNTIES[0], history.events()), fold(PROGRAMME, COUNTIES[0], events))


def test_times_without_a_zone_or_with_a_fold_are_kept_exactly() -> None:
    events = [(s, e) for s, e in random_events(4, 200) if e.county_code == COUNTIES[0]]
    events = [
        (s, msgspec.structs.replace(e, occurred_at=e.occurred_at.replace(tzinfo=None)))
        if n % 3 == 0
        else (s, msgspec.structs.replace(e, occurred_at=e.occurred_at.replace(fold=1)))
        if n % 3 == 1
        else (s, e)
        for n, (s, e) in enumerate(events)
    ]
    history = CountyHistory()
    for sequence, envelope in events:
        history.append(sequence, envelope)
    kept = [e.occurred_at for _, e in history.events()]
    assert [(t, t.tzinfo, t.fold) for t in kept] == [
        (e.occurred_at, e.occurred_at.tzinfo, e.occurred_at.fold) for _, e in events
    ]
    same(fold(PROGRAMME, COUNTIES[0], history.events()), fold(PROGRAMME, COUNTIES[0], events))


def test_many_time_zones() -> None:
    events = [(s, msgspec.structs.replace(e, county_code=COUNTIES[0])) for s, e in random_events(6, 400)]
    events = [
        (s, msgspec.structs.replace(e, occurred_at=e.occurred_at.astimezone(dt.timezone(dt.timedelta(minutes=n)))))
        for n, (s, e) in enumerate(events)
    ]
    history = CountyHistory()
    for sequence, envelope in events:
        history.append(sequence, envelope)
    assert [e.occurred_at.tzinfo for _, e in history.events()] == [e.occurred_at.tzinfo for _, e in events]
    same(fold(PROGRAMME, COUNTIES[0], history.events()), fold(PROGRAMME, COUNTIES[0], events))


class _AsFound:
    """Escalation's observe as it was: every envelope kept, a retraction refolds them all."""

    def __init__(self) -> None:
        self.facts: dict[str, CountyFacts] = {}
        self.history: dict[str, list[tuple[int, EventEnvelope]]] = {}

    def observe(self, sequence: int, envelope: EventEnvelope) -> None:
        county = envelope.county_code
        history = self.history.setdefault(county, [])
        history.append((sequence, envelope))
        facts = self.facts.get(county) or new_facts(PROGRAMME, county)
        try:
            if not apply(PROGRAMME, facts, sequence, envelope):
                facts = fold(PROGRAMME, county, history)
        except Exception:
            history.pop()
            self.facts[county] = fold(PROGRAMME, county, history)
            raise
        self.facts[county] = facts


def service() -> EscalationService:
    policy = load_default_policy()
    judge = Judge(PROGRAMME, {policy.version: policy}, policy, WorkdayCalendar.official())
    clock = SimulatedClock(dt.datetime(2017, 3, 1, tzinfo=dt.UTC))
    return EscalationService(cast(JetStreamContext, None), {PROGRAMME.id: judge}, clock)


def _failing(envelope: EventEnvelope) -> EventEnvelope:
    """An event apply fails on (its time is out of range in the programme's zone)."""
    late = dt.datetime(9999, 12, 31, 22, tzinfo=dt.timezone(dt.timedelta(hours=-12)))
    return msgspec.structs.replace(envelope, occurred_at=late)


@pytest.mark.parametrize("seed", range(12))
def test_the_service_folds_as_it_did_with_the_envelopes(seed: int) -> None:
    events = random_events(seed, 500)
    rng = random.Random(seed)
    escalation, as_found = service(), _AsFound()
    failures = 0
    for sequence, envelope in events:
        if rng.random() < 0.02:
            envelope = _failing(envelope)
        results: list[type[Exception] | None] = []
        for observer in (escalation, as_found):
            try:
                observer.observe(sequence, envelope)
                results.append(None)
            except Exception as exc:  # the same failure, or none, from both
                results.append(type(exc))
        assert results[0] == results[1]
        failures += results[0] is not None
        key = (PROGRAMME.id, envelope.county_code)
        facts = escalation.facts(key)
        assert facts is not None
        same(facts, as_found.facts[envelope.county_code])
    assert failures > 0
    for county in COUNTIES:
        kept = as_found.history[county]
        same(
            fold(PROGRAMME, county, escalation._history[(PROGRAMME.id, county)].events()), fold(PROGRAMME, county, kept)
        )
        # A confirmation reissues the latest proposal of the action, as decoded.
        for _, envelope in kept:
            if isinstance(envelope.payload, ActionProposed):
                latest = [e.payload for _, e in kept if isinstance(e.payload, ActionProposed)]
                wanted = next(p for p in reversed(latest) if p.action_id == envelope.payload.action_id)
                assert escalation._proposal((PROGRAMME.id, county), envelope.payload.action_id) == wanted


def test_the_kept_history_is_small() -> None:
    """Progress reports (87% of a real stream) cost tens of bytes each, not a decoded envelope's ~1.3 kB."""
    rng = random.Random(5)
    county = COUNTIES[0]
    events = []
    for n in range(5000):
        milestone = rng.choice(PROGRAMME.milestones)
        percent = rng.randint(0, 20) * 5
        steps = tuple(s.id for s in milestone.steps[: len(milestone.steps) * percent // 100])
        payload = ProgressReported(milestone_id=milestone.id, percent=percent, note=rng.choice(NOTES), steps_done=steps)
        data = encode_event(
            EventEnvelope(
                event_id=f"{county}-{n:07d}/0",
                schema_version=1,
                programme_id=PROGRAMME.id,
                county_code=county,
                occurred_at=dt.datetime(2017, 3, 1, 9, tzinfo=ZONES[0]) + dt.timedelta(minutes=n, microseconds=n),
                recorded_at=dt.datetime(2017, 3, 1, 9, 1, tzinfo=ZONES[0]) + dt.timedelta(minutes=n),
                actor=Actor(role="county", county_code=county, user=f"sys-{county}"),
                submission_id=f"{county}-{n:07d}",
                submission_digest="0" * 64,
                causation_id=f"{county}-{n:07d}",
                correlation_id=f"{county}-{n:07d}",
                payload=payload,
            )
        )
        events.append((n + 1, data))
    history = CountyHistory()
    for sequence, data in events[:1000]:  # the shared payloads made
        history.append(sequence, decode_event(data))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for sequence, data in events[1000:]:
            history.append(sequence, decode_event(data))  # the envelope is dropped at once
        per_event = (tracemalloc.get_traced_memory()[0] - before) / (len(events) - 1000)
    finally:
        tracemalloc.stop()
    assert per_event < 150, per_event
    same(fold(PROGRAMME, county, history.events()), fold(PROGRAMME, county, ((s, decode_event(d)) for s, d in events)))
