"""The rules of sending, as pure decisions: when, again, instead, or not at all.

The sender works the outbox; for each row it asks :func:`next_step` twice: before sending
(``result=None``: send now, hold for quiet hours, or fold into the day's digest) and after
(``result`` from the channel: done, retry later, fall back, or give up). Time is passed in, never
read; the same inputs always give the same step.

- Quiet hours (default 22:00–08:00 Asia/Shanghai) hold non-urgent SMS until they end; e-mail
  is never held.
- A per-recipient daily SMS budget (default 10, below carriers' per-number limits): once a
  recipient's local day is used up, further SMS are folded into one digest for that recipient and
  day (:func:`digest`), sent when the next local day starts (quiet hours then apply to it).
- Transient failures (throttled, provider errors) retry with exponential backoff (base 30 s,
  factor 2, capped at 1 h) with a jitter derived from the message id, up to 8 attempts; a
  provider's Retry-After hint lengthens a wait (never beyond the cap).
- Permanent failures (invalid number, rejected), and retries exhausted, fall back: SMS → the same
  person's e-mail; then the person's backup (and the backup's backup) on the same channel; when
  nothing is left, give up with a reason.

Message identity is (action, recipient, channel) (:func:`message_id`): a fallback that lands on a
message already planned (the person's own e-mail, a backup who was addressed anyway) has its id,
so the outbox inserts nothing new. Reasons name people by id and never hold an address.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Annotated, get_args
from zoneinfo import ZoneInfo

import msgspec

from contracts.directory import Contact, Directory
from services.notifier.channels.base import ChannelKind, DeliveryResult, OutboundMessage, Outcome
from services.notifier.templates import digest_subject, digest_text, zh_date

Channel = ChannelKind
CHANNELS: tuple[Channel, ...] = get_args(ChannelKind)
DIGEST_TEMPLATE_KEY = "digest"  # sms_templates key of the digest's approved template
DIGEST_ACTION_PREFIX = "digest:"
MESSAGE_ID_HEX = 32  # fits Aliyun OutId (≤ 256) and Tencent SessionContext (≤ 512) with room


class NotifierSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the notifier sends. Defaults follow the issue; every one is configurable."""

    channels: tuple[Channel, ...] = ("sms", "email")
    # policy level id -> the provider's approved SMS template code ("digest" -> the digest's).
    sms_templates: dict[str, str] = msgspec.field(default_factory=dict)
    timezone: str = "Asia/Shanghai"
    quiet_start: dt.time = dt.time(22, 0)
    quiet_end: dt.time = dt.time(8, 0)
    quiet_channels: tuple[Channel, ...] = ("sms",)
    sms_daily_budget: Annotated[int, msgspec.Meta(ge=0)] = 10
    budget_channels: tuple[Channel, ...] = ("sms",)
    retry_base_seconds: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    retry_factor: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    retry_max_seconds: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    # Each delay is shortened by up to this fraction (deterministically, from the message id);
    # below 1 - 1/factor, delays still grow strictly until the cap.
    retry_jitter: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.25
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 8
    # A transient failure whose retry would fall later than this after queueing falls back instead.
    max_age_seconds: Annotated[float, msgspec.Meta(gt=0)] = 2 * 86400.0
    webhook_url: str | None = None  # the webhook channel's endpoint (one for every recipient)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class OutboxState(msgspec.Struct, frozen=True, kw_only=True):
    """What the sender knows of an outbox row when it asks what to do."""

    message: OutboundMessage
    action_id: str  # the action's id, or a digest's key (digest:<recipient>:<channel>:<day>)
    queued_at: dt.datetime
    attempts: int = 0  # send attempts made, counting the one whose result is being judged
    last_outcome: str | None = None  # the last Outcome's value ("sent", …), as the outbox stores it
    # Messages on budgeted channels (SMS) already sent to this recipient on now's local day.
    sent_today: int = 0
    # "<recipient_id>/<channel>" of the earlier links of this message's fallback chain.
    tried: tuple[str, ...] = ()

    @property
    def is_digest(self) -> bool:
        return self.action_id.startswith(DIGEST_ACTION_PREFIX)


# -- steps ---------------------------------------------------------------------------------------
class _Step(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    reason: str = ""


class SendNow(_Step, frozen=True, kw_only=True, tag="send_now"):
    pass


class HoldUntil(_Step, frozen=True, kw_only=True, tag="hold_until"):
    at: dt.datetime


class RetryAt(_Step, frozen=True, kw_only=True, tag="retry_at"):
    at: dt.datetime
    attempt: int  # the number of the attempt that will be made at ``at``


class Fallback(_Step, frozen=True, kw_only=True, tag="fallback"):
    """This message failed for good; queue ``message`` instead (its row carries ``tried``)."""

    message: OutboundMessage
    tried: tuple[str, ...]


class Digest(_Step, frozen=True, kw_only=True, tag="digest"):
    """Budget used up: fold this message into the recipient's digest for ``day``, sent at ``send_at``."""

    recipient_id: str
    channel: str
    day: dt.date
    send_at: dt.datetime
    key: str  # the digest's action key: digest:<recipient>:<channel>:<day>


class GiveUp(_Step, frozen=True, kw_only=True, tag="give_up"):
    pass


class Done(_Step, frozen=True, kw_only=True, tag="done"):
    pass


Step = SendNow | HoldUntil | RetryAt | Fallback | Digest | GiveUp | Done


# -- identity and addresses ----------------------------------------------------------------------
def _hex(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:MESSAGE_ID_HEX]


def message_id(action_id: str, recipient_id: str, channel: str) -> str:
    """The message's deterministic id: 32 hex of sha256(action, recipient, channel)."""
    return _hex("duban.message/v1", action_id, recipient_id, channel)


def address_for(person: Contact, channel: str, settings: NotifierSettings) -> str | None:
    """Where ``channel`` reaches ``person``, or None when it cannot.

    The file channel is the demo's stand-in for SMS: it needs no contact data and is addressed by
    the person's id, so demo output holds no number.
    """
    if channel == "sms":
        return person.mobile
    if channel == "email":
        return person.email
    if channel == "webhook":
        return settings.webhook_url
    if channel == "file":
        return person.id
    return None


# -- time ----------------------------------------------------------------------------------------
def _aware(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must carry its offset")
    return now


def local_day(now: dt.datetime, settings: NotifierSettings) -> dt.date:
    return _aware(now).astimezone(settings.zone).date()


def day_bounds(day: dt.date, settings: NotifierSettings) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of a local day: what the daily budget counts."""
    zone = settings.zone
    return (
        dt.datetime.combine(day, dt.time(0), tzinfo=zone),
        dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tzinfo=zone),
    )


def in_quiet_hours(now: dt.datetime, settings: NotifierSettings) -> bool:
    start, end = settings.quiet_start, settings.quiet_end
    t = _aware(now).astimezone(settings.zone).time()
    if start == end:
        return False
    if start < end:
        return start <= t < end
    return t >= start or t < end  # across midnight: [22:00, 24:00) ∪ [00:00, 08:00)


def quiet_hours_end(now: dt.datetime, settings: NotifierSettings) -> dt.datetime:
    """The first end of quiet hours after ``now`` (local time, aware)."""
    local = _aware(now).astimezone(settings.zone)
    end = dt.datetime.combine(local.date(), settings.quiet_end, tzinfo=settings.zone)
    if end <= local:
        end = dt.datetime.combine(local.date() + dt.timedelta(days=1), settings.quiet_end, tzinfo=settings.zone)
    return end


def backoff(message_id: str, attempt: int, settings: NotifierSettings) -> dt.timedelta:
    """The wait after failed attempt ``attempt`` (1-based): base·factor^(attempt-1), capped, jittered.

    The jitter shortens the delay by a fraction in [0, retry_jitter) drawn from the message id
    and attempt: senders do not retry in lockstep, and the same row always waits the same.
    """
    raw = min(settings.retry_max_seconds, settings.retry_base_seconds * settings.retry_factor ** (attempt - 1))
    draw = int(_hex("duban.backoff/v1", message_id, str(attempt))[:13], 16) / 16**13
    return dt.timedelta(seconds=raw * (1.0 - settings.retry_jitter * draw))


def budget_used(sent_today: int, settings: NotifierSettings) -> bool:
    """Whether a recipient who was sent ``sent_today`` budgeted messages today may get no more."""
    return sent_today >= settings.sms_daily_budget


# -- the decision --------------------------------------------------------------------------------
def next_step(
    state: OutboxState,
    result: DeliveryResult | None,
    now: dt.datetime,
    settings: NotifierSettings,
    directory: Directory,
) -> Step:
    """What to do with an outbox row now: before sending (``result`` None) or after an attempt."""
    _aware(now)
    message = state.message
    if result is None:
        return _before_sending(state, now, settings)
    outcome = result.outcome.value
    if result.outcome is Outcome.SENT:
        return Done(reason=f"sent on attempt {max(state.attempts, 1)}")
    attempts = max(state.attempts, 1)
    if result.retryable:
        if attempts < settings.max_attempts:
            delay = backoff(message.message_id, attempts, settings)
            if result.retry_after_s is not None:  # the provider's hint, if longer (and within the cap)
                hint = dt.timedelta(seconds=min(max(result.retry_after_s, 0.0), settings.retry_max_seconds))
                delay = max(delay, hint)
            at = now + delay
            if at - state.queued_at <= dt.timedelta(seconds=settings.max_age_seconds):
                return RetryAt(
                    at=at,
                    attempt=attempts + 1,
                    reason=f"{outcome} on attempt {attempts} of {settings.max_attempts}",
                )
            why = f"{outcome}, and a retry would exceed the maximum age"
        else:
            why = f"{outcome} on attempt {attempts}, the last of {settings.max_attempts}"
    else:
        why = f"{outcome} (permanent)"
    return _fall_back(state, why, settings, directory)


def _before_sending(state: OutboxState, now: dt.datetime, settings: NotifierSettings) -> Step:
    message = state.message
    if state.last_outcome == Outcome.SENT:
        return Done(reason="already sent")
    if message.channel in settings.quiet_channels and not message.urgent and in_quiet_hours(now, settings):
        return HoldUntil(
            at=quiet_hours_end(now, settings),
            reason=f"quiet hours {settings.quiet_start:%H:%M}–{settings.quiet_end:%H:%M} {settings.timezone}",
        )
    if message.channel in settings.budget_channels and not state.is_digest and budget_used(state.sent_today, settings):
        day = local_day(now, settings)
        return Digest(
            recipient_id=message.recipient_id,
            channel=message.channel,
            day=day,
            send_at=day_bounds(day, settings)[1],
            key=digest_key(message.recipient_id, message.channel, day),
            reason=f"daily {message.channel} budget of {settings.sms_daily_budget} used for {day.isoformat()}",
        )
    return SendNow()


def _key(recipient_id: str, channel: str) -> str:
    return f"{recipient_id}/{channel}"


def _fall_back(state: OutboxState, why: str, settings: NotifierSettings, directory: Directory) -> Step:
    message = state.message
    tried = (*state.tried, _key(message.recipient_id, message.channel))
    person = directory.person(message.recipient_id)
    if person is None:
        return GiveUp(reason=f"{why}; {message.recipient_id} is not in the directory")
    missing: list[str] = []
    # 1. SMS → the same person's e-mail.
    if message.channel == "sms":
        found = _candidate(state, person, "email", tried, settings, missing)
        if found is not None:
            return _fallback_step(state, found, person, person, tried, why, settings)
    # 2. The backup chain, on the same channel (an SMS also tries the backup's e-mail).
    channels: list[Channel] = [message.channel, "email"] if message.channel == "sms" else [message.channel]
    seen = {person.id}
    current = person
    while True:
        if current.backup is None:
            missing.append(f"{current.id} has no backup")
            break
        backup = directory.person(current.backup)
        if backup is None:
            missing.append(f"backup {current.backup} of {current.id} is not in the directory")
            break
        if backup.id in seen:
            missing.append(f"the backup chain returns to {backup.id}")
            break
        seen.add(backup.id)
        for channel in channels:
            found = _candidate(state, backup, channel, tried, settings, missing)
            if found is not None:
                return _fallback_step(state, found, person, backup, tried, why, settings)
        current = backup
    return GiveUp(reason=f"{why}; no fallback: " + "; ".join(missing))


def _candidate(
    state: OutboxState,
    person: Contact,
    channel: Channel,
    tried: tuple[str, ...],
    settings: NotifierSettings,
    missing: list[str],
) -> Channel | None:
    """The channel if ``person`` can be tried on it; otherwise note why not."""
    if _key(person.id, channel) in tried:
        missing.append(f"{person.id}/{channel} already tried")
        return None
    if channel not in settings.channels:
        missing.append(f"{channel} is not enabled")
        return None
    if address_for(person, channel, settings) is None:
        missing.append(f"{person.id} has no {channel} address")
        return None
    if channel == "sms" and state.message.sms_template_code is None:
        missing.append(f"no SMS template to reach {person.id}")
        return None
    return channel


def _fallback_step(
    state: OutboxState,
    channel: Channel,
    original: Contact,
    target: Contact,
    tried: tuple[str, ...],
    why: str,
    settings: NotifierSettings,
) -> Fallback:
    source = state.message
    body = source.body
    if target.id != original.id:
        if channel == "email":
            body = f"{target.name}：\n（以下通知原发给{original.name}，因未能送达，转请您处理。）\n\n{source.body}"
    elif channel != source.channel:
        body = f"{source.body}\n\n（{source.channel}未能送达，改以{channel}发送。）"
    address = address_for(target, channel, settings)
    assert address is not None  # _candidate checked it
    new = OutboundMessage(
        message_id=message_id(state.action_id, target.id, channel),
        channel=channel,
        recipient_id=target.id,
        address=address,
        subject=source.subject,
        body=body,
        sms_template_code=source.sms_template_code if channel == "sms" else None,
        sms_template_params=dict(source.sms_template_params) if channel == "sms" else {},
        urgent=source.urgent,
    )
    return Fallback(message=new, tried=tried, reason=f"{why}; falling back to {target.id}/{channel}")


# -- digests -------------------------------------------------------------------------------------
def digest_key(recipient_id: str, channel: str, day: dt.date) -> str:
    return f"{DIGEST_ACTION_PREFIX}{recipient_id}:{channel}:{day.isoformat()}"


def digest(
    messages: list[OutboundMessage],
    recipient: str,
    day: dt.date,
    settings: NotifierSettings | None = None,
) -> OutboundMessage:
    """One message summarising the messages folded for ``recipient`` on ``day``.

    Its id depends on the recipient, the day and the folded ids (not their order): rebuilding
    the same digest after a crash gives the same message. Urgent if any folded message was.
    """
    if not messages:
        raise ValueError("a digest needs at least one message")
    if any(m.recipient_id != recipient for m in messages):
        raise ValueError(f"a digest is for one recipient: {recipient}")
    channels = {m.channel for m in messages}
    if len(channels) != 1:
        raise ValueError("a digest is for one channel")
    channel = messages[0].channel
    ordered = sorted(messages, key=lambda m: (m.subject, m.message_id))
    ids = sorted(m.message_id for m in messages)
    subjects = [m.subject or m.body.splitlines()[0] for m in ordered]
    template = (settings or NotifierSettings()).sms_templates.get(DIGEST_TEMPLATE_KEY) if channel == "sms" else None
    return OutboundMessage(
        message_id=_hex("duban.digest/v1", recipient, channel, day.isoformat(), *ids),
        channel=channel,
        recipient_id=recipient,
        address=messages[0].address,
        subject=digest_subject(len(messages), day),
        body=digest_text(subjects, day),
        sms_template_code=template,
        sms_template_params={"day": zh_date(day), "count": str(len(messages))} if channel == "sms" else {},
        urgent=any(m.urgent for m in messages),
    )
