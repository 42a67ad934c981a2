"""The SMS, webhook and file channels against local servers that speak each provider's API.

Each fake provider VERIFIES the request's signature by recomputing it from what arrived, with
the documented algorithm written again here (not imported from the channel), and answers as the
provider does: success, throttled, invalid number, bad signature.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from contracts.directory import ContactRole, example_directory_path, load_directory
from services.notifier.channels.aliyun import AliyunSmsChannel
from services.notifier.channels.base import OutboundMessage, Outcome, Secret
from services.notifier.channels.file import FileChannel
from services.notifier.channels.tencent import TencentSmsChannel
from services.notifier.channels.webhook import WebhookChannel

pytestmark = pytest.mark.integration

ALIYUN_ID, ALIYUN_SECRET = "LTAI5tDubanTestKey", "aliyun-secret-for-tests-0001"
TENCENT_ID, TENCENT_SECRET = "AKIDdubanTestSecretId", "tencent-secret-for-tests-0001"
TENCENT_APP = "1400000001"
WEBHOOK_SECRET = "webhook-shared-secret-0001"

THROTTLED_NUMBER = "13800000098"
ILLEGAL_NUMBER = "13800000099"


# --- the signature algorithms, written again from the providers' documentation ------------------

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")


def pop_encode(text: str) -> str:
    """Alibaba Cloud POP percent-encoding: RFC 3986 unreserved kept, every other byte %XX."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in text.encode("utf-8"))


def aliyun_expected_signature(query: dict[str, str], secret: str, method: str) -> str:
    pairs = sorted((k, v) for k, v in query.items() if k != "Signature")
    canonical = "&".join(pop_encode(k) + "=" + pop_encode(v) for k, v in pairs)
    text = method + "&" + pop_encode("/") + "&" + pop_encode(canonical)
    return base64.b64encode(hmac.new((secret + "&").encode(), text.encode(), "sha1").digest()).decode()


def tencent_expected_signature(secret: str, date: str, timestamp: str, canonical_request: str) -> str:
    def mac(key: bytes, msg: str) -> bytes:
        return hmac.new(key, msg.encode(), "sha256").digest()

    scope = f"{date}/sms/tc3_request"
    string_to_sign = "\n".join(
        ["TC3-HMAC-SHA256", timestamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = mac(mac(mac(("TC3" + secret).encode(), date), "sms"), "tc3_request")
    return hmac.new(key, string_to_sign.encode(), "sha256").hexdigest()


# --- fake providers ----------------------------------------------------------------------------


@dataclass
class Fake:
    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def _aliyun_app(fake: Fake) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        query = {k: request.query.getone(k) for k in request.query}
        request_id = str(uuid.uuid4()).upper()
        required = {
            "AccessKeyId", "Action", "Format", "OutId", "PhoneNumbers", "RegionId", "SignName", "Signature",
            "SignatureMethod", "SignatureNonce", "SignatureVersion", "TemplateCode", "TemplateParam",
            "Timestamp", "Version",
        }  # fmt: skip
        if missing := required - query.keys():
            fake.refused.append(f"missing {sorted(missing)}")
            return web.json_response(
                {"RequestId": request_id, "Code": "MissingParameter", "Message": f"{sorted(missing)}"}, status=400
            )
        assert query["Action"] == "SendSms" and query["Version"] == "2017-05-25" and query["Format"] == "JSON"
        assert query["SignatureMethod"] == "HMAC-SHA1" and query["SignatureVersion"] == "1.0"
        stamp = dt.datetime.strptime(query["Timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        assert abs((dt.datetime.now(dt.UTC) - stamp).total_seconds()) < 900
        if query["AccessKeyId"] != ALIYUN_ID:
            return web.json_response(
                {
                    "RequestId": request_id,
                    "Code": "InvalidAccessKeyId.NotFound",
                    "Message": "Specified access key is not found.",
                },
                status=404,
            )
        expected = aliyun_expected_signature(query, ALIYUN_SECRET, request.method)
        if not hmac.compare_digest(expected, query["Signature"]):
            fake.refused.append("signature")
            return web.json_response(
                {
                    "RequestId": request_id,
                    "Code": "SignatureDoesNotMatch",
                    "Message": "Specified signature is not matched with our calculation.",
                },
                status=400,
            )
        phone = query["PhoneNumbers"]
        if phone == THROTTLED_NUMBER:
            return web.json_response(
                {"RequestId": request_id, "Code": "isv.BUSINESS_LIMIT_CONTROL", "Message": "触发小时级流控Permits:5"}
            )
        if phone == ILLEGAL_NUMBER:
            return web.json_response(
                {"RequestId": request_id, "Code": "isv.MOBILE_NUMBER_ILLEGAL", "Message": f"非法手机号 {phone}"}
            )
        biz_id = f"{len(fake.received) + 1:06d}^{uuid.uuid4().int % 10**10}"
        fake.received.append(
            {
                "phone": phone,
                "out_id": query["OutId"],
                "sign_name": query["SignName"],
                "template": query["TemplateCode"],
                "params": json.loads(query["TemplateParam"]),
                "biz_id": biz_id,
            }
        )
        return web.json_response({"RequestId": request_id, "Code": "OK", "Message": "OK", "BizId": biz_id})

    app = web.Application()
    app.router.add_get("/", handle)
    return app


def _tencent_app(fake: Fake) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        request_id = str(uuid.uuid4())

        def error(code: str, message: str) -> web.Response:
            fake.refused.append(code)
            return web.json_response(
                {"Response": {"Error": {"Code": code, "Message": message}, "RequestId": request_id}}
            )

        assert request.headers["X-TC-Action"] == "SendSms"
        assert request.headers["X-TC-Version"] == "2021-01-11"
        assert request.headers["X-TC-Region"] == "ap-guangzhou"
        timestamp = request.headers["X-TC-Timestamp"]
        if abs(time.time() - int(timestamp)) > 300:
            return error("AuthFailure.SignatureExpire", "signature expired")
        auth = request.headers.get("Authorization", "")
        algorithm, _, rest = auth.partition(" ")
        parts = dict(p.strip().split("=", 1) for p in rest.split(","))
        secret_id, date, service, terminator = parts["Credential"].split("/")
        assert algorithm == "TC3-HMAC-SHA256" and service == "sms" and terminator == "tc3_request"
        assert date == dt.datetime.fromtimestamp(int(timestamp), dt.UTC).strftime("%Y-%m-%d")
        if secret_id != TENCENT_ID:
            return error("AuthFailure.SecretIdNotFound", "The SecretId is not found")
        signed = parts["SignedHeaders"].split(";")
        canonical_headers = "".join(f"{h}:{request.headers[h].strip().lower()}\n" for h in signed)
        canonical_request = "\n".join(
            ["POST", "/", "", canonical_headers, ";".join(signed), hashlib.sha256(body).hexdigest()]
        )
        expected = tencent_expected_signature(TENCENT_SECRET, date, timestamp, canonical_request)
        if signed != ["content-type", "host"] or not hmac.compare_digest(expected, parts["Signature"]):
            return error("AuthFailure.SignatureFailure", "The provided credentials could not be validated.")
        payload = json.loads(body)
        assert payload["SmsSdkAppId"] == TENCENT_APP
        (phone,) = payload["PhoneNumberSet"]
        context = payload.get("SessionContext", "")
        status: dict[str, Any] = {"PhoneNumber": phone, "SessionContext": context, "Fee": 0, "IsoCode": "CN"}
        if phone == f"+86{THROTTLED_NUMBER}":
            status |= {"Code": "LimitExceeded.PhoneNumberThirtySecondLimit", "Message": "30秒内发送短信条数超过上限"}
        elif phone == f"+86{ILLEGAL_NUMBER}":
            status |= {"Code": "InvalidParameterValue.IncorrectPhoneNumber", "Message": f"手机号格式错误 {phone}"}
        else:
            serial = f"2645:{uuid.uuid4().int % 10**12}"
            status |= {"Code": "Ok", "Message": "send success", "SerialNo": serial, "Fee": 1}
            fake.received.append(
                {
                    "phone": phone,
                    "session_context": context,
                    "sign_name": payload["SignName"],
                    "template": payload["TemplateId"],
                    "params": payload["TemplateParamSet"],
                    "serial": serial,
                }
            )
        return web.json_response({"Response": {"SendStatusSet": [status], "RequestId": request_id}})

    app = web.Application()
    app.router.add_post("/", handle)
    return app


def _webhook_app(fake: Fake) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, "sha256").hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("X-Duban-Signature", "")):
            fake.refused.append("signature")
            return web.json_response({"error": "bad signature"}, status=401)
        key = request.headers.get("Idempotency-Key")
        if not key:
            return web.json_response({"error": "Idempotency-Key required"}, status=400)
        mode = request.match_info["mode"]
        if mode == "busy":
            return web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": "7"})
        if mode == "broken":
            return web.Response(status=500, text="oops")
        fake.received.append({"key": key, "payload": json.loads(body)})
        return web.json_response({"id": f"hook-{len(fake.received)}"}, status=202)

    app = web.Application()
    app.router.add_post("/hook/{mode}", handle)
    return app


async def _serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


@pytest.fixture
async def aliyun() -> AsyncIterator[Fake]:
    fake = Fake(url="")
    async for url in _serve(_aliyun_app(fake)):
        fake.url = url
        yield fake


@pytest.fixture
async def tencent() -> AsyncIterator[Fake]:
    fake = Fake(url="")
    async for url in _serve(_tencent_app(fake)):
        fake.url = url
        yield fake


@pytest.fixture
async def webhook() -> AsyncIterator[Fake]:
    fake = Fake(url="")
    async for url in _serve(_webhook_app(fake)):
        fake.url = url
        yield fake


def _sms(
    address: str, message_id: str = "act-0001:410923-liu-bing:sms", recipient_id: str = "410923-liu-bing"
) -> OutboundMessage:
    return OutboundMessage(
        message_id=message_id,
        channel="sms",
        recipient_id=recipient_id,
        address=address,
        subject="督办提醒",
        body="刘冰同志：南乐县第1.3项已逾期3个工作日，请尽快报送。",
        sms_template_code="SMS_460750001",
        sms_template_params={"county": "南乐县", "item": "1.3 完成方案编制", "days": "3"},
        urgent=False,
    )


def _aliyun_channel(fake: Fake, secret: str = ALIYUN_SECRET) -> AliyunSmsChannel:
    return AliyunSmsChannel(ALIYUN_ID, Secret(secret), "濮阳督查", endpoint=fake.url, timeout=5)


def _tencent_channel(fake: Fake, secret: str = TENCENT_SECRET) -> TencentSmsChannel:
    return TencentSmsChannel(TENCENT_ID, Secret(secret), TENCENT_APP, "濮阳督查", endpoint=fake.url, timeout=5)


# --- Aliyun --------------------------------------------------------------------------------------


async def test_aliyun_success_carries_our_id_number_and_params(aliyun: Fake) -> None:
    channel = _aliyun_channel(aliyun)
    try:
        result = await channel.send(_sms("+8613800000005"))
    finally:
        await channel.aclose()
    assert result.outcome is Outcome.SENT, result.detail
    assert aliyun.refused == []
    (got,) = aliyun.received
    assert got["phone"] == "13800000005"  # mainland form, without +86
    assert got["out_id"] == "act-0001:410923-liu-bing:sms"
    assert got["sign_name"] == "濮阳督查"
    assert got["template"] == "SMS_460750001"
    assert got["params"] == {"county": "南乐县", "item": "1.3 完成方案编制", "days": "3"}
    assert result.provider_message_id == got["biz_id"]


async def test_aliyun_provider_answers_map_to_outcomes(aliyun: Fake) -> None:
    channel = _aliyun_channel(aliyun)
    try:
        throttled = await channel.send(_sms(f"+86{THROTTLED_NUMBER}"))
        illegal = await channel.send(_sms(f"+86{ILLEGAL_NUMBER}"))
    finally:
        await channel.aclose()
    assert throttled.outcome is Outcome.THROTTLED and throttled.retryable
    assert illegal.outcome is Outcome.INVALID_RECIPIENT and not illegal.retryable
    assert ILLEGAL_NUMBER not in illegal.detail  # the provider echoed the number; we masked it
    assert "138****0099" in illegal.detail


async def test_aliyun_wrong_secret_is_rejected(aliyun: Fake) -> None:
    channel = _aliyun_channel(aliyun, secret="not-the-secret-9999")
    try:
        result = await channel.send(_sms("+8613800000005"))
    finally:
        await channel.aclose()
    assert aliyun.refused == ["signature"]
    assert result.outcome is Outcome.REJECTED
    assert "SignatureDoesNotMatch" in result.detail
    assert "not-the-secret-9999" not in result.detail and ALIYUN_ID not in result.detail
    assert aliyun.received == []


async def test_aliyun_server_down_is_transient(aliyun: Fake) -> None:
    channel = AliyunSmsChannel(ALIYUN_ID, Secret(ALIYUN_SECRET), "濮阳督查", endpoint="http://127.0.0.1:9/", timeout=2)
    try:
        result = await channel.send(_sms("+8613800000005"))
    finally:
        await channel.aclose()
    assert result.outcome is Outcome.TRANSIENT_ERROR


# --- Tencent -------------------------------------------------------------------------------------


async def test_tencent_success_carries_our_id_number_and_params(tencent: Fake) -> None:
    channel = _tencent_channel(tencent)
    message = OutboundMessage(
        message_id="act-0002:410922-liu-bing:sms",
        channel="sms",
        recipient_id="410922-liu-bing",
        address="+8613800000003",
        subject="督办提醒",
        body="刘兵同志：……",
        sms_template_code="1890001",
        sms_template_params={"2": "1.3 完成方案编制", "1": "清丰县", "3": "3"},
    )
    try:
        result = await channel.send(message)
    finally:
        await channel.aclose()
    assert result.outcome is Outcome.SENT, result.detail
    assert tencent.refused == []
    (got,) = tencent.received
    assert got["phone"] == "+8613800000003"
    assert got["session_context"] == "act-0002:410922-liu-bing:sms"
    assert got["template"] == "1890001"
    assert got["params"] == ["清丰县", "1.3 完成方案编制", "3"]  # positional, in numeric key order
    assert result.provider_message_id == got["serial"]


async def test_tencent_provider_answers_map_to_outcomes(tencent: Fake) -> None:
    channel = _tencent_channel(tencent)
    try:
        throttled = await channel.send(_sms(f"+86{THROTTLED_NUMBER}"))
        illegal = await channel.send(_sms(f"+86{ILLEGAL_NUMBER}"))
    finally:
        await channel.aclose()
    assert throttled.outcome is Outcome.THROTTLED and throttled.retryable
    assert illegal.outcome is Outcome.INVALID_RECIPIENT and not illegal.retryable
    assert ILLEGAL_NUMBER not in illegal.detail


async def test_tencent_wrong_secret_is_rejected(tencent: Fake) -> None:
    channel = _tencent_channel(tencent, secret="not-the-secret-9999")
    try:
        result = await channel.send(_sms("+8613800000005"))
    finally:
        await channel.aclose()
    assert tencent.refused == ["AuthFailure.SignatureFailure"]
    assert result.outcome is Outcome.REJECTED
    assert "not-the-secret-9999" not in result.detail
    assert tencent.received == []


async def test_tencent_stale_clock_is_transient(tencent: Fake) -> None:
    channel = TencentSmsChannel(
        TENCENT_ID,
        Secret(TENCENT_SECRET),
        TENCENT_APP,
        "濮阳督查",
        endpoint=tencent.url,
        clock=lambda: time.time() - 3600,
    )
    try:
        result = await channel.send(_sms("+8613800000005"))
    finally:
        await channel.aclose()
    assert result.outcome is Outcome.TRANSIENT_ERROR


# --- the right person: 南乐县's 刘冰 and 清丰县's 刘兵 --------------------------------------------


async def test_liu_bing_and_liu_bing_reach_their_own_numbers(aliyun: Fake, tencent: Fake) -> None:
    directory = load_directory(example_directory_path())

    def responsible(county: str) -> tuple[str, str]:
        (person,) = [
            p for p in directory.people if p.county_code == county and ContactRole.RESPONSIBLE_PERSON in p.roles
        ]
        assert person.mobile is not None
        return person.id, person.mobile

    nanle_id, nanle_mobile = responsible("410923")  # 南乐县: 刘冰
    qingfeng_id, qingfeng_mobile = responsible("410922")  # 清丰县: 刘兵
    assert directory.person(nanle_id).name == "刘冰"  # type: ignore[union-attr]
    assert directory.person(qingfeng_id).name == "刘兵"  # type: ignore[union-attr]
    assert nanle_mobile != qingfeng_mobile

    messages = {
        "410923": _sms(nanle_mobile, message_id=f"act-nanle:{nanle_id}:sms", recipient_id=nanle_id),
        "410922": _sms(qingfeng_mobile, message_id=f"act-qingfeng:{qingfeng_id}:sms", recipient_id=qingfeng_id),
    }
    ali, ten = _aliyun_channel(aliyun), _tencent_channel(tencent)
    try:
        for message in messages.values():
            assert (await ali.send(message)).outcome is Outcome.SENT
            assert (await ten.send(message)).outcome is Outcome.SENT
    finally:
        await ali.aclose()
        await ten.aclose()

    by_out_id = {r["out_id"]: r["phone"] for r in aliyun.received}
    assert by_out_id == {
        f"act-nanle:{nanle_id}:sms": nanle_mobile.removeprefix("+86"),
        f"act-qingfeng:{qingfeng_id}:sms": qingfeng_mobile.removeprefix("+86"),
    }
    by_context = {r["session_context"]: r["phone"] for r in tencent.received}
    assert by_context == {
        f"act-nanle:{nanle_id}:sms": nanle_mobile,
        f"act-qingfeng:{qingfeng_id}:sms": qingfeng_mobile,
    }


# --- webhook -------------------------------------------------------------------------------------


async def test_webhook_signed_with_idempotency_key(webhook: Fake) -> None:
    channel = WebhookChannel(webhook.url + "hook/ok", Secret(WEBHOOK_SECRET), timeout=5)
    message = _sms("+8613800000005")
    try:
        result = await channel.send(message)
    finally:
        await channel.aclose()
    assert result.outcome is Outcome.SENT, result.detail
    assert result.provider_message_id == "hook-1"
    (got,) = webhook.received
    assert got["key"] == message.message_id
    assert got["payload"]["message_id"] == message.message_id
    assert got["payload"]["sms_template_params"]["county"] == "南乐县"
    assert WEBHOOK_SECRET not in json.dumps(got["payload"])


async def test_webhook_status_mapping(webhook: Fake) -> None:
    busy = WebhookChannel(webhook.url + "hook/busy", Secret(WEBHOOK_SECRET), timeout=5)
    broken = WebhookChannel(webhook.url + "hook/broken", Secret(WEBHOOK_SECRET), timeout=5)
    wrong = WebhookChannel(webhook.url + "hook/ok", Secret("not-the-secret"), timeout=5)
    try:
        throttled = await busy.send(_sms("+8613800000005"))
        failed = await broken.send(_sms("+8613800000005"))
        refused = await wrong.send(_sms("+8613800000005"))
    finally:
        for channel in (busy, broken, wrong):
            await channel.aclose()
    assert throttled.outcome is Outcome.THROTTLED and throttled.retry_after_s == 7
    assert failed.outcome is Outcome.TRANSIENT_ERROR and failed.retryable
    assert refused.outcome is Outcome.REJECTED and not refused.retryable
    assert webhook.refused == ["signature"]
    assert webhook.received == []


# --- file ----------------------------------------------------------------------------------------


async def test_file_channel_writes_once_per_message_id(tmp_path: Path) -> None:
    path = tmp_path / "demo" / "sms.jsonl"
    channel = FileChannel(path)
    first = await channel.send(_sms("+8613800000005", message_id="m-1"))
    again = await channel.send(_sms("+8613800000005", message_id="m-1"))
    other = await channel.send(_sms("+8613800000003", message_id="m-2"))
    assert first.outcome is Outcome.SENT and again.outcome is Outcome.SENT and other.outcome is Outcome.SENT
    assert again.detail == "already in the file"
    records = channel.messages()
    assert [(r["message_id"], r["address"]) for r in records] == [("m-1", "+8613800000005"), ("m-2", "+8613800000003")]
    assert records[0]["body"].startswith("刘冰同志")

    # A second channel (another process, a restart) sees what is already there.
    restarted = FileChannel(path)
    await restarted.send(_sms("+8613800000005", message_id="m-1"))
    await restarted.send(_sms("+8613800000005", message_id="m-3"))
    assert [r["message_id"] for r in restarted.messages()] == ["m-1", "m-2", "m-3"]
    # And the first channel catches up with lines it did not write.
    await channel.send(_sms("+8613800000005", message_id="m-3"))
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3
