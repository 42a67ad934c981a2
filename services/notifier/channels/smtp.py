"""E-mail over SMTP (aiosmtplib): STARTTLS, implicit TLS or plain, with AUTH.

The message is ``multipart/alternative`` (text/plain UTF-8 with the full Chinese body, and the same
text as simple HTML); the subject is RFC 2047 encoded. ``Message-ID`` is derived from our
message id, and ``X-Duban-Message-Id`` carries it verbatim, so a resend after a crash is
recognisable as the same message.

One connection is kept open and reused; a connection the server dropped while idle is opened
again once. SMTP replies map onto :class:`Outcome`: 4xx → transient (throttled when the server says
so), 5xx on the recipient → invalid recipient, authentication failure → rejected, no connection →
transient.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import re
import ssl
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Literal

import aiosmtplib
import structlog

from services.notifier.channels.base import (
    DeliveryResult,
    OutboundMessage,
    Outcome,
    Secret,
    log_attempt,
    safe_detail,
    wrong_channel,
)

log = structlog.get_logger("duban.notifier.channels.smtp")

Security = Literal["starttls", "tls", "none"]

# RFC 5322 atext: what may stand unescaped in the left part of a Message-ID.
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")
_THROTTLE_HINT = re.compile(r"rate|limit|too many|try (again )?later|4\.7\.", re.I)


def message_id_header(message_id: str, domain: str) -> str:
    """``<our-id@domain>``; characters a Message-ID cannot hold become ``=XX`` (reversible).

    ``=`` itself is escaped, and so is a dot at either end or next to another dot (dot-atom rules).
    """
    last = len(message_id) - 1
    out = []
    for i, c in enumerate(message_id):
        if c == ".":
            lone = 0 < i < last and message_id[i - 1] != "." and message_id[i + 1] != "."
            out.append("." if lone else "=2E")
        elif c != "=" and _ATEXT.fullmatch(c):
            out.append(c)
        else:
            out.append("".join(f"={b:02X}" for b in c.encode()))
    return f"<{''.join(out)}@{domain}>"


def build_email(message: OutboundMessage, *, sender: str, sender_name: str | None = None) -> EmailMessage:
    domain = sender.rpartition("@")[2] or "duban.invalid"
    email = EmailMessage()
    email["Subject"] = message.subject
    email["From"] = Address(display_name=sender_name, addr_spec=sender) if sender_name else sender
    email["To"] = message.address
    email["Date"] = format_datetime(dt.datetime.now(dt.UTC))
    email["Message-ID"] = message_id_header(message.message_id, domain)
    email["X-Duban-Message-Id"] = message.message_id
    email["Auto-Submitted"] = "auto-generated"
    if message.urgent:
        email["Importance"] = "high"
        email["X-Priority"] = "1"
    # base64 bodies keep the message 7-bit clean for any relay (no 8BITMIME needed).
    email.set_content(message.body, subtype="plain", charset="utf-8", cte="base64")
    paragraphs = "".join(f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>" for p in message.body.split("\n\n"))
    email.add_alternative(
        f'<!DOCTYPE html><html lang="zh-CN"><head><meta charset="utf-8"><title>{html.escape(message.subject)}'
        f"</title></head><body>{paragraphs}</body></html>",
        subtype="html",
        charset="utf-8",
        cte="base64",
    )
    return email


def _by_code(code: int, text: str, *, permanent: Outcome) -> Outcome:
    if 400 <= code < 500:
        return Outcome.THROTTLED if code == 452 or _THROTTLE_HINT.search(text) else Outcome.TRANSIENT_ERROR
    if 500 <= code < 600:
        return permanent
    return Outcome.TRANSIENT_ERROR


def classify(exc: BaseException) -> tuple[Outcome, str]:
    """Map an aiosmtplib (or socket) failure onto an outcome and a short reason."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        if 400 <= exc.code < 500:
            return Outcome.TRANSIENT_ERROR, f"authentication temporarily failed ({exc.code})"
        return Outcome.REJECTED, f"authentication failed ({exc.code})"
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refusals = exc.recipients
        code = refusals[0].code if refusals else 550
        text = refusals[0].message if refusals else ""
        return _by_code(code, text, permanent=Outcome.INVALID_RECIPIENT), f"recipient refused ({code} {text})"
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
        return _by_code(exc.code, exc.message, permanent=Outcome.INVALID_RECIPIENT), (
            f"recipient refused ({exc.code} {exc.message})"
        )
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return _by_code(exc.code, exc.message, permanent=Outcome.REJECTED), f"sender refused ({exc.code} {exc.message})"
    if isinstance(exc, aiosmtplib.SMTPDataError):
        return _by_code(
            exc.code, exc.message, permanent=Outcome.REJECTED
        ), f"message refused ({exc.code} {exc.message})"
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return Outcome.REJECTED, f"server does not support what we need: {exc}"
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPConnectError | aiosmtplib.SMTPTimeoutError):
        return Outcome.TRANSIENT_ERROR, f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _by_code(exc.code, exc.message, permanent=Outcome.REJECTED), f"SMTP {exc.code} {exc.message}"
    if isinstance(exc, aiosmtplib.SMTPException) and "authentication method" in str(exc):
        return Outcome.REJECTED, f"cannot authenticate: {exc}"  # the server offers no AUTH we can use
    if isinstance(exc, aiosmtplib.SMTPException):
        return Outcome.TRANSIENT_ERROR, f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ssl.SSLError):
        return Outcome.TRANSIENT_ERROR, f"TLS failure: {exc.reason or exc}"
    if isinstance(exc, OSError | TimeoutError):
        return Outcome.TRANSIENT_ERROR, f"{type(exc).__name__}: {exc}"
    return Outcome.TRANSIENT_ERROR, type(exc).__name__


class SmtpChannel:
    kind = "email"

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: Secret | None = None,
        security: Security = "starttls",
        sender: str,
        sender_name: str | None = None,
        timeout: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if security not in ("starttls", "tls", "none"):
            raise ValueError(f"security must be starttls, tls or none, not {security!r}")
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        self.host = host
        self.port = port
        self.security: Security = security
        self.sender = sender
        self.sender_name = sender_name
        self._username = username
        self._password = password
        self._timeout = timeout
        self._tls_context = tls_context
        self._smtp: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SmtpChannel({self.host}:{self.port}, security={self.security}, sender={self.sender})"

    def _client(self) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            username=self._username,
            password=self._password.reveal() if self._password is not None else None,
            use_tls=self.security == "tls",
            start_tls=True if self.security == "starttls" else False if self.security == "none" else None,
            tls_context=self._tls_context,
            timeout=self._timeout,
        )

    async def _connected(self) -> tuple[aiosmtplib.SMTP, bool]:
        """The open connection (and whether it was reused), connecting if there is none."""
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp, True
        await self._drop()
        smtp = self._client()
        await smtp.connect()  # connects, upgrades (STARTTLS) and logs in as configured
        self._smtp = smtp
        return smtp, False

    async def _drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None and smtp.is_connected:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()

    async def send(self, message: OutboundMessage) -> DeliveryResult:
        if (wrong := wrong_channel(self.kind, message)) is not None:
            return wrong
        email = build_email(message, sender=self.sender, sender_name=self.sender_name)
        async with self._lock:
            result = await self._send_locked(email, message)
        log_attempt(self.kind, "smtp", message, result)
        return result

    async def _send_locked(self, email: EmailMessage, message: OutboundMessage) -> DeliveryResult:
        for attempt in (1, 2):
            reused = False
            try:
                smtp, reused = await self._connected()
                errors, response = await smtp.send_message(email, sender=self.sender, recipients=[message.address])
            except aiosmtplib.SMTPServerDisconnected as exc:
                await self._drop()
                if reused and attempt == 1:
                    continue  # the server closed an idle connection: open a fresh one once
                return self._failed(exc)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                if not isinstance(exc, aiosmtplib.SMTPRecipientsRefused | aiosmtplib.SMTPDataError):
                    await self._drop()
                else:
                    await self._reset()
                return self._failed(exc)
            if errors:  # only when some of several recipients were refused; we send to one
                code, text = next(iter(errors.values()))
                return DeliveryResult(
                    outcome=_by_code(code, text, permanent=Outcome.INVALID_RECIPIENT),
                    detail=self._safe(f"recipient refused ({code} {text})"),
                )
            return DeliveryResult(
                outcome=Outcome.SENT,
                provider_message_id=str(email["Message-ID"]),
                detail=self._safe(response),
            )
        raise AssertionError("unreachable")

    async def _reset(self) -> None:
        if self._smtp is not None and self._smtp.is_connected:
            try:
                await self._smtp.rset()
            except (aiosmtplib.SMTPException, OSError):
                await self._drop()

    def _failed(self, exc: BaseException) -> DeliveryResult:
        outcome, reason = classify(exc)
        return DeliveryResult(outcome=outcome, detail=self._safe(reason))

    def _safe(self, text: str) -> str:
        return safe_detail(text, secrets=(self._password,))

    async def aclose(self) -> None:
        async with self._lock:
            await self._drop()
