"""`duban demo` end to end, as a person runs it: the command in a fresh folder, its own embedded
NATS, PostgreSQL and SMTP server, the whole 2017–2018 story as fast as the services go. The
outcomes are read back from what it leaves: the summary, the mailbox the SMTP server filled, the
SMS file and the 一览表 workbook; and nothing of it may still run afterwards."""

from __future__ import annotations

import email
import email.header
import json
import mailbox
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import openpyxl
import pytest

COUNTIES = {"410928": "濮阳县", "410922": "清丰县", "410923": "南乐县", "410926": "范县", "410927": "台前县"}


def process_groups() -> set[int]:
    ps = subprocess.run(["ps", "-eo", "pgid="], capture_output=True, text=True, check=True).stdout
    return {int(line) for line in ps.split()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("demo")
    duban = Path(sys.executable).with_name("duban")
    done = subprocess.run(
        [str(duban), "demo", "--speed", "0", "--no-live", "--out", "out"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = folder / "out"
    return {
        "folder": folder,
        "out": out,
        "stdout": done.stdout,
        "summary": json.loads((out / "summary.json").read_text()),
        "groups_after": process_groups(),
    }


def test_the_whole_programme_is_played(demo: dict[str, Any]) -> None:
    summary = demo["summary"]
    assert (summary["first_day"], summary["last_day"], summary["days"]) == ("2017-03-01", "2018-12-31", 671)
    assert summary["submissions"] > 150 and summary["operator_decisions"] == 5
    assert "671 simulated days" in demo["stdout"]


def test_actions_per_county(demo: dict[str, Any]) -> None:
    counties = demo["summary"]["counties"]
    assert {code: c["name"] for code, c in counties.items()} == COUNTIES
    # Two counties on time throughout: reminders only, every one issued.
    for code in ("410928", "410927"):
        assert counties[code]["actions_by_level"] == {"reminder": 8}, code
        assert counties[code]["findings"] == 0
    # 清丰县, late on the plan review: up the ladder, the 通报批评 and 约谈 proposed and confirmed.
    late = counties["410922"]
    assert late["actions_by_level"] == {
        "reminder": 8,
        "urgent_reminder": 1,
        "overdue_notice": 1,
        "public_criticism": 1,
        "admonitory_talk": 1,
    }
    assert late["actions_by_state"]["confirmed"] == 2 and "proposed" not in late["actions_by_state"]
    # 南乐县 published its tender documents without a passed pre-review: a finding and its notice.
    assert counties["410923"]["findings"] == 1
    assert counties["410923"]["actions_by_level"]["procedure_notice"] == 1
    # 范县 missed progress tables (criticised, a second offence waived), was granted an extension,
    # and applied for pre-acceptance before six months of trial operation (a finding).
    fan = counties["410926"]
    assert fan["actions_by_level"]["missed_table_criticism"] == 2
    assert fan["actions_by_level"]["second_offence_talk"] == 1 and fan["actions_by_state"]["waived"] == 1
    assert fan["findings"] == 1 and fan["actions_by_level"]["procedure_notice"] == 1


def test_emails_arrived_at_the_smtp_server(demo: dict[str, Any]) -> None:
    box = mailbox.Maildir(str(demo["out"] / "mailbox"), create=False)
    messages = [email.message_from_bytes(box.get_bytes(key)) for key in box.iterkeys()]
    assert len(messages) == demo["summary"]["emails_received"] > 0
    subjects = [str(email.header.make_header(email.header.decode_header(m["Subject"]))) for m in messages]
    criticism = [s for s, m in zip(subjects, messages, strict=True) if "清丰县" in s and "通报批评" in s]
    assert criticism, subjects
    assert all(m["To"].endswith("@example.org") for m in messages)  # the example directory: nobody real
    assert all(m["X-Duban-Message-Id"] for m in messages)
    # Once in effect: no message id twice.
    ids = [m["X-Duban-Message-Id"] for m in messages]
    assert len(ids) == len(set(ids))


def test_sms_file(demo: dict[str, Any]) -> None:
    lines = [json.loads(line) for line in (demo["out"] / "sms.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == demo["summary"]["sms_written"] > 0
    assert len({line["message_id"] for line in lines}) == len(lines)
    assert any("清丰县" in line["body"] for line in lines)


def test_the_workbook(demo: dict[str, Any]) -> None:
    sheet = openpyxl.load_workbook(demo["out"] / "督查进度一览表.xlsx").active
    assert sheet is not None
    rows = list(sheet.iter_rows(values_only=True))
    header = rows[2]
    assert [h for h in header[4:] if h] == list(COUNTIES.values())
    milestones = {
        row[0]: row for row in rows if row[0] in {"1.1", "1.2", "1.3", "2.1", "2.2", "2.3", "3.1", "3.2", "3.3"}
    }
    assert len(milestones) == 9
    statuses = {county: [milestones[m][4 + 3 * i] for m in sorted(milestones)] for i, county in enumerate(COUNTIES)}
    assert statuses["410928"] == ["已完成"] * 9
    assert statuses["410922"][1] == "逾期完成"  # 1.2, the late plan review


def test_nothing_keeps_running(demo: dict[str, Any]) -> None:
    # The demo started a nats-server and a PostgreSQL of its own (each leading its process
    # group, the postmaster with its backends); none of them outlives the command.
    pids = demo["summary"]["server_pids"]
    assert len(pids) == 2
    assert not set(pids) & demo["groups_after"]


def test_the_record_verifies_and_the_workbook_is_signed(demo: dict[str, Any]) -> None:
    summary = demo["summary"]
    assert summary["record_verified"] is True
    assert "the record verified" in demo["stdout"]
    signature = json.loads((demo["out"] / "督查进度一览表.xlsx.sig").read_text())
    assert signature["signer"] == summary["signer"] and summary["signer"].startswith("U")
    duban = Path(sys.executable).with_name("duban")
    checked = subprocess.run(
        [str(duban), "audit", "verify-file", "out/督查进度一览表.xlsx", "--trust", summary["signer"]],
        cwd=demo["folder"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "OK" in checked.stdout
