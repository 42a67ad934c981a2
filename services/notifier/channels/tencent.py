"""SMS through Tencent Cloud SMS: API 3.0 ``SendSms`` (version 2021-01-11), TC3-HMAC-SHA256.

A POST of JSON to ``https://sms.tencentcloudapi.com/`` with ``PhoneNumberSet`` (E.164),
``SmsSdkAppId``, ``SignName``, ``TemplateId``, ``TemplateParamSet`` and ``SessionContext`` = our
message id (echoed back in the answer and in delivery receipts).

Signature (Tencent Cloud API 3.0 "Signature v3"):

    CanonicalRequest = "POST\\n/\\n\\n" + "content-type:application/json; charset=utf-8\\nhost:<host>\\n"
                       + "\\n" + "content-type;host" + "\\n" + hex(sha256(payload))
    StringToSign     = "TC3-HMAC-SHA256\\n" + timestamp + "\\n" + "<date>/sms/tc3_request\\n"
                       + hex(sha256(CanonicalRequest))
    SecretDate       = HMAC_SHA256("TC3" + SecretKey, date)      # date: UTC, YYYY-MM-DD
    SecretService    = HMAC_SHA256(SecretDate, "sms")
    SecretSigning    = HMAC_SHA256(SecretService, "tc3_request")
    Signature        = hex(HMAC_SHA256(SecretSigning, StringToSign))
    Authorization    = "TC3-HMAC-SHA256 Credential=<SecretId>/<date>/sms/tc3_request, "
                       "SignedHeaders=content-type;host, Signature=<Signature>"

with headers ``X-TC-Action: SendSms``, ``X-TC-Version``, ``X-TC-Timestamp``, ``X-TC-Region``.

Template parameters are positional at Tencent: the message's ``sms_template_params`` are sent in
numeric key order when the keys are ``"1"``, ``"2"`` …, otherwise in their given order.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
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

log = structlog.get_logger("duban.notifier.channels.tencent")

DEFAULT_ENDPOINT = "https://sms.tencentcloudapi.com/"
API_VERSION = "2021-01-11"
SERVICE = "sms"
ALGORITHM = "TC3-HMAC-SHA256"
CONTENT_TYPE = "application/json; charset=utf-8"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def tc3_signature(
    *,
    secret_key: str,
    service: str,
    host: str,
    timestamp: int,
    payload: bytes,
    method: str = "POST",
    content_type: str = CONTENT_TYPE,
    canonical_query: str = "",
) -> tuple[str, str]:
    """(signature hex, credential scope) for a request signed with ``content-type;host``."""
    date = dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d")
    canonical_request = "\n".join(
        [
            method,
            "/",
            canonical_query,
            f"content-type:{content_type}\nhost:{host}\n",
            "content-type;host",
            hashlib.sha256(payload).hexdigest(),
        ]
    )
    scope = f"{date}/{service}/tc3_request"
    to_sign = "\n".join(
        [ALGORITHM, str(timestamp), scope, hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()]
    )
    signing_key = _hmac(_hmac(_hmac(f"TC3{secret_key}".encode(), date), service), "tc3_request")
    return hmac.new(signing_key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest(), scope


def authorization(secret_id: str, scope: str, signature: str) -> str:
    return f"{ALGORITHM} Credential={secret_id}/{scope}, SignedHeaders=content-type;host, Signature={signature}"


def template_param_set(params: Mapping[str, str]) -> list[str]:
    if params and all(k.isdigit() for k in params):
        return [params[k] for k in sorted(params, key=int)]
    return list(params.values())


def classify(code: str) -> Outcome:
    if code == "Ok":
        return Outcome.SENT
    if code.startswith(("LimitExceeded", "RequestLimitExceeded")):
        return Outcome.THROTTLED
    if code == "InvalidParameterValue.IncorrectPhoneNumber" or code.startswith(
        ("FailedOperation.PhoneNumber", "UnsupportedOperation.ContainDomesticAndInternationalPhoneNumber")
    ):
        return Outcome.INVALID_RECIPIENT
    if code.startswith(("InternalError", "ServiceUnavailable", "ResourceUnavailable")) or code in (
        "AuthFailure.SignatureExpire",  # our clock or a slow network: a fresh signature may pass
    ):
        return Outcome.TRANSIENT_ERROR
    return Outcome.REJECTED  # AuthFailure.*, UnauthorizedOperation.*, FailedOperation.*, InvalidParameter*


class TencentSmsChannel:
    kind = "sms"
    provider = "tencent"

    def __init__(
        self,
        secret_id: str,
        secret_key: Secret,
        sdk_app_id: str,
        sign_name: str,
        *,
        region: str = "ap-guangzhou",
        endpoint: str = DEFAULT_ENDPOINT,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret_id = secret_id
        self._secret_key = secret_key
        self.sdk_app_id = sdk_app_id
        self.sign_name = sign_name
        self.region = region
        self.endpoint = endpoint
        parts = urlsplit(endpoint)
        if not parts.hostname:
            raise ValueError(f"endpoint without a host: {endpoint!r}")
        self._host = parts.netloc.lower()  # what httpx sends as Host (with a non-default port)
        self._client, self._owns_client = make_client(timeout, client)
        self._clock = clock

    def __repr__(self) -> str:
        return f"TencentSmsChannel(endpoint={self.endpoint!r}, sdk_app_id={self.sdk_app_id!r})"

    def _signed(self, action: str, body: bytes) -> dict[str, str]:
        timestamp = int(self._clock())
        signature, scope = tc3_signature(
            secret_key=self._secret_key.reveal(), service=SERVICE, host=self._host, timestamp=timestamp, payload=body
        )
        return {
            "Authorization": authorization(self._secret_id, scope, signature),
            "Content-Type": CONTENT_TYPE,
            "Host": self._host,
            "X-TC-Action": action,
            "X-TC-Version": API_VERSION,
            "X-TC-Timestamp": str(timestamp),
            "X-TC-Region": self.region,
        }

    async def pull_receipts(self, limit: int = 100) -> list[Receipt]:
        """Delivery reports not fetched before (PullSmsSendStatus); our id is the SessionContext.

        A transport or API failure returns nothing: the reports stay at Tencent for the next pull.
        """
        body = msgspec.json.encode({"Limit": limit, "SmsSdkAppId": self.sdk_app_id})
        try:
            response = await self._client.post(
                self.endpoint, content=body, headers=self._signed("PullSmsSendStatus", body)
            )
            data: Any = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("notifier.receipts.unavailable", provider=self.provider, detail=safe_detail(str(exc)))
            return []
        reports = (data.get("Response") or {}).get("PullSmsSendStatusSet") or []
        return [
            Receipt(
                message_id=str(r.get("SessionContext") or ""),
                delivered=r.get("ReportStatus") == "SUCCESS",
                detail=safe_detail(str(r.get("Description") or r.get("ReportStatus") or "")),
                provider_message_id=r.get("SerialNo"),
            )
            for r in reports
            if r.get("SessionContext")
        ]

    def request(self, message: OutboundMessage) -> tuple[dict[str, str], bytes]:
        """Headers and body of the signed ``SendSms`` request for one message."""
        assert message.sms_template_code is not None
        body = msgspec.json.encode(
            {
                "PhoneNumberSet": [f"+86{mainland_number(message.address)}"],
                "SmsSdkAppId": self.sdk_app_id,
                "SignName": self.sign_name,
                "TemplateId": message.sms_template_code,
                "TemplateParamSet": template_param_set(message.sms_template_params),
                "SessionContext": message.message_id,
            }
        )
        headers = self._signed("SendSms", body)
        return headers, body

    async def send(self, message: OutboundMessage) -> DeliveryResult:
        result = await self._send(message)
        log_attempt(self.kind, self.provider, message, result)
        return result

    async def _send(self, message: OutboundMessage) -> DeliveryResult:
        if (wrong := wrong_channel(self.kind, message)) is not None:
            return wrong
        try:
            mainland_number(message.address)
        except ValueError:
            return DeliveryResult(outcome=Outcome.INVALID_RECIPIENT, detail="not a mainland China mobile number")
        if not message.sms_template_code:
            return DeliveryResult(outcome=Outcome.REJECTED, detail="no SMS template id for this message")
        headers, body = self.request(message)
        try:
            response = await self._client.post(self.endpoint, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return DeliveryResult(outcome=Outcome.TRANSIENT_ERROR, detail=transport_failure(exc))
        return self._result(response)

    def _result(self, response: httpx.Response) -> DeliveryResult:
        try:
            data: Any = response.json()
        except ValueError:
            data = None
        answer = data.get("Response") if isinstance(data, dict) else None
        if not isinstance(answer, dict):
            outcome = Outcome.TRANSIENT_ERROR if response.status_code >= 500 else Outcome.REJECTED
            return DeliveryResult(outcome=outcome, detail=f"HTTP {response.status_code} without an SMS API answer")
        error = answer.get("Error")
        if isinstance(error, dict):
            code = str(error.get("Code", ""))
            outcome = classify(code)
            if outcome is Outcome.SENT or (response.status_code >= 500 and outcome is Outcome.REJECTED):
                outcome = Outcome.TRANSIENT_ERROR
            return DeliveryResult(outcome=outcome, detail=self._safe(f"{code}: {error.get('Message', '')}"))
        statuses = answer.get("SendStatusSet")
        if not isinstance(statuses, list) or not statuses or not isinstance(statuses[0], dict):
            return DeliveryResult(outcome=Outcome.TRANSIENT_ERROR, detail="answer without SendStatusSet")
        status = statuses[0]
        code = str(status.get("Code", ""))
        detail = self._safe(f"{code}: {status.get('Message', '')}")
        outcome = classify(code)
        return provider_result(outcome, detail, status.get("SerialNo"))

    def _safe(self, text: str) -> str:
        return safe_detail(text, secrets=(self._secret_key, self._secret_id))

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
