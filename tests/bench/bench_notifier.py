#!/usr/bin/env python
"""Notifier benchmark: the outbox → channel path against local SMTP and SMS servers.

A program, not a pytest test::

    .venv/bin/python tests/bench/bench_notifier.py --messages 500            # quick check, < 1 min
    .venv/bin/python tests/bench/bench_notifier.py --messages 5000 --json /tmp/bench-notifier.json

It starts, in a temporary directory removed at the end (``--keep`` keeps it), an ``EmbeddedNats``
(JetStream, ``sync_interval: always``) and an ``EmbeddedPostgres(durable=True)``, and in a child
process (so the servers do not share this process's GIL) an aiosmtpd SMTP server and an
Aliyun-compatible SMS HTTP server (aiohttp: ``GET /`` with ``Action=SendSms`` answers
``{"Code": "OK", "BizId": ...}``, as in ``tests/integration/test_channels_sms.py``). Both count
what they receive; the counts are checked against what the notifier says it sent.

1. **outbox → SMTP**: ``--messages`` synthetic ``ActionIssued`` events (``overdue_notice``, addressed
   to the responsible person) over ``--counties`` synthetic counties (each with its own responsible
   person in an in-memory directory), published to the stream and planned with ``apply_batch``
   (batches of 500, as the service's consumer fetches); then ``work_once()`` until nothing is due,
   e-mail only (``SmtpChannel``). Baselines in the same run: raw ``aiosmtplib`` sends of the same
   messages (pre-built ``EmailMessage``s, one connection: **the baseline the ratio uses**), and the
   channel alone (``SmtpChannel.send`` without the outbox). ``publish_events`` is timed afterwards.
2. **outbox → SMS** (``AliyunSmsChannel``): the same, SMS only. Baselines: raw ``httpx`` GETs of the
   same signed URLs (built before timing) with one client (**the ratio's baseline**), and the
   channel alone.
3. **fan-out of one 通报批评**: one ``ActionIssued`` (``public_criticism``, addressed to
   responsible_person, unit_leader, supervision_bureau, city_bureau) per county, channels SMTP +
   file: for the shipped programme's five counties with the example directory, and for
   ``--fanout-counties`` (default 2,844) synthetic counties. Timed from the first ``apply_batch``
   until every message is sent (``work_once`` drained), with the split, then ``publish_events``.

The simulated clock stands at 10:00 Asia/Shanghai (no quiet hours); each recipient gets at most a
few SMS, so the daily budget never applies. Log output is the service's (JSON, ``--log-level``,
default info) written to a file in the temporary directory, so its cost is counted.

Prints a table, then all figures as JSON (also to ``--json FILE``). ``--profile DIR`` runs the
outbox drains under pyinstrument (not a project dependency: ``.venv/bin/pip install pyinstrument``).
Throughput on these machines drifts by up to 60% between runs: compare the RATIOS. Never fails on
a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiosmtplib  # noqa: E402
import asyncpg  # noqa: E402
import httpx  # noqa: E402
import msgspec  # noqa: E402
import nats  # noqa: E402
import structlog  # noqa: E402

from contracts.directory import (  # noqa: E402
    DIRECTORY_FORMAT,
    Contact,
    ContactRole,
    Directory,
    example_directory_path,
    load_directory,
)
from contracts.events import EVENT_SCHEMA_VERSIONS, ActionIssued, Actor, EventEnvelope, encode_event  # noqa: E402
from contracts.programme import Programme, load_default_programme  # noqa: E402
from contracts.subjects import actions_subject  # noqa: E402
from services.common.clock import SimulatedClock  # noqa: E402
from services.common.embedded import EmbeddedNats, EmbeddedPostgres, free_port  # noqa: E402
from services.common.jetstream import ensure_streams  # noqa: E402
from services.common.logging import configure_logging  # noqa: E402
from services.common.postgres import create_pool  # noqa: E402
from services.notifier import outbox  # noqa: E402
from services.notifier.channels.aliyun import AliyunSmsChannel, canonical_query, percent_encode  # noqa: E402
from services.notifier.channels.base import Channel, OutboundMessage, Secret  # noqa: E402
from services.notifier.channels.file import FileChannel  # noqa: E402
from services.notifier.channels.smtp import SmtpChannel, build_email  # noqa: E402
from services.notifier.delivery import NotifierSettings  # noqa: E402
from services.notifier.service import Notifier  # noqa: E402
from tests.bench.synthetic import (  # noqa: E402
    print_results,
    run_header,
    synthetic_programme,
)

SELF = str(Path(__file__).resolve())
SHANGHAI = dt.timezone(dt.timedelta(hours=8))
NOW = dt.datetime(2017, 5, 3, 10, 0, tzinfo=SHANGHAI)  # a working morning: no quiet hours
SENDER = "duban@example.org"
ALIYUN_ID, ALIYUN_SECRET, SIGN_NAME = "LTAI5tDubanBenchKey", "aliyun-secret-for-bench-0001", "濮阳督办"
SMS_TEMPLATES = {"overdue_notice": "SMS_000001", "public_criticism": "SMS_000002", "digest": "SMS_000009"}
APPLY_BATCH = 500  # what services/notifier/main.py's consumer fetches per batch
EXPLANATION = "里程碑1.2《建设方案通过评审》完成时限2017年4月30日（遇休息日顺延至2017年5月2日），已逾期1个工作日。"
CITY_PEOPLE = (
    Contact(
        id="city-supervision-bureau",
        name="市委市政府督查局",
        roles=(ContactRole.SUPERVISION_BUREAU,),
        mobile="+8613800000011",
        email="duchaju@example.org",
    ),
    Contact(
        id="city-urban-management-bureau",
        name="市城管综合执法局",
        roles=(ContactRole.CITY_BUREAU,),
        mobile="+8613800000012",
        email="chengguan@example.org",
    ),
)


# ------------------------------------------------------------------------------------------
# the servers' child process: aiosmtpd + an Aliyun-compatible HTTP server, both counting
# ------------------------------------------------------------------------------------------


async def serve_child() -> None:
    from aiohttp import web
    from aiosmtpd.controller import Controller

    counts = {"smtp": 0, "smtp_bytes": 0, "sms": 0}

    class Inbox:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            counts["smtp"] += len(envelope.rcpt_tos)
            counts["smtp_bytes"] += len(envelope.content)
            return "250 OK"

    smtp_port = free_port()
    controller = Controller(Inbox(), hostname="127.0.0.1", port=smtp_port)
    controller.start()

    async def send_sms(request: web.Request) -> web.Response:
        query = request.query
        request_id = str(uuid.uuid4()).upper()
        if query.get("Action") != "SendSms" or not query.get("PhoneNumbers") or not query.get("OutId"):
            return web.json_response(
                {"RequestId": request_id, "Code": "MissingParameter", "Message": "bad"}, status=400
            )
        counts["sms"] += 1
        biz_id = f"{counts['sms']:06d}^{uuid.uuid4().int % 10**10}"
        return web.json_response({"RequestId": request_id, "Code": "OK", "Message": "OK", "BizId": biz_id})

    async def count(_request: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application()
    app.router.add_get("/", send_sms)
    app.router.add_get("/count", count)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    http_port = runner.addresses[0][1]
    print(json.dumps({"smtp_port": smtp_port, "http_port": http_port}), flush=True)
    try:
        await asyncio.Event().wait()  # until terminated
    finally:
        controller.stop()
        await runner.cleanup()


class Servers:
    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.smtp_port = 0
        self.http_port = 0
        self._client = httpx.AsyncClient(trust_env=False)

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, SELF, "--serve-child", stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        ports = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 30))
        self.smtp_port, self.http_port = ports["smtp_port"], ports["http_port"]

    @property
    def sms_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    async def counts(self) -> dict[str, int]:
        response = await self._client.get(f"{self.sms_url}count")
        return dict(response.json())

    async def stop(self) -> None:
        await self._client.aclose()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# ------------------------------------------------------------------------------------------
# CPU accounting (bench process, PostgreSQL cluster, nats-server, the servers' child)
# ------------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime + stime, plus cutime + cstime: what children that have exited (and were reaped) used
    return sum(int(f) for f in fields[11:15]) / _TICK


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        total += _proc_cpu(p)
        stack += _children(p)
    return total


class CpuMeter:
    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids

    def snapshot(self) -> dict[str, float]:
        snap = {name: tree_cpu(pid) for name, pid in self.pids.items()}
        snap["bench"] = time.process_time()
        return snap

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: round(after[k] - before[k], 2) for k in after}


# ------------------------------------------------------------------------------------------
# synthetic programme, directory and actions
# ------------------------------------------------------------------------------------------


def synthetic_directory(programme: Programme) -> Directory:
    """Per county a responsible person and a unit leader (own mobile and e-mail); the two city bureaus."""
    people: list[Contact] = []
    for i, county in enumerate(programme.counties):
        office = f"{county.code}-office"
        people.append(
            Contact(
                id=county.responsible_person.id,
                name=county.responsible_person.name,
                roles=(ContactRole.RESPONSIBLE_PERSON,),
                county_code=county.code,
                mobile=f"+86139{2 * i:08d}",
                email=f"rp.{county.code}@example.org",
                backup=office,
            )
        )
        people.append(
            Contact(
                id=office,
                name=f"{county.name}数字城管建设办公室",
                roles=(ContactRole.UNIT_LEADER,),
                county_code=county.code,
                mobile=f"+86139{2 * i + 1:08d}",
                email=f"office.{county.code}@example.org",
            )
        )
    return Directory(format=DIRECTORY_FORMAT, people=(*people, *CITY_PEOPLE))


def overdue_action(programme_id: str, county_code: str, n: int) -> ActionIssued:
    return ActionIssued(
        action_id=f"{programme_id}:{county_code}:overdue_notice:1.2:bench-{n:06d}",
        level_id="overdue_notice",
        level_name="逾期通知",
        policy_version="2017.1",
        due_on=dt.date(2017, 5, 3),
        addressed=("responsible_person",),
        explanation_zh=EXPLANATION,
        milestone_id="1.2",
        deadline=dt.date(2017, 5, 2),
        workdays=1,
    )


def criticism_action(programme_id: str, county_code: str) -> ActionIssued:
    return ActionIssued(
        action_id=f"{programme_id}:{county_code}:public_criticism:1.2:2017-05-02",
        level_id="public_criticism",
        level_name="通报批评",
        policy_version="2017.1",
        due_on=dt.date(2017, 5, 10),
        addressed=("responsible_person", "unit_leader", "supervision_bureau", "city_bureau"),
        explanation_zh="里程碑1.2《建设方案通过评审》完成时限2017年4月30日（遇休息日顺延至2017年5月2日），"
        "已逾期5个工作日，依照督办办法予以通报批评。",
        milestone_id="1.2",
        deadline=dt.date(2017, 5, 2),
        workdays=5,
        urgent=True,
        confirmed_by="city-operator",
    )


def envelope_bytes(programme_id: str, county_code: str, action: ActionIssued) -> bytes:
    return encode_event(
        EventEnvelope(
            event_id=action.action_id,
            schema_version=EVENT_SCHEMA_VERSIONS["action_issued"],
            programme_id=programme_id,
            county_code=county_code,
            occurred_at=NOW,
            recorded_at=NOW,
            actor=Actor(role="system", user="escalation"),
            submission_id=action.action_id,
            submission_digest="",
            causation_id=action.action_id,
            correlation_id=action.action_id,
            payload=action,
        )
    )


async def publish_all(js: Any, items: Sequence[tuple[str, bytes]], window: int = 500) -> list[tuple[int, bytes]]:
    """Append to the stream (``window`` in flight); returns (stream sequence, data) as the consumer sees them."""
    out: list[tuple[int, bytes]] = []
    for start in range(0, len(items), window):
        chunk = items[start : start + window]
        acks = await asyncio.gather(*(js.publish(subject, data) for subject, data in chunk))
        out += [(ack.seq, data) for ack, (_, data) in zip(acks, chunk, strict=True)]
    return out


# ------------------------------------------------------------------------------------------
# the measured steps
# ------------------------------------------------------------------------------------------


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


async def reset_outbox(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute("TRUNCATE notifier.outbox, notifier.event_outbox, notifier.checkpoint")
        await conn.execute("VACUUM ANALYZE notifier.outbox")


async def outbox_states(pool: asyncpg.Pool) -> dict[str, int]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT channel || ':' || state AS k, count(*) AS n FROM notifier.outbox GROUP BY 1")
    return {r["k"]: int(r["n"]) for r in rows}


async def budget_query_ms(pool: asyncpg.Pool, repeats: int = 20) -> float:
    """What the daily-budget query (``outbox.sms_sent_on``, asked for every row sent) costs now."""
    start, end = NOW.replace(hour=0), NOW.replace(hour=23)
    async with pool.acquire() as conn:
        t0 = time.perf_counter()
        for i in range(repeats):
            await outbox.sms_sent_on(conn, f"p{900000 + i}", start, end)
        return round((time.perf_counter() - t0) / repeats * 1000, 2)


async def apply_all(notifier: Notifier, batch: Sequence[tuple[int, bytes]]) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(batch), APPLY_BATCH):
        await notifier.apply_batch(batch[start : start + APPLY_BATCH])
    return time.perf_counter() - t0


class Profiler:
    def __init__(self, directory: str | None) -> None:
        self.directory = Path(directory) if directory else None

    async def run(self, name: str, func: Callable[[], Awaitable[Any]]) -> Any:
        if self.directory is None:
            return await func()
        from pyinstrument import Profiler as Pyinstrument  # not a project dependency

        self.directory.mkdir(parents=True, exist_ok=True)
        profiler = Pyinstrument(interval=0.001, async_mode="enabled")
        profiler.start()
        try:
            return await func()
        finally:
            profiler.stop()
            (self.directory / f"{name}.txt").write_text(profiler.output_text(unicode=True, show_all=False))
            (self.directory / f"{name}.html").write_text(profiler.output_html())


class Drain(msgspec.Struct, kw_only=True):
    seconds: float
    handled: int
    calls: int
    complete: bool
    first_tenth_per_s: float  # the rate over the first and the last tenth of the rows handled:
    last_tenth_per_s: float  # a drop means the per-row cost grows with the outbox


async def drain_work(notifier: Notifier, max_seconds: float = float("inf")) -> Drain:
    """``work_once()`` (its default limit, as ``send_forever``) until nothing is due (or ``max_seconds``)."""
    t0 = time.perf_counter()
    handled = calls = 0
    progress: list[tuple[float, int]] = [(0.0, 0)]
    complete = True
    while n := await notifier.work_once():
        handled += n
        calls += 1
        progress.append((time.perf_counter() - t0, handled))
        if progress[-1][0] > max_seconds:
            complete = False
            break
    seconds = time.perf_counter() - t0

    def tenth_rate(first: bool) -> float:
        tenth = max(1, handled // 10)
        if first:
            end = next(p for p in progress if p[1] >= tenth)
            return rate(end[1], end[0])
        start = next(p for p in reversed(progress) if p[1] <= handled - tenth)
        return rate(handled - start[1], seconds - start[0])

    return Drain(
        seconds=seconds,
        handled=handled,
        calls=calls,
        complete=complete,
        first_tenth_per_s=round(tenth_rate(True), 1) if handled else float("nan"),
        last_tenth_per_s=round(tenth_rate(False), 1) if handled else float("nan"),
    )


async def drain_publish(notifier: Notifier) -> tuple[float, int]:
    t0 = time.perf_counter()
    published = 0
    while n := await notifier.publish_events():
        published += n
    return time.perf_counter() - t0, published


async def outbox_throughput(
    *,
    kind: str,
    pool: asyncpg.Pool,
    js: Any,
    channel: Channel,
    channel_key: str,
    settings: NotifierSettings,
    programme: Programme,
    directory: Directory,
    messages: int,
    servers: Servers,
    cpu: CpuMeter,
    profiler: Profiler,
    baseline: Callable[[list[OutboundMessage]], Awaitable[Callable[[], Awaitable[float]]]],
) -> dict[str, Any]:
    await reset_outbox(pool)
    clock = SimulatedClock(NOW)
    notifier = Notifier(pool, js, {channel_key: channel}, directory, settings, {programme.id: programme}, clock)
    counties = programme.counties
    items = []
    for n in range(messages):
        county = counties[n % len(counties)]
        action = overdue_action(programme.id, county.code, n)
        items.append((actions_subject(programme.id, county.code), envelope_bytes(programme.id, county.code, action)))
    batch = await publish_all(js, items)
    before = cpu.snapshot()
    t_apply = await apply_all(notifier, batch)
    cpu_apply = CpuMeter.delta(before, cpu.snapshot())
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT message FROM notifier.outbox ORDER BY next_attempt_at, message_id")
    planned = [msgspec.json.decode(r["message"], type=OutboundMessage) for r in rows]

    # Baselines (same messages, same server): the raw protocol client, then the channel alone.
    run_baseline = await baseline(planned)  # prepared outside the timing
    counts0 = await servers.counts()
    before = cpu.snapshot()
    t_raw = await run_baseline()
    cpu_raw = CpuMeter.delta(before, cpu.snapshot())
    before = cpu.snapshot()
    t0 = time.perf_counter()
    channel_results = [await channel.send(m) for m in planned]
    t_channel = time.perf_counter() - t0
    cpu_channel = CpuMeter.delta(before, cpu.snapshot())
    channel_sent = sum(r.sent for r in channel_results)

    # The outbox path.
    counts1 = await servers.counts()
    before = cpu.snapshot()
    drain: Drain = await profiler.run(f"{kind}-work", lambda: drain_work(notifier))
    t_work, handled, calls = drain.seconds, drain.handled, drain.calls
    cpu_work = CpuMeter.delta(before, cpu.snapshot())
    counts2 = await servers.counts()
    t_publish, published = await drain_publish(notifier)
    states = await outbox_states(pool)
    budget_ms = await budget_query_ms(pool)
    server_key = "smtp" if kind == "smtp" else "sms"
    raw_rate = rate(len(planned), t_raw)
    work_rate = rate(handled, t_work)
    return {
        "messages": len(planned),
        "recipients": len({m.recipient_id for m in planned}),
        "apply": {"seconds": round(t_apply, 3), "messages_per_s": round(rate(len(planned), t_apply), 1)},
        "raw": {
            "seconds": round(t_raw, 3),
            "messages_per_s": round(raw_rate, 1),
            "server_received": counts1[server_key] - counts0[server_key] - channel_sent,
        },
        "channel_only": {
            "seconds": round(t_channel, 3),
            "messages_per_s": round(rate(len(planned), t_channel), 1),
            "sent": channel_sent,
            "ratio_to_raw": round(rate(len(planned), t_channel) / raw_rate, 3),
        },
        "outbox": {
            "seconds": round(t_work, 3),
            "handled": handled,
            "work_once_calls": calls,
            "messages_per_s": round(work_rate, 1),
            "first_tenth_per_s": drain.first_tenth_per_s,
            "last_tenth_per_s": drain.last_tenth_per_s,
            "sms_sent_on_ms_at_end": budget_ms,
            "ratio_to_raw": round(work_rate / raw_rate, 3),
            "server_received": counts2[server_key] - counts1[server_key],
            "states": states,
        },
        "publish_events": {
            "seconds": round(t_publish, 3),
            "events": published,
            "events_per_s": round(rate(published, t_publish), 1),
        },
        "outbox_plus_publish_messages_per_s": round(rate(handled, t_work + t_publish), 1),
        "cpu_seconds": {"apply": cpu_apply, "raw": cpu_raw, "channel_only": cpu_channel, "outbox": cpu_work},
    }


async def raw_smtp(port: int, messages: list[OutboundMessage]) -> Callable[[], Awaitable[float]]:
    emails = [build_email(m, sender=SENDER) for m in messages]  # built before timing: raw = the wire only

    async def run() -> float:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=False, start_tls=False)
        t0 = time.perf_counter()
        await smtp.connect()
        for email, message in zip(emails, messages, strict=True):
            await smtp.send_message(email, sender=SENDER, recipients=[message.address])
        elapsed = time.perf_counter() - t0
        await smtp.quit()
        return elapsed

    return run


async def raw_sms(
    url: str, channel: AliyunSmsChannel, messages: list[OutboundMessage]
) -> Callable[[], Awaitable[float]]:
    urls = []
    for m in messages:  # the same signed query the channel sends, built before timing
        params = channel.signed_params(m, m.address.removeprefix("+86"))
        signature = params.pop("Signature")
        urls.append(f"{url}?Signature={percent_encode(signature)}&{canonical_query(params)}")

    async def run() -> float:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
            t0 = time.perf_counter()
            for u in urls:
                response = await client.get(u, headers={"Accept": "application/json"})
                if response.json().get("Code") != "OK":
                    raise RuntimeError(f"raw SMS baseline refused: {response.text[:200]}")
            return time.perf_counter() - t0

    return run


async def raw_file(path: Path, messages: list[OutboundMessage]) -> float:
    """One JSON line + fsync per message, no lock, no dedup: the file channel's floor."""

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            for m in messages:
                os.write(fd, msgspec.json.encode(m) + b"\n")
                os.fsync(fd)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    await asyncio.to_thread(write)
    return time.perf_counter() - t0


async def fanout(
    *,
    name: str,
    pool: asyncpg.Pool,
    js: Any,
    programme: Programme,
    directory: Directory,
    servers: Servers,
    tmp: Path,
    cpu: CpuMeter,
    profiler: Profiler,
    max_seconds: float,
) -> dict[str, Any]:
    await reset_outbox(pool)
    file_path = tmp / f"fanout-{name}.jsonl"
    channels: dict[str, Channel] = {
        "file": FileChannel(file_path),
        "email": SmtpChannel("127.0.0.1", servers.smtp_port, security="none", sender=SENDER),
    }
    settings = NotifierSettings(channels=("file", "email"), quiet_channels=("file",), sms_templates=SMS_TEMPLATES)
    notifier = Notifier(pool, js, channels, directory, settings, {programme.id: programme}, SimulatedClock(NOW))
    items = [
        (
            actions_subject(programme.id, c.code),
            envelope_bytes(programme.id, c.code, criticism_action(programme.id, c.code)),
        )
        for c in programme.counties
    ]
    batch = await publish_all(js, items)
    counts0 = await servers.counts()
    before = cpu.snapshot()
    t_apply = await profiler.run(f"fanout-{name}-apply", lambda: apply_all(notifier, batch))
    cpu_apply = CpuMeter.delta(before, cpu.snapshot())
    before = cpu.snapshot()
    drain: Drain = await profiler.run(f"fanout-{name}-work", lambda: drain_work(notifier, max_seconds))
    t_work, handled, calls = drain.seconds, drain.handled, drain.calls
    cpu_work = CpuMeter.delta(before, cpu.snapshot())
    counts1 = await servers.counts()
    t_publish, published = await drain_publish(notifier)
    states = await outbox_states(pool)
    for channel in channels.values():
        await channel.aclose()
    total = t_apply + t_work
    planned = sum(states.values())
    return {
        "counties": len(programme.counties),
        "people": len(directory.people),
        "planned": planned,
        "messages": handled,
        "complete": drain.complete,
        "first_tenth_per_s": drain.first_tenth_per_s,
        "last_tenth_per_s": drain.last_tenth_per_s,
        "sms_sent_on_ms_at_end": await budget_query_ms(pool),
        "email_received_by_server": counts1["smtp"] - counts0["smtp"],
        "file_lines": len(file_path.read_bytes().splitlines()) if file_path.exists() else 0,
        "states": states,
        "apply_seconds": round(t_apply, 3),
        "work_seconds": round(t_work, 3),
        "work_once_calls": calls,
        "seconds_until_all_sent": round(total, 3) if drain.complete else None,
        "seconds_until_stopped": round(total, 3),
        "messages_per_s": round(rate(handled, total), 1),
        "send_messages_per_s": round(rate(handled, t_work), 1),
        "publish_events": {
            "seconds": round(t_publish, 3),
            "events": published,
            "events_per_s": round(rate(published, t_publish), 1),
        },
        "cpu_seconds": {"apply": cpu_apply, "work": cpu_work},
    }


async def fanout_baseline(servers: Servers, tmp: Path, messages: int) -> dict[str, Any]:
    """The floor for the fan-out's mix (half e-mail, half file): raw SMTP + raw fsync'd lines."""
    programme = synthetic_programme(max(1, messages // 2))
    directory = synthetic_directory(programme)
    settings = NotifierSettings(channels=("email",))
    from services.notifier.planning import plan

    msgs: list[OutboundMessage] = []
    for c in programme.counties:
        msgs += plan(overdue_action(programme.id, c.code, 0), programme.id, c.code, c.name, directory, settings)
    t_smtp = await (await raw_smtp(servers.smtp_port, msgs))()
    t_file = await raw_file(tmp / "raw-file.jsonl", msgs)
    return {
        "messages": 2 * len(msgs),
        "seconds": round(t_smtp + t_file, 3),
        "messages_per_s": round(rate(2 * len(msgs), t_smtp + t_file), 1),
        "smtp_messages_per_s": round(rate(len(msgs), t_smtp), 1),
        "file_messages_per_s": round(rate(len(msgs), t_file), 1),
    }


# ------------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = run_header(args, exclude=("json", "serve_child"))
    tmp = Path(tempfile.mkdtemp(prefix="duban-bench-notifier-", dir=args.tmpdir))
    log_file = (tmp / "notifier.log").open("w", encoding="utf-8")
    configure_logging("json", args.log_level)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=log_file))
    for handler in logging.getLogger().handlers:  # stdlib loggers (httpx, asyncpg, nats) too
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(log_file)
    nats_server = EmbeddedNats(tmp / "nats", server_name="duban-bench-notifier")
    pg = EmbeddedPostgres(tmp / "postgres", durable=True)
    servers = Servers()
    nc: Any = None
    pool: asyncpg.Pool | None = None
    try:
        await asyncio.gather(nats_server.start(), pg.start(), servers.start())
        pg_proc = getattr(pg, "_proc", None)
        cpu = CpuMeter(
            {
                "postgres": pg_proc.pid if pg_proc is not None else None,
                "nats": nats_server.pid,
                "servers": servers.proc.pid if servers.proc else None,
            }
        )
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await ensure_streams(js)
        pool = await create_pool(pg.dsn, min_size=2, max_size=5)
        async with pool.acquire() as conn:
            await outbox.migrate(conn)
            if args.budget_index:  # a what-if in this bench's own database: not the shipped schema
                await conn.execute(
                    "CREATE INDEX bench_outbox_budget ON notifier.outbox (recipient_id, sent_at)"
                    " WHERE channel = 'sms' AND state = 'sent'"
                )
            results["postgres"] = {
                "version": await conn.fetchval("SHOW server_version"),
                "fsync": await conn.fetchval("SHOW fsync"),
                "synchronous_commit": await conn.fetchval("SHOW synchronous_commit"),
            }
        profiler = Profiler(args.profile)

        # Enough recipients that nobody gets more than a few SMS (the daily budget is 10).
        units = max(args.counties, -(-args.messages // 3))
        programme = synthetic_programme(units)
        directory = synthetic_directory(programme)
        results["synthetic"] = {"counties": units, "people": len(directory.people)}

        if "smtp" in args.parts:
            print(f"[1] outbox → SMTP, {args.messages} messages …", file=sys.stderr, flush=True)
            smtp = SmtpChannel("127.0.0.1", servers.smtp_port, security="none", sender=SENDER)
            try:
                results["smtp"] = await outbox_throughput(
                    kind="smtp",
                    pool=pool,
                    js=js,
                    channel=smtp,
                    channel_key="email",
                    settings=NotifierSettings(channels=("email",)),
                    programme=programme,
                    directory=directory,
                    messages=args.messages,
                    servers=servers,
                    cpu=cpu,
                    profiler=profiler,
                    baseline=lambda msgs: raw_smtp(servers.smtp_port, msgs),
                )
            finally:
                await smtp.aclose()

        if "sms" in args.parts:
            print(f"[2] outbox → SMS (Aliyun), {args.messages} messages …", file=sys.stderr, flush=True)
            sms = AliyunSmsChannel(ALIYUN_ID, Secret(ALIYUN_SECRET), SIGN_NAME, endpoint=servers.sms_url)
            try:
                results["sms"] = await outbox_throughput(
                    kind="sms",
                    pool=pool,
                    js=js,
                    channel=sms,
                    channel_key="sms",
                    settings=NotifierSettings(channels=("sms",), sms_templates=SMS_TEMPLATES),
                    programme=programme,
                    directory=directory,
                    messages=args.messages,
                    servers=servers,
                    cpu=cpu,
                    profiler=profiler,
                    baseline=lambda msgs: raw_sms(servers.sms_url, sms, msgs),
                )
            finally:
                await sms.aclose()

        if "fanout" in args.parts:
            shipped = load_default_programme()
            print("[3] fan-out of 通报批评: shipped programme …", file=sys.stderr, flush=True)
            results["fanout_shipped"] = await fanout(
                name="shipped",
                pool=pool,
                js=js,
                programme=shipped,
                directory=load_directory(example_directory_path(), shipped),
                servers=servers,
                tmp=tmp,
                cpu=cpu,
                profiler=profiler,
                max_seconds=args.fanout_max_seconds,
            )
            if args.fanout_counties:
                big = synthetic_programme(args.fanout_counties)
                print(f"[3] fan-out of 通报批评: {args.fanout_counties} counties …", file=sys.stderr, flush=True)
                results["fanout_synthetic"] = await fanout(
                    name="synthetic",
                    pool=pool,
                    js=js,
                    programme=big,
                    directory=synthetic_directory(big),
                    servers=servers,
                    tmp=tmp,
                    cpu=cpu,
                    profiler=profiler,
                    max_seconds=args.fanout_max_seconds,
                )
                n = results["fanout_synthetic"]["messages"]
                base = await fanout_baseline(servers, tmp, min(n, 4000))  # a rate: 4,000 are plenty
                results["fanout_baseline"] = base
                results["fanout_synthetic"]["ratio_to_raw"] = round(
                    results["fanout_synthetic"]["messages_per_s"] / base["messages_per_s"], 3
                )
        results["log_lines"] = sum(1 for _ in (tmp / "notifier.log").open("rb"))
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        if pool is not None:
            await pool.close()
        await servers.stop()
        await nats_server.stop()
        await pg.stop()
        log_file.close()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            with contextlib.suppress(Exception):
                await pg.destroy()
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def render_table(r: dict[str, Any]) -> str:
    what_if = " — WHAT-IF: --budget-index (not the shipped schema)" if r["args"].get("budget_index") else ""
    lines = [
        f"Notifier bench {r['date']} ({r['machine']['cpus']} CPUs, Python {r['machine']['python']}){what_if}",
        "",
        f"| {'measure':<66} | {'figure':>20} | {'ratio':>7} |",
        f"|{'-' * 68}|{'-' * 22}:|{'-' * 8}:|",
    ]

    def row(label: str, figure: str, ratio: str = "") -> None:
        lines.append(f"| {label:<66} | {figure:>20} | {ratio:>7} |")

    for key, title in (("smtp", "SMTP"), ("sms", "Aliyun SMS")):
        part = r.get(key)
        if not part:
            continue
        n = part["messages"]
        row(
            f"{title}: raw client, {n:,} msgs, one connection (baseline)",
            f"{part['raw']['messages_per_s']:,.0f} msg/s",
            "1.00",
        )
        row(
            f"{title}: channel.send alone",
            f"{part['channel_only']['messages_per_s']:,.0f} msg/s",
            f"{part['channel_only']['ratio_to_raw']:.3f}",
        )
        row(
            f"{title}: outbox, work_once drained ({part['recipients']:,} recipients)",
            f"{part['outbox']['messages_per_s']:,.0f} msg/s",
            f"{part['outbox']['ratio_to_raw']:.3f}",
        )
        row(
            f"{title}: work_once rate, first / last tenth of rows",
            f"{part['outbox']['first_tenth_per_s']:,.0f} / {part['outbox']['last_tenth_per_s']:,.0f}",
        )
        row(f"{title}: budget query (sms_sent_on) at the end", f"{part['outbox']['sms_sent_on_ms_at_end']:.2f} ms")
        row(f"{title}: apply_batch (plan + enqueue)", f"{part['apply']['messages_per_s']:,.0f} msg/s")
        row(f"{title}: publish_events afterwards", f"{part['publish_events']['events_per_s']:,.0f} ev/s")
        row(
            f"{title}: work_once + publish_events",
            f"{part['outbox_plus_publish_messages_per_s']:,.0f} msg/s",
            f"{part['outbox_plus_publish_messages_per_s'] / part['raw']['messages_per_s']:.3f}",
        )
    for key in ("fanout_shipped", "fanout_synthetic"):
        part = r.get(key)
        if not part:
            continue
        if part["complete"]:
            label = f"fan-out 通报批评, {part['counties']:,} counties: {part['planned']:,} msgs, all sent in"
            figure = f"{part['seconds_until_all_sent']:.2f} s"
        else:
            label = (
                f"fan-out 通报批评, {part['counties']:,} counties: {part['messages']:,} of {part['planned']:,} sent in"
            )
            figure = f"{part['seconds_until_stopped']:.2f} s (cut)"
        row(label, figure)
        row("  of which apply_batch / work_once", f"{part['apply_seconds']:.2f} / {part['work_seconds']:.2f} s")
        row(
            "  messages/s, apply start → last sent",
            f"{part['messages_per_s']:,.0f} msg/s",
            f"{part['ratio_to_raw']:.3f}" if "ratio_to_raw" in part else "",
        )
        row(
            "  work_once rate, first / last tenth of rows",
            f"{part['first_tenth_per_s']:,.0f} / {part['last_tenth_per_s']:,.0f}",
        )
        row("  budget query (sms_sent_on) at the end", f"{part['sms_sent_on_ms_at_end']:.2f} ms")
        row("  publish_events afterwards", f"{part['publish_events']['seconds']:.2f} s")
    if r.get("fanout_baseline"):
        b = r["fanout_baseline"]
        row(
            f"fan-out floor: raw SMTP + raw fsync'd lines, {b['messages']:,} msgs (baseline)",
            f"{b['messages_per_s']:,.0f} msg/s",
            "1.00",
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=5000, help="messages for parts 1 and 2 (default 5,000)")
    p.add_argument("--counties", type=int, default=2844, help="synthetic counties (recipients) for parts 1 and 2")
    p.add_argument("--fanout-counties", type=int, default=2844, help="synthetic counties for part 3 (0: skip)")
    p.add_argument(
        "--fanout-max-seconds",
        type=float,
        default=150.0,
        help="stop draining a fan-out after this (reported as incomplete, with its rate); default 150",
    )
    p.add_argument(
        "--budget-index",
        action="store_true",
        help="what-if: add a partial index for the daily-budget query to the bench's own database",
    )
    p.add_argument(
        "--parts",
        type=lambda s: [x for x in s.split(",") if x],
        default=["smtp", "sms", "fanout"],
        help="comma-separated parts to run: smtp,sms,fanout (default all)",
    )
    p.add_argument("--log-level", default="info", help="the service's log level (output goes to a file)")
    p.add_argument("--profile", metavar="DIR", help="pyinstrument profiles of the outbox drains into DIR")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON to FILE (always printed at the end)")
    p.add_argument("--tmpdir", help="parent of the temporary directory (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve-child"]:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_child())
        return 0
    args = parse_args(argv)
    results = asyncio.run(bench(args))
    print_results(render_table(results), results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
