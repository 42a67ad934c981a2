"""The README's `nats req` commands, played against running services: each subject exists, each
body is one the service accepts, each answer is JSON a person can read. (The `nats` CLI is not
installable here; the requests are the same bytes it would send.)"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import shlex
from pathlib import Path

import msgspec

from contracts.escalation import ActionList, ActionView
from tests.stack import SHANGHAI, Running

README = Path(__file__).resolve().parents[2] / "README.md"
NATS_REQ = re.compile(r"`(nats req [^`]+)`")


def readme_requests() -> list[tuple[str, bytes]]:
    """(subject, body) of every `nats req …` in the README's ops section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Operate it with the NATS CLI") :]
    section = section[: section.index("\n## ", 1)]
    requests = []
    for command in NATS_REQ.findall(section):
        if command.startswith("nats req duban.ops.") and "…" in command:
            continue  # "… duban.ops.ledger.status": shorthand for the line's first command
        words = shlex.split(command.replace('"$(cat ', "@").replace(')"', ""), posix=True)
        subject, body = words[2], words[3]
        data = (README.parent / body[1:]).read_bytes() if body.startswith("@") else body.encode()
        requests.append((subject, data))
    return requests


def test_the_readme_lists_the_common_tasks() -> None:
    subjects = {subject for subject, _ in readme_requests()}
    assert {
        "duban.submit.county.410928",
        "duban.submit.city.410926",
        "duban.query.ledger.table",
        "duban.query.ledger.county",
        "duban.query.ledger.history",
        "duban.ops.escalation.actions",
        "duban.ops.escalation.confirm",
        "duban.ops.escalation.waive",
        "duban.ops.escalation.why",
        "duban.ops.submissions.status",
    } <= subjects


async def test_every_readme_request_is_answered(running: Running) -> None:
    running.clock.set(dt.datetime(2018, 1, 5, 10, 0, tzinfo=SHANGHAI))
    await running.nc.request("duban.ops.escalation.tick", b"{}", timeout=10)
    proposed: tuple[ActionView, ...] = ()
    for _ in range(100):  # escalation lists an action once it has read it back from the stream
        answer = await running.nc.request("duban.ops.escalation.actions", b'{"state": "proposed"}', timeout=5)
        proposed = msgspec.json.decode(answer.data, type=ActionList).items
        if len(proposed) >= 2:
            break
        await asyncio.sleep(0.05)
    assert len(proposed) >= 2, "a county that did nothing by 2018 has proposals pending"
    action_ids = iter(p.action_id for p in proposed)
    for subject, body in readme_requests():
        if b"ACTION_ID" in body:
            body = body.replace(b"ACTION_ID", next(action_ids).encode())
        msg = await running.nc.request(subject, body, timeout=30)
        error = (msg.headers or {}).get("Nats-Service-Error-Code")
        assert error is None, (subject, body, msg.headers, msg.data)
        answer = json.loads(msg.data)
        assert isinstance(answer, dict)
        if subject.startswith("duban.submit."):
            assert answer["status"] == "accepted", (subject, answer)
        else:
            assert msg.data.startswith(b"{\n  "), subject  # indented for a terminal
