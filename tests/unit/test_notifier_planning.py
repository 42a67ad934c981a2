"""Planning: an issued action → who is told what on which channel; preflight lists every gap."""

from __future__ import annotations

import datetime as dt
import re

import msgspec
import pytest

from contracts.directory import Contact, ContactRole, Directory, example_directory_path, load_directory
from contracts.events import ActionIssued
from contracts.policy import Policy, load_default_policy
from contracts.programme import Programme, load_default_programme
from services.notifier.channels.base import OutboundMessage
from services.notifier.delivery import NotifierSettings, message_id
from services.notifier.planning import plan, preflight, recipients
from services.notifier.templates import SMS_MAX_CHARS, sms_text

PROGRAMME_ID = "puyang-2017-13"
PHONE = re.compile(r"1[3-9]\d{9}")


@pytest.fixture(scope="module")
def programme() -> Programme:
    return load_default_programme()


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_default_policy()


@pytest.fixture(scope="module")
def directory(programme: Programme) -> Directory:
    return load_directory(example_directory_path(), programme)


@pytest.fixture(scope="module")
def settings(policy: Policy) -> NotifierSettings:
    templates = {level.id: f"SMS_{i:03d}" for i, level in enumerate(policy.levels)}
    return NotifierSettings(channels=("sms", "email"), sms_templates={**templates, "digest": "SMS_900"})


def action(
    policy: Policy,
    county: str,
    level_id: str,
    *,
    milestone: str | None = "1.2",
    period: str | None = None,
    deadline: dt.date | None = dt.date(2017, 5, 2),
    due_on: dt.date = dt.date(2017, 5, 3),
    workdays: int = 1,
) -> ActionIssued:
    level = policy.level(level_id)
    assert level is not None
    subject = milestone or period or "finding"
    return ActionIssued(
        action_id=f"{PROGRAMME_ID}:{county}:{level_id}:{subject}:{deadline}",
        level_id=level_id,
        level_name=level.name,
        policy_version=policy.version,
        due_on=due_on,
        addressed=tuple(r.value for r in level.addressed),
        explanation_zh=f"里程碑{subject}截止{deadline}，尚未完成，依据督办政策{policy.version}“{level.name}”，现予发出。",
        missing_zh="“省级方案评审”通过记录" if milestone else "",
        milestone_id=milestone,
        period=period,
        deadline=deadline,
        workdays=workdays,
        urgent=level.urgent,
    )


def by(messages: list[OutboundMessage], recipient: str, channel: str) -> OutboundMessage:
    return next(m for m in messages if m.recipient_id == recipient and m.channel == channel)


def test_nanle_action_goes_to_liu_bing_of_nanle_and_qingfeng_to_liu_bing_of_qingfeng(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    nanle = plan(action(policy, "410923", "reminder"), PROGRAMME_ID, "410923", "南乐县", directory, settings)
    qingfeng = plan(action(policy, "410922", "reminder"), PROGRAMME_ID, "410922", "清丰县", directory, settings)
    assert {m.recipient_id for m in nanle} == {"410923-liu-bing"}
    assert {m.recipient_id for m in qingfeng} == {"410922-liu-bing"}
    assert by(nanle, "410923-liu-bing", "sms").address == "+8613800000005"
    assert by(nanle, "410923-liu-bing", "email").address == "liu-bing.410923@example.org"
    assert by(qingfeng, "410922-liu-bing", "sms").address == "+8613800000003"
    assert by(qingfeng, "410922-liu-bing", "email").address == "liu-bing.410922@example.org"
    assert by(nanle, "410923-liu-bing", "email").body.startswith("刘冰：")
    assert by(qingfeng, "410922-liu-bing", "email").body.startswith("刘兵：")


def test_city_roles_go_to_the_city_level_entries(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    messages = plan(action(policy, "410926", "public_criticism"), PROGRAMME_ID, "410926", "范县", directory, settings)
    assert [m.recipient_id for m in messages if m.channel == "email"] == [
        "410926-zhao-liling",
        "410926-office",
        "city-supervision-bureau",
        "city-urban-management-bureau",
    ]
    assert by(messages, "city-supervision-bureau", "email").address == "duchaju@example.org"
    assert by(messages, "city-urban-management-bureau", "sms").address == "+8613800000012"
    # A city recipient is asked to follow up, a county one to act.
    assert "请督促范县" in by(messages, "city-supervision-bureau", "email").body
    assert "报送进度" in by(messages, "410926-zhao-liling", "email").body


def test_recipients_resolve_by_role_and_county_never_by_name(directory: Directory) -> None:
    assert [p.id for p in recipients(["responsible_person", "unit_leader"], "410923", directory)] == [
        "410923-liu-bing",
        "410923-office",
    ]
    # Two people named 刘兵 in one county would both be told; a name never selects anyone.
    twin = Contact(id="410923-liu-bing-2", name="刘兵", roles=directory.people[2].roles, county_code="410923")
    doubled = msgspec.structs.replace(directory, people=(*directory.people, twin))
    assert [p.id for p in recipients(["responsible_person"], "410923", doubled)] == [
        "410923-liu-bing",
        "410923-liu-bing-2",
    ]
    assert recipients(["no_such_role"], "410923", directory) == []


def test_message_ids_are_deterministic_distinct_and_short(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    act = action(policy, "410928", "admonitory_talk")
    first = plan(act, PROGRAMME_ID, "410928", "濮阳县", directory, settings)
    again = plan(act, PROGRAMME_ID, "410928", "濮阳县", directory, settings)
    assert first == again  # a redelivered action plans the same messages, with the same ids
    ids = [m.message_id for m in first]
    assert len(ids) == len(set(ids)) == 8  # 4 people × (sms, email)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    for m in first:
        assert m.message_id == message_id(act.action_id, m.recipient_id, m.channel)
    other = plan(
        action(policy, "410928", "admonitory_talk", deadline=dt.date(2017, 6, 1)),
        PROGRAMME_ID,
        "410928",
        "濮阳县",
        directory,
        settings,
    )
    assert not set(ids) & {m.message_id for m in other}


def test_sms_goes_through_the_levels_template_with_short_parameters(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    act = action(policy, "410922", "overdue_notice", workdays=3, due_on=dt.date(2017, 5, 5))
    sms = by(plan(act, PROGRAMME_ID, "410922", "清丰县", directory, settings), "410922-liu-bing", "sms")
    assert sms.sms_template_code == settings.sms_templates["overdue_notice"]
    assert sms.sms_template_params == {
        "county": "清丰县",
        "milestone": "里程碑1.2",
        "deadline": "2017年5月2日",
        "days": "3",
    }
    assert list(sms.sms_template_params) == ["county", "milestone", "deadline", "days"]  # positional for Tencent
    assert sms.urgent  # 逾期通知 is urgent in the default policy
    assert sms.body == "【督办】清丰县里程碑1.2已于2017年5月2日到期，逾期3个工作日（逾期通知），请尽快办理。"


def test_email_has_the_subject_the_full_explanation_what_to_do_and_whom_to_contact(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    act = action(policy, "410922", "overdue_notice")
    mail = by(plan(act, PROGRAMME_ID, "410922", "清丰县", directory, settings), "410922-liu-bing", "email")
    assert mail.subject == "【督办】清丰县 里程碑1.2 逾期通知"
    assert act.explanation_zh in mail.body
    assert "需要办理：" in mail.body and "延期" in mail.body
    assert "市城管综合执法局 <chengguan@example.org>" in mail.body
    assert act.action_id in mail.body
    assert mail.sms_template_code is None and mail.sms_template_params == {}
    assert not PHONE.search(mail.body)


def test_every_level_and_county_renders_an_sms_of_one_segment(
    programme: Programme, policy: Policy, directory: Directory
) -> None:
    for county in [*programme.counties]:
        for level in policy.levels:
            for act in (
                action(policy, county.code, level.id, workdays=250, due_on=dt.date(2018, 5, 3)),
                action(policy, county.code, level.id, due_on=dt.date(2017, 4, 25), workdays=5),
                action(policy, county.code, level.id, milestone=None, period="2017-05", deadline=dt.date(2017, 6, 5)),
                action(policy, county.code, level.id, milestone=None, deadline=None),
            ):
                text = sms_text(act, county.name)
                assert len(text) <= SMS_MAX_CHARS, text
                assert text.startswith(f"【督办】{county.name}")
    long = action(policy, "410922", "provincial_measures", milestone="3.3", workdays=120, due_on=dt.date(2019, 1, 1))
    assert len(sms_text(long, "清丰县" * 10)) <= SMS_MAX_CHARS


def test_before_the_deadline_the_text_counts_days_left(policy: Policy) -> None:
    act = action(policy, "410923", "reminder", due_on=dt.date(2017, 4, 25), workdays=5)
    assert sms_text(act, "南乐县") == "【督办】南乐县里程碑1.2将于2017年5月2日到期，剩5个工作日（提醒），请抓紧办理。"


def test_demo_channels_file_and_email(policy: Policy, directory: Directory, settings: NotifierSettings) -> None:
    demo = msgspec.structs.replace(settings, channels=("file", "email"))
    messages = plan(action(policy, "410923", "urgent_reminder"), PROGRAMME_ID, "410923", "南乐县", directory, demo)
    assert sorted((m.recipient_id, m.channel) for m in messages) == [
        ("410923-liu-bing", "email"),
        ("410923-liu-bing", "file"),
        ("410923-office", "email"),
        ("410923-office", "file"),
    ]
    for m in messages:
        if m.channel == "file":
            assert m.address == m.recipient_id  # the demo's file holds no number
            assert len(m.body) <= SMS_MAX_CHARS
        assert not PHONE.search(m.address + m.body)


def test_without_a_template_no_sms_is_planned_but_the_email_is(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    bare = msgspec.structs.replace(settings, sms_templates={})
    messages = plan(action(policy, "410923", "reminder"), PROGRAMME_ID, "410923", "南乐县", directory, bare)
    assert [(m.recipient_id, m.channel) for m in messages] == [("410923-liu-bing", "email")]


def test_a_person_without_a_mobile_gets_only_email(
    policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    people = tuple(
        msgspec.structs.replace(p, mobile=None) if p.id == "410923-liu-bing" else p for p in directory.people
    )
    messages = plan(
        action(policy, "410923", "reminder"),
        PROGRAMME_ID,
        "410923",
        "南乐县",
        msgspec.structs.replace(directory, people=people),
        settings,
    )
    assert [m.channel for m in messages] == ["email"]


# -- preflight -----------------------------------------------------------------------------------
def test_preflight_finds_no_gap_in_the_example(
    programme: Programme, policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    assert preflight(programme, policy, directory, settings) == []
    assert preflight([programme], [policy], directory, settings) == []


def without(directory: Directory, person_id: str, **changes: object) -> Directory:
    people = tuple(msgspec.structs.replace(p, **changes) if p.id == person_id else p for p in directory.people)
    return msgspec.structs.replace(directory, people=people)


def test_preflight_lists_exactly_liu_bings_missing_mobile(
    programme: Programme, policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    gaps = preflight(programme, policy, without(directory, "410923-liu-bing", mobile=None), settings)
    assert len(gaps) == 1
    (gap,) = gaps
    assert (gap.what, gap.county_code, gap.role, gap.person_id, gap.severity) == (
        "no_mobile",
        "410923",
        "responsible_person",
        "410923-liu-bing",
        "warning",
    )
    # With e-mail only, the missing mobile is no gap.
    email_only = msgspec.structs.replace(settings, channels=("email",))
    assert preflight(programme, policy, without(directory, "410923-liu-bing", mobile=None), email_only) == []


def test_preflight_unreachable_person_missing_role_templates_and_backups(
    programme: Programme, policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    broken = without(directory, "410922-office", mobile=None, email=None)
    broken = without(broken, "410926-zhao-liling", backup="410926-nobody")
    broken = msgspec.structs.replace(
        broken, people=tuple(p for p in broken.people if p.id != "city-urban-management-bureau")
    )
    templates = {k: v for k, v in settings.sms_templates.items() if k != "reminder"}
    gaps = preflight(programme, policy, broken, msgspec.structs.replace(settings, sms_templates=templates))
    found = {(g.what, g.county_code, g.role, g.person_id, g.level_id) for g in gaps}
    assert found == {
        ("no_channel", "410922", "unit_leader", "410922-office", None),
        ("unreachable_backup", "410922", None, "410922-liu-bing", None),
        ("unknown_backup", "410926", None, "410926-zhao-liling", None),
        ("no_person", None, "city_bureau", None, None),
        ("no_sms_template", None, None, None, "reminder"),
    }
    assert all(g.severity == "error" for g in gaps if g.what != "unreachable_backup")
    assert not any(PHONE.search(g.detail) for g in gaps)


def test_preflight_reports_a_backup_loop_and_the_webhook_without_url(
    programme: Programme, policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    looped = without(directory, "410928-office", backup="410928-sun-qingwei")
    gaps = preflight(programme, policy, looped, settings)
    assert [(g.what, g.person_id) for g in gaps] == [
        ("backup_cycle", "410928-sun-qingwei"),
        ("backup_cycle", "410928-office"),
    ]
    hooked = msgspec.structs.replace(settings, channels=("sms", "email", "webhook"))
    assert [g.what for g in preflight(programme, policy, directory, hooked)] == ["no_webhook_url"]


def test_preflight_checks_the_programmes_responsible_person(
    programme: Programme, policy: Policy, directory: Directory, settings: NotifierSettings
) -> None:
    moved = without(directory, "410927-wang-junhai", roles=(ContactRole.UNIT_LEADER,))
    gaps = preflight(programme, policy, moved, settings)
    assert {(g.what, g.county_code) for g in gaps} == {("not_responsible", "410927"), ("no_person", "410927")}
