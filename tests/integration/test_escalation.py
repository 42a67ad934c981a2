"""The escalation service against a real nats-server with the submissions service: actions
recorded once, proposals confirmed and waived over the ops subjects, nothing new after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections import Counter
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
import pytest_asyncio

from contracts.escalation import (
    ACTIONS_SUBJECT,
    CONFIRM_SUBJECT,
    TICK_SUBJECT,
    WAIVE_SUBJECT,
    WHY_SUBJECT,
    ActionList,
    ActionView,
    OpsError,
    TickReport,
)
from contracts.policy import load_default_policy
from contracts.replies import Accepted
from contracts.workdays import WorkdayCalendar
from services.escalation.ladder import Judge
from services.escalation.main import follow, start_service
from services.escalation.service import EscalationService
from tests.harness import PROGRAMME, Harness

pytestmark = pytest.mark.integration
SHANGHAI = dt.timezone(dt.timedelta(hours=8))


class Escalation:
    def __init__(
        self, nc: nats.aio.client.Client, service: EscalationService, stop: asyncio.Event, task: asyncio.Task[None]
    ):
        self.nc, self.service, self.stop, self.task = nc, service, stop, task

    async def ask(self, subject: str, body: dict[str, object], answer: type[msgspec.Struct]) -> msgspec.Struct:
        msg = await self.nc.request(subject, json.dumps(body, ensure_ascii=False).encode(), timeout=10)
        if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
            return msgspec.json.decode(msg.data, type=OpsError)
        return msgspec.json.decode(msg.data, type=answer)

    async def tick(self) -> TickReport:
        report = await self.ask(TICK_SUBJECT, {}, TickReport)
        assert isinstance(report, TickReport)
        return report

    async def actions(self, **query: object) -> list[ActionView]:
        answer = await self.ask(ACTIONS_SUBJECT, dict(query), ActionList)
        assert isinstance(answer, ActionList)
        return list(answer.items)


async def start(nats_url: str, harness: Harness) -> Escalation:
    nc = await nats.connect(nats_url)
    policy = load_default_policy()
    judges = {PROGRAMME.id: Judge(PROGRAMME, {policy.version: policy}, policy, WorkdayCalendar.official())}
    service = EscalationService(nc.jetstream(), judges, harness.clock)
    stop, caught_up = asyncio.Event(), asyncio.Event()
    await start_service(nc, service, harness.clock, "0.0.0-test")
    task = asyncio.create_task(follow(nc.jetstream(), service, stop, caught_up))
    await asyncio.wait_for(caught_up.wait(), 10)
    return Escalation(nc, service, stop, task)


async def stop_escalation(e: Escalation) -> None:
    e.stop.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(e.task, 5)
    await e.nc.close()


@pytest_asyncio.fixture(loop_scope="session")
async def escalation(harness: Harness, nats_url: str) -> AsyncIterator[Escalation]:
    harness.clock.set(dt.datetime(2017, 3, 1, 9, tzinfo=SHANGHAI))
    running = await start(nats_url, harness)
    try:
        yield running
    finally:
        await stop_escalation(running)


async def settle(harness: Harness, e: Escalation) -> int:
    """Wait until the service has seen every stored event; returns the stream's last sequence."""
    last = int((await harness.js.stream_info("DUBAN_EVENTS")).state.last_seq)
    async with asyncio.timeout(10):
        while True:
            seen = max((f.last_sequence for f in e.service._facts.values()), default=0)
            if seen >= last:
                return last
            await asyncio.sleep(0.02)


def at(day: str) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(hour=9, tzinfo=SHANGHAI)


async def test_ladder_proposals_confirm_waive_and_restart(
    harness: Harness, escalation: Escalation, nats_url: str
) -> None:
    e = escalation
    # 2017-05-03: every silent county is overdue on 1.1 and 1.2 and missed the March/April tables.
    harness.clock.set(at("2017-05-03"))
    report = await e.tick()
    assert report.new_actions > 0
    await settle(harness, e)
    qingfeng = await e.actions(county_code="410922")
    levels = {(a.level_id, a.milestone_id or a.period) for a in qingfeng}
    assert ("overdue_notice", "1.2") in levels and ("public_criticism", "1.1") in levels
    overdue = next(a for a in qingfeng if (a.level_id, a.milestone_id) == ("overdue_notice", "1.2"))
    assert overdue.state == "issued" and overdue.due_on == dt.date(2017, 5, 3)
    # Judging again, at once, records nothing new.
    assert (await e.tick()).new_actions == 0

    harness.clock.set(at("2017-05-09"))
    await e.tick()
    await settle(harness, e)
    criticism = next(
        a for a in await e.actions(county_code="410922") if (a.level_id, a.milestone_id) == ("public_criticism", "1.2")
    )
    assert criticism.state == "proposed"
    why = await e.ask(WHY_SUBJECT, {"action_id": criticism.action_id}, ActionView)
    assert isinstance(why, ActionView) and "已逾期5个工作日" in why.explanation_zh

    confirmed = await e.ask(
        CONFIRM_SUBJECT, {"action_id": criticism.action_id, "operator": "市督查局王科长"}, ActionView
    )
    assert isinstance(confirmed, ActionView)
    again = await e.ask(CONFIRM_SUBJECT, {"action_id": criticism.action_id, "operator": "x"}, ActionView)
    await settle(harness, e)
    assert isinstance(again, OpsError) and again.code == "not_proposed"
    now_issued = e.service.view(criticism.action_id)
    assert now_issued.state == "issued" and now_issued.decided_by == "市督查局王科长"

    harness.clock.set(at("2017-05-16"))
    await e.tick()
    await settle(harness, e)
    talk = next(
        a for a in await e.actions(county_code="410922") if (a.level_id, a.milestone_id) == ("admonitory_talk", "1.2")
    )
    empty_reason = await e.ask(
        WAIVE_SUBJECT, {"action_id": talk.action_id, "operator": "王", "reason": " "}, ActionView
    )
    assert isinstance(empty_reason, OpsError) and empty_reason.code == "bad_request"
    waived = await e.ask(
        WAIVE_SUBJECT, {"action_id": talk.action_id, "operator": "王", "reason": "已约谈分管副县长"}, ActionView
    )
    assert isinstance(waived, ActionView)
    last = await settle(harness, e)
    assert e.service.view(talk.action_id).state == "waived"

    # The stream holds each action once.
    events = [env for _, env in await harness.events()]
    recorded = Counter(
        getattr(env.payload, "action_id", "")
        for env in events
        if env.event_type in ("action_issued", "action_proposed")
    )
    # Each action once; the confirmed proposal twice: proposed, then issued on confirmation.
    assert recorded.pop(criticism.action_id) == 2
    assert set(recorded.values()) == {1}

    # A restart (a new service folding the stream from the start) issues nothing new.
    await stop_escalation(e)
    restarted = await start(nats_url, harness)
    try:
        assert (await restarted.tick()).new_actions == 0
        assert int((await harness.js.stream_info("DUBAN_EVENTS")).state.last_seq) == last
        assert restarted.service.view(talk.action_id).state == "waived"
    finally:
        await stop_escalation(restarted)


async def test_completion_stops_the_ladder(harness: Harness, escalation: Escalation) -> None:
    e = escalation
    harness.clock.set(at("2017-03-24"))
    await e.tick()
    await settle(harness, e)
    reply = await harness.send(
        {
            "kind": "complete_milestone",
            "milestone_id": "1.1",
            "completed_on": "2017-03-24",
            "evidence": [{"title": "批复"}],
        },
        county="410927",
    )
    assert isinstance(reply, Accepted), reply
    harness.clock.set(at("2017-04-20"))
    await e.tick()
    await settle(harness, e)
    taiqian = {(a.level_id, a.milestone_id) for a in await e.actions(county_code="410927") if a.milestone_id == "1.1"}
    puyang = {(a.level_id, a.milestone_id) for a in await e.actions(county_code="410928") if a.milestone_id == "1.1"}
    assert taiqian == {("reminder", "1.1")}
    assert {"overdue_notice", "public_criticism", "admonitory_talk"} <= {lv for lv, _ in puyang}
