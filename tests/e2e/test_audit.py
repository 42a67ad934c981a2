"""The tamper-evident record with all four services running: an untouched record verifies; an
altered stored event, a removed one, an altered or invented read-model row and an altered export
are each caught, at their exact place."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from contracts.audit import FILE_SIGNATURE_HEADER, FILE_SIGNATURE_SUFFIX, AuditReport
from contracts.commands import Role
from contracts.escalation import AUDIT_CHECKPOINT_SUBJECT, TICK_SUBJECT, CheckpointList
from contracts.ledger import PROJECTION_STATUS_SUBJECT, REPORT_SUBJECT, ProjectionStatus
from contracts.programme import load_default_programme
from contracts.replies import Accepted, decode_reply
from contracts.subjects import EVENTS_ALL, EVENTS_STREAM, submit_subject
from services.audit.verify import verify_record
from services.common.jetstream import read_messages
from services.common.signing import file_signature_from_header, trusted_keys
from tests.harness import declare_streams
from tests.stack import SHANGHAI, Running

PROGRAMME = load_default_programme().id


async def _submit(nc: NatsClient, county: str, submission_id: str, milestone: str, percent: int) -> None:
    body = {
        "submission_id": submission_id,
        "programme_id": PROGRAMME,
        "county_code": county,
        "command": {"kind": "report_progress", "milestone_id": milestone, "percent": percent},
    }
    reply = decode_reply(
        (await nc.request(submit_subject(Role.COUNTY, county), json.dumps(body).encode(), timeout=5)).data
    )
    assert isinstance(reply, Accepted), reply


async def _record_some_history(running: Running) -> None:
    """Facts from three counties, then actions (signed) once 1.1 is overdue, then a checkpoint."""
    for number, county in enumerate(("410928", "410922", "410923")):
        await _submit(running.nc, county, f"audit-{number}-a", "1.1", 30)
        await _submit(running.nc, county, f"audit-{number}-b", "1.1", 60)
    running.clock.set(dt.datetime(2017, 4, 5, 10, 0, tzinfo=SHANGHAI))  # 1.1 overdue everywhere
    await running.nc.request(TICK_SUBJECT, b"{}", timeout=10)
    await _settle(running)
    for _ in range(100):  # escalation records the heads once it has read them
        reply = await running.nc.request(AUDIT_CHECKPOINT_SUBJECT, b"{}", timeout=10)
        if msgspec.json.decode(reply.data, type=CheckpointList).items:
            break
        await asyncio.sleep(0.05)


async def _settle(running: Running) -> None:
    """Until the ledger has applied the whole stream and nothing new came for a second (the
    notifier records its outcomes a little after the actions)."""
    js = running.nc.jetstream()
    quiet_since, seen = asyncio.get_running_loop().time(), -1
    for _ in range(600):
        last = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
        status = msgspec.json.decode(
            (await running.nc.request(PROJECTION_STATUS_SUBJECT, b"", timeout=5)).data, type=ProjectionStatus
        )
        now = asyncio.get_running_loop().time()
        if last != seen or status.checkpoint < last:
            quiet_since, seen = now, last
        elif now - quiet_since > 1.0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the services did not settle")


async def _verify(running: Running, *, read_models: bool = True) -> AuditReport:
    return await verify_record(running.nc, trusted_keys(running.settings, environ={}), read_models=read_models)


async def test_an_untouched_record_verifies_with_signed_actions_and_checkpoints(running: Running) -> None:
    await _record_some_history(running)
    report = await _verify(running)
    assert report.ok, report.breaks
    assert report.events >= 6 + 3 and report.chains >= 6  # three counties' facts and actions
    assert report.signed_events >= 3 and report.checkpoints >= 1
    assert report.unchained_before_chain == 0
    assert [name.split()[0] for name in report.read_models_checked] == ["ledger", "notifier"]


async def test_an_altered_read_model_row_and_an_invented_one_are_caught(running: Running, fresh_database: str) -> None:
    await _record_some_history(running)
    conn = await asyncpg.connect(fresh_database)
    try:
        await conn.execute(
            "UPDATE ledger.milestones SET percent = 100 WHERE county_code = '410922' AND milestone_id = '1.1'"
        )
        await conn.execute(
            "INSERT INTO ledger.milestones (programme_id, county_code, milestone_id, percent, note)"
            " VALUES ($1, '410926', '9.9', 100, 'invented')",
            PROGRAMME,
        )
        await conn.execute(
            "UPDATE ledger.event_log SET envelope = jsonb_set(envelope::jsonb, '{payload,percent}', '95')::json"
            " WHERE stream_sequence = 2"
        )
    finally:
        await conn.close()
    report = await _verify(running)
    assert not report.ok
    found = {(b.kind, b.where) for b in report.breaks}
    assert ("read_model_altered", f"ledger.milestones {PROGRAMME} 410922 1.1") in found
    assert ("read_model_unexplained", f"ledger.milestones {PROGRAMME} 410926 9.9") in found
    assert ("read_model_altered", "ledger.event_log stream sequence 2") in found
    altered = next(b for b in report.breaks if b.where == f"ledger.milestones {PROGRAMME} 410922 1.1")
    assert altered.detail == "percent is 100; the events say 60"
    logged = next(b for b in report.breaks if b.where == "ledger.event_log stream sequence 2")
    assert "payload.percent: 95 in the read model, 60 from the events" in logged.detail
    assert report.first_break is not None and report.first_break.stream_sequence == 2


async def test_a_signed_export_verifies_and_an_altered_one_does_not(running: Running, tmp_path: Path) -> None:
    await _record_some_history(running)
    reply = await running.nc.request(REPORT_SUBJECT, b"{}", timeout=30)
    signature = file_signature_from_header((reply.headers or {})[FILE_SIGNATURE_HEADER])
    xlsx = tmp_path / "一览表.xlsx"
    xlsx.write_bytes(reply.data)
    xlsx.with_name(xlsx.name + FILE_SIGNATURE_SUFFIX).write_bytes(msgspec.json.encode(signature))
    state = str(running.settings.state_dir)

    verified = await _duban("audit", "verify-file", str(xlsx), state_dir=state)
    assert verified.returncode == 0, verified.stdout
    assert "OK" in verified.stdout and signature.signer in verified.stdout

    data = bytearray(reply.data)
    data[len(data) // 2] ^= 0x01
    xlsx.write_bytes(bytes(data))
    refused = await _duban("audit", "verify-file", str(xlsx), state_dir=state)
    assert refused.returncode == 1
    assert "NOT VERIFIED" in refused.stdout and "not the one signed" in refused.stdout

    xlsx.write_bytes(reply.data)  # the right file, but not a key we trust
    stranger = await _duban("audit", "verify-file", str(xlsx), state_dir=str(tmp_path))
    assert stranger.returncode == 1 and "not a trusted key" in stranger.stdout


async def _duban(*args: str, state_dir: str) -> subprocess.CompletedProcess[str]:
    """The real command, in a process of its own (it configures logging for itself)."""
    env = {**os.environ, "DUBAN_STATE_DIR": state_dir, "COLUMNS": "200"}
    command = [str(Path(sys.executable).with_name("duban")), *args]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, env=env, timeout=60)


async def _rewrite_stream(running: Running, alter: dict[int, bytes | None]) -> None:
    """What an insider with the server's rights could do: replace DUBAN_EVENTS by a copy in which
    the events at the given sequences are altered (bytes) or left out (None), headers kept."""
    js = running.nc.jetstream()
    stored = [item async for batch in read_messages(js, EVENTS_STREAM, EVENTS_ALL) for item in batch]
    await js.delete_stream(EVENTS_STREAM)
    await declare_streams(js)
    for sequence, msg in stored:
        data = alter.get(sequence, msg.data)
        if data is None:
            continue
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith(("Nats-Batch", "Nats-Expected"))}
        await js.publish(msg.subject, data, headers=headers)


@pytest.mark.parametrize("how", ["altered", "removed"])
async def test_a_tampered_stored_event_is_caught_at_its_place(running: Running, how: str) -> None:
    await _record_some_history(running)
    running.stop.set()  # the services stop; the stream and its checkpoints stay
    await asyncio.wait_for(running.services, 30)
    js = running.nc.jetstream()
    target = await js.get_msg(EVENTS_STREAM, 3)
    assert target.subject is not None
    original = target.data or b""
    forged = original.replace(b'"percent":30', b'"percent":90')
    assert forged != original
    await _rewrite_stream(running, {3: forged if how == "altered" else None})

    report = await _verify(running, read_models=False)
    assert not report.ok
    first = report.first_break
    assert first is not None
    if how == "altered":
        assert (first.kind, first.stream_sequence, first.subject) == ("altered", 3, target.subject)
        assert first.event_id == msgspec.json.decode(original)["event_id"]
    else:
        # The next event on the same subject now links to a hash nothing has.
        assert first.kind == "relinked" and first.subject == target.subject and (first.stream_sequence or 0) >= 3
        assert any(b.kind == "checkpoint_mismatch" for b in report.breaks)


async def test_an_outbox_row_deleted_reset_or_invented_is_caught(running: Running, fresh_database: str) -> None:
    await _record_some_history(running)
    conn = await asyncpg.connect(fresh_database)
    try:
        sent = await conn.fetch("SELECT message_id FROM notifier.outbox WHERE state = 'sent' ORDER BY message_id")
        assert len(sent) >= 2, "the actions were told to someone"
        deleted, reset = sent[0]["message_id"], sent[1]["message_id"]
        await conn.execute("DELETE FROM notifier.outbox WHERE message_id = $1", deleted)
        await conn.execute("UPDATE notifier.outbox SET state = 'pending' WHERE message_id = $1", reset)
        await conn.execute(
            "INSERT INTO notifier.outbox (message_id, action_id, programme_id, county_code, channel, recipient_id,"
            " message, next_attempt_at, queued_at) SELECT 'invented', 'no-such-action', programme_id, county_code,"
            " channel, recipient_id, message, now(), now() FROM notifier.outbox WHERE message_id = $1",
            reset,
        )
    finally:
        await conn.close()
    report = await _verify(running)
    found = {(b.kind, b.where) for b in report.breaks}
    assert found == {
        ("read_model_missing", f"notifier.outbox {deleted}"),
        ("read_model_altered", f"notifier.outbox {reset}"),
        ("read_model_unexplained", "notifier.outbox invented"),
    }
