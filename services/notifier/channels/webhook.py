"""A generic HTTPS webhook: the message as JSON, signed with a shared secret.

Headers: ``X-Duban-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>``,
``Idempotency-Key: <message_id>`` (the receiver drops a resend after a crash), and
``X-Duban-Message-Id``. The body carries the message's fields and nothing secret.

Answers: 2xx → sent (``id`` from a JSON answer, if any, as the provider id); 429 → throttled
(honouring ``Retry-After``); 408 and 5xx, timeouts and network failures → transient; other 4xx and
redirects → rejected.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import httpx
import msgspec
import structlog

from services.notifier.channels._http import make_client, retry_after, transport_failure
from services.notifier.channels.base import (
    DeliveryResult,
    OutboundMessage,
    Outcome,
    Secret,
    log_attempt,
    safe_detail,
)

log = structlog.get_logger("duban.notifier.channels.webhook")

SIGNATURE_HEADER = "X-Duban-Signature"


def sign_body(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class WebhookChannel:
    kind = "webhook"

    def __init__(
        self,
        url: str,
        secret: Secret,
        *,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
        accept_any_channel: bool = True,
    ) -> None:
        self.url = url
        self._secret = secret
        self._client, self._owns_client = make_client(timeout, client)
        # A webhook often stands in for SMS or e-mail (a chat bot, a gateway): by default it takes
        # a message planned for any channel.
        self.accept_any_channel = accept_any_channel

    def __repr__(self) -> str:
        return f"WebhookChannel({self.url!r})"

    def body(self, message: OutboundMessage) -> bytes:
        return msgspec.json.encode(message)

    async def send(self, message: OutboundMessage) -> DeliveryResult:
        result = await self._send(message)
        log_attempt(self.kind, "webhook", message, result)
        return result

    async def _send(self, message: OutboundMessage) -> DeliveryResult:
        if not self.accept_any_channel and message.channel != self.kind:
            return DeliveryResult(outcome=Outcome.REJECTED, detail=f"a {message.channel} message for the webhook")
        body = self.body(message)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            SIGNATURE_HEADER: sign_body(body, self._secret.reveal()),
            "Idempotency-Key": message.message_id,
            "X-Duban-Message-Id": message.message_id,
        }
        try:
            response = await self._client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return DeliveryResult(outcome=Outcome.TRANSIENT_ERROR, detail=transport_failure(exc))
        status = response.status_code
        detail = safe_detail(f"HTTP {status} {response.reason_phrase}", secrets=(self._secret,))
        if 200 <= status < 300:
            return DeliveryResult(outcome=Outcome.SENT, provider_message_id=self._provider_id(response), detail=detail)
        if status == 429:
            return DeliveryResult(outcome=Outcome.THROTTLED, detail=detail, retry_after_s=retry_after(response))
        if status == 408 or status >= 500:
            return DeliveryResult(outcome=Outcome.TRANSIENT_ERROR, detail=detail, retry_after_s=retry_after(response))
        return DeliveryResult(outcome=Outcome.REJECTED, detail=detail)

    @staticmethod
    def _provider_id(response: httpx.Response) -> str | None:
        try:
            data: Any = response.json()
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("id"), str | int):
            return str(data["id"])[:128]
        request_id: str | None = response.headers.get("x-request-id")
        return request_id

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
