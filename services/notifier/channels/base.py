"""What every delivery channel shares: the message, the result, the protocol, masking, secrets.

A channel knows one protocol (SMTP, an SMS provider's API, a webhook, a file) and nothing of the
outbox, the policy or the directory: it is handed an :class:`OutboundMessage`, makes one attempt
and answers with a :class:`DeliveryResult` that says whether trying again can help.

Nothing a channel returns or logs carries a full phone number or a credential: ``detail`` goes
through :func:`safe_detail`, addresses through :func:`mask_address`, and credentials live in
:class:`Secret`, which never shows its value in ``repr``/``str``.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Literal, Protocol, runtime_checkable

import msgspec
import structlog

from services.common.logging import mask_phone_numbers

ChannelKind = Literal["sms", "email", "webhook", "file"]

# Our deterministic id: printable ASCII without spaces, at most 64 characters, so it fits every
# provider's correlation field (Aliyun OutId, Tencent SessionContext, Message-ID, Idempotency-Key).
MessageId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")]


class OutboundMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One message to one person on one channel, as planned and written to the outbox."""

    message_id: MessageId
    channel: ChannelKind
    recipient_id: str  # person id from the directory, never a name
    address: str  # E.164 mobile (+8613800000003) or e-mail address
    subject: str
    body: str  # the full text (e-mail body; SMS fallback text for the file channel)
    sms_template_code: str | None = None
    sms_template_params: dict[str, str] = msgspec.field(default_factory=dict)
    urgent: bool = False


class Outcome(enum.StrEnum):
    SENT = "sent"
    THROTTLED = "throttled"  # transient: the provider asks us to slow down; retry later
    INVALID_RECIPIENT = "invalid_recipient"  # permanent: the number or mailbox does not exist
    REJECTED = "rejected"  # permanent: bad template, signature, credentials or request
    TRANSIENT_ERROR = "transient_error"  # network, timeout, 5xx: retry later


RETRYABLE_OUTCOMES = frozenset({Outcome.THROTTLED, Outcome.TRANSIENT_ERROR})


class DeliveryResult(msgspec.Struct, frozen=True, kw_only=True):
    outcome: Outcome
    provider_message_id: str | None = None
    detail: str = ""  # masked: never a full phone number or a credential
    retry_after_s: float | None = None  # a provider's hint (HTTP Retry-After), when it gave one

    @property
    def retryable(self) -> bool:
        return self.outcome in RETRYABLE_OUTCOMES

    @property
    def sent(self) -> bool:
        return self.outcome is Outcome.SENT


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    """A provider's delivery report for one of our messages (found by our id in its
    correlation field)."""

    message_id: str
    delivered: bool
    detail: str = ""  # masked, like DeliveryResult.detail
    provider_message_id: str | None = None


@runtime_checkable
class Channel(Protocol):
    """One delivery protocol. ``send`` makes one attempt and never raises for delivery failures."""

    kind: str

    async def send(self, message: OutboundMessage) -> DeliveryResult: ...

    async def aclose(self) -> None: ...


# --- masking -------------------------------------------------------------------------------------

_E164_CN = re.compile(r"^\+?86(1[3-9]\d{9})$")
_DETAIL_LIMIT = 500


def mainland_number(address: str) -> str:
    """``+8613812341234`` → ``13812341234`` (the form Aliyun wants); raises on anything else."""
    match = _E164_CN.match(address.strip())
    if match is None:
        if re.fullmatch(r"1[3-9]\d{9}", address.strip()):
            return address.strip()
        raise ValueError("not a mainland China mobile number")
    return match.group(1)


def mask_phone(address: str) -> str:
    """``+8613812341234`` → ``138****1234``; other text has any phone numbers in it masked."""
    try:
        number = mainland_number(address)
    except ValueError:
        return mask_phone_numbers(address)
    return f"{number[:3]}****{number[-4:]}"


def mask_email(address: str) -> str:
    local, at, domain = address.partition("@")
    if not at:
        return mask_phone_numbers(address)
    return f"{local[:1]}***@{domain}"


def mask_address(address: str) -> str:
    return mask_email(address) if "@" in address else mask_phone(address)


def safe_detail(text: str, *, secrets: Iterable[Secret | str | None] = (), limit: int = _DETAIL_LIMIT) -> str:
    """A provider's message made fit for ``detail`` and logs: secrets removed, phones masked, cut."""
    for secret in secrets:
        value = secret.reveal() if isinstance(secret, Secret) else secret
        if value and len(value) >= 4:
            text = text.replace(value, "[redacted]")
    text = mask_phone_numbers(text)
    # Numbers in other spellings (+86 138 1234 1234, 138-1234-1234) are masked too.
    text = re.sub(r"(?<!\d)(1[3-9]\d)[ -]?(\d{4})[ -]?(\d{4})(?!\d)", r"\1****\3", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- secrets -------------------------------------------------------------------------------------


class SecretNotFound(LookupError):
    pass


class Secret:
    """A credential. Its value is only available through :meth:`reveal`; it never prints itself."""

    __slots__ = ("_source", "_value")

    def __init__(self, value: str, *, source: str = "literal") -> None:
        if not value:
            raise ValueError(f"empty secret from {source}")
        self._value = value
        self._source = source

    def reveal(self) -> str:
        return self._value

    @property
    def source(self) -> str:
        """Where it came from (``env:NAME`` or ``file:/path``), safe to log."""
        return self._source

    def __repr__(self) -> str:
        return f"Secret(<{self._source}>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("secrets are not pickled")

    @classmethod
    def from_file(cls, path: str | Path) -> Secret:
        path = Path(path)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SecretNotFound(f"secret file {path} cannot be read: {exc.strerror}") from None
        return cls(value, source=f"file:{path}")

    @classmethod
    def from_env(cls, name: str, *, environ: Mapping[str, str] | None = None) -> Secret:
        """The value of ``NAME``, or the content of the file named by ``NAME_FILE``."""
        env = os.environ if environ is None else environ
        value = env.get(name)
        if value:
            return cls(value.strip(), source=f"env:{name}")
        path = env.get(f"{name}_FILE")
        if path:
            return cls.from_file(path)
        raise SecretNotFound(f"neither {name} nor {name}_FILE is set")

    @classmethod
    def load(cls, ref: str, *, environ: Mapping[str, str] | None = None) -> Secret:
        """A reference as configuration gives it: ``env:NAME``, ``file:/path``, or a bare NAME."""
        kind, sep, rest = ref.partition(":")
        if sep and kind == "file":
            return cls.from_file(rest)
        if sep and kind == "env":
            return cls.from_env(rest, environ=environ)
        return cls.from_env(ref, environ=environ)


def wrong_channel(kind: str, message: OutboundMessage) -> DeliveryResult | None:
    if message.channel != kind:
        return DeliveryResult(
            outcome=Outcome.REJECTED, detail=f"a {message.channel} message was given to the {kind} channel"
        )
    return None


def log_attempt(channel: str, provider: str, message: OutboundMessage, result: DeliveryResult) -> None:
    """One log line per delivery attempt, the same for every channel; the address masked."""
    structlog.get_logger("services.notifier.channels").info(
        "notifier.channel.attempt",
        channel=channel,
        provider=provider,
        message_id=message.message_id,
        to=mask_address(message.address),
        outcome=result.outcome.value,
        detail=result.detail,
    )


def provider_result(outcome: Outcome, detail: str, provider_message_id: object = None) -> DeliveryResult:
    """A provider's answer as a result: its message id is kept only when the message was sent."""
    if outcome is Outcome.SENT and provider_message_id:
        return DeliveryResult(outcome=outcome, provider_message_id=str(provider_message_id), detail=detail)
    return DeliveryResult(outcome=outcome, detail=detail)
