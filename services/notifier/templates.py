"""The words of a notification, in Chinese: SMS template parameters, a short SMS text, an e-mail. Pure.

SMS in mainland China goes out only through a template the provider has approved, one per policy
level (``NotifierSettings.sms_templates``); what we choose is its parameters, kept short (providers
cap a parameter's length). The same facts also render as a short text (≤ 70 characters, one SMS
segment) for the file/demo channel and the record. The e-mail carries the action's full
explanation, what to do and whom to contact.

Nothing here holds or prints a phone number: contacts are listed by name and e-mail address.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from contracts.directory import Contact, ContactRole, Directory
from contracts.events import ActionIssued

SMS_MAX_CHARS = 70  # one SMS segment of Chinese text (UCS-2)
SMS_PARAM_MAX_CHARS = 20  # below every provider's per-parameter limit
SUBJECT_PREFIX = "【督办】"

COUNTY_ROLES = frozenset({ContactRole.RESPONSIBLE_PERSON, ContactRole.UNIT_LEADER})
CITY_ROLES = frozenset({ContactRole.SUPERVISION_BUREAU, ContactRole.CITY_BUREAU})


def zh_date(day: dt.date) -> str:
    return f"{day.year}年{day.month}月{day.day}日"


def item_zh(action: ActionIssued) -> str:
    """What the action is about, briefly: 里程碑1.2, 2017年5月督查进度一览表, 程序问题."""
    if action.milestone_id:
        return f"里程碑{action.milestone_id}"
    if action.period:
        return f"{action.period[:4]}年{int(action.period[5:7])}月督查进度一览表"
    return "督办事项"


def is_overdue(action: ActionIssued) -> bool:
    """After the deadline (escalation counts ``workdays`` overdue), or before it (days left)."""
    return action.deadline is not None and action.due_on > action.deadline


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def sms_params(action: ActionIssued, county_name: str) -> dict[str, str]:
    """The parameters of the level's approved SMS template, in a fixed order (Tencent's are positional)."""
    return {
        "county": _clip(county_name, SMS_PARAM_MAX_CHARS),
        "milestone": _clip(item_zh(action), SMS_PARAM_MAX_CHARS),
        "deadline": zh_date(action.deadline) if action.deadline else "",
        "days": str(action.workdays),
    }


def _timing_zh(action: ActionIssued) -> str:
    if action.deadline is None:
        return ""
    if is_overdue(action):
        return f"已于{zh_date(action.deadline)}到期，逾期{action.workdays}个工作日"
    if action.workdays <= 0:
        return f"于今日（{zh_date(action.deadline)}）到期"
    return f"将于{zh_date(action.deadline)}到期，剩{action.workdays}个工作日"


def sms_text(action: ActionIssued, county_name: str) -> str:
    """The SMS as one segment (≤ 70 characters): the file/demo channel's text and the record's."""
    head = f"{SUBJECT_PREFIX}{county_name}{item_zh(action)}{_timing_zh(action)}"
    tail = "，请尽快办理。" if is_overdue(action) else "，请抓紧办理。"
    room = SMS_MAX_CHARS - len(head) - len(tail) - 2  # the level's name goes in （）
    if room >= 2:
        return f"{head}（{_clip(action.level_name, room)}）{tail}"
    return _clip(head + tail, SMS_MAX_CHARS)


def email_subject(action: ActionIssued, county_name: str) -> str:
    """E.g. 【督办】清丰县 里程碑1.2 逾期通知."""
    return f"{SUBJECT_PREFIX}{county_name} {item_zh(action)} {action.level_name}"


def city_contacts(directory: Directory) -> list[Contact]:
    """Whom a county asks: the city bureau first, then the supervision bureau (city-level entries)."""
    order = (ContactRole.CITY_BUREAU, ContactRole.SUPERVISION_BUREAU)
    found: list[Contact] = []
    for role in order:
        for person in directory.people:
            if person.county_code is None and role in person.roles and person not in found:
                found.append(person)
    return found


def _what_to_do(action: ActionIssued, county_name: str, recipient: Contact) -> str:
    if any(role in COUNTY_ROLES for role in recipient.roles):
        missing = f"完成{action.missing_zh}，" if action.missing_zh else ""
        return (
            f"请{missing}并通过本县督办系统报送进度及佐证材料；确有困难需要延期的，请说明理由提出延期申请，由市级审核。"
        )
    return f"请督促{county_name}按期落实，并在督办系统中跟踪办理情况。"


def email_body(
    action: ActionIssued,
    county_name: str,
    recipient: Contact,
    contacts: Sequence[Contact],
    *,
    forwarded_from: Contact | None = None,
) -> str:
    """The full e-mail: salutation, explanation, what to do, whom to contact, the action's id."""
    lines = [f"{recipient.name}：", ""]
    if forwarded_from is not None:
        lines += [f"（本通知原发给{forwarded_from.name}，因未能送达，转请您处理。）", ""]
    lines += [action.explanation_zh, ""]
    lines.append(f"事项：{county_name} {item_zh(action)}（{action.level_name}）")
    timing = _timing_zh(action)
    if timing:
        lines.append(f"期限：{timing}")
    if action.missing_zh:
        lines.append(f"尚缺：{action.missing_zh}")
    lines.append(f"需要办理：{_what_to_do(action, county_name, recipient)}")
    if contacts:
        lines.append("联系：")
        lines += [f"  {c.name}" + (f" <{c.email}>" if c.email else "") for c in contacts]
    lines += ["", f"督办编号：{action.action_id}", "（本邮件由督办系统自动发送。）"]
    return "\n".join(lines)


def digest_subject(count: int, day: dt.date) -> str:
    return f"{SUBJECT_PREFIX}{zh_date(day)}督办通知汇总（{count}条）"


def digest_text(subjects: Sequence[str], day: dt.date) -> str:
    """The digest's full text: one line per folded message."""
    lines = [f"{SUBJECT_PREFIX}{zh_date(day)}您另有{len(subjects)}条督办通知，汇总如下："]
    lines += [f"{i}. {s.removeprefix(SUBJECT_PREFIX)}" for i, s in enumerate(subjects, 1)]
    lines.append("详情请查看邮件或登录督办系统。")
    return "\n".join(lines)
