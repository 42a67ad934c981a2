"""The notifier against a real nats-server, PostgreSQL and SMTP server (aiosmtpd, in the test):
the right people told on the right channels, once in effect, and every outcome on record."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
import structlog
from aiosmtpd.controller import Controller

from contracts.directory import example_directory_path, load_directory
from contracts.events import EVENT_SCHEMA_VERSIONS, ActionIssued, Actor, EventEnvelope, encode_event
from contracts.subjects import actions_subject
from services.common.embedded import free_port
from services.common.postgres import create_pool
from services.notifier import outbox
from services.notifier.channels.file import FileChannel
from services.notifier.channels.smtp import SmtpChannel
from services.notifier.delivery import NotifierSettings
from services.notifier.service import Notifier
from tests.harness import PROGRAMME, Harness

pytestmark = pytest.mark.integration
SHANGHAI = dt.timezone(dt.timedelta(hours=8))
DIRECTORY = load_directory(example_directory_path(), PROGRAMME)


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], email.message.EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((list(envelope.rcpt_tos), parsed))  # type: ignore[arg-type]
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def notifier(
    harness: Harness, fresh_database: str, smtp: tuple[Inbox, int], tmp_path: Path
) -> AsyncIterator[Notifier]:
    pool = await create_pool(fresh_database)
    async with pool.acquire() as conn:
        await outbox.migrate(conn)
    nc = await nats.connect(harness.nc.connected_url.geturl())  # type: ignore[union-attr]
    channels = {
        "file": FileChannel(tmp_path / "sms.jsonl"),
        "email": SmtpChannel("127.0.0.1", smtp[1], security="none", sender="duban@example.org"),
    }
    settings = NotifierSettings(channels=("file", "email"), quiet_channels=("file",))
    service = Notifier(pool, nc.jetstream(), channels, DIRECTORY, settings, {PROGRAMME.id: PROGRAMME}, harness.clock)
    try:
        yield service
    finally:
        for channel in channels.values():
            await channel.aclose()
        await nc.close()
        await pool.close()


def action(county: str, level: str = "overdue_notice", urgent: bool = False) -> ActionIssued:
    return ActionIssued(
        action_id=f"{PROGRAMME.id}:{county}:{level}:1.2:2017-05-02",
        level_id=level,
        level_name="逾期通知",
        policy_version="2017.1",
        due_on=dt.date(2017, 5, 3),
        addressed=("responsible_person",),
        explanation_zh="里程碑1.2《建设方案通过评审》完成时限2017年4月30日（遇休息日顺延至2017年5月2日），已逾期1个工作日。",
        milestone_id="1.2",
        deadline=dt.date(2017, 5, 2),
        workdays=1,
        urgent=urgent,
    )


async def publish_action(harness: Harness, county: str, payload: ActionIssued) -> tuple[int, bytes]:
    now = harness.clock.now()
    envelope = EventEnvelope(
        event_id=payload.action_id,
        schema_version=EVENT_SCHEMA_VERSIONS["action_issued"],
        programme_id=PROGRAMME.id,
        county_code=county,
        occurred_at=now,
        recorded_at=now,
        actor=Actor(role="system", user="escalation"),
        submission_id=payload.action_id,
        submission_digest="",
        causation_id=payload.action_id,
        correlation_id=payload.action_id,
        payload=payload,
    )
    data = encode_event(envelope)
    ack = await harness.js.publish(actions_subject(PROGRAMME.id, county), data)
    return ack.seq, data


async def drain(service: Notifier) -> None:
    while await service.work_once():
        pass
    await service.publish_events()


def sms_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()] if path.exists() else []


async def test_the_right_people_are_told_once(
    harness: Harness, notifier: Notifier, smtp: tuple[Inbox, int], tmp_path: Path
) -> None:
    harness.clock.set(dt.datetime(2017, 5, 3, 10, tzinfo=SHANGHAI))
    nanle = await publish_action(harness, "410923", action("410923"))
    qingfeng = await publish_action(harness, "410922", action("410922"))
    await notifier.apply_batch([nanle, qingfeng])
    await drain(notifier)
    inbox = smtp[0]
    recipients = sorted(r for rcpts, _ in inbox.messages for r in rcpts)
    # 南乐县's action reaches 刘冰 (410923), 清丰县's reaches 刘兵 (410922): by county and role.
    assert recipients == ["liu-bing.410922@example.org", "liu-bing.410923@example.org"]
    subjects = {rcpts[0]: msg["Subject"] for rcpts, msg in inbox.messages}
    assert "南乐县" in subjects["liu-bing.410923@example.org"] and "清丰县" in subjects["liu-bing.410922@example.org"]
    body = next(m for r, m in inbox.messages if r == ["liu-bing.410923@example.org"]).get_body().get_content()
    assert "已逾期1个工作日" in body
    assert sorted(line["recipient_id"] for line in sms_lines(tmp_path / "sms.jsonl")) == [
        "410922-liu-bing",
        "410923-liu-bing",
    ]
    # Redelivered action events plan nothing new and send nothing again.
    await notifier.apply_batch([nanle, qingfeng])
    await drain(notifier)
    assert len(inbox.messages) == 2 and len(sms_lines(tmp_path / "sms.jsonl")) == 2
    # Every outcome is in the county's history: queued and sent, per channel, numbers masked.
    events = [env for _, env in await harness.events("410923.notifications")]
    kinds = sorted((e.event_type, e.payload.channel) for e in events)  # type: ignore[union-attr]
    assert kinds == [
        ("notification_queued", "email"),
        ("notification_queued", "file"),
        ("notification_sent", "email"),
        ("notification_sent", "file"),
    ]
    assert all("13800000" not in json.dumps(e.payload.address_masked) for e in events)  # type: ignore[union-attr]


async def test_a_crash_between_sent_and_recorded_resends_once_with_the_same_id(
    harness: Harness, notifier: Notifier, smtp: tuple[Inbox, int]
) -> None:
    harness.clock.set(dt.datetime(2017, 5, 3, 10, tzinfo=SHANGHAI))
    await notifier.apply_batch([await publish_action(harness, "410926", action("410926"))])
    # The sender leases the rows and sends — and "crashes" before writing the outcome.
    async with notifier._pool.acquire() as conn:
        rows = await outbox.claim_due(conn, harness.clock.now())
    email_row = next(r for r in rows if r.message.channel == "email")
    await notifier._channels["email"].send(email_row.message)
    # Restarted: nothing is due while the lease holds; after it expires, one resend.
    assert await notifier.work_once() == 0
    harness.clock.advance(outbox.LEASE + dt.timedelta(seconds=1))
    await drain(notifier)
    harness.clock.advance(dt.timedelta(hours=1))
    await drain(notifier)
    copies = [m for rcpts, m in smtp[0].messages if rcpts == ["zhao-liling.410926@example.org"]]
    assert len(copies) == 2  # the original and at most one resend
    assert copies[0]["Message-ID"] == copies[1]["Message-ID"]  # the same id: recognisably one message


async def test_quiet_hours_hold_non_urgent_messages_until_morning(
    harness: Harness, notifier: Notifier, tmp_path: Path
) -> None:
    harness.clock.set(dt.datetime(2017, 5, 3, 23, 30, tzinfo=SHANGHAI))
    await notifier.apply_batch([await publish_action(harness, "410927", action("410927"))])
    await drain(notifier)
    assert sms_lines(tmp_path / "sms.jsonl") == []  # held (the file channel stands in for SMS here)
    harness.clock.set(dt.datetime(2017, 5, 4, 8, 0, 1, tzinfo=SHANGHAI))
    await drain(notifier)
    assert [line["recipient_id"] for line in sms_lines(tmp_path / "sms.jsonl")] == ["410927-wang-junhai"]


async def test_no_full_phone_number_or_secret_in_any_log_line(
    harness: Harness, notifier: Notifier, tmp_path: Path
) -> None:
    harness.clock.set(dt.datetime(2017, 5, 3, 10, tzinfo=SHANGHAI))
    with structlog.testing.capture_logs() as logs:
        await notifier.apply_batch([await publish_action(harness, "410923", action("410923"))])
        await drain(notifier)
    assert any(entry["event"] == "notification sent" for entry in logs)
    text = json.dumps(logs, ensure_ascii=False, default=str)
    assert not re.search(r"1[3-9]\d{9}", text), text  # no mainland mobile number in full
    assert "+8613800000005" not in text and "13800000005" not in text


async def test_delivery_receipts_are_recorded(harness: Harness, fresh_database: str, tmp_path: Path) -> None:
    """SMS through a local server speaking Tencent's API; its delivery reports (pulled with
    PullSmsSendStatus, matched by our SessionContext) land in the county's history."""
    from aiohttp import web

    from services.notifier.channels.base import Secret
    from services.notifier.channels.tencent import TencentSmsChannel

    sent: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        assert request.headers["Authorization"].startswith("TC3-HMAC-SHA256 Credential=AKID-test/")
        body = await request.json()
        if request.headers["X-TC-Action"] == "SendSms":
            sent.append(body)
            status = [{"Code": "Ok", "SerialNo": f"serial-{len(sent)}", "PhoneNumber": body["PhoneNumberSet"][0]}]
            return web.json_response({"Response": {"SendStatusSet": status, "RequestId": "r"}})
        assert request.headers["X-TC-Action"] == "PullSmsSendStatus"
        reports = [
            {
                "SessionContext": b["SessionContext"],
                "SerialNo": f"serial-{i}",
                "ReportStatus": "SUCCESS" if i == 1 else "FAIL",
                "Description": "DELIVRD" if i == 1 else "用户关机",
            }
            for i, b in enumerate(sent, start=1)
        ]
        sent.clear()  # a report is pulled once
        return web.json_response({"Response": {"PullSmsSendStatusSet": reports, "RequestId": "r"}})

    app = web.Application()
    app.router.add_post("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    pool = await create_pool(fresh_database)
    async with pool.acquire() as conn:
        await outbox.migrate(conn)
    sms = TencentSmsChannel(
        "AKID-test", Secret("test-key"), "1400000000", "濮阳督办", endpoint=f"http://127.0.0.1:{port}/"
    )
    settings = NotifierSettings(channels=("sms",), sms_templates={"overdue_notice": "100001"})
    service = Notifier(pool, harness.js, {"sms": sms}, DIRECTORY, settings, {PROGRAMME.id: PROGRAMME}, harness.clock)
    try:
        harness.clock.set(dt.datetime(2017, 5, 3, 10, tzinfo=SHANGHAI))
        urgent = action("410923", urgent=True)
        await service.apply_batch([await publish_action(harness, "410923", urgent)])
        await service.apply_batch([await publish_action(harness, "410922", action("410922", urgent=True))])
        await drain(service)
        assert await service.pull_receipts() == 2
        await service.publish_events()
        history = [env for _, env in await harness.events("410923.notifications")]
        history += [env for _, env in await harness.events("410922.notifications")]
        kinds = sorted(e.event_type for e in history)
        # One SMS was accepted but not delivered: it falls back to that person's backup, the county office.
        assert kinds == [
            "notification_delivered",
            "notification_failed",
            "notification_queued",
            "notification_queued",
            "notification_queued",
            "notification_sent",
            "notification_sent",
        ]
        failed_event = next(e for e in history if e.event_type == "notification_failed")
        county = failed_event.county_code
        fallback = [e for e in history if e.event_type == "notification_queued" and "fallback" in e.payload.detail]  # type: ignore[union-attr]
        assert [(e.county_code, e.payload.recipient_id) for e in fallback] == [(county, f"{county}-office")]  # type: ignore[union-attr]
        failed = next(e for e in history if e.event_type == "notification_failed")
        assert failed.payload.detail == "用户关机"  # type: ignore[union-attr]
        assert await service.pull_receipts() == 0  # nothing is recorded twice
    finally:
        await sms.aclose()
        await pool.close()
        await runner.cleanup()


async def test_aliyun_delivery_reports_are_queried_and_recorded_once(harness: Harness, fresh_database: str) -> None:
    """SMS through a local server speaking Aliyun's RPC API; QuerySendDetails (by BizId, number
    and day) reports delivered and failed, each recorded once."""
    from aiohttp import web

    from services.notifier.channels.aliyun import AliyunSmsChannel
    from services.notifier.channels.base import Secret

    biz: dict[str, str] = {}  # BizId -> OutId

    async def handle(request: web.Request) -> web.Response:
        q = request.query
        assert q["AccessKeyId"] == "LTAI-test" and q["Signature"]
        if q["Action"] == "SendSms":
            biz_id = f"biz-{len(biz) + 1}"
            biz[biz_id] = q["OutId"]
            return web.json_response({"Code": "OK", "Message": "OK", "BizId": biz_id, "RequestId": "r"})
        assert q["Action"] == "QuerySendDetails" and q["SendDate"] == "20170503" and q["PhoneNumber"].startswith("138")
        status, err = (3, "DELIVERED") if q["BizId"] == "biz-1" else (2, "MOBILE_NOT_ON_SERVICE")
        detail = {"SendStatus": status, "ErrCode": err, "OutId": biz[q["BizId"]], "PhoneNum": q["PhoneNumber"]}
        return web.json_response({"Code": "OK", "SmsSendDetailDTOs": {"SmsSendDetailDTO": [detail]}, "TotalCount": 1})

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    pool = await create_pool(fresh_database)
    async with pool.acquire() as conn:
        await outbox.migrate(conn)
    sms = AliyunSmsChannel("LTAI-test", Secret("secret"), "濮阳督办", endpoint=f"http://127.0.0.1:{port}/")
    settings = NotifierSettings(channels=("sms",), sms_templates={"overdue_notice": "SMS_100001"})
    service = Notifier(pool, harness.js, {"sms": sms}, DIRECTORY, settings, {PROGRAMME.id: PROGRAMME}, harness.clock)
    try:
        harness.clock.set(dt.datetime(2017, 5, 3, 10, tzinfo=SHANGHAI))
        await service.apply_batch([await publish_action(harness, "410923", action("410923", urgent=True))])
        await service.apply_batch([await publish_action(harness, "410922", action("410922", urgent=True))])
        await drain(service)
        assert await service.pull_receipts() == 2
        assert await service.pull_receipts() == 0  # each report recorded once
        await service.publish_events()
        history = [env for _, env in await harness.events("410923.notifications")]
        history += [env for _, env in await harness.events("410922.notifications")]
        outcomes = sorted(
            e.event_type for e in history if e.event_type in ("notification_delivered", "notification_failed")
        )
        assert outcomes == ["notification_delivered", "notification_failed"]
    finally:
        await sms.aclose()
        await pool.close()
        await runner.cleanup()
