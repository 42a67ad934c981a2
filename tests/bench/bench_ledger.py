#!/usr/bin/env python
"""Ledger benchmark: append, raw consume, rebuild, catch-up as the ledger starts, append→queryable lag.

A program, not a pytest test::

    .venv/bin/python tests/bench/bench_ledger.py --events 20000          # quick check (~1 min)
    .venv/bin/python tests/bench/bench_ledger.py --events 1000000 --json /tmp/bench.json

It starts its own nats-server (JetStream, file store, ``sync_interval: always``) and PostgreSQL
(``durable=True``: fsync and synchronous_commit on) in a temporary directory that is removed at
the end, generates N valid events for U synthetic counties (histories with progress reports,
completions with evidence, review requests and decisions, monthly progress tables, extensions,
a few procedure findings and retractions), appends them, and measures:

1. append rate (core publish with a reply inbox, acks gathered in windows);
2. baselines in the same run: nats-py's ordered consumer reading every message and doing nothing
   (callback and ``next_msg`` variants), the same plus ``decode_event`` (and the rebuild's
   ``decode_stored_event``) of each envelope, and the
   ledger's own ``read_stream`` iterated with no database;
3. the ledger's rebuild (``services.ledger.consumer.rebuild``) after ``migrate()``: events/s, ratio to the raw
   rate, peak RSS during it (and the delta over the RSS before it), CPU seconds of this process,
   PostgreSQL and nats-server, and the table sizes after; then again replacing the read model,
   into an empty one with the retractions read ahead instead of from the retraction index, and
   the completion of a retraction index created after the events were stored (as the
   submissions service does when it starts on such a stream);
4. catch-up as the ledger starts: read model truncated, ``supervise_live`` from sequence 1 until
   the checkpoint reaches the end. An empty read model is filled by a rebuild
   (``services.ledger.consumer.rebuild_to_catch_up``), then the live consumer follows;
5. append→queryable lag at steady rates with ``supervise_live`` running (per-batch transactions
   on the durable pull consumer): for each event, publish ack →
   checkpoint ≥ its sequence (p50/p95/p99/max).

Throughput on these machines drifts by up to 60% between runs: compare the RATIOS.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import datetime as dt
import gc
import hashlib
import json
import os
import pickle
import random
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import nats  # noqa: E402
from nats.aio.client import Client as NatsClient  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402
from nats.js.api import DeliverPolicy  # noqa: E402

from contracts.events import (  # noqa: E402
    EVENT_SCHEMA_VERSIONS,
    Actor,
    EventEnvelope,
    EventPayload,
    ExtensionDecided,
    ExtensionRequested,
    IndexedRetraction,
    MilestoneCompleted,
    ProcedureFindingRecorded,
    ProgressReported,
    ProgressTableFiled,
    ReviewDecided,
    ReviewRequested,
    SubmissionRetracted,
    TrialOperationStarted,
    decode_event,
    decode_stored_event,
    encode_event,
    event_type_of,
)
from contracts.payloads import Document, ExtensionOutcome, ProgressTableLine, ReviewOutcome  # noqa: E402
from contracts.programme import Decider, Programme  # noqa: E402
from contracts.subjects import (  # noqa: E402
    EVENT_TYPE_HEADER,
    EVENTS_ALL,
    EVENTS_STREAM,
    RETRACTIONS_STREAM,
    aggregate_subject,
)
from services.common.jetstream import (  # noqa: E402
    complete_retraction_index,
    ensure_streams,
    index_retractions,
    indexed_retractions,
)
from services.common.postgres import create_pool  # noqa: E402
from services.ledger.consumer import read_stream, supervise_live  # noqa: E402
from services.ledger.consumer import rebuild as rebuild_from_stream  # noqa: E402
from services.ledger.projection import READ_MODEL_TABLES, LedgerProjection, migrate  # noqa: E402
from tests.bench.synthetic import (  # noqa: E402
    bench_servers,
    log,
    run_benchmark,
    run_header,
    synthetic_programme,
    tear_down,
)
from tests.harness import declare_streams  # noqa: E402

CST = dt.timezone(dt.timedelta(hours=8))
PROGRAMME_START = dt.datetime(2017, 3, 1, 9, 0, tzinfo=CST)
PROGRAMME_END = dt.datetime(2018, 10, 31, 17, 0, tzinfo=CST)

GOAL_RATIO = 0.50  # rebuild ≥ 50% of the raw consume rate
GOAL_SECONDS_PER_MILLION = 60.0  # 1M events rebuilt in under a minute


# ------------------------------------------------------------------------------------------
# synthetic programme and histories
# ------------------------------------------------------------------------------------------


def _period(day: dt.date) -> str:
    return f"{day.year:04d}-{day.month:02d}"


def _previous_period(day: dt.date) -> str:
    first = day.replace(day=1) - dt.timedelta(days=1)
    return _period(first)


NOTES = ("按计划推进", "正在协调资金", "已召开推进会", "设备到货安装中", "方案修改完善中", "")
ZERO_HASH = "0" * 64


class Unit:
    """One county's history: a little state machine producing the next event on demand."""

    def __init__(self, programme: Programme, code: str, budget: int, seed: int, rates: Rates) -> None:
        self.programme = programme
        self.code = code
        self.subject = aggregate_subject(programme.id, code)
        self.budget = max(1, budget)
        self.rng = random.Random(seed)
        self.rates = rates
        self.k = 0
        self.queue: collections.deque[tuple[EventPayload, str, bool]] = collections.deque()
        self.milestones = sorted(programme.milestones, key=lambda m: m.deadline)
        self.active = 0
        self.percent = {m.id: 0 for m in programme.milestones}
        self.lateness = dt.timedelta(days=self.rng.randint(-20, 40))
        self.filed: set[str] = set()
        self.progress_submissions: list[str] = []
        self.retracted: set[str] = set()
        self.last_submission = ""
        self.last_index = 0
        self.last_event_id = ""
        self.county_actor = Actor(role="county", county_code=code, user=f"sys-{code}")

    def when(self) -> dt.datetime:
        t = min(1.0, (self.k + self.rng.random()) / self.budget)
        return PROGRAMME_START + (PROGRAMME_END - PROGRAMME_START) * t

    def next_envelope(self) -> EventEnvelope:
        occurred = self.when()
        if not self.queue:
            self._plan(occurred.date())
        payload, role, follow_up = self.queue.popleft()
        if follow_up and self.last_submission:  # a further event of the previous decision
            submission_id, index = self.last_submission, self.last_index + 1
        else:
            submission_id, index = f"{self.code}-{self.k:07d}", 0
            self.last_submission = submission_id
        self.last_index = index
        self.k += 1
        if isinstance(payload, ProgressReported):
            self.progress_submissions.append(submission_id)
        event_type = event_type_of(payload)
        event_id = f"{submission_id}/{index}"
        self.last_event_id = event_id
        actor = self.county_actor if role == "county" else Actor(role=role, user=f"{role}-operator")
        return EventEnvelope(
            event_id=event_id,
            schema_version=EVENT_SCHEMA_VERSIONS[event_type],
            programme_id=self.programme.id,
            county_code=self.code,
            occurred_at=occurred,
            recorded_at=occurred + dt.timedelta(seconds=1 + self.rng.random()),
            actor=actor,
            submission_id=submission_id,
            submission_digest=hashlib.sha256(submission_id.encode()).hexdigest(),
            causation_id=submission_id,
            correlation_id=submission_id,
            payload=payload,
        )

    # -- planning ------------------------------------------------------------------------
    def _plan(self, day: dt.date) -> None:
        rng, q = self.rng, self.queue
        if self.active < len(self.milestones):
            m = self.milestones[self.active]
            if day > m.deadline + self.lateness:
                self._complete(m, day)
                self.active += 1
                return
        period = _previous_period(day)
        table = self.programme.progress_table
        if table.first_period <= period <= table.last_period and period not in self.filed:
            self.filed.add(period)
            lines = tuple(
                ProgressTableLine(milestone_id=mid, percent=pct, note=rng.choice(NOTES))
                for mid, pct in self.percent.items()
            )
            q.append((ProgressTableFiled(period=period, lines=lines), "county", False))
            return
        r = rng.random()
        current = self.milestones[min(self.active, len(self.milestones) - 1)]
        rates = self.rates
        if r < rates.finding and self.last_event_id:
            rule = rng.choice(self.programme.rules)
            q.append(
                (
                    ProcedureFindingRecorded(
                        rule_id=rule.id,
                        trigger_event_id=self.last_event_id,
                        finding_zh=rule.finding_zh,
                        finding_en=rule.finding_en,
                        milestone_id=current.id,
                        detail="synthetic",
                    ),
                    "system",
                    True,
                )
            )
            return
        r -= rates.finding
        if r < rates.retraction and self.progress_submissions:
            target = rng.choice(self.progress_submissions[-20:])
            if target not in self.retracted:
                self.retracted.add(target)
                q.append(
                    (SubmissionRetracted(retracted_submission_id=target, reason="填报有误，撤回"), "county", False)
                )
                return
        r -= rates.retraction
        if r < rates.extension:
            proposed = current.deadline + dt.timedelta(days=30)
            q.append(
                (
                    ExtensionRequested(milestone_id=current.id, proposed_deadline=proposed, reason="资金未到位"),
                    "county",
                    False,
                )
            )
            granted = rng.random() < 0.5
            q.append(
                (
                    ExtensionDecided(
                        milestone_id=current.id,
                        outcome=ExtensionOutcome.GRANTED if granted else ExtensionOutcome.REFUSED,
                        new_deadline=proposed if granted else None,
                        reason="同意" if granted else "不予批准",
                    ),
                    "city",
                    False,
                )
            )
            return
        pct = min(99, self.percent[current.id] + rng.randint(1, 6))
        self.percent[current.id] = pct
        steps = tuple(s.id for s in current.steps[: len(current.steps) * pct // 100])
        q.append(
            (
                ProgressReported(milestone_id=current.id, percent=pct, note=rng.choice(NOTES), steps_done=steps),
                "county",
                False,
            )
        )

    def _complete(self, m: Any, day: dt.date) -> None:
        rng, q = self.rng, self.queue
        self.percent[m.id] = 100
        q.append(
            (
                ProgressReported(
                    milestone_id=m.id, percent=100, note="已完成", steps_done=tuple(s.id for s in m.steps)
                ),
                "county",
                False,
            )
        )
        reviews = [r for r in self.programme.reviews if r.milestone == m.id]
        completing = m.completed_by.removeprefix("review:") if m.completed_by.startswith("review:") else None
        reviews.sort(key=lambda r: r.kind == completing)  # the completing review last
        for review in reviews:
            decider = "county" if review.decided_by is Decider.NONE else review.decided_by.value
            documents = (self._document(m.id, "申请材料", 0),)
            q.append((ReviewRequested(review_kind=review.kind, documents=documents), "county", False))
            if rng.random() < 0.2:  # returned with comments once, then asked again
                q.append(
                    (
                        ReviewDecided(
                            review_kind=review.kind,
                            outcome=ReviewOutcome.RETURNED,
                            decided_on=day,
                            comments="请补充材料后重新报送",
                        ),
                        decider,
                        False,
                    )
                )
                q.append((ReviewRequested(review_kind=review.kind, documents=documents), "county", False))
            q.append(
                (
                    ReviewDecided(
                        review_kind=review.kind,
                        outcome=ReviewOutcome.PASSED,
                        decided_on=day,
                        approval_document_number=f"豫审〔{day.year}〕{rng.randint(1, 999)}号",
                    ),
                    decider,
                    False,
                )
            )
        if m.completed_by == "trial_operation_started":
            q.append((TrialOperationStarted(started_on=day, note="系统上线试运行"), "county", False))
        evidence = tuple(self._document(m.id, "完成证明", i) for i in range(rng.randint(1, 3)))
        via = m.completed_by if m.completed_by != "county" else "county"
        role = "county" if via == "county" else "system"
        q.append((MilestoneCompleted(milestone_id=m.id, completed_on=day, evidence=evidence, via=via), role, False))

    def _document(self, milestone_id: str, what: str, i: int) -> Document:
        n = self.rng.randint(1, 999)
        return Document(
            title=f"{milestone_id} {what} {i + 1}",
            number=f"濮政办〔2017〕{n}号",
            sha256=hashlib.sha256(f"{self.code}{milestone_id}{what}{i}{n}".encode()).hexdigest(),
            url=f"https://docs.example.cn/{self.code}/{milestone_id}/{n}.pdf",
        )


@dataclass(frozen=True)
class Rates:
    finding: float = 0.004
    retraction: float = 0.002
    extension: float = 0.004


class EventSource:
    """Interleaved histories of all units: round r gives each unit (in random order) its r-th event."""

    def __init__(self, programme: Programme, events: int, seed: int, rates: Rates) -> None:
        units = len(programme.counties)
        base, extra = divmod(events, units)
        self.units = [
            Unit(programme, c.code, base + (1 if i < extra else 0), seed * 1_000_003 + i, rates)
            for i, c in enumerate(programme.counties)
        ]
        self.rng = random.Random(seed)
        self.total = events
        self.produced = 0
        self._round: list[Unit] = []
        self._round_no = 0
        self.type_counts: collections.Counter[str] = collections.Counter()
        self.bytes = 0

    def _next_unit(self) -> Unit:
        while not self._round:
            if self.produced >= self.total:  # after the bulk: random units, steady traffic
                return self.rng.choice(self.units)
            self._round = [u for u in self.units if u.k < u.budget]
            self.rng.shuffle(self._round)
            self._round_no += 1
        return self._round.pop()

    def chunk(self, n: int) -> list[tuple[str, bytes, dict[str, str], str]]:
        out = []
        for _ in range(n):
            unit = self._next_unit()
            envelope = unit.next_envelope()
            data = encode_event(envelope)
            event_type = envelope.event_type
            self.type_counts[event_type] += 1
            self.bytes += len(data)
            self.produced += 1
            out.append(
                (
                    unit.subject,
                    data,
                    {"Nats-Msg-Id": envelope.event_id, EVENT_TYPE_HEADER: event_type},
                    event_type,
                )
            )
        return out


# ------------------------------------------------------------------------------------------
# measuring helpers
# ------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")
NATS_ERRORS: dict[str, int] = {}  # errors reported to the connection's error callback, by type


def nats_errors_since(before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in NATS_ERRORS.items() if v - before.get(k, 0)}


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, cpu seconds) of a process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu(root_pid: int | None) -> float:
    """CPU seconds of a process and its live children (PostgreSQL backends are children)."""
    if root_pid is None:
        return 0.0
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        st = _stat(pid)
        if st is None:
            continue
        ppid, cpu = st
        if pid == root_pid or ppid == root_pid:
            total += cpu
    return total


def vm_field(name: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Phase:
    """Wall time and CPU seconds of this process, PostgreSQL and nats-server over one phase."""

    def __init__(self, pg_pid: int | None, nats_pid: int | None) -> None:
        self.pg_pid, self.nats_pid = pg_pid, nats_pid

    def __enter__(self) -> Phase:
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.pg0 = tree_cpu(self.pg_pid)
        self.nats0 = tree_cpu(self.nats_pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu = {
            "bench_process_s": round(time.process_time() - self.cpu0, 2),
            "postgres_s": round(tree_cpu(self.pg_pid) - self.pg0, 2),
            "nats_server_s": round(tree_cpu(self.nats_pid) - self.nats0, 2),
        }


class RssSampler:
    """Samples VmRSS every ``interval`` seconds in a side task; keeps the maximum."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.max = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.max = max(self.max, vm_field("VmRSS"))
            await asyncio.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.max = vm_field("VmRSS")
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.max = max(self.max, vm_field("VmRSS"))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def mib(n: int | float) -> float:
    return round(n / (1024 * 1024), 1)


# ------------------------------------------------------------------------------------------
# phases
# ------------------------------------------------------------------------------------------


RETRACTED = str(SubmissionRetracted.__struct_config__.tag)  # its event type


async def bulk_append(nc: NatsClient, source: EventSource, n: int, window: int, chunk: int) -> dict[str, Any]:
    """Core publishes with a reply inbox; at most ``window`` unacknowledged; acks counted. Then
    the retractions go into the retraction index, as the submissions service adds each one it
    stores (their sequences follow from the order published, when every event was stored once)."""
    js = nc.jetstream()
    start = (await js.stream_info(EVENTS_STREAM)).state.last_seq + 1
    retractions: list[tuple[int, bytes]] = []  # (sequence if all is stored once, data)
    inbox = nc.new_inbox()
    state: dict[str, Any] = {"outstanding": 0, "acked": 0, "errors": 0, "duplicates": 0, "first_error": ""}
    room = asyncio.Event()
    low = window // 2

    async def on_ack(msg: Msg) -> None:
        data = msg.data
        if b'"error"' in data or (msg.headers and msg.headers.get("Status")):
            state["errors"] += 1
            if not state["first_error"]:
                state["first_error"] = data.decode(errors="replace")[:300] or str(msg.headers)
        elif b'"duplicate"' in data:
            state["duplicates"] += 1
        state["acked"] += 1
        state["outstanding"] -= 1
        if state["outstanding"] <= low:
            room.set()

    sub = await nc.subscribe(inbox, cb=on_ack, pending_msgs_limit=window * 4)
    gen_seconds = 0.0
    published = 0
    t0 = time.perf_counter()
    while published < n:
        g0 = time.perf_counter()
        items = source.chunk(min(chunk, n - published))
        gen_seconds += time.perf_counter() - g0
        for number, (subject, data, headers, event_type) in enumerate(items, start=start + published):
            while state["outstanding"] >= window:
                room.clear()
                await room.wait()
            state["outstanding"] += 1
            await nc.publish(subject, data, reply=inbox, headers=headers)
            if event_type == RETRACTED:
                retractions.append((number, data))
        published += len(items)
        del items
    await nc.flush()
    deadline = time.monotonic() + 120
    while state["outstanding"] > 0 and time.monotonic() < deadline:
        room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(room.wait(), 1.0)
        if state["outstanding"] <= low:
            await asyncio.sleep(0.01)
    seconds = time.perf_counter() - t0
    await sub.unsubscribe()
    indexed = 0
    if state["acked"] == n and not state["errors"] and not state["duplicates"]:
        indexed = await index_retractions(js, [(decode_event(data), sequence) for sequence, data in retractions])
    publish_seconds = seconds - gen_seconds
    return {
        "events": n,
        "acked": state["acked"],
        "errors": state["errors"],
        "duplicates": state["duplicates"],
        "first_error": state["first_error"],
        "seconds_total": round(seconds, 2),
        "generation_seconds": round(gen_seconds, 2),
        "publish_seconds": round(publish_seconds, 2),
        "events_per_s_incl_generation": round(n / seconds),
        "events_per_s_publish_only": round(n / publish_seconds) if publish_seconds > 0 else None,
        "window": window,
        "retractions_indexed": indexed,
    }


async def raw_consume_cb(
    js: JetStreamContext, n: int, decode: bool, decoder: Callable[[bytes], object] = decode_event
) -> float:
    """Ordered push consumer with a callback that does nothing (or only decodes); seconds for n."""
    done = asyncio.Event()
    count = 0

    async def handler(msg: Msg) -> None:
        nonlocal count
        if decode:
            decoder(msg.data)
        count += 1
        if count >= n:
            done.set()

    t0 = time.perf_counter()
    sub = await js.subscribe(EVENTS_ALL, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, cb=handler)
    try:
        await asyncio.wait_for(done.wait(), timeout=max(60.0, n / 2000))
    finally:
        seconds = time.perf_counter() - t0
        await sub.unsubscribe()
    return seconds


async def raw_consume_next(js: JetStreamContext, n: int, batch_size: int = 5000) -> float:
    """Ordered consumer read with next_msg, as read_stream does, keeping only msg.data."""
    t0 = time.perf_counter()
    sub = await js.subscribe(
        EVENTS_ALL, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, pending_msgs_limit=batch_size * 4
    )
    try:
        for _ in range(n):
            msg = await sub.next_msg(timeout=10)
            msg.data  # noqa: B018
    finally:
        seconds = time.perf_counter() - t0
        await sub.unsubscribe()
    return seconds


async def read_stream_only(js: JetStreamContext) -> tuple[float, int]:
    t0 = time.perf_counter()
    count = 0
    async for batch in read_stream(js):
        count += len(batch)
    return time.perf_counter() - t0, count


async def table_sizes(pool: asyncpg.Pool) -> dict[str, dict[str, Any]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT c.relname, pg_total_relation_size(c.oid) AS total, pg_relation_size(c.oid) AS heap,"
            " pg_indexes_size(c.oid) AS indexes FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'ledger' AND c.relkind = 'r' ORDER BY total DESC"
        )
        out = {}
        for r in rows:
            count = await conn.fetchval(f"SELECT count(*) FROM ledger.{r['relname']}")
            out[r["relname"]] = {
                "rows": count,
                "total_mib": mib(r["total"]),
                "heap_mib": mib(r["heap"]),
                "indexes_mib": mib(r["indexes"]),
            }
    return out


async def read_model_digest(pool: asyncpg.Pool) -> dict[str, Any]:
    """Digests of the read model, to compare rebuild with live processing."""
    async with pool.acquire() as conn:
        return {
            # Not county_state.revision: which write a row came from differs between live and rebuilt.
            "county_state": await conn.fetchval(
                "SELECT md5(string_agg(programme_id || county_code || last_sequence || state::text, ','"
                " ORDER BY programme_id, county_code)) FROM ledger.county_state"
            ),
            "milestones": await conn.fetchval(
                "SELECT md5(string_agg(m::text, ',' ORDER BY programme_id, county_code, milestone_id))"
                " FROM ledger.milestones m"
            ),
            "event_log_rows": await conn.fetchval("SELECT count(*) FROM ledger.event_log"),
            "parked_rows": await conn.fetchval("SELECT count(*) FROM ledger.parked"),
            "checkpoint": await conn.fetchval("SELECT last_sequence FROM ledger.checkpoint WHERE projection='ledger'"),
        }


async def truncate_read_model(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute("TRUNCATE " + ", ".join(f"ledger.{t}" for t in READ_MODEL_TABLES))


@dataclass
class LiveLedger:
    stop: asyncio.Event
    task: asyncio.Task[None]
    applied: asyncio.Condition


def start_live(js: JetStreamContext, projection: LedgerProjection) -> LiveLedger:
    stop = asyncio.Event()
    applied = asyncio.Condition()
    # The live path as the ledger runs it; the condition is never signalled, so waits poll.
    task = asyncio.get_running_loop().create_task(supervise_live(js, projection, stop))
    return LiveLedger(stop, task, applied)


async def stop_live(live: LiveLedger) -> None:
    live.stop.set()
    try:
        await asyncio.wait_for(live.task, 15)
    except (TimeoutError, asyncio.CancelledError):
        live.task.cancel()
        with contextlib.suppress(BaseException):
            await live.task


async def live_catchup(
    js: JetStreamContext, pool: asyncpg.Pool, projection: LedgerProjection, last_seq: int, max_seconds: float
) -> tuple[dict[str, Any], LiveLedger]:
    await truncate_read_model(pool)
    live = start_live(js, projection)
    t0 = time.perf_counter()
    checkpoint = 0
    progress: list[tuple[float, int]] = []
    async with pool.acquire() as conn:
        while True:
            checkpoint = int(await conn.fetchval("SELECT coalesce(max(last_sequence), 0) FROM ledger.checkpoint") or 0)
            elapsed = time.perf_counter() - t0
            if not progress or elapsed - progress[-1][0] >= 10:
                progress.append((elapsed, checkpoint))
            if checkpoint >= last_seq or elapsed > max_seconds or live.task.done():
                break
            await asyncio.sleep(0.05)
    seconds = time.perf_counter() - t0
    if live.task.done() and live.task.exception():
        raise RuntimeError("the live consumer failed") from live.task.exception()
    return (
        {
            "finished": checkpoint >= last_seq,
            "events_applied": checkpoint,
            "seconds": round(seconds, 2),
            "events_per_s": round(checkpoint / seconds) if seconds else None,
            "progress_every_10s": [(round(t, 1), c) for t, c in progress],
        },
        live,
    )


async def steady_lag(
    js: JetStreamContext,
    pool: asyncpg.Pool,
    source: EventSource,
    live: LiveLedger,
    nats_url: str,
    rate: float,
    seconds: float,
    poll_interval: float,
    workdir: Path,
) -> dict[str, Any]:
    """Publish at ``rate``/s for ``seconds`` from a separate process (its own event loop, as a
    real publisher would be); here, record when each checkpoint value became visible. Per
    event: publish ack → first observed checkpoint ≥ its sequence.

    Both processes use time.perf_counter (CLOCK_MONOTONIC: one clock for the whole machine).
    """
    n = int(rate * seconds)
    items = [(subject, data, headers) for subject, data, headers, _ in source.chunk(n)]
    job = workdir / f"lag-{rate:g}.pickle"
    out = workdir / f"lag-{rate:g}.json"
    job.write_bytes(pickle.dumps({"url": nats_url, "rate": rate, "items": items}))
    del items
    timeline: list[tuple[float, int]] = []  # (observed at, checkpoint), checkpoint non-decreasing
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).resolve()),  # noqa: ASYNC240
        "--lag-child",
        str(job),
        str(out),
    )
    async with pool.acquire() as conn:

        async def observe() -> int:
            checkpoint = int(await conn.fetchval("SELECT coalesce(max(last_sequence), 0) FROM ledger.checkpoint") or 0)
            timeline.append((time.perf_counter(), checkpoint))
            return checkpoint

        await observe()
        while child.returncode is None:
            # Wake on the consumer's "batch applied" signal, or poll after poll_interval.
            with contextlib.suppress(TimeoutError):
                async with live.applied:
                    await asyncio.wait_for(live.applied.wait(), poll_interval)
            await observe()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.wait(), 0)
        if child.returncode != 0:
            raise RuntimeError(f"lag publisher exited with {child.returncode}")
        report = json.loads(out.read_text())
        acks = report["acks"]
        target = max((a[0] for a in acks if a[0] is not None), default=0)
        deadline = time.perf_counter() + 30
        while timeline[-1][1] < target and time.perf_counter() < deadline:
            with contextlib.suppress(TimeoutError):
                async with live.applied:
                    await asyncio.wait_for(live.applied.wait(), poll_interval)
            await observe()
    times = [t for t, _ in timeline]
    checkpoints = [c for _, c in timeline]
    lags_ack, lags_pub, ack_latency = [], [], []
    never = errors = 0
    for seq, t_pub, t_ack in acks:
        if seq is None:
            errors += 1
            continue
        ack_latency.append(t_ack - t_pub)
        i = bisect.bisect_left(checkpoints, seq)
        if i == len(checkpoints):
            never += 1
            continue
        # The first observation at or after the ack that shows it (seen earlier: 0).
        seen = times[i]
        lags_ack.append(max(0.0, seen - t_ack))
        lags_pub.append(max(0.0, seen - t_pub))
    lags_ack.sort()
    lags_pub.sort()
    ack_latency.sort()
    job.unlink(missing_ok=True)
    out.unlink(missing_ok=True)

    def ms(values: list[float]) -> dict[str, float]:
        return {
            "p50": round(percentile(values, 50) * 1000, 1),
            "p95": round(percentile(values, 95) * 1000, 1),
            "p99": round(percentile(values, 99) * 1000, 1),
            "max": round(values[-1] * 1000, 1) if values else float("nan"),
        }

    return {
        "target_rate": rate,
        "achieved_rate": report["achieved_rate"],
        "events": n,
        "measured": len(lags_ack),
        "never_applied_within_30s": never,
        "publish_errors": errors,
        "observations": len(timeline),
        "ack_to_queryable_ms": ms(lags_ack),
        "publish_to_queryable_ms": ms(lags_pub),
        "publish_ack_latency_ms": ms(ack_latency),
        "publisher_cpu_s": report["cpu_s"],
    }


async def lag_child(job_path: str, out_path: str) -> None:
    """The steady publisher of the lag test (a separate process): js.publish per event, each in its
    own task at its scheduled time; writes [seq, t_publish, t_ack] per event."""
    job = pickle.loads(Path(job_path).read_bytes())  # noqa: ASYNC240
    rate, items = job["rate"], job["items"]
    nc = await nats.connect(job["url"])
    js = nc.jetstream()
    acks: list[list[Any]] = [[None, 0.0, 0.0] for _ in items]
    loop = asyncio.get_running_loop()

    async def one(i: int, subject: str, data: bytes, headers: dict[str, str]) -> None:
        t_pub = time.perf_counter()
        try:
            ack = await js.publish(subject, data, headers=headers, timeout=10)
        except Exception:  # counted as an error by the parent
            acks[i] = [None, t_pub, 0.0]
        else:
            acks[i] = [ack.seq, t_pub, time.perf_counter()]

    tasks = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for i, (subject, data, headers) in enumerate(items):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(i, subject, data, headers)))
    seconds = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    await nc.close()
    report = {
        "acks": acks,
        "achieved_rate": round(len(items) / seconds, 1),
        "cpu_s": round(time.process_time() - cpu0, 2),
    }
    Path(out_path).write_text(json.dumps(report))  # noqa: ASYNC240


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = run_header(args)
    tmp, nats_server, pg = bench_servers("duban-bench-", "duban-bench", args.tmpdir)
    assert pg is not None
    nc: NatsClient | None = None
    pool: asyncpg.Pool | None = None
    live: LiveLedger | None = None
    try:
        await nats_server.start()
        await pg.start()
        nats_pid = nats_server.pid
        pg_proc = getattr(pg, "_proc", None)
        pg_pid = pg_proc.pid if pg_proc is not None else None

        async def on_error(exc: Exception) -> None:
            name = type(exc).__name__
            NATS_ERRORS[name] = NATS_ERRORS.get(name, 0) + 1

        nc = await nats.connect(nats_server.url, error_cb=on_error)
        js = nc.jetstream()
        await ensure_streams(js)
        pool = await create_pool(pg.dsn, min_size=2, max_size=5)
        async with pool.acquire() as conn:
            await migrate(conn)
            results["postgres"] = {
                "version": await conn.fetchval("SHOW server_version"),
                "fsync": await conn.fetchval("SHOW fsync"),
                "synchronous_commit": await conn.fetchval("SHOW synchronous_commit"),
                "shared_buffers": await conn.fetchval("SHOW shared_buffers"),
            }
        results["nats_server"] = {"sync_interval": "always", "url": nats_server.url}

        programme = synthetic_programme(args.units)
        projection = LedgerProjection(pool, {programme.id: programme})
        source = EventSource(programme, args.events, args.seed, Rates())

        # 1. append --------------------------------------------------------------------
        log(f"appending {args.events:,} events for {args.units:,} units …")
        with Phase(pg_pid, nats_pid) as ph:
            append = await bulk_append(nc, source, args.events, args.window, chunk=20_000)
        append["cpu"] = ph.cpu
        append["mean_event_bytes"] = round(source.bytes / max(1, source.produced))
        append["event_types"] = dict(source.type_counts.most_common())
        info = await js.stream_info(EVENTS_STREAM)
        append["stream_messages"] = info.state.messages
        append["stream_mib"] = mib(info.state.bytes)
        results["append"] = append
        last_seq = int(info.state.last_seq)
        log(f"  {append['events_per_s_publish_only']:,} ev/s publish-only; stream {append['stream_mib']} MiB")
        if append["errors"] or info.state.messages != args.events - append["duplicates"]:
            raise RuntimeError(f"append incomplete: {append}, stream has {info.state.messages}")
        gc.collect()

        # 2. baselines -----------------------------------------------------------------
        n = last_seq
        log("baselines …")
        baselines: dict[str, Any] = {}
        runs: tuple[tuple[str, Callable[[], Awaitable[float]]], ...] = (
            ("raw_ordered_cb", lambda: raw_consume_cb(js, n, decode=False)),
            ("raw_ordered_next_msg", lambda: raw_consume_next(js, n)),
            ("raw_ordered_cb_decode", lambda: raw_consume_cb(js, n, decode=True)),
            (
                "raw_ordered_cb_decode_stored",
                lambda: raw_consume_cb(js, n, decode=True, decoder=decode_stored_event),
            ),
        )
        for name, run in runs:
            errors0 = dict(NATS_ERRORS)
            try:
                with Phase(pg_pid, nats_pid) as ph:
                    seconds = await run()
            except Exception as exc:  # a finding, not the end of the run
                baselines[name] = {"failed": f"{type(exc).__name__}: {exc}", "nats_errors": nats_errors_since(errors0)}
                log(f"  {name}: FAILED {baselines[name]}")
                continue
            baselines[name] = {
                "seconds": round(seconds, 2),
                "events_per_s": round(n / seconds),
                "cpu": ph.cpu,
                "nats_errors": nats_errors_since(errors0),
            }
            log(f"  {name}: {n / seconds:,.0f} ev/s {baselines[name]['nats_errors'] or ''}")
        errors0 = dict(NATS_ERRORS)
        try:
            with Phase(pg_pid, nats_pid) as ph:
                seconds, count = await read_stream_only(js)
            baselines["read_stream_no_db"] = {
                "seconds": round(seconds, 2),
                "events_per_s": round(count / seconds),
                "events_read": count,
                "cpu": ph.cpu,
                "nats_errors": nats_errors_since(errors0),
            }
            log(f"  read_stream_no_db: {count / seconds:,.0f} ev/s, {count:,} read")
        except Exception as exc:
            baselines["read_stream_no_db"] = {
                "failed": f"{type(exc).__name__}: {exc}",
                "nats_errors": nats_errors_since(errors0),
            }
            log(f"  read_stream_no_db: FAILED {baselines['read_stream_no_db']}")
        raw_rate = baselines["raw_ordered_cb"]["events_per_s"]
        for b in baselines.values():
            if "events_per_s" in b:
                b["ratio_to_raw"] = round(b["events_per_s"] / raw_rate, 3)
        decode_share = 1 - baselines["raw_ordered_cb"]["seconds"] / baselines["raw_ordered_cb_decode"].get(
            "seconds", float("nan")
        )
        baselines["decode_share_of_decode_baseline"] = round(decode_share, 3)
        results["baselines"] = baselines
        gc.collect()

        # 3. rebuild -------------------------------------------------------------------
        log("rebuild …")
        rss_before = vm_field("VmRSS")
        hwm_reset = reset_peak_rss()
        errors0 = dict(NATS_ERRORS)
        failure = None
        try:
            with Phase(pg_pid, nats_pid) as ph, RssSampler() as rss:
                result = await rebuild_from_stream(js, projection, last_seq)
        except Exception as exc:  # a finding: report it, carry on with the other phases
            failure = f"{type(exc).__name__}: {exc}"
            result = None
        hwm = vm_field("VmHWM") if hwm_reset else 0
        peak = max(rss.max, hwm)
        if result is None:
            rebuild: dict[str, Any] = {
                "failed": failure,
                "seconds_until_failure": round(ph.seconds, 2),
                "nats_errors": nats_errors_since(errors0),
                "read_model": await read_model_digest(pool),
                "rss_peak_mib": mib(peak),
                "rss_delta_mib": mib(peak - rss_before),
            }
            results["rebuild"] = rebuild
            rebuild_digest = rebuild["read_model"]
            log(f"  rebuild FAILED: {rebuild}")
        else:
            rebuild = rebuild_figures(result.events, ph, raw_rate, rss_before, peak, errors0)
            rebuild["phases"] = dict(result.phases)
            rebuild["ratio_to_read_stream_no_db"] = round(
                result.events / ph.seconds / baselines["read_stream_no_db"].get("events_per_s", float("nan")), 3
            )
            rebuild["peak_source"] = "VmHWM after clear_refs" if hwm_reset else "VmRSS sampled every 50 ms"
            rebuild["ru_maxrss_lifetime_mib"] = mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            rebuild["table_sizes"] = await table_sizes(pool)
            rebuild_digest = await read_model_digest(pool)
            rebuild["read_model"] = rebuild_digest
            results["rebuild"] = rebuild
            log(f"  {rebuild['events_per_s']:,} ev/s, {rebuild['seconds']} s, ratio {rebuild['ratio_to_raw']}")
            if rebuild_digest["parked_rows"]:
                log(f"  WARNING: {rebuild_digest['parked_rows']} events parked: the generator made invalid events")
            rebuild["complete"] = rebuild_digest["event_log_rows"] == n
            if not rebuild["complete"]:
                log(f"  WARNING: rebuild finished with {rebuild_digest['event_log_rows']:,} of {n:,} events in the log")

        # 3b. a rebuild again, replacing the read model 3 made (what `duban ledger rebuild` does):
        # the replaced read model foresees each county's retractions (see LedgerProjection.rebuild)
        log("rebuild again, replacing the read model …")
        rss_before = vm_field("VmRSS")
        hwm_reset = reset_peak_rss()
        errors0 = dict(NATS_ERRORS)
        with Phase(pg_pid, nats_pid) as ph, RssSampler() as rss:
            result = await rebuild_from_stream(js, projection, last_seq)
        peak = max(rss.max, vm_field("VmHWM") if hwm_reset else 0)
        digest = await read_model_digest(pool)
        rebuild_again = rebuild_figures(result.events, ph, raw_rate, rss_before, peak, errors0)
        rebuild_again["phases"] = dict(result.phases)
        rebuild_again["complete"] = digest["event_log_rows"] == n
        rebuild_again["same_read_model_as_first"] = all(
            digest[k] == rebuild_digest[k] for k in ("county_state", "milestones", "event_log_rows", "checkpoint")
        )
        rebuild_again["read_model"] = digest
        results["rebuild_replacing"] = rebuild_again
        rebuild_digest = digest
        log(
            f"  {rebuild_again['events_per_s']:,} ev/s, {rebuild_again['seconds']} s,"
            f" ratio {rebuild_again['ratio_to_raw']}, same read model={rebuild_again['same_read_model_as_first']}"
        )

        # 3c. into an empty read model again, its retractions read ahead in the stream: as a
        # ledger fills itself from a stream whose retraction index does not cover it from the
        # first event (a deployment from before the index)
        log("rebuild into an empty read model, reading the retractions ahead (no index) …")
        async with pool.acquire() as conn:
            await conn.execute("TRUNCATE " + ", ".join(f"ledger.{t}" for t in READ_MODEL_TABLES))
        errors0 = dict(NATS_ERRORS)
        with Phase(pg_pid, nats_pid) as ph:
            result = await rebuild_from_stream(js, projection, last_seq, index=False)
        digest = await read_model_digest(pool)
        ahead = rebuild_figures(result.events, ph, raw_rate, 0, 0, errors0)
        ahead["same_read_model_as_first"] = all(
            digest[k] == rebuild_digest[k] for k in ("county_state", "milestones", "event_log_rows", "checkpoint")
        )
        ahead["phases"] = dict(result.phases)
        results["rebuild_read_ahead"] = ahead
        log(
            f"  {ahead['events_per_s']:,} ev/s, {ahead['seconds']} s, ratio {ahead['ratio_to_raw']},"
            f" same read model={ahead['same_read_model_as_first']}"
        )

        # 3d. completing an index created after the events were stored, as the submissions
        # service does when it starts on such a deployment
        log("completing a retraction index created after the events were stored …")
        results["index_completed"] = await complete_index_from_scratch(js, last_seq)
        log(f"  {results['index_completed']}")

        if args.profile:
            log(f"profiled rebuild (pyinstrument) → {args.profile} …")
            try:
                results["rebuild_profiled"] = await profiled_rebuild(projection, js, last_seq, Path(args.profile))
            except Exception as exc:
                results["rebuild_profiled"] = {"failed": f"{type(exc).__name__}: {exc}"}

        # 4. catch-up as the ledger starts -------------------------------------------------
        if not args.skip_catchup:
            log("catch-up from sequence 1 as the ledger starts …")
            with Phase(pg_pid, nats_pid) as ph:
                catchup, live = await live_catchup(js, pool, projection, last_seq, args.catchup_max_seconds)
            catchup["cpu"] = ph.cpu
            catchup["ratio_to_raw"] = round(catchup["events_per_s"] / raw_rate, 3)
            catchup["ratio_to_rebuild"] = round(catchup["events_per_s"] / rebuild_again["events_per_s"], 3)
            if catchup["finished"]:
                await asyncio.sleep(0.5)
                digest = await read_model_digest(pool)
                catchup["read_model"] = digest
                catchup["same_read_model_as_rebuild"] = all(
                    digest[k] == rebuild_digest[k]
                    for k in ("county_state", "milestones", "event_log_rows", "checkpoint")
                )
            results["live_catchup"] = catchup
            log(f"  {catchup['events_per_s']:,} ev/s, {catchup['seconds']} s, finished={catchup['finished']}")
            if not catchup["finished"]:
                await stop_live(live)
                live = None
                log("  not finished: rebuilding to the end so the lag test starts caught up …")
                await rebuild_from_stream(js, projection, last_seq)

        # 5. lag under steady load -------------------------------------------------------
        if args.lag_rates:
            if live is None:
                live = start_live(js, projection)
            await asyncio.sleep(1.0)
            lag = []
            for rate in args.lag_rates:
                log(f"lag at {rate:g}/s for {args.lag_seconds:g} s …")
                with Phase(pg_pid, nats_pid) as ph:
                    r = await steady_lag(
                        js, pool, source, live, nats_server.url, rate, args.lag_seconds, args.poll_interval, tmp
                    )
                r["cpu"] = ph.cpu
                lag.append(r)
                log(f"  ack→queryable ms {r['ack_to_queryable_ms']}")
            results["lag"] = lag
        if live is not None:
            await stop_live(live)
            live = None
        return results
    finally:
        if live is not None:
            await stop_live(live)
        if pool is not None:
            await pool.close()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        await tear_down(tmp, args.keep, nats_server, pg)


async def complete_index_from_scratch(js: JetStreamContext, last_seq: int) -> dict[str, Any]:
    """Drop the retraction index, declare it again (it then covers only later events) and time
    its completion; the completed index must hold what the bulk append indexed."""
    before = await indexed_retractions(js, last_seq)
    await js.delete_stream(RETRACTIONS_STREAM)
    await declare_streams(js)  # the index now covers only events after the last
    started = time.perf_counter()
    added = await complete_retraction_index(js)
    seconds = time.perf_counter() - started
    after = await indexed_retractions(js, last_seq)

    def entries(index: list[IndexedRetraction] | None) -> set[tuple[int, str]] | None:
        return None if index is None else {(e.stream_sequence, e.event_id) for e in index}

    return {
        "seconds": round(seconds, 2),
        "added": added,
        "indexed_as_appended": len(before or []),
        "same_entries": entries(after) == entries(before),
    }


def rebuild_figures(
    events: int, ph: Phase, raw_rate: float, rss_before: int, peak: int, errors0: dict[str, int]
) -> dict[str, Any]:
    """A rebuild's rate, ratio to the raw baseline, memory, CPU and goals."""
    figures: dict[str, Any] = {
        "events": events,
        "nats_errors": nats_errors_since(errors0),
        "seconds": round(ph.seconds, 2),
        "events_per_s": round(events / ph.seconds),
        "ratio_to_raw": round(events / ph.seconds / raw_rate, 3),
        "seconds_per_million": round(ph.seconds / events * 1_000_000, 1),
        "rss_before_mib": mib(rss_before),
        "rss_peak_mib": mib(peak),
        "rss_delta_mib": mib(peak - rss_before),
        "cpu": ph.cpu,
    }
    figures["goal_ratio_met"] = figures["ratio_to_raw"] >= GOAL_RATIO
    figures["goal_1m_under_60s_met"] = figures["seconds_per_million"] < GOAL_SECONDS_PER_MILLION
    return figures


async def profiled_rebuild(
    projection: LedgerProjection, js: JetStreamContext, last_seq: int, path: Path
) -> dict[str, Any]:
    try:
        from pyinstrument import Profiler
    except ImportError:
        log("  pyinstrument not installed (.venv/bin/pip install pyinstrument): skipped")
        return {"skipped": "pyinstrument not installed"}
    profiler = Profiler(interval=0.001, async_mode="disabled")
    t0 = time.perf_counter()
    profiler.start()
    result = await rebuild_from_stream(js, projection, last_seq)  # as in step 3
    profiler.stop()
    seconds = time.perf_counter() - t0
    path.write_text(profiler.output_text(unicode=True, color=False, show_all=False))  # noqa: ASYNC240
    from pyinstrument.renderers import ConsoleRenderer

    flat = ConsoleRenderer(unicode=True, color=False, flat=True, show_all=True)
    path.with_suffix(".flat.txt").write_text(profiler.output(flat))
    path.with_suffix(".html").write_text(profiler.output_html())
    return {"seconds_with_profiler": round(seconds, 2), "events": result.events, "text": str(path)}


def render_table(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []
    a = r["append"]
    b = r["baselines"]
    rows.append(
        (
            "append (publish+ack, excl. generation)",
            f"{a['events_per_s_publish_only']:,} ev/s",
            f"{a['publish_seconds']} s",
        )
    )
    rows.append(
        ("append incl. event generation", f"{a['events_per_s_incl_generation']:,} ev/s", f"{a['seconds_total']} s")
    )
    for name, label in (
        ("raw_ordered_cb", "raw ordered consumer, cb, no work [BASELINE]"),
        ("raw_ordered_next_msg", "raw ordered consumer, next_msg loop"),
        ("raw_ordered_cb_decode", "raw ordered consumer + decode_event"),
        ("raw_ordered_cb_decode_stored", "raw ordered consumer + decode_stored_event"),
        ("read_stream_no_db", "ledger read_stream(), no database"),
    ):
        x = b[name]
        if "failed" in x:
            rows.append((label, "FAILED", f"{x['failed'][:60]} {x.get('nats_errors') or ''}"))
            continue
        note = f" nats errors: {x['nats_errors']}" if x.get("nats_errors") else ""
        rows.append((label, f"{x['events_per_s']:,} ev/s", f"{x['ratio_to_raw']:.2f}× raw{note}"))
    rb = r["rebuild"]
    if "failed" in rb:
        rows.append(("REBUILD into an empty read model", "FAILED", f"{rb['failed'][:60]} {rb.get('nats_errors')}"))
        rows.append(("  rows in event_log after the failure", f"{rb['read_model']['event_log_rows']:,}", ""))
    else:
        rows.append(
            ("REBUILD into an empty read model", f"{rb['events_per_s']:,} ev/s", f"{rb['ratio_to_raw']:.2f}× raw")
        )
        rows.append(("  rebuild seconds / per 1M events", f"{rb['seconds']} s", f"{rb['seconds_per_million']} s/1M"))
        rows.append(("  rebuild peak RSS / delta", f"{rb['rss_peak_mib']} MiB", f"+{rb['rss_delta_mib']} MiB"))
        c = rb["cpu"]
        rows.append(
            (
                "  rebuild CPU: bench / postgres / nats",
                f"{c['bench_process_s']} / {c['postgres_s']} / {c['nats_server_s']} s",
                "",
            )
        )
    if "rebuild_read_ahead" in r:
        ra = r["rebuild_read_ahead"]
        rows.append(
            (
                "REBUILD into an empty read model, no index",
                f"{ra['events_per_s']:,} ev/s",
                f"{ra['ratio_to_raw']:.2f}× raw, same={ra['same_read_model_as_first']}",
            )
        )
    if "index_completed" in r:
        ic = r["index_completed"]
        rows.append(
            (
                "COMPLETE a retraction index from before",
                f"{ic['seconds']} s",
                f"{ic['added']} of {ic['indexed_as_appended']} entries, same={ic['same_entries']}",
            )
        )
    if "rebuild_replacing" in r:
        rc = r["rebuild_replacing"]
        rows.append(
            (
                "REBUILD again, replacing its read model",
                f"{rc['events_per_s']:,} ev/s",
                f"{rc['ratio_to_raw']:.2f}× raw",
            )
        )
        rows.append(
            (
                "  seconds / per 1M / same read model",
                f"{rc['seconds']} s",
                f"{rc['seconds_per_million']} s/1M, same={rc['same_read_model_as_first']}",
            )
        )
        rows.append(("  peak RSS / delta", f"{rc['rss_peak_mib']} MiB", f"+{rc['rss_delta_mib']} MiB"))
        c = rc["cpu"]
        rows.append(
            (
                "  CPU: bench / postgres / nats",
                f"{c['bench_process_s']} / {c['postgres_s']} / {c['nats_server_s']} s",
                "",
            )
        )
    if "live_catchup" in r:
        lc = r["live_catchup"]
        rows.append(
            ("CATCH-UP from 1 as the ledger starts", f"{lc['events_per_s']:,} ev/s", f"{lc['ratio_to_raw']:.3f}× raw")
        )
        rows.append(
            (
                "  catch-up vs rebuild / finished",
                f"{lc.get('ratio_to_rebuild', float('nan')):.3f}× rebuild",
                f"finished={lc['finished']}",
            )
        )
        if "same_read_model_as_rebuild" in lc:
            rows.append(("  live read model == rebuild read model", str(lc["same_read_model_as_rebuild"]), ""))
    for lag in r.get("lag", []):
        q = lag["ack_to_queryable_ms"]
        rows.append(
            (
                f"LAG @ {lag['target_rate']:g}/s ack→queryable (ms)",
                f"p50 {q['p50']} p95 {q['p95']}",
                f"p99 {q['p99']} max {q['max']}",
            )
        )
        q = lag["publish_ack_latency_ms"]
        rows.append(
            (
                f"  publish→ack (ms) @ {lag['target_rate']:g}/s",
                f"p50 {q['p50']} p95 {q['p95']}",
                f"p99 {q['p99']} max {q['max']}",
            )
        )
    w0 = max(len(x[0]) for x in rows)
    w1 = max(len(x[1]) for x in rows)
    lines = [f"duban ledger bench {r['date']}: {r['args']['events']:,} events, {r['args']['units']:,} units"]
    lines.append(f"{'measure':<{w0}}  {'value':>{w1}}  ratio / note")
    lines.append("-" * (w0 + w1 + 24))
    lines += [f"{x[0]:<{w0}}  {x[1]:>{w1}}  {x[2]}" for x in rows]
    lines.append("")
    if "failed" not in rb:
        lines.append("table sizes after rebuild:")
        for name, t in rb["table_sizes"].items():
            lines.append(
                f"  ledger.{name:<14} {t['rows']:>10,} rows  {t['total_mib']:>8} MiB total"
                f" ({t['heap_mib']} heap, {t['indexes_mib']} indexes)"
            )
        for label, x in (
            ("into an empty read model", rb),
            ("replacing it", r.get("rebuild_replacing")),
            ("into an empty read model, no index", r.get("rebuild_read_ahead")),
        ):
            if x is not None:
                lines.append(
                    f"goals, rebuild {label}: ≥ {GOAL_RATIO:.0%} of raw: {'MET' if x['goal_ratio_met'] else 'NOT MET'};"
                    f" 1M under {GOAL_SECONDS_PER_MILLION:g} s: {'MET' if x['goal_1m_under_60s_met'] else 'NOT MET'}"
                    f" ({x['seconds_per_million']} s per 1M)"
                )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="events to append (default 1,000,000)")
    p.add_argument("--units", type=int, default=2844, help="county-level units (default 2,844)")
    p.add_argument("--seed", type=int, default=20170301)
    p.add_argument("--window", type=int, default=20_000, help="unacknowledged publishes during the bulk append")
    p.add_argument("--catchup-max-seconds", type=float, default=900.0, help="stop the catch-up after this")
    p.add_argument("--skip-catchup", action="store_true")
    p.add_argument(
        "--lag-rates",
        type=lambda s: [float(x) for x in s.split(",") if x],
        default=[500.0, 2000.0],
        help="comma-separated steady append rates for the lag test ('' to skip); default 500,2000",
    )
    p.add_argument("--lag-seconds", type=float, default=10.0)
    p.add_argument("--poll-interval", type=float, default=0.005, help="checkpoint poll interval (s) in the lag test")
    p.add_argument("--profile", metavar="FILE", help="also run a second rebuild under pyinstrument, text to FILE")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON to FILE (always printed at the end)")
    p.add_argument("--tmpdir", help="parent of the temporary directory (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--lag-child"]:
        asyncio.run(lag_child(argv[1], argv[2]))
        return 0
    args = parse_args(argv)
    return run_benchmark(args, bench, render_table)


if __name__ == "__main__":
    sys.exit(main())
