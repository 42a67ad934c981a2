"""Delivery decisions: quiet hours, the daily SMS budget and its digest, retries, fallbacks."""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

import msgspec
import pytest

from contracts.directory import Directory, example_directory_path, load_directory
from contracts.events import ActionIssued
from contracts.policy import Policy, load_default_policy
from contracts.programme import load_default_programme
from services.notifier.channels.base import DeliveryResult, OutboundMessage, Outcome
from services.notifier.delivery import (
    Digest,
    Done,
    Fallback,
    GiveUp,
    HoldUntil,
    NotifierSettings,
    OutboxState,
    RetryAt,
    SendNow,
    Step,
    backoff,
    budget_used,
    day_bounds,
    digest,
    digest_key,
    message_id,
    next_step,
)
from services.notifier.planning import plan

SH = ZoneInfo("Asia/Shanghai")
PHONE = re.compile(r"1[3-9]\d{9}")
PROGRAMME_ID = "puyang-2017-13"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_default_policy()


@pytest.fixture(scope="module")
def directory() -> Directory:
    return load_directory(example_directory_path(), load_default_programme())


@pytest.fixture(scope="module")
def settings(policy: Policy) -> NotifierSettings:
    templates = {level.id: f"SMS_{i:03d}" for i, level in enumerate(policy.levels)}
    return NotifierSettings(sms_templates={**templates, "digest": "SMS_900"})


def step(
    state: OutboxState,
    result: DeliveryResult | None,
    now: dt.datetime,
    settings: NotifierSettings,
    directory: Directory,
) -> Step:
    decided = next_step(state, result, now, settings, directory)
    assert not PHONE.search(decided.reason), decided.reason
    return decided


def at(y: int, mo: int, d: int, h: int = 12, mi: int = 0, s: int = 0) -> dt.datetime:
    return dt.datetime(y, mo, d, h, mi, s, tzinfo=SH)


def action(policy: Policy, county: str, level_id: str, milestone: str = "1.2") -> ActionIssued:
    level = policy.level(level_id)
    assert level is not None
    return ActionIssued(
        action_id=f"{PROGRAMME_ID}:{county}:{level_id}:{milestone}:2017-05-02",
        level_id=level_id,
        level_name=level.name,
        policy_version=policy.version,
        due_on=dt.date(2017, 5, 3),
        addressed=tuple(r.value for r in level.addressed),
        explanation_zh=f"里程碑{milestone}截止2017年5月2日，尚未完成。",
        milestone_id=milestone,
        deadline=dt.date(2017, 5, 2),
        workdays=1,
        urgent=level.urgent,
    )


def planned(
    policy: Policy,
    directory: Directory,
    settings: NotifierSettings,
    recipient: str,
    channel: str,
    *,
    county: str = "410923",
    level: str = "reminder",
    milestone: str = "1.2",
) -> tuple[ActionIssued, OutboundMessage]:
    act = action(policy, county, level, milestone)
    messages = plan(act, PROGRAMME_ID, county, "南乐县", directory, settings)
    return act, next(m for m in messages if m.recipient_id == recipient and m.channel == channel)


def state_of(
    act: ActionIssued,
    message: OutboundMessage,
    *,
    attempts: int = 0,
    sent_today: int = 0,
    last_outcome: str | None = None,
    tried: tuple[str, ...] = (),
) -> OutboxState:
    return OutboxState(
        message=message,
        action_id=act.action_id,
        queued_at=at(2017, 5, 3, 9),
        attempts=attempts,
        sent_today=sent_today,
        last_outcome=last_outcome,
        tried=tried,
    )


def result(outcome: Outcome, detail: str = "") -> DeliveryResult:
    return DeliveryResult(outcome=outcome, detail=detail)


# -- quiet hours ---------------------------------------------------------------------------------
def test_a_non_urgent_sms_at_2330_is_held_until_0800_next_day(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    act, sms = planned(policy, directory, settings, "410923-liu-bing", "sms")
    assert not sms.urgent
    decided = step(state_of(act, sms), None, at(2017, 5, 3, 23, 30), settings, directory)
    assert isinstance(decided, HoldUntil)
    assert decided.at == at(2017, 5, 4, 8, 0)
    # The same instant given in UTC decides the same.
    utc = at(2017, 5, 3, 23, 30).astimezone(dt.UTC)
    assert step(state_of(act, sms), None, utc, settings, directory) == decided


def test_an_urgent_sms_and_any_email_are_sent_in_quiet_hours(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    act, urgent = planned(policy, directory, settings, "410923-liu-bing", "sms", level="overdue_notice")
    assert urgent.urgent
    assert isinstance(step(state_of(act, urgent), None, at(2017, 5, 3, 23, 30), settings, directory), SendNow)
    act, mail = planned(policy, directory, settings, "410923-liu-bing", "email")
    assert isinstance(step(state_of(act, mail), None, at(2017, 5, 3, 23, 30), settings, directory), SendNow)
    assert isinstance(step(state_of(act, mail), None, at(2017, 5, 4, 3, 0), settings, directory), SendNow)


@pytest.mark.parametrize(
    ("now", "held_until"),
    [
        (at(2017, 5, 3, 21, 59, 59), None),
        (at(2017, 5, 3, 22, 0, 0), at(2017, 5, 4, 8)),
        (at(2017, 5, 4, 0, 0, 0), at(2017, 5, 4, 8)),
        (at(2017, 5, 4, 7, 59, 59), at(2017, 5, 4, 8)),
        (at(2017, 5, 4, 8, 0, 0), None),
        (at(2017, 12, 31, 22, 0, 0), at(2018, 1, 1, 8)),
    ],
)
def test_quiet_hours_boundaries_are_exact(
    policy: Policy,
    directory: Directory,
    settings: NotifierSettings,
    now: dt.datetime,
    held_until: dt.datetime | None,
) -> None:
    act, sms = planned(policy, directory, settings, "410923-liu-bing", "sms")
    decided = step(state_of(act, sms), None, now, settings, directory)
    if held_until is None:
        assert isinstance(decided, SendNow)
    else:
        assert isinstance(decided, HoldUntil) and decided.at == held_until


def test_quiet_hours_are_configurable_and_now_must_be_aware(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    act, sms = planned(policy, directory, settings, "410923-liu-bing", "sms")
    none = msgspec.structs.replace(settings, quiet_start=dt.time(0), quiet_end=dt.time(0))
    assert isinstance(step(state_of(act, sms), None, at(2017, 5, 3, 23, 30), none, directory), SendNow)
    day = msgspec.structs.replace(settings, quiet_start=dt.time(12), quiet_end=dt.time(14))
    held = step(state_of(act, sms), None, at(2017, 5, 3, 13), day, directory)
    assert isinstance(held, HoldUntil) and held.at == at(2017, 5, 3, 14)
    with pytest.raises(ValueError, match="offset"):
        next_step(state_of(act, sms), None, dt.datetime(2017, 5, 3, 12), settings, directory)


# -- budget and digest ---------------------------------------------------------------------------
def test_budget_used() -> None:
    settings = NotifierSettings()
    assert settings.sms_daily_budget == 10
    assert not budget_used(9, settings)
    assert budget_used(10, settings)
    assert budget_used(0, NotifierSettings(sms_daily_budget=0))


def _sms_for(policy: Policy, directory: Directory, settings: NotifierSettings, n: int) -> list[OutboxState]:
    """n distinct non-urgent SMS to 刘冰 (different milestones and levels)."""
    states = []
    milestones = ["1.1", "1.2", "1.3", "2.1", "2.2", "2.3", "3.1", "3.2", "3.3"]
    for i in range(n):
        level = ("reminder", "urgent_reminder")[i // len(milestones)]
        act, sms = planned(
            policy, directory, settings, "410923-liu-bing", "sms", level=level, milestone=milestones[i % 9]
        )
        states.append(state_of(act, sms))
    return states


def test_the_eleventh_sms_of_a_local_day_goes_to_the_digest_and_the_next_day_resets(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    states = _sms_for(policy, directory, settings, 13)
    sent: dict[tuple[str, dt.date], int] = {}
    folded: dict[str, list[OutboundMessage]] = {}
    now = at(2017, 5, 3, 9)
    for state in states[:12]:
        day = now.astimezone(SH).date()
        count = sent.get((state.message.recipient_id, day), 0)
        decided = step(msgspec.structs.replace(state, sent_today=count), None, now, settings, directory)
        if isinstance(decided, SendNow):
            sent[(state.message.recipient_id, day)] = count + 1
        else:
            assert isinstance(decided, Digest)
            assert decided.day == day and decided.recipient_id == "410923-liu-bing"
            assert decided.send_at == at(2017, 5, 4, 0, 0)
            assert decided.key == digest_key("410923-liu-bing", "sms", day)
            folded.setdefault(decided.key, []).append(state.message)
        now += dt.timedelta(minutes=5)
    assert sent == {("410923-liu-bing", dt.date(2017, 5, 3)): 10}
    (key,) = folded
    assert len(folded[key]) == 2  # the 11th and 12th: kept, not dropped

    # The next local day (00:00 Shanghai = 16:00 UTC the day before) starts a new budget.
    next_day = at(2017, 5, 4, 0, 0).astimezone(dt.UTC)
    assert dt.datetime(2017, 5, 3, 16, 0, tzinfo=dt.UTC) == next_day
    fresh = step(states[12], None, at(2017, 5, 4, 9), settings, directory)
    assert isinstance(fresh, SendNow)

    # The digest: one message listing the held ones, deterministic, sent once quiet hours end.
    held = folded[key]
    summary = digest(held, "410923-liu-bing", dt.date(2017, 5, 3), settings)
    assert summary == digest(list(reversed(held)), "410923-liu-bing", dt.date(2017, 5, 3), settings)
    assert summary.recipient_id == "410923-liu-bing" and summary.channel == "sms"
    assert summary.address == held[0].address
    assert summary.sms_template_code == "SMS_900"
    assert summary.sms_template_params == {"day": "2017年5月3日", "count": "2"}
    for m in held:
        assert m.subject.removeprefix("【督办】") in summary.body
    assert summary.message_id not in {m.message_id for m in held}
    assert summary.message_id != digest(held[:1], "410923-liu-bing", dt.date(2017, 5, 3), settings).message_id
    digest_state = OutboxState(message=summary, action_id=key, queued_at=next_day, sent_today=10)
    assert digest_state.is_digest
    morning = step(digest_state, None, next_day, settings, directory)
    assert isinstance(morning, HoldUntil) and morning.at == at(2017, 5, 4, 8)
    # A digest is not folded again even when the new day's budget is also used up.
    assert isinstance(step(digest_state, None, at(2017, 5, 4, 8), settings, directory), SendNow)


def test_budget_counts_sms_only_and_the_local_day(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    act, mail = planned(policy, directory, settings, "410923-liu-bing", "email")
    assert isinstance(step(state_of(act, mail, sent_today=50), None, at(2017, 5, 3, 9), settings, directory), SendNow)
    act, sms = planned(policy, directory, settings, "410923-liu-bing", "sms", level="overdue_notice")
    # 23:59:59 Shanghai is still 5月3日; an urgent SMS is folded into that day's digest.
    late = step(state_of(act, sms, sent_today=10), None, at(2017, 5, 3, 23, 59, 59), settings, directory)
    assert isinstance(late, Digest) and late.day == dt.date(2017, 5, 3)
    assert day_bounds(dt.date(2017, 5, 3), settings) == (at(2017, 5, 3, 0), at(2017, 5, 4, 0))


def test_digest_rejects_mixed_messages(policy: Policy, directory: Directory, settings: NotifierSettings) -> None:
    _, a = planned(policy, directory, settings, "410923-liu-bing", "sms")
    _, b = planned(policy, directory, settings, "410923-liu-bing", "email")
    with pytest.raises(ValueError, match="one channel"):
        digest([a, b], "410923-liu-bing", dt.date(2017, 5, 3))
    with pytest.raises(ValueError, match="one recipient"):
        digest([a], "410922-liu-bing", dt.date(2017, 5, 3))
    with pytest.raises(ValueError, match="at least one"):
        digest([], "410923-liu-bing", dt.date(2017, 5, 3))
    _, urgent = planned(policy, directory, settings, "410923-liu-bing", "sms", level="overdue_notice")
    assert digest([a, urgent], "410923-liu-bing", dt.date(2017, 5, 3)).urgent


# -- retries -------------------------------------------------------------------------------------
def test_transient_failures_back_off_growing_capped_then_fall_back(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    act, sms = planned(policy, directory, settings, "410923-liu-bing", "sms")
    now = at(2017, 5, 3, 9)
    delays = []
    for attempt in range(1, 8):
        outcome = Outcome.THROTTLED if attempt % 2 else Outcome.TRANSIENT_ERROR
        decided = step(state_of(act, sms, attempts=attempt), result(outcome), now, settings, directory)
        assert isinstance(decided, RetryAt), decided
        assert decided.attempt == attempt + 1
        delays.append((decided.at - now).total_seconds())
    assert delays == sorted(delays) and len(set(delays)) == len(delays)  # they grow
    assert 0.75 * 30 <= delays[0] <= 30
    assert all(d <= 3600 for d in delays)
    assert delays[-1] >= 0.75 * 1920  # 30·2⁶
    # Deterministic: the same row waits the same; another message is jittered differently.
    assert backoff(sms.message_id, 3, settings) == backoff(sms.message_id, 3, settings)
    assert backoff(sms.message_id, 3, settings) != backoff(message_id("x", "y", "sms"), 3, settings)
    long = [backoff(sms.message_id, n, settings).total_seconds() for n in range(1, 30)]
    assert max(long) <= 3600 and min(long[8:]) >= 0.75 * 3600  # capped at an hour

    # The 8th attempt failing too: fall back to the same person's e-mail.
    last = step(state_of(act, sms, attempts=8), result(Outcome.TRANSIENT_ERROR), now, settings, directory)
    assert isinstance(last, Fallback)
    assert (last.message.recipient_id, last.message.channel) == ("410923-liu-bing", "email")
    assert "attempt 8" in last.reason


def test_retry_then_success(policy: Policy, directory: Directory, settings: NotifierSettings) -> None:
    act, mail = planned(policy, directory, settings, "410923-liu-bing", "email")
    now = at(2017, 5, 3, 9)
    first = step(state_of(act, mail, attempts=1), result(Outcome.TRANSIENT_ERROR), now, settings, directory)
    assert isinstance(first, RetryAt)
    again = step(state_of(act, mail, attempts=1), None, first.at, settings, directory)
    assert isinstance(again, SendNow)
    done = step(state_of(act, mail, attempts=2), result(Outcome.SENT), first.at, settings, directory)
    assert isinstance(done, Done) and "attempt 2" in done.reason
    # A row already sent (a crash before it was marked) is not sent again by this rule.
    assert isinstance(step(state_of(act, mail, last_outcome="sent"), None, now, settings, directory), Done)


def test_a_providers_retry_after_lengthens_the_wait_within_the_cap(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    act, sms = planned(policy, directory, settings, "410923-liu-bing", "sms")
    now = at(2017, 5, 3, 9)
    for hint, expected in ((600.0, 600.0), (86400.0, 3600.0)):
        throttled = DeliveryResult(outcome=Outcome.THROTTLED, retry_after_s=hint)
        decided = step(state_of(act, sms, attempts=1), throttled, now, settings, directory)
        assert isinstance(decided, RetryAt) and (decided.at - now).total_seconds() == expected
    short = DeliveryResult(outcome=Outcome.THROTTLED, retry_after_s=1.0)
    decided = step(state_of(act, sms, attempts=1), short, now, settings, directory)
    assert isinstance(decided, RetryAt) and decided.at - now == backoff(sms.message_id, 1, settings)


def test_a_retry_past_the_maximum_age_falls_back(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    act, sms = planned(policy, directory, settings, "410923-liu-bing", "sms")
    stale = step(state_of(act, sms, attempts=2), result(Outcome.THROTTLED), at(2017, 5, 5, 9), settings, directory)
    assert isinstance(stale, Fallback) and "maximum age" in stale.reason


# -- permanent failures and fallbacks ------------------------------------------------------------
def test_invalid_recipient_on_sms_falls_back_to_the_same_persons_email(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    act, sms = planned(policy, directory, settings, "410923-liu-bing", "sms")
    _, mail = planned(policy, directory, settings, "410923-liu-bing", "email")
    decided = step(
        state_of(act, sms, attempts=1),
        result(Outcome.INVALID_RECIPIENT, "number 13800000005 does not exist"),
        at(2017, 5, 3, 9),
        settings,
        directory,
    )
    assert isinstance(decided, Fallback)
    assert decided.message.address == "liu-bing.410923@example.org"
    # The planned e-mail has the same identity: the outbox adds nothing, the person is told once.
    assert decided.message.message_id == mail.message_id
    assert decided.tried == ("410923-liu-bing/sms",)
    assert "invalid_recipient" in decided.reason


def test_rejected_email_falls_back_to_the_backup_person(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    act, mail = planned(policy, directory, settings, "410923-liu-bing", "email")
    decided = step(
        state_of(act, mail, attempts=1, tried=("410923-liu-bing/sms",)),
        result(Outcome.REJECTED),
        at(2017, 5, 3, 9),
        settings,
        directory,
    )
    assert isinstance(decided, Fallback)
    backup = decided.message
    assert (backup.recipient_id, backup.channel, backup.address) == (
        "410923-office",
        "email",
        "office.410923@example.org",
    )
    assert backup.message_id == message_id(act.action_id, "410923-office", "email")
    assert backup.body.startswith("南乐县数字城管建设办公室：") and "原发给刘冰" in backup.body
    assert backup.subject == mail.subject
    assert decided.tried == ("410923-liu-bing/sms", "410923-liu-bing/email")

    # The backup has no backup: when it fails too, give up and say why.
    final = step(
        OutboxState(
            message=backup, action_id=act.action_id, queued_at=at(2017, 5, 3, 9), attempts=1, tried=decided.tried
        ),
        result(Outcome.REJECTED),
        at(2017, 5, 3, 9, 5),
        settings,
        directory,
    )
    assert isinstance(final, GiveUp)
    assert "410923-office has no backup" in final.reason and "rejected" in final.reason


def test_sms_without_an_email_falls_back_to_the_backups_sms(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    no_email = msgspec.structs.replace(
        directory,
        people=tuple(
            msgspec.structs.replace(p, email=None) if p.id == "410923-liu-bing" else p for p in directory.people
        ),
    )
    act, sms = planned(policy, no_email, settings, "410923-liu-bing", "sms")
    decided = step(
        state_of(act, sms, attempts=1), result(Outcome.INVALID_RECIPIENT), at(2017, 5, 3, 9), settings, no_email
    )
    assert isinstance(decided, Fallback)
    assert (decided.message.recipient_id, decided.message.channel) == ("410923-office", "sms")
    assert decided.message.address == "+8613800000006"
    assert decided.message.sms_template_code == sms.sms_template_code
    assert decided.message.sms_template_params == sms.sms_template_params


def test_no_backup_gives_up_with_a_reason(policy: Policy, directory: Directory, settings: NotifierSettings) -> None:
    act, mail = planned(policy, directory, settings, "city-supervision-bureau", "email", level="overdue_notice")
    decided = step(state_of(act, mail, attempts=1), result(Outcome.REJECTED), at(2017, 5, 3, 9), settings, directory)
    assert isinstance(decided, GiveUp)
    assert decided.reason == "rejected (permanent); no fallback: city-supervision-bureau has no backup"


def test_a_backup_loop_ends(policy: Policy, directory: Directory, settings: NotifierSettings) -> None:
    looped = msgspec.structs.replace(
        directory,
        people=tuple(
            msgspec.structs.replace(p, backup="410923-liu-bing") if p.id == "410923-office" else p
            for p in directory.people
        ),
    )
    email_only = msgspec.structs.replace(settings, channels=("email",))
    act, mail = planned(policy, looped, email_only, "410923-office", "email", level="urgent_reminder")
    decided = step(
        state_of(act, mail, attempts=1, tried=("410923-liu-bing/email",)),
        result(Outcome.REJECTED),
        at(2017, 5, 3, 9),
        email_only,
        looped,
    )
    assert isinstance(decided, GiveUp)
    assert "410923-liu-bing/email already tried" in decided.reason


def test_a_recipient_missing_from_the_directory_gives_up(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    act, mail = planned(policy, directory, settings, "410923-liu-bing", "email")
    gone = msgspec.structs.replace(directory, people=tuple(p for p in directory.people if p.id != "410923-liu-bing"))
    decided = step(state_of(act, mail, attempts=1), result(Outcome.REJECTED), at(2017, 5, 3, 9), settings, gone)
    assert isinstance(decided, GiveUp) and "not in the directory" in decided.reason


def test_steps_are_deterministic(policy: Policy, directory: Directory, settings: NotifierSettings) -> None:
    act, sms = planned(policy, directory, settings, "410923-liu-bing", "sms")
    for res in (None, result(Outcome.THROTTLED), result(Outcome.REJECTED), result(Outcome.SENT)):
        state = state_of(act, sms, attempts=0 if res is None else 3)
        assert next_step(state, res, at(2017, 5, 3, 23), settings, directory) == next_step(
            state, res, at(2017, 5, 3, 23), settings, directory
        )


def test_no_reason_holds_a_phone_number(policy: Policy, directory: Directory, settings: NotifierSettings) -> None:
    """Every step for every outcome, channel, recipient and time: reasons name ids, never numbers,
    even when the provider's detail carries one."""
    reasons = []
    for level in ("reminder", "overdue_notice"):
        act = action(policy, "410923", level)
        for message in plan(act, PROGRAMME_ID, "410923", "南乐县", directory, settings):
            for attempts, res in [(0, None)] + [
                (n, result(o, f"{message.address} +8613800000005 failed")) for o in Outcome for n in (1, 8)
            ]:
                for now in (at(2017, 5, 3, 9), at(2017, 5, 3, 23, 30), at(2017, 5, 9, 9)):
                    for sent_today in (0, 10):
                        state = state_of(act, message, attempts=attempts, sent_today=sent_today)
                        decided = next_step(state, res, now, settings, directory)
                        reasons.append(decided.reason)
    assert len(reasons) > 500 and any("invalid_recipient" in r for r in reasons)
    for reason in reasons:
        assert not PHONE.search(reason), reason
