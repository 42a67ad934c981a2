"""Channels without a network: signatures against the providers' published examples, encoding,
outcome mapping, masking and secrets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import msgspec
import pytest
from structlog.testing import capture_logs

from services.notifier.channels import aliyun, tencent
from services.notifier.channels.base import (
    Channel,
    DeliveryResult,
    OutboundMessage,
    Outcome,
    Secret,
    SecretNotFound,
    mainland_number,
    mask_address,
    mask_phone,
    safe_detail,
)
from services.notifier.channels.smtp import SmtpChannel, build_email, message_id_header
from services.notifier.channels.webhook import WebhookChannel, sign_body

# --- Aliyun RPC signature (HMAC-SHA1) ----------------------------------------------------------


def test_aliyun_signature_matches_the_rpc_documentation_example() -> None:
    # Alibaba Cloud "Request signatures" / "Signature mechanism" (RPC API), worked example:
    # DescribeRegions with AccessKeyId "testid", AccessKeySecret "testsecret"
    # (help.aliyun.com/en/document_detail/130769.html; www.alibabacloud.com/help/doc-detail/69009.html).
    params = {
        "Timestamp": "2016-02-23T12:46:24Z",
        "Format": "XML",
        "AccessKeyId": "testid",
        "Action": "DescribeRegions",
        "SignatureMethod": "HMAC-SHA1",
        "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
        "Version": "2014-05-26",
        "SignatureVersion": "1.0",
    }
    assert aliyun.string_to_sign(params) == (
        "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions%26Format%3DXML"
        "%26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"
        "%26SignatureVersion%3D1.0%26Timestamp%3D2016-02-23T12%253A46%253A24Z%26Version%3D2014-05-26"
    )
    assert aliyun.rpc_signature(params, "testsecret") == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="


def test_aliyun_signature_matches_the_sms_documentation_example() -> None:
    # Aliyun SMS "HTTP协议及签名" (help.aliyun.com/document_detail/56189.html), SendSms example with
    # AccessKeyId "testId", AccessKeySecret "testSecret" and a Chinese SignName.
    params = {
        "AccessKeyId": "testId",
        "Action": "SendSms",
        "Format": "XML",
        "OutId": "123",
        "PhoneNumbers": "15300000001",
        "RegionId": "cn-hangzhou",
        "SignName": "阿里云短信测试专用",
        "SignatureMethod": "HMAC-SHA1",
        "SignatureNonce": "45e25e9b-0a6f-4070-8c85-2956eda1b466",
        "SignatureVersion": "1.0",
        "TemplateCode": "SMS_71390007",
        "TemplateParam": '{"customer":"test"}',
        "Timestamp": "2017-07-12T02:42:19Z",
        "Version": "2017-05-25",
    }
    assert aliyun.canonical_query(params | {"Signature": "ignored"}) == (
        "AccessKeyId=testId&Action=SendSms&Format=XML&OutId=123&PhoneNumbers=15300000001"
        "&RegionId=cn-hangzhou&SignName=%E9%98%BF%E9%87%8C%E4%BA%91%E7%9F%AD%E4%BF%A1%E6%B5%8B%E8%AF%95"
        "%E4%B8%93%E7%94%A8&SignatureMethod=HMAC-SHA1&SignatureNonce=45e25e9b-0a6f-4070-8c85-2956eda1b466"
        "&SignatureVersion=1.0&TemplateCode=SMS_71390007&TemplateParam=%7B%22customer%22%3A%22test%22%7D"
        "&Timestamp=2017-07-12T02%3A42%3A19Z&Version=2017-05-25"
    )
    assert aliyun.rpc_signature(params, "testSecret") == "zJDF+Lrzhj/ThnlvIToysFRq6t4="


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        ("a b", "a%20b"),  # space is %20, never '+'
        ("*", "%2A"),
        ("~", "~"),  # tilde stays
        ("-_.", "-_."),
        ("+", "%2B"),
        ("/", "%2F"),
        ("=&", "%3D%26"),
        ("2017-07-12T02:42:19Z", "2017-07-12T02%3A42%3A19Z"),
        ('{"k":"v"}', "%7B%22k%22%3A%22v%22%7D"),
        ("督办", "%E7%9D%A3%E5%8A%9E"),  # UTF-8 bytes, upper-case hex
        ("%", "%25"),
        ("!'()", "%21%27%28%29"),
        ("", ""),
    ],
)
def test_aliyun_percent_encoding(raw: str, encoded: str) -> None:
    assert aliyun.percent_encode(raw) == encoded


def test_aliyun_request_is_signed_with_our_out_id() -> None:
    import datetime as dt

    channel = aliyun.AliyunSmsChannel(
        "testId",
        Secret("testSecret"),
        "濮阳督查",
        now=lambda: dt.datetime(2017, 7, 12, 2, 42, 19, tzinfo=dt.UTC),
        nonce=lambda: "n-1",
    )
    params = channel.signed_params(_sms(), "13800000005")
    assert params["OutId"] == "act-1:p:sms"
    assert params["Timestamp"] == "2017-07-12T02:42:19Z"
    assert params["TemplateParam"] == '{"county":"南乐县","days":"3"}'
    signature = params.pop("Signature")
    assert signature == aliyun.rpc_signature(params, "testSecret")


@pytest.mark.parametrize(
    ("code", "status", "outcome"),
    [
        ("OK", 200, Outcome.SENT),
        ("isv.BUSINESS_LIMIT_CONTROL", 200, Outcome.THROTTLED),
        ("Throttling.User", 400, Outcome.THROTTLED),
        ("isv.MOBILE_NUMBER_ILLEGAL", 200, Outcome.INVALID_RECIPIENT),
        ("SignatureDoesNotMatch", 400, Outcome.REJECTED),
        ("InvalidAccessKeyId.NotFound", 404, Outcome.REJECTED),
        ("isv.SMS_TEMPLATE_ILLEGAL", 200, Outcome.REJECTED),
        ("isv.SMS_SIGNATURE_ILLEGAL", 200, Outcome.REJECTED),
        ("isp.SYSTEM_ERROR", 200, Outcome.TRANSIENT_ERROR),
        ("SomethingNew", 503, Outcome.TRANSIENT_ERROR),
        ("SomethingNew", 400, Outcome.REJECTED),
    ],
)
def test_aliyun_codes(code: str, status: int, outcome: Outcome) -> None:
    assert aliyun.classify(code, status) is outcome


# --- Tencent TC3-HMAC-SHA256 -------------------------------------------------------------------


def test_tc3_signature_matches_the_documentation_example() -> None:
    # Tencent Cloud API 3.0 "Signature v3" (TC3-HMAC-SHA256) worked example: CVM DescribeInstances,
    # timestamp 1551113065, SecretKey "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE"; the documented payload hash
    # is 35e9c5b0…f064, the canonical request hash 5ffe6a04…7031 and the signature 72e494ea…5168
    # (tencentcloud.com/document/product/382/40467 and the other products' "Signature v3" pages).
    payload = b'{"Limit": 1, "Filters": [{"Values": ["\\u672a\\u547d\\u540d"], "Name": "instance-name"}]}'
    assert hashlib.sha256(payload).hexdigest() == "35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
    signature, scope = tencent.tc3_signature(
        secret_key="Gu5t9xGARNpq86cd98joQYCN3EXAMPLE",
        service="cvm",
        host="cvm.tencentcloudapi.com",
        timestamp=1551113065,
        payload=payload,
    )
    assert scope == "2019-02-25/cvm/tc3_request"  # the UTC date, not Beijing's 2019-02-26
    assert signature == "72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
    assert tencent.authorization("AKIDEXAMPLE", scope, signature) == (
        "TC3-HMAC-SHA256 Credential=AKIDEXAMPLE/2019-02-25/cvm/tc3_request, "
        "SignedHeaders=content-type;host, Signature=72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
    )


def test_tencent_request_headers_and_body() -> None:
    channel = tencent.TencentSmsChannel(
        "AKIDEXAMPLE", Secret("sk-example-0001"), "1400000001", "濮阳督查", clock=lambda: 1551113065.7
    )
    headers, body = channel.request(_sms())
    assert headers["X-TC-Action"] == "SendSms"
    assert headers["X-TC-Version"] == "2021-01-11"
    assert headers["X-TC-Timestamp"] == "1551113065"
    assert headers["Host"] == "sms.tencentcloudapi.com"
    payload = msgspec.json.decode(body)
    assert payload["PhoneNumberSet"] == ["+8613800000005"]
    assert payload["SessionContext"] == "act-1:p:sms"
    expected, _ = tencent.tc3_signature(
        secret_key="sk-example-0001", service="sms", host="sms.tencentcloudapi.com", timestamp=1551113065, payload=body
    )
    assert headers["Authorization"].endswith(f"Signature={expected}")
    assert "/2019-02-25/sms/tc3_request" in headers["Authorization"]


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        ("Ok", Outcome.SENT),
        ("LimitExceeded.PhoneNumberDailyLimit", Outcome.THROTTLED),
        ("RequestLimitExceeded", Outcome.THROTTLED),
        ("InvalidParameterValue.IncorrectPhoneNumber", Outcome.INVALID_RECIPIENT),
        ("FailedOperation.PhoneNumberInBlacklist", Outcome.INVALID_RECIPIENT),
        ("AuthFailure.SignatureFailure", Outcome.REJECTED),
        ("AuthFailure.SecretIdNotFound", Outcome.REJECTED),
        ("FailedOperation.TemplateIncorrectOrUnapproved", Outcome.REJECTED),
        ("InternalError.Timeout", Outcome.TRANSIENT_ERROR),
    ],
)
def test_tencent_codes(code: str, outcome: Outcome) -> None:
    assert tencent.classify(code) is outcome


def test_tencent_template_params_are_positional() -> None:
    assert tencent.template_param_set({"10": "j", "2": "b", "1": "a"}) == ["a", "b", "j"]
    assert tencent.template_param_set({"name": "x", "days": "3"}) == ["x", "3"]


# --- results, masking, secrets -----------------------------------------------------------------


def test_retryable() -> None:
    assert DeliveryResult(outcome=Outcome.THROTTLED).retryable
    assert DeliveryResult(outcome=Outcome.TRANSIENT_ERROR).retryable
    for outcome in (Outcome.SENT, Outcome.INVALID_RECIPIENT, Outcome.REJECTED):
        assert not DeliveryResult(outcome=outcome).retryable


def test_mask_phone() -> None:
    assert mask_phone("+8613812341234") == "138****1234"
    assert mask_phone("13812341234") == "138****1234"
    assert mask_address("liu-bing.410923@example.org") == "l***@example.org"
    assert mask_address("+8613800000005") == "138****0005"
    assert mainland_number("+8613800000005") == "13800000005"
    with pytest.raises(ValueError):
        mainland_number("+4915112345678")


def test_safe_detail_masks_numbers_in_any_spelling_and_removes_secrets() -> None:
    text = "bad number 13812341234, +8613812341234, 138 1234 1234 for key s3cr3t-value"
    detail = safe_detail(text, secrets=(Secret("s3cr3t-value"),))
    assert "13812341234" not in detail and "1234 1234" not in detail
    assert "s3cr3t-value" not in detail
    assert "138****1234" in detail
    assert len(safe_detail("x" * 2000)) <= 500


def test_message_id_is_checked_on_decode() -> None:
    good = msgspec.json.encode(_sms())
    assert msgspec.json.decode(good, type=OutboundMessage) == _sms()
    too_long = good.replace(b"act-1:p:sms", b"a" * 65)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(too_long, type=OutboundMessage)


def test_secret_never_shows_itself(tmp_path: Path) -> None:
    secret = Secret.from_env("DUBAN_TEST_SECRET", environ={"DUBAN_TEST_SECRET": "hunter2-value"})
    assert secret.reveal() == "hunter2-value"
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret) and "hunter2" not in f"{secret}"
    assert secret.source == "env:DUBAN_TEST_SECRET"

    path = tmp_path / "aliyun.secret"
    path.write_text("from-a-file\n", encoding="utf-8")
    from_file = Secret.from_env("ALIYUN_SECRET", environ={"ALIYUN_SECRET_FILE": str(path)})
    assert from_file.reveal() == "from-a-file"
    assert Secret.load(f"file:{path}").reveal() == "from-a-file"
    assert Secret.load("env:X", environ={"X": "y-value"}).reveal() == "y-value"
    with pytest.raises(SecretNotFound):
        Secret.from_env("NOT_SET_ANYWHERE", environ={})
    with pytest.raises(SecretNotFound):
        Secret.from_file(tmp_path / "missing")
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(secret)


# --- no full phone number or credential in any log line or detail --------------------------------

PHONE = "+8613812341234"
ALIYUN_SECRET = "aliyun-secret-value-0001"
TENCENT_SECRET = "tencent-secret-value-0001"
HOOK_SECRET = "hook-secret-value-0001"


def _sms(address: str = "+8613800000005") -> OutboundMessage:
    return OutboundMessage(
        message_id="act-1:p:sms",
        channel="sms",
        recipient_id="p",
        address=address,
        subject="督办",
        body="请尽快报送。",
        sms_template_code="SMS_1",
        sms_template_params={"county": "南乐县", "days": "3"},
    )


def _echo_transport(status: int, answer: dict[str, object]) -> httpx.MockTransport:
    """A provider that echoes the number and our key id back in its error message."""

    def handler(request: httpx.Request) -> httpx.Response:
        text = f"{request.url} {request.headers.get('authorization', '')} {request.content.decode()}"
        return httpx.Response(status, json=answer | {"Echo": text})

    return httpx.MockTransport(handler)


async def test_nothing_secret_or_full_number_in_logs_or_details() -> None:
    def echo(*secrets: str) -> str:  # a provider quoting the number and the channel's own credentials
        return f"手机号 {PHONE.removeprefix('+86')} / {PHONE} key {' '.join(secrets)}"

    channels: list[Channel] = [
        aliyun.AliyunSmsChannel(
            "LTAIkeyid",
            Secret(ALIYUN_SECRET),
            "签名",
            client=httpx.AsyncClient(
                transport=_echo_transport(
                    200, {"Code": "isv.MOBILE_NUMBER_ILLEGAL", "Message": echo("LTAIkeyid", ALIYUN_SECRET)}
                )
            ),
        ),
        tencent.TencentSmsChannel(
            "AKIDkeyid",
            Secret(TENCENT_SECRET),
            "1400000001",
            "签名",
            client=httpx.AsyncClient(
                transport=_echo_transport(
                    200,
                    {"Response": {"Error": {"Code": "AuthFailure.X", "Message": echo("AKIDkeyid", TENCENT_SECRET)}}},
                )
            ),
        ),
        WebhookChannel(
            "https://hooks.example.org/x",
            Secret(HOOK_SECRET),
            client=httpx.AsyncClient(transport=_echo_transport(500, {"error": echo(HOOK_SECRET)})),
        ),
        SmtpChannel("127.0.0.1", 9, username="u", password=Secret("smtp-password-0001"), sender="a@b.org", timeout=1),
    ]
    results = []
    with capture_logs() as logs:
        for channel in channels:
            message = _sms(PHONE)
            if isinstance(channel, SmtpChannel):
                message = msgspec.structs.replace(message, channel="email", address="liu@example.org")
            results.append(await channel.send(message))
            await channel.aclose()
    assert [r.outcome for r in results] == [
        Outcome.INVALID_RECIPIENT,
        Outcome.REJECTED,
        Outcome.TRANSIENT_ERROR,
        Outcome.TRANSIENT_ERROR,
    ]
    assert len(logs) == 4
    text = " ".join(str(entry) for entry in logs) + " ".join(r.detail for r in results)
    forbidden = [
        PHONE,
        PHONE.removeprefix("+86"),
        ALIYUN_SECRET,
        TENCENT_SECRET,
        HOOK_SECRET,
        "smtp-password-0001",
        "LTAIkeyid",
        "AKIDkeyid",
    ]
    for value in forbidden:
        assert value not in text, value
    assert "138****1234" in text
    assert repr(channels[0]).count(ALIYUN_SECRET) == 0 and "smtp-password" not in repr(channels[3])


# --- e-mail and webhook pieces -----------------------------------------------------------------


def test_message_id_header_is_valid_and_reversible() -> None:
    assert message_id_header("act-1.ok", "example.org") == "<act-1.ok@example.org>"
    header = message_id_header("act:1@x<y>=", "example.org")
    assert header == "<act=3A1=40x=3Cy=3E=3D@example.org>"
    assert message_id_header("..a..b.", "e.org") == "<=2E=2Ea=2E=2Eb=2E@e.org>"
    assert message_id_header("a.b", "e.org") == "<a.b@e.org>"


def test_email_has_plain_utf8_body_and_encoded_subject() -> None:
    message = msgspec.structs.replace(_sms(), channel="email", address="liu@example.org", subject="【督办】逾期")
    built = build_email(message, sender="duban@example.org", sender_name="濮阳市督查局")
    raw = built.as_bytes()
    assert b"Subject: =?utf-8?" in raw
    assert "X-Duban-Message-Id: act-1:p:sms" in raw.decode("ascii")  # 7-bit clean: base64 bodies
    plain = built.get_body(preferencelist=("plain",))
    assert plain is not None and plain.get_content().strip() == "请尽快报送。"


def test_webhook_signature() -> None:
    assert sign_body(b'{"a":1}', "k") == "sha256=" + __import__("hmac").new(b"k", b'{"a":1}', "sha256").hexdigest()


def test_http_client_request_lines_stay_out_of_the_logs() -> None:
    # httpx logs each request URL at INFO; a signed Aliyun URL carries AccessKeyId and Signature.
    import logging

    from services.common.logging import configure_logging

    configure_logging("json", "info")
    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
    assert logging.getLogger("httpcore").getEffectiveLevel() >= logging.WARNING
