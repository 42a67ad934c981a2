"""The demo's live view: rendered into a recording console, checked for its texts and colours."""

from __future__ import annotations

import datetime as dt
import itertools

import msgspec
from rich.console import Console, RenderableType

from contracts.events import (
    ActionConfirmed,
    ActionIssued,
    ActionProposed,
    ActionWaived,
    Actor,
    EventEnvelope,
    EventPayload,
    NotificationDelivered,
    NotificationFailed,
    NotificationQueued,
    NotificationSent,
    ProcedureFindingRecorded,
    ProgressReported,
)
from contracts.programme import load_default_programme
from services.demo.view import DemoView
from tests.unit.test_report import scenario_table

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
PROGRAMME = load_default_programme()
P = "puyang-2017-13"
CRITICISM = f"{P}:410922:public_criticism:1.2:2017-05-02"
TALK = f"{P}:410922:admonitory_talk:1.2:2017-05-02"
REMINDER = f"{P}:410928:reminder:1.3:2017-06-30"
NOTICE = f"{P}:410923:procedure_notice:s9.1"


_numbers = itertools.count(1)


def envelope(county: str, day: str, payload: EventPayload) -> EventEnvelope:
    n = next(_numbers)
    at = dt.datetime.fromisoformat(day).replace(hour=9, tzinfo=SHANGHAI)
    return EventEnvelope(
        event_id=f"e{n}",
        schema_version=1,
        programme_id=P,
        county_code=county,
        occurred_at=at,
        recorded_at=at,
        actor=Actor(role="system", user="escalation"),
        submission_id=f"e{n}",
        submission_digest="",
        causation_id="x",
        correlation_id="x",
        payload=payload,
    )


def action(
    kind: type[ActionIssued] | type[ActionProposed], action_id: str, **extra: object
) -> ActionIssued | ActionProposed:
    level = action_id.split(":")[2]
    names = {
        "reminder": "提醒",
        "public_criticism": "通报批评",
        "admonitory_talk": "约谈",
        "procedure_notice": "程序问题提示",
    }
    fields: dict[str, object] = {
        "action_id": action_id,
        "level_id": level,
        "level_name": names[level],
        "policy_version": "2017.1",
        "due_on": dt.date(2017, 5, 9),
        "addressed": ("responsible_person",),
        "explanation_zh": f"里程碑说明{level}第一句。依据督办政策2017.1。",
        "milestone_id": action_id.split(":")[3] if level != "procedure_notice" else "1.3",
        **extra,
    }
    return msgspec.convert(fields, kind)


Outcome = NotificationQueued | NotificationSent | NotificationDelivered | NotificationFailed


def notification(kind: type[Outcome], action_id: str, channel: str, address: str) -> Outcome:
    return kind(
        message_id=f"{action_id}:{channel}",
        action_id=action_id,
        recipient_id="410922-liu-bing",
        channel=channel,
        attempt=1,
        address_masked=address,
        detail="号码停机" if issubclass(kind, NotificationFailed) else "",
    )


def fed_view() -> DemoView:
    view = DemoView(PROGRAMME, start=dt.date(2017, 3, 1), end=dt.date(2018, 12, 31), speed=15)
    view.update_table(scenario_table())
    view.set_day(dt.date(2017, 5, 9), ["清丰县：建设方案逾期未通过省级评审"])
    view.set_day(dt.date(2017, 5, 10), "市督查局：确认对清丰县通报批评")
    events = [
        envelope("410928", "2017-06-23", action(ActionIssued, REMINDER)),
        envelope("410922", "2017-05-09", action(ActionProposed, CRITICISM)),
        envelope("410922", "2017-05-10", ActionConfirmed(action_id=CRITICISM, operator="市督查局")),
        envelope("410922", "2017-05-10", action(ActionIssued, CRITICISM, confirmed_by="市督查局")),
        envelope("410922", "2017-05-16", action(ActionProposed, TALK)),
        envelope("410922", "2017-05-17", ActionWaived(action_id=TALK, operator="市督查局", reason="已取得省级批复")),
        envelope(
            "410923",
            "2017-06-06",
            ProcedureFindingRecorded(
                rule_id="r", trigger_event_id="s9/0", finding_zh="招标文件未经预审即发布", finding_en="x"
            ),
        ),
        envelope("410923", "2017-06-06", action(ActionIssued, NOTICE)),
        envelope("410922", "2017-05-10", notification(NotificationQueued, CRITICISM, "sms", "138****0001")),
        envelope("410922", "2017-05-10", notification(NotificationSent, CRITICISM, "sms", "138****0001")),
        envelope("410922", "2017-05-10", notification(NotificationDelivered, CRITICISM, "sms", "138****0001")),
        envelope("410922", "2017-05-10", notification(NotificationSent, CRITICISM, "email", "l***@example.org")),
        envelope("410928", "2017-06-23", notification(NotificationFailed, REMINDER, "sms", "139****0002")),
        envelope("410928", "2017-06-23", ProgressReported(milestone_id="1.3", percent=60)),
    ]
    for event in events:
        view.add_event(event)
    return view


def render(renderable: RenderableType) -> str:
    console = Console(record=True, width=160, color_system="truecolor")
    console.print(renderable)
    return console.export_text()


def styles_of(renderable: RenderableType, text: str) -> list[str]:
    """The styles of the segments carrying ``text``."""
    console = Console(width=160, color_system="truecolor", force_terminal=True)
    return [str(seg.style) for seg in console.render(renderable) if text in seg.text and seg.style is not None]


def test_the_view_shows_date_progress_table_actions_notifications_and_captions() -> None:
    out = render(fed_view().render())
    assert "2017年5月10日（星期三）" in out and "第71天/共671天" in out and "15天/秒" in out
    for name in ("濮阳县", "清丰县", "南乐县", "范县", "台前县"):
        assert name in out
    for text in ("已完成", "逾期未完成", "推进中80%", "逾期完成", "待审查", "未开始"):
        assert text in out
    assert "1期 2017-05" in out  # 清丰县 missed its 2017-05 table
    assert "迟报1期" in out  # 范县 filed one late
    assert "待审查延" in out  # 台前县's extension
    assert "推进中50%!" in out  # 南乐县's finding
    # actions: newest first, with county, level, state, subject and the explanation's first sentence
    feed = out[out.index("督办事项") :]
    assert feed.index("程序问题提示") < feed.index("通报批评")
    assert "2017-05-17  清丰县  约谈" in out and "免予处理" in out and "已取得省级批复" in out
    assert "市督查局确认" in out and "待确认" in out
    assert "里程碑说明reminder第一句。" in out and "依据督办政策" not in out
    # notifications: sent, delivered, failed (not queued), masked addresses, the action
    assert "138****0001" in out and "l***@example.org" in out and "139****0002" in out
    assert "已送达" in out and "已发送" in out and "失败" in out and "号码停机" in out
    assert "通报批评 1.2" in out
    # captions, newest first
    assert out.index("市督查局：确认对清丰县通报批评") < out.index("清丰县：建设方案逾期未通过省级评审")


def test_cells_are_coloured_by_the_light() -> None:
    rendered = fed_view().render()
    assert set(styles_of(rendered, "逾期未完成")) == {"bold red"}  # 清丰县 1.2
    assert set(styles_of(rendered, "已完成")) == {"green"}
    assert set(styles_of(rendered, "推进中50%")) == {"bold yellow"}  # due soon
    assert "bold magenta" in styles_of(rendered, "!")  # 南乐县's finding
    assert set(styles_of(rendered, "1期 2017-05")) == {"bold red"}  # a missing table
    assert set(styles_of(rendered, "待确认")) == {"bold yellow"}


def test_the_view_renders_before_anything_is_known() -> None:
    view = DemoView(PROGRAMME, start=dt.date(2017, 3, 1), end=dt.date(2018, 12, 31))
    out = render(view.render())
    assert "等待台账" in out and "暂无督办事项" in out and "全速" in out and "第0天/共671天" in out


def test_summary_counts_actions_by_level_decisions_findings_and_notifications() -> None:
    view = fed_view()
    tallies = view.tallies()
    qingfeng = tallies["410922"]
    assert qingfeng.by_level() == {"public_criticism": 1, "admonitory_talk": 1}
    assert qingfeng.by_state() == {"confirmed": 1, "waived": 1}
    assert qingfeng.notifications == {"sent": 2, "delivered": 1}
    assert tallies["410928"].by_state() == {"issued": 1} and tallies["410928"].notifications == {"failed": 1}
    assert tallies["410923"].findings == 1 and tallies["410923"].by_level() == {"procedure_notice": 1}
    assert tallies["410926"].by_level() == {} and tallies["410926"].findings == 0
    out = render(view.summary())
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "通报批评×1" in lines["清丰县"] and "约谈×1" in lines["清丰县"] and "2/1/0" in lines["清丰县"]
    assert "提醒×1" in lines["濮阳县"] and "0/0/1" in lines["濮阳县"]
    assert "程序问题提示×1" in lines["南乐县"]
    assert "—" in lines["范县"]
    assert "提醒×1" in lines["合计"] and "通报批评×1" in lines["合计"] and "2/1/1" in lines["合计"]


def test_a_confirmation_shows_once_and_decisions_on_unseen_actions_read_their_id() -> None:
    view = DemoView(PROGRAMME, start=dt.date(2017, 3, 1), end=dt.date(2018, 12, 31))
    view.add_action(envelope("410922", "2017-05-10", ActionConfirmed(action_id=CRITICISM, operator="王科长")))
    view.add_action(envelope("410922", "2017-05-10", action(ActionIssued, CRITICISM, confirmed_by="王科长")))
    view.add_notification(envelope("410922", "2017-05-10", notification(NotificationSent, TALK, "sms", "138****0001")))
    assert len(view.actions) == 1 and view.actions[0].level_id == "public_criticism"
    assert view.actions[0].subject == "1.2" and view.actions[0].state == "confirmed"
    assert view.notifications[0].action == "admonitory_talk 1.2"
    view.observe("day", (dt.date(2017, 5, 11), ["清丰县：重新报审"]))
    view.observe("table", scenario_table())
    view.observe("event", envelope("410922", "2017-05-11", action(ActionProposed, TALK)))
    assert view.day == dt.date(2017, 5, 11) and view.table is not None and len(view.actions) == 2
