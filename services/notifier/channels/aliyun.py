"""SMS through Aliyun (Alibaba Cloud) SMS: ``SendSms`` on the RPC API, signature version 1.0.

The request is a GET to ``https://dysmsapi.aliyuncs.com/`` with every parameter in the query:

- common parameters: ``AccessKeyId``, ``Action=SendSms``, ``Format=JSON``, ``RegionId``,
  ``SignatureMethod=HMAC-SHA1``, ``SignatureNonce`` (a fresh UUID), ``SignatureVersion=1.0``,
  ``Timestamp`` (ISO 8601 UTC, ``2017-07-12T02:42:19Z``), ``Version=2017-05-25``;
- ``PhoneNumbers`` (the mainland number without +86), ``SignName``, ``TemplateCode``,
  ``TemplateParam`` (JSON), ``OutId`` = our message id, so a resend is recognisable.

Signature (Alibaba Cloud "RPC signature mechanism" / SMS "signature method" docs):
``percent_encode`` is RFC 3986 (UTF-8; only ``A-Z a-z 0-9 - _ . ~`` stay; space is ``%20``, ``*`` is
``%2A``); the canonical query is the encoded ``name=value`` pairs sorted by name and joined by
``&``; ``StringToSign = "GET&%2F&" + percent_encode(canonical query)``;
``Signature = Base64(HMAC-SHA1(AccessKeySecret + "&", StringToSign))``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable, Mapping
from urllib.parse import quote

import httpx
import structlog

from services.notifier.channels._http import make_client, transport_failure
from services.notifier.channels.base import (
    DeliveryResult,
    OutboundMessage,
    Outcome,
    Receipt,
    Secret,
    log_attempt,
    mainland_number,
    provider_result,
    safe_detail,
    wrong_channel,
)

log = structlog.get_logger("duban.notifier.channels.aliyun")

DEFAULT_ENDPOINT = "https://dysmsapi.aliyuncs.com/"
API_VERSION = "2017-05-25"

_THROTTLED = {"isv.BUSINESS_LIMIT_CONTROL", "isv.DAY_LIMIT_CONTROL", "isv.OUT_OF_SERVICE_LIMIT_CONTROL"}
_INVALID_RECIPIENT = {"isv.MOBILE_NUMBER_ILLEGAL", "isv.BLACK_KEY_CONTROL_LIMIT_MOBILE"}
_REJECTED = {
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "isv.SMS_TEMPLATE_ILLEGAL",
    "isv.SMS_SIGNATURE_ILLEGAL",
    "isv.TEMPLATE_MISSING_PARAMETERS",
    "isv.INVALID_PARAMETERS",
    "isv.INVALID_JSON_PARAM",
    "isv.PARAM_LENGTH_LIMIT",
    "isv.ACCOUNT_NOT_EXISTS",
    "isv.ACCOUNT_ABNORMAL",
    "isv.AMOUNT_NOT_ENOUGH",
    "isv.SMS_CONTENT_ILLEGAL",
}
_TRANSIENT = {"isp.SYSTEM_ERROR", "InternalError", "ServiceUnavailable", "SignatureNonceUsed"}


def percent_encode(value: str) -> str:
    """RFC 3986 percent-encoding as Aliyun's POP signature wants it (UTF-8, ``~`` kept)."""
    return quote(value, safe="~")  # quote() never encodes A-Z a-z 0-9 _ . - ; '~' added


def canonical_query(params: Mapping[str, str]) -> str:
    return "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in sorted(params.items()) if k != "Signature")


def string_to_sign(params: Mapping[str, str], method: str = "GET") -> str:
    return f"{method}&{percent_encode('/')}&{percent_encode(canonical_query(params))}"


def rpc_signature(params: Mapping[str, str], access_key_secret: str, method: str = "GET") -> str:
    digest = hmac.new(f"{access_key_secret}&".encode(), string_to_sign(params, method).encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def classify(code: str, status: int) -> Outcome:
    if code == "OK":
        return Outcome.SENT
    if code in _THROTTLED or code.startswith("Throttling"):
        return Outcome.THROTTLED
    if code in _INVALID_RECIPIENT:
        return Outcome.INVALID_RECIPIENT
    if code in _REJECTED or code.startswith(("InvalidAccessKeyId", "Forbidden", "InvalidTimeStamp")):
        return Outcome.REJECTED
    if code in _TRANSIENT or status >= 500:
        return Outcome.TRANSIENT_ERROR
    return Outcome.REJECTED


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AliyunSmsChannel:
    kind = "sms"
    provider = "aliyun"

    def __init__(
        self,
        access_key_id: str,
        access_key_secret: Secret,
        sign_name: str,
        *,
        endpoint: str = DEFAULT_ENDPOINT,
        region_id: str = "cn-hangzhou",
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
        now: Callable[[], dt.datetime] = _utc_now,
        nonce: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self._access_key_id = access_key_id
        self._secret = access_key_secret
        self.sign_name = sign_name
        self.endpoint = endpoint
        self.region_id = region_id
        self._client, self._owns_client = make_client(timeout, client)
        self._now = now
        self._nonce = nonce

    def __repr__(self) -> str:
        return f"AliyunSmsChannel(endpoint={self.endpoint!r}, sign_name={self.sign_name!r})"

    def _signed(self, action: str, **fields: str) -> dict[str, str]:
        params = {
            "AccessKeyId": self._access_key_id,
            "Action": action,
            "Format": "JSON",
            "RegionId": self.region_id,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureNonce": self._nonce(),
            "SignatureVersion": "1.0",
            "Timestamp": self._now().astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "Version": API_VERSION,
            **fields,
        }
        params["Signature"] = rpc_signature(params, self._secret.reveal())
        return params

    def _url(self, params: dict[str, str]) -> str:
        signature = params.pop("Signature")
        # The query is built here, byte for byte the canonical one, so what is sent is what was signed.
        return f"{self.endpoint}?Signature={percent_encode(signature)}&{canonical_query(params)}"

    def signed_params(self, message: OutboundMessage, phone: str) -> dict[str, str]:
        assert message.sms_template_code is not None
        return self._signed(
            "SendSms",
            OutId=message.message_id,
            PhoneNumbers=phone,
            SignName=self.sign_name,
            TemplateCode=message.sms_template_code,
            TemplateParam=json.dumps(message.sms_template_params, ensure_ascii=False, separators=(",", ":")),
        )

    async def query_receipt(self, message_id: str, address: str, biz_id: str, sent_on: dt.date) -> Receipt | None:
        """The delivery report of one sent SMS (QuerySendDetails by BizId, number and day); None
        while the carrier has not reported yet or the API cannot be reached."""
        params = self._signed(
            "QuerySendDetails",
            PhoneNumber=mainland_number(address),
            BizId=biz_id,
            SendDate=sent_on.strftime("%Y%m%d"),
            PageSize="10",
            CurrentPage="1",
        )
        try:
            response = await self._client.get(self._url(params), headers={"Accept": "application/json"})
            data = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("notifier.receipts.unavailable", provider=self.provider, detail=self._safe(type(exc).__name__))
            return None
        details = ((data or {}).get("SmsSendDetailDTOs") or {}).get("SmsSendDetailDTO") or []
        mine = next((d for d in details if d.get("OutId") == message_id), details[0] if details else None)
        status = (mine or {}).get("SendStatus")
        if status not in (2, 3):  # 1: waiting for the carrier's report
            return None
        return Receipt(
            message_id=message_id,
            delivered=status == 3,
            detail=self._safe(str(mine.get("ErrCode") or "")),  # type: ignore[union-attr]
            provider_message_id=biz_id,
        )

    async def send(self, message: OutboundMessage) -> DeliveryResult:
        result = await self._send(message)
        log_attempt(self.kind, self.provider, message, result)
        return result

    async def _send(self, message: OutboundMessage) -> DeliveryResult:
        if (wrong := wrong_channel(self.kind, message)) is not None:
            return wrong
        try:
            phone = mainland_number(message.address)
        except ValueError:
            return DeliveryResult(outcome=Outcome.INVALID_RECIPIENT, detail="not a mainland China mobile number")
        if not message.sms_template_code:
            return DeliveryResult(outcome=Outcome.REJECTED, detail="no SMS template code for this message")
        url = self._url(self.signed_params(message, phone))
        try:
            response = await self._client.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            return DeliveryResult(outcome=Outcome.TRANSIENT_ERROR, detail=transport_failure(exc))
        return self._result(response)

    def _result(self, response: httpx.Response) -> DeliveryResult:
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("Code"), str):
            outcome = Outcome.TRANSIENT_ERROR if response.status_code >= 500 else Outcome.REJECTED
            return DeliveryResult(outcome=outcome, detail=f"HTTP {response.status_code} without an SMS API answer")
        code: str = data["Code"]
        outcome = classify(code, response.status_code)
        detail = self._safe(f"{code}: {data.get('Message', '')}")
        return provider_result(outcome, detail, data.get("BizId"))

    def _safe(self, text: str) -> str:
        return safe_detail(text, secrets=(self._secret, self._access_key_id))

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
