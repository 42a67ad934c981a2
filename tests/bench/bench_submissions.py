#!/usr/bin/env python
"""Submissions benchmark: concurrent county clients against the real submissions service.

A program, not a pytest test::

    .venv/bin/python tests/bench/bench_submissions.py --quick            # < 1 min
    .venv/bin/python tests/bench/bench_submissions.py                    # 5, 20, 100 counties, ~3 min
    .venv/bin/python tests/bench/bench_submissions.py --mode open --rate 300 --counties 100
    .venv/bin/python tests/bench/bench_submissions.py --profile /tmp/subm-prof   # + a py-spy profile

It starts, in a temporary directory removed at the end (``--keep`` keeps it), an ``EmbeddedNats``
(JetStream file store, ``sync_interval: always``, as in production) and declares the streams.
The server side runs in a child process (so it does not share this process's GIL with the
clients), one of:

- **service**: the real submissions service: ``SubmissionsService(EventStore(nc, js), …)`` served
  by ``services.submissions.app.start`` (the ``duban-submissions`` micro service, concurrency
  ``MAX_IN_FLIGHT``), with a synthetic programme of ``--units`` counties (codes 900000…) and the
  service's JSON logs (level info) written to a file, so their cost is counted. Stage times are
  taken by a subclass of ``EventStore`` (append, catch_up) and of ``SubmissionsService``
  (``handle``); nothing of the project is patched.
- **baseline**: a bare nats-py responder: a queue-group subscription on the same subjects, the same
  concurrency limit (a semaphore, a task per request, as ``services.common.micro`` does), that
  appends the payload as it is to a JetStream stream of the same configuration (``js.publish`` to
  ``bench.baseline.<county>``, await the ack) and replies with the sequence: no decoding, no
  decision, no logging.

The clients, in this process: one NATS connection per county (codes 900000…), each posting
``report_progress`` submissions with unique ids to ``duban.submit.county.<code>`` and waiting for
the reply. ``--mode closed`` (default): each county keeps ``--depth`` requests outstanding (1: a
county system that waits for each answer). ``--mode open``: ``--rate`` requests/s in total, sent
on schedule whatever the answers do; latency counts from the scheduled time (no coordinated
omission). Each measurement is ``--warmup`` seconds (not counted; the service's first request per
county catches its record up from the stream) then ``--seconds`` measured.

For each county count the order is baseline, service, baseline again (a fresh child each time):
the baseline figure is the mean of the two, and their difference shows the drift during the run.
Printed: throughput, latency p50/p99/p99.9 (request → decided → appended → answered, seen by the
client), the service's own stage times (handle, append, catch_up), CPU seconds of the server
child / nats-server / the clients, and the ratios with their goals: throughput ≥ 0.5× baseline,
p99 ≤ 2× baseline. ``--profile DIR`` adds a run of the service under py-spy (``pip install
py-spy``; not a project dependency) at the largest county count and prints where its on-CPU time
goes; ``--profiler pyinstrument`` uses pyinstrument inside the child instead.

The server child also times the cyclic collector's pauses (stages ``gc0``/``gc1``/``gc2``, one
value per collection): a full collection stops the event loop, so its pause lands in the latency
tail. The service child calls ``settle_heap()`` once serving, as the supervisor does in
production; ``--no-settle`` leaves that out, to see what it saves.

Throughput on these machines drifts by up to 60% between runs: compare the RATIOS. Never fails on
a time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import itertools
import json
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import nats  # noqa: E402
from nats.aio.client import Client as NatsClient  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402
from nats.js.api import DeliverPolicy, StreamConfig  # noqa: E402

from contracts.events import EventEnvelope  # noqa: E402
from contracts.replies import Accepted, Refused  # noqa: E402
from contracts.subjects import EVENTS_STREAM, SUBMIT_ALL, aggregate_subject, submit_subject  # noqa: E402
from services.common.embedded import EmbeddedNats  # noqa: E402
from services.common.jetstream import ensure_streams, stream_configs  # noqa: E402
from services.submissions.app import MAX_IN_FLIGHT  # noqa: E402
from services.submissions.record import CountyRecord  # noqa: E402
from services.submissions.service import SubmissionsService  # noqa: E402
from services.submissions.store import CONCURRENT_CATCH_UPS, EventStore  # noqa: E402
from tests.bench.synthetic import (  # noqa: E402
    bench_servers,
    log,
    run_benchmark,
    run_header,
    synthetic_programme,
    tear_down,
)

SELF = str(Path(__file__).resolve())
GOAL_THROUGHPUT_RATIO = 0.5  # service ≥ half the bare responder's throughput
GOAL_P99_RATIO = 2.0  # service p99 ≤ twice the bare responder's
BASELINE_STREAM = "BENCH_BASELINE"
BASELINE_PREFIX = "bench.baseline"
CTL_PREFIX = "bench.ctl"
BASELINE_QUEUE = "bench-baseline"
MILESTONE = "1.3"
STEPS = ("fiscal_review_approved", "project_registered")
NOTE = "财政评审批复已取得，项目已立项"
FIRST_CODE = 900000


def county_codes(n: int, offset: int = 0) -> list[str]:
    return [f"{FIRST_CODE + offset + i:06d}" for i in range(n)]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def summary_ms(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean in milliseconds of values in seconds."""
    s = sorted(values)
    if not s:
        return {"n": 0}
    return {
        "n": len(s),
        "p50": round(percentile(s, 50) * 1000, 2),
        "p90": round(percentile(s, 90) * 1000, 2),
        "p99": round(percentile(s, 99) * 1000, 2),
        "p99.9": round(percentile(s, 99.9) * 1000, 2),
        "max": round(s[-1] * 1000, 2),
        "mean": round(sum(s) / len(s) * 1000, 3),
    }


# ------------------------------------------------------------------------------------------
# the server child: the real service, or the bare responder
# ------------------------------------------------------------------------------------------


class Stages:
    """Per-request stage times (seconds) collected in the server child while the parent measures."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self.active = False

    def add(self, stage: str, seconds: float) -> None:
        if self.active:
            self.times[stage].append(seconds)

    def take(self) -> dict[str, Any]:
        summary = {stage: summary_ms(values) for stage, values in self.times.items()}
        self.times.clear()
        return summary


STAGES = Stages()


def time_collections() -> None:
    """Count the cyclic collector's pauses as stages ``gc0``/``gc1``/``gc2`` (one value per collection)."""
    started: list[float] = []

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            STAGES.add(f"gc{info['generation']}", time.perf_counter() - started.pop())

    gc.callbacks.append(on_collection)


class TimedEventStore(EventStore):
    """The service's event store, with append and catch_up timed."""

    async def catch_up(self, record: CountyRecord) -> CountyRecord:
        t0 = time.perf_counter()
        try:
            return await super().catch_up(record)
        finally:
            STAGES.add("catch_up", time.perf_counter() - t0)

    async def append(self, record: CountyRecord, events: list[EventEnvelope]) -> list[int]:
        t0 = time.perf_counter()
        try:
            return await super().append(record, events)
        finally:
            STAGES.add("append", time.perf_counter() - t0)


class TimedService(SubmissionsService):
    """The submissions service, with ``handle`` (decode → decide → append → reply built) timed."""

    async def handle(self, subject: str, body: bytes) -> Accepted | Refused:
        t0 = time.perf_counter()
        try:
            return await super().handle(subject, body)
        finally:
            STAGES.add("handle", time.perf_counter() - t0)


def ctl_subject(name: str, verb: str) -> str:
    return f"{CTL_PREFIX}.{name}.{verb}"


async def serve(
    kind: str,
    name: str,
    url: str,
    units: int,
    max_in_flight: int,
    log_path: str,
    pyinstrument: str,
    settle: bool = True,
) -> None:
    """Serve ``kind`` while switched on by the parent (``bench.ctl.<name>.on|off|measure|stats|quit``)."""
    nc = await nats.connect(url, name=f"bench-{name}")
    js = nc.jetstream()
    time_collections()
    quit_event = asyncio.Event()
    profiler: Any = None
    if pyinstrument:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001, async_mode="disabled")
    switch_on: Callable[[], Awaitable[None]]
    switch_off: Callable[[], Awaitable[None]]

    if kind == "service":
        from services.common.clock import SystemClock
        from services.common.logging import configure_logging
        from services.common.micro import MicroService
        from services.submissions.app import start

        log_file = Path(log_path).open("a", encoding="utf-8")  # noqa: SIM115, ASYNC230 - for the child's life
        configure_logging("json", "info", stream=log_file)
        programme = synthetic_programme(units)
        service = TimedService(TimedEventStore(nc, js), {programme.id: programme}, SystemClock())
        micro: list[MicroService] = []

        async def service_on() -> None:
            micro.append(await start(nc, service, max_in_flight=max_in_flight))

        async def service_off() -> None:
            while micro:
                await micro.pop().stop()

        switch_on, switch_off = service_on, service_off
    elif kind == "baseline":
        slots = asyncio.Semaphore(max_in_flight)
        in_flight: set[asyncio.Task[None]] = set()
        subs: list[Any] = []

        async def run(msg: Msg) -> None:
            try:
                t0 = time.perf_counter()
                ack = await js.publish(f"{BASELINE_PREFIX}.{msg.subject.rsplit('.', 1)[-1]}", msg.data)
                STAGES.add("append", time.perf_counter() - t0)
                await msg.respond(b'{"stream_sequence": %d}' % ack.seq)
            finally:
                slots.release()

        async def dispatch(msg: Msg) -> None:
            await slots.acquire()  # as services.common.micro does: a full house holds the subscription
            task = asyncio.create_task(run(msg))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

        async def baseline_on() -> None:
            subs.append(await nc.subscribe(SUBMIT_ALL, queue=BASELINE_QUEUE, cb=dispatch))
            await nc.flush()

        async def baseline_off() -> None:
            while subs:
                await subs.pop().unsubscribe()
            if in_flight:
                await asyncio.wait(in_flight, timeout=10)

        switch_on, switch_off = baseline_on, baseline_off
    else:
        raise SystemExit(f"unknown server kind {kind!r}")

    async def on(msg: Msg) -> None:
        if profiler is not None and not profiler.is_running:
            profiler.start()
        await switch_on()
        await msg.respond(b"{}")

    async def off(msg: Msg) -> None:
        await switch_off()
        await msg.respond(b"{}")

    async def measure(msg: Msg) -> None:
        STAGES.active = msg.data == b"1"
        await msg.respond(b"{}")

    async def stats(msg: Msg) -> None:
        await msg.respond(msgspec.json.encode(STAGES.take()))

    async def quit_(msg: Msg) -> None:
        await msg.respond(b"{}")
        quit_event.set()

    for verb, cb in (("on", on), ("off", off), ("measure", measure), ("stats", stats), ("quit", quit_)):
        await nc.subscribe(ctl_subject(name, verb), cb=cb)
    await nc.flush()
    if kind == "service" and settle:  # as services.common.supervisor does once every service is ready
        from services.common.supervisor import settle_heap

        settle_heap()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, quit_event.set)
    print(json.dumps({"ready": name, "pid": os.getpid()}), flush=True)
    await quit_event.wait()
    await switch_off()
    if profiler is not None and profiler.is_running:
        profiler.stop()
        out = Path(pyinstrument)
        out.write_text(profiler.output_text(unicode=True, color=False, show_all=False))  # noqa: ASYNC240
        from pyinstrument.renderers import ConsoleRenderer

        flat = ConsoleRenderer(unicode=True, color=False, flat=True, show_all=True)
        out.with_suffix(".flat.txt").write_text(profiler.output(flat))
    await nc.drain()


def child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_submissions.py --serve")
    p.add_argument("--serve", required=True, choices=("service", "baseline"))
    p.add_argument("--name", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--units", type=int, required=True)
    p.add_argument("--max-in-flight", type=int, required=True)
    p.add_argument("--log", default=os.devnull)
    p.add_argument("--pyinstrument", default="")
    p.add_argument("--no-settle", action="store_true")
    a = p.parse_args(argv)
    asyncio.run(serve(a.serve, a.name, a.url, a.units, a.max_in_flight, a.log, a.pyinstrument, not a.no_settle))
    return 0


# ------------------------------------------------------------------------------------------
# the parent: servers, clients, measurements
# ------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int | None) -> float:
    """CPU seconds of a process and its direct children (a py-spy wrapper's child too)."""
    if pid is None:
        return 0.0
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


class ServerChild:
    """A server child process (the service or the bare responder), switched on and off by requests."""

    def __init__(
        self,
        kind: str,
        name: str,
        ctl: NatsClient,
        url: str,
        args: argparse.Namespace,
        tmp: Path,
        *,
        py_spy: Path | None = None,
        pyinstrument: str = "",
    ) -> None:
        self.kind, self.name, self.ctl, self.url, self.args, self.tmp = kind, name, ctl, url, args, tmp
        self.py_spy, self.pyinstrument = py_spy, pyinstrument
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        cmd = [sys.executable, SELF, "--serve", self.kind, "--name", self.name, "--url", self.url]
        cmd += ["--units", str(self.args.units), "--max-in-flight", str(self.args.max_in_flight)]
        cmd += ["--log", str(self.tmp / f"{self.name}.log")]
        if self.args.no_settle:
            cmd.append("--no-settle")
        if self.pyinstrument:
            cmd += ["--pyinstrument", self.pyinstrument]
        if self.py_spy is not None:
            spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
            cmd = [spy, "record", "-o", str(self.py_spy), "-f", "raw", "-r", "200", "--nonblocking", "--", *cmd]
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, stderr=None
        )
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
            if not line:
                raise RuntimeError(f"{self.name} child exited before it was ready")
            if line.startswith(b"{"):
                return

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def request(self, verb: str, data: bytes = b"") -> bytes:
        return (await self.ctl.request(ctl_subject(self.name, verb), data, timeout=30)).data

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await self.request("quit")
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            self.proc.terminate()
            await self.proc.wait()


PROGRAMME_ID = ""  # set in bench() from the synthetic programme


def submission_body(code: str, submission_id: str, percent: int) -> bytes:
    return msgspec.json.encode(
        {
            "submission_id": submission_id,
            "programme_id": PROGRAMME_ID,
            "county_code": code,
            "submitted_by": f"合成县{code}数字城管建设办",
            "command": {
                "kind": "report_progress",
                "milestone_id": MILESTONE,
                "percent": percent,
                "note": NOTE,
                "steps_done": list(STEPS),
            },
        }
    )


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    accepted: int = 0
    duplicates: int = 0  # answered "duplicate": the bench reused an id (a bug in the bench if not 0)
    refused: int = 0
    errors: int = 0
    timeouts: int = 0
    refusal_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    first_problem: str = ""

    def count_reply(self, msg: Msg) -> None:
        data = msg.data
        if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
            self.errors += 1
            self.first_problem = self.first_problem or f"{msg.headers} {data[:200]!r}"
        elif b'"refused"' in data:
            self.refused += 1
            with contextlib.suppress(msgspec.DecodeError):
                self.refusal_codes[str(msgspec.json.decode(data).get("code"))] += 1
            self.first_problem = self.first_problem or data[:300].decode(errors="replace")
        else:
            self.accepted += 1
            if b'"duplicate": true' in data:
                self.duplicates += 1


OnMeasure = Callable[[], Awaitable[None]]
RUNS = itertools.count(1)  # every loop's submission ids are new: no duplicates across slices and levels


class Clients:
    """One NATS connection per county."""

    def __init__(self, url: str, codes: list[str]) -> None:
        self.url, self.codes = url, codes
        self.conns: list[NatsClient] = []

    async def connect(self) -> None:
        connecting = (nats.connect(self.url, name=f"county-{code}") for code in self.codes)
        self.conns = list(await asyncio.gather(*connecting))

    async def close(self) -> None:
        for nc in self.conns:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _one(self, nc: NatsClient, code: str, sid: str, percent: int, tally: Tally | None) -> float | None:
        body = submission_body(code, sid, percent)
        t0 = time.perf_counter()
        try:
            msg = await nc.request(submit_subject("county", code), body, timeout=30)
        except nats.errors.TimeoutError:
            if tally is not None:
                tally.timeouts += 1
            return None
        except Exception as exc:
            if tally is not None:
                tally.errors += 1
                tally.first_problem = tally.first_problem or repr(exc)
            return None
        elapsed = time.perf_counter() - t0
        if tally is not None:
            tally.count_reply(msg)
        return elapsed

    async def prime(self, tag: str) -> list[float]:
        """One request per county, all at once; returns their latencies (a county's first request
        after a start catches its record up from the stream)."""
        run_no = next(RUNS)
        sent = (
            self._one(nc, code, f"{code}-{tag}-{run_no}", 5, None)
            for nc, code in zip(self.conns, self.codes, strict=True)
        )
        return [x for x in await asyncio.gather(*sent) if x is not None]

    async def closed_loop(
        self, tally: Tally, tag: str, depth: int, warmup: float, seconds: float, on_measure: OnMeasure
    ) -> None:
        """Each county keeps ``depth`` requests outstanding; the first ``warmup`` seconds are not
        counted. Returns when every request sent before the end is answered."""
        run_no = next(RUNS)
        loop = asyncio.get_running_loop()
        measure_from = loop.time() + warmup
        end = measure_from + seconds

        async def worker(nc: NatsClient, code: str, lane: int) -> None:
            i = 0
            while (now := loop.time()) < end:
                counted = now >= measure_from
                sid = f"{code}-{tag}-{run_no}-{lane}-{i}"
                elapsed = await self._one(nc, code, sid, 1 + i % 99, tally if counted else None)
                if counted and elapsed is not None:
                    tally.latencies.append(elapsed)
                i += 1

        async def mark() -> None:
            await asyncio.sleep(warmup)
            await on_measure()

        marker = asyncio.create_task(mark())
        lanes = (worker(nc, c, lane) for nc, c in zip(self.conns, self.codes, strict=True) for lane in range(depth))
        await asyncio.gather(*lanes)
        await marker

    async def open_loop(
        self, tally: Tally, tag: str, rate: float, warmup: float, seconds: float, on_measure: OnMeasure
    ) -> None:
        """``rate`` requests/s in total, spread evenly over the counties, each sent on schedule
        whatever the answers do; latency from the scheduled time."""
        run_no = next(RUNS)
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        measure_from = start + warmup
        end = measure_from + seconds
        interval = len(self.codes) / rate
        rng = random.Random(run_no)
        pending: set[asyncio.Task[None]] = set()

        async def send(nc: NatsClient, code: str, sid: str, scheduled: float, counted: bool) -> None:
            elapsed = await self._one(nc, code, sid, 50, tally if counted else None)
            if counted and elapsed is not None:
                # what the county waited since the request was due, even if this loop sent it late
                tally.latencies.append(loop.time() - scheduled)

        async def county(nc: NatsClient, code: str) -> None:
            scheduled = start + rng.random() * interval
            i = 0
            while scheduled < end:
                delay = scheduled - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                sid = f"{code}-{tag}-{run_no}-{i}"
                task = asyncio.create_task(send(nc, code, sid, scheduled, scheduled >= measure_from))
                pending.add(task)
                task.add_done_callback(pending.discard)
                scheduled += interval
                i += 1

        async def mark() -> None:
            await asyncio.sleep(max(0.0, measure_from - loop.time()))
            await on_measure()

        marker = asyncio.create_task(mark())
        await asyncio.gather(*(county(nc, code) for nc, code in zip(self.conns, self.codes, strict=True)))
        await marker
        if pending:
            await asyncio.wait(pending, timeout=60)


@dataclass
class PathRun:
    """What one path (service or baseline) did over a level's slices."""

    kind: str
    tally: Tally = field(default_factory=Tally)
    seconds: float = 0.0
    slices: list[float] = field(default_factory=list)  # throughput per slice
    cpu: dict[str, float] = field(
        default_factory=lambda: {"server_child_s": 0.0, "nats_server_s": 0.0, "clients_s": 0.0}
    )
    stages: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        t = self.tally
        done = len(t.latencies)
        return {
            "kind": self.kind,
            "seconds": round(self.seconds, 2),
            "completed": done,
            "throughput_per_s": round(done / self.seconds, 1) if self.seconds else 0.0,
            "slice_throughputs": [round(x, 1) for x in self.slices],
            "latency_ms": summary_ms(t.latencies),
            "accepted": t.accepted,
            "duplicates": t.duplicates,
            "refused": t.refused,
            "refusal_codes": dict(t.refusal_codes),
            "errors": t.errors,
            "timeouts": t.timeouts,
            "first_problem": t.first_problem,
            "server_stages_ms": self.stages,
            "cpu": {k: round(v, 2) for k, v in self.cpu.items()},
        }


async def run_slice(
    child: ServerChild,
    run: PathRun,
    clients: Clients,
    nats_pid: int | None,
    args: argparse.Namespace,
    warmup: float,
    seconds: float,
    prime: bool = False,
) -> None:
    """Switch ``child`` on, drive the clients through warm-up and ``seconds`` measured, switch it off.
    ``prime``: first one request per county, answered before the warm-up starts."""
    await child.request("on")
    if prime:
        await clients.prime(run.kind)
    marks: dict[str, float] = {}
    before = len(run.tally.latencies)

    async def on_measure() -> None:
        await child.request("measure", b"1")
        marks["t0"] = time.perf_counter()
        marks["child"], marks["nats"], marks["self"] = (
            process_cpu(child.pid),
            process_cpu(nats_pid),
            time.process_time(),
        )

    try:
        if args.mode == "open":
            await clients.open_loop(run.tally, run.kind, args.rate, warmup, seconds, on_measure)
        else:
            await clients.closed_loop(run.tally, run.kind, args.depth, warmup, seconds, on_measure)
        elapsed = time.perf_counter() - marks["t0"]
        run.cpu["server_child_s"] += process_cpu(child.pid) - marks["child"]
        run.cpu["nats_server_s"] += process_cpu(nats_pid) - marks["nats"]
        run.cpu["clients_s"] += time.process_time() - marks["self"]
        await child.request("measure", b"0")
    finally:
        await child.request("off")
    run.seconds += elapsed
    run.slices.append((len(run.tally.latencies) - before) / elapsed)


async def run_level(
    counties: int, children: dict[str, ServerChild], nats_pid: int | None, args: argparse.Namespace
) -> dict[str, Any]:
    """Baseline and service in alternating slices (ABBA…), so drift hits both alike."""
    clients = Clients(children["service"].url, county_codes(counties))
    await clients.connect()
    runs = {kind: PathRun(kind) for kind in ("baseline", "service")}
    slice_seconds = args.seconds / args.slices
    try:
        for i in range(args.slices):
            order = ("baseline", "service") if i % 2 == 0 else ("service", "baseline")
            for kind in order:
                warmup = args.warmup if i < 2 else args.slice_warmup
                await run_slice(children[kind], runs[kind], clients, nats_pid, args, warmup, slice_seconds, prime=i < 2)
                r = runs[kind]
                log(f"  {counties} counties, slice {i + 1}/{args.slices}, {kind}: {r.slices[-1]:,.0f} req/s")
        for kind, child in children.items():
            if kind in runs:
                runs[kind].stages = msgspec.json.decode(await child.request("stats"))
    finally:
        await clients.close()
    base, svc = runs["baseline"].figures(), runs["service"].figures()
    for x in (base, svc):
        lat = x["latency_ms"]
        log(
            f"  {counties} counties, {x['kind']}: {x['throughput_per_s']:,} req/s, p50 {lat.get('p50')}"
            f" p99 {lat.get('p99')} p99.9 {lat.get('p99.9')} ms; refused {x['refused']}, errors {x['errors']},"
            f" timeouts {x['timeouts']}, duplicates {x['duplicates']}; cpu {x['cpu']}"
        )
    return {"counties": counties, "baseline": base, "service": svc, **ratios(base, svc)}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    global PROGRAMME_ID
    results: dict[str, Any] = {
        **run_header(args),
        "levels": [],
    }
    programme = synthetic_programme(args.units)
    PROGRAMME_ID = programme.id
    tmp, server, _ = bench_servers("duban-bench-subm-", "duban-bench-submissions", args.tmpdir, postgres=False)
    ctl: NatsClient | None = None
    children: dict[str, ServerChild] = {}
    try:
        await server.start()
        results["nats_server"] = {"sync_interval": "always", "url": server.url}
        ctl = await nats.connect(server.url, name="bench-ctl")
        js = ctl.jetstream()
        await ensure_streams(js)
        await js.add_stream(_replace_config(stream_configs(1)[0]))
        for kind in ("baseline", "service"):
            children[kind] = ServerChild(kind, kind, ctl, server.url, args, tmp)
        await asyncio.gather(*(c.start() for c in children.values()))
        for counties in args.counties:
            if counties > args.units:
                raise SystemExit(f"--counties {counties} > --units {args.units}")
            log(f"{counties} counties …")
            results["levels"].append(await run_level(counties, children, server.pid, args))
        await asyncio.gather(*(c.stop() for c in children.values()))
        if not args.skip_cold:
            results["cold_start"] = await cold_start(args, server, ctl, tmp)
        if args.profile:
            results["profile"] = await profiled_run(args, server, ctl, tmp)
        stream = await js.stream_info(EVENTS_STREAM)
        results["events_stream"] = {"messages": stream.state.messages, "bytes": stream.state.bytes}
        return results
    finally:
        for child in children.values():
            with contextlib.suppress(Exception):
                await child.stop()
        if ctl is not None:
            with contextlib.suppress(Exception):
                await ctl.close()
        await tear_down(tmp, args.keep, server)


async def raw_catch_up(js: JetStreamContext, subjects: dict[str, int], concurrency: int) -> float:
    """The floor for catching records up: an ordered consumer per subject, a callback that does
    nothing, ``concurrency`` subjects at once; seconds until every message is read."""

    async def one(subject: str, count: int) -> None:
        done = asyncio.Event()
        seen = 0

        async def cb(_msg: Msg) -> None:
            nonlocal seen
            seen += 1
            if seen >= count:
                done.set()

        sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, cb=cb)
        try:
            await asyncio.wait_for(done.wait(), 120)
        finally:
            await sub.unsubscribe()

    slots = asyncio.Semaphore(concurrency)

    async def bounded(subject: str, count: int) -> None:
        async with slots:
            await one(subject, count)

    t0 = time.perf_counter()
    await asyncio.gather(*(bounded(s, n) for s, n in subjects.items() if n))
    return time.perf_counter() - t0


async def cold_start(args: argparse.Namespace, server: EmbeddedNats, ctl: NatsClient, tmp: Path) -> dict[str, Any]:
    """A service that has just started: every county's first request catches its record up from
    the stream. Baseline: the same subjects read by raw ordered consumers (callback, no work)."""
    counties = max(args.counties)
    codes = county_codes(counties)
    js = ctl.jetstream()
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=f"duban.events.{PROGRAMME_ID}.*")
    known = info.state.subjects or {}
    subjects = {
        aggregate_subject(PROGRAMME_ID, c): int(known.get(aggregate_subject(PROGRAMME_ID, c), 0)) for c in codes
    }
    events = sum(subjects.values())
    log(f"cold start: {counties} counties with {events:,} events on record; raw read …")
    reader = await nats.connect(server.url, name="bench-raw-reader")  # ctl stays out of its traffic
    try:  # as many at once as the service's store reads (more are cut off as a slow consumer)
        raw_seconds = await raw_catch_up(reader.jetstream(), subjects, CONCURRENT_CATCH_UPS)
    finally:
        await reader.close()
    log(f"  raw ordered consumers: {events / raw_seconds:,.0f} ev/s; a fresh service, one request per county …")
    child = ServerChild("service", "cold", ctl, server.url, args, tmp)
    await child.start()
    clients = Clients(server.url, codes)
    await clients.connect()
    try:
        await child.request("on")
        await child.request("measure", b"1")
        cpu0 = process_cpu(child.pid)
        t0 = time.perf_counter()
        latencies = await clients.prime("cold")
        seconds = time.perf_counter() - t0
        cpu = process_cpu(child.pid) - cpu0
        stages = msgspec.json.decode(await child.request("stats"))
    finally:
        await clients.close()
        await child.stop()
    result = {
        "counties": counties,
        "events_on_record": events,
        "events_per_county_mean": round(events / counties),
        "raw_seconds": round(raw_seconds, 2),
        "raw_events_per_s": round(events / raw_seconds),
        "service_seconds": round(seconds, 2),
        "service_events_per_s": round(events / seconds),
        "ratio_to_raw": round(raw_seconds / seconds, 3),
        "first_request_ms": summary_ms(latencies),
        "service_stages_ms": stages,
        "service_cpu_s": round(cpu, 2),
    }
    log(
        f"  service: all {counties} first requests answered in {seconds:.2f} s ({events / seconds:,.0f} ev/s caught up,"
        f" {result['ratio_to_raw']}× raw); first request p50 {result['first_request_ms'].get('p50')}"
        f" p99 {result['first_request_ms'].get('p99')} ms"
    )
    return result


def _replace_config(config: StreamConfig) -> StreamConfig:
    import dataclasses

    return dataclasses.replace(
        config,
        name=BASELINE_STREAM,
        subjects=[f"{BASELINE_PREFIX}.>"],
        description="the bench's bare responder appends here",
        allow_atomic=None,
    )


def ratios(base: dict[str, Any], service: dict[str, Any]) -> dict[str, Any]:
    tp_ratio = service["throughput_per_s"] / base["throughput_per_s"] if base["throughput_per_s"] else float("nan")
    p99_ratio = service["latency_ms"]["p99"] / base["latency_ms"]["p99"]
    return {
        "throughput_ratio": round(tp_ratio, 3),
        "p50_ratio": round(service["latency_ms"]["p50"] / base["latency_ms"]["p50"], 2),
        "p99_ratio": round(p99_ratio, 2),
        "p999_ratio": round(service["latency_ms"]["p99.9"] / base["latency_ms"]["p99.9"], 2),
        "goal_throughput_met": tp_ratio >= GOAL_THROUGHPUT_RATIO,
        "goal_p99_met": p99_ratio <= GOAL_P99_RATIO,
    }


# ------------------------------------------------------------------------------------------
# profiling
# ------------------------------------------------------------------------------------------


async def profiled_run(args: argparse.Namespace, server: EmbeddedNats, ctl: NatsClient, tmp: Path) -> dict[str, Any]:
    """The service alone at the largest county count, under py-spy (or pyinstrument in the child)."""
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    counties = max(args.counties)
    # counties no level used: nothing to catch up, so the profile shows the steady state
    offset = counties if counties * 2 <= args.units else 0
    py_spy: Path | None = None
    pyinstrument = ""
    if args.profiler == "pyinstrument":
        try:
            import pyinstrument as _  # noqa: F401
        except ImportError:
            log("pyinstrument not installed (.venv/bin/pip install pyinstrument): no profile")
            return {"skipped": "pyinstrument not installed"}
        pyinstrument = str(out / "service-pyinstrument.txt")
    else:
        if not (shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")):
            log("py-spy not installed (.venv/bin/pip install py-spy): no profile")
            return {"skipped": "py-spy not installed"}
        py_spy = out / "service-py-spy.txt"
    log(f"profiling the service at {counties} counties with {args.profiler} → {out} …")
    child = ServerChild("service", "profiled", ctl, server.url, args, tmp, py_spy=py_spy, pyinstrument=pyinstrument)
    await child.start()
    clients = Clients(server.url, county_codes(counties, offset))
    await clients.connect()
    run = PathRun("service")
    try:
        await run_slice(child, run, clients, server.pid, args, args.warmup, args.seconds, prime=True)
        run.stages = msgspec.json.decode(await child.request("stats"))
    finally:
        await clients.close()
        await child.stop()
    figures = run.figures()
    log(f"  under the profiler: {figures['throughput_per_s']:,} req/s")
    if py_spy is None:
        return {"profiler": "pyinstrument", "file": pyinstrument, "counties": counties, "run": figures}
    summary = summarise_collapsed(py_spy) if py_spy.exists() else {"missing": str(py_spy)}
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    (out / "service-py-spy-summary.json").write_text(text)
    return {"profiler": "py-spy", "file": str(py_spy), "counties": counties, "run": figures, "summary": summary}


def _frame_name(frame: str) -> str:
    """'handle (services/submissions/service.py:60)' → 'handle (services/submissions/service.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def _area(frame: str) -> str:
    path = frame.partition(" (")[2]
    for prefix, area in (
        ("services/submissions", "services/submissions"),
        ("services/common", "services/common"),
        ("contracts", "contracts"),
        ("nats/micro", "nats-py micro"),
        ("nats/js", "nats-py jetstream"),
        ("nats/", "nats-py core"),
        ("structlog", "structlog"),
        ("prometheus_client", "prometheus_client"),
        ("asyncio", "asyncio"),
        ("msgspec", "msgspec"),
        ("tests/bench", "bench harness"),
    ):
        if prefix in path:
            return area
    return "other: " + path.split("/")[0][:30]


def summarise_collapsed(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares per function (and self share per area) of py-spy's raw output."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    area_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        area_counts[_area(frames[-1])] += count
        for name in set(frames):
            incl_counts[name] += count

    def share(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(v / total, 3)) for k, v in c.most_common(top)]

    return {
        "samples": total,
        "self": share(self_counts),
        "inclusive": share(incl_counts),
        "self_by_area": share(area_counts),
    }


# ------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------


def render_table(r: dict[str, Any]) -> str:
    a = r["args"]
    mode = f"closed loop, depth {a['depth']}" if a["mode"] == "closed" else f"open loop, {a['rate']:g} req/s"
    lines = [
        f"duban submissions bench {r['date']}: {mode}; per path and county count {a['seconds']:g} s measured in"
        f" {a['slices']} alternating slices; max in flight {a['max_in_flight']}",
        f"{'counties':>8}  {'path':<26} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8}"
        f"  {'ref/err/t-o':>11}  {'cpu child/nats/clients s':>24}  req/s per slice",
        "-" * 130,
    ]
    for level in r["levels"]:
        for label, x in (("bare responder (BASELINE)", level["baseline"]), ("submissions service", level["service"])):
            lat = x["latency_ms"]
            c = x["cpu"]
            cpu = f"{c['server_child_s']}/{c['nats_server_s']}/{c['clients_s']}"
            lines.append(
                f"{level['counties']:>8}  {label:<26} {x['throughput_per_s']:>8,.0f} {lat.get('p50', 0):>7}"
                f" {lat.get('p99', 0):>7} {lat.get('p99.9', 0):>8}  {x['refused']:>3}/{x['errors']}/{x['timeouts']:<5}"
                f"  {cpu:>24}  {', '.join(f'{v:,.0f}' for v in x['slice_throughputs'])}"
            )
        for label, x in (("baseline", level["baseline"]), ("service", level["service"])):
            stages = x["server_stages_ms"]
            text = ", ".join(f"{k} p50 {v.get('p50')} / p99 {v.get('p99')}" for k, v in sorted(stages.items()))
            lines.append(f"{'':>8}  {label} stages (ms): {text}")
        lines.append(
            f"{'':>8}  RATIOS: throughput {level['throughput_ratio']:.2f}× baseline (goal ≥ {GOAL_THROUGHPUT_RATIO}:"
            f" {'MET' if level['goal_throughput_met'] else 'NOT MET'}); p99 {level['p99_ratio']:.2f}× baseline"
            f" (goal ≤ {GOAL_P99_RATIO:g}: {'MET' if level['goal_p99_met'] else 'NOT MET'});"
            f" p50 {level['p50_ratio']}×, p99.9 {level['p999_ratio']}×"
        )
        lines.append("")
    cold = r.get("cold_start")
    if cold:
        fr = cold["first_request_ms"]
        cu = cold["service_stages_ms"].get("catch_up", {})
        lines.append(
            f"COLD START ({cold['counties']} counties, {cold['events_on_record']:,} events on record, mean"
            f" {cold['events_per_county_mean']:,} per county): raw ordered consumers {cold['raw_events_per_s']:,} ev/s"
            f" (BASELINE); a fresh service answers every county's first request in {cold['service_seconds']} s ="
            f" {cold['service_events_per_s']:,} ev/s caught up = {cold['ratio_to_raw']:.2f}× raw; first request p50"
            f" {fr.get('p50')} / p99 {fr.get('p99')} ms; catch_up p50 {cu.get('p50')} / p99 {cu.get('p99')} ms;"
            f" service CPU {cold['service_cpu_s']} s"
        )
        lines.append("")
    prof = r.get("profile")
    if prof and "summary" in prof and "self_by_area" in prof["summary"]:
        sm = prof["summary"]
        run = prof["run"]
        lines.append(
            f"py-spy profile of the service child at {prof['counties']} counties ({sm['samples']:,} on-CPU samples at"
            f" 200 Hz; {run['throughput_per_s']:,} req/s under the profiler):"
        )
        lines.append("  self time by area: " + ", ".join(f"{k} {v:.0%}" for k, v in sm["self_by_area"][:10]))
        lines.append("  top self:")
        lines += [f"    {v:6.1%}  {k}" for k, v in sm["self"][:15]]
        lines.append("  top inclusive:")
        lines += [f"    {v:6.1%}  {k}" for k, v in sm["inclusive"][:30]]
    elif prof:
        lines.append(f"profile: {json.dumps({k: v for k, v in prof.items() if k != 'run'})}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--counties",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[5, 20, 100],
        help="comma-separated county counts, one measurement each (default 5,20,100)",
    )
    p.add_argument("--mode", choices=("closed", "open"), default="closed")
    p.add_argument("--depth", type=int, default=1, help="closed loop: requests outstanding per county (default 1)")
    p.add_argument("--rate", type=float, default=300.0, help="open loop: requests/s in total (default 300)")
    p.add_argument(
        "--seconds", type=float, default=12.0, help="measured seconds per path and county count (default 12)"
    )
    p.add_argument("--slices", type=int, default=4, help="alternating slices per path and county count (default 4)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up before each path's first slice (default 2 s)")
    p.add_argument("--slice-warmup", type=float, default=0.5, help="warm-up before later slices (default 0.5 s)")
    p.add_argument("--units", type=int, default=2844, help="counties in the service's programme (default 2,844)")
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=MAX_IN_FLIGHT,
        help=f"server concurrency, both paths (default the service's MAX_IN_FLIGHT, {MAX_IN_FLIGHT})",
    )
    p.add_argument("--skip-cold", action="store_true", help="skip the cold-start (record catch-up) measurement")
    p.add_argument(
        "--no-settle",
        action="store_true",
        help="serve without settle_heap() (the startup heap left to the cyclic collector), to see what it saves",
    )
    p.add_argument("--profile", metavar="DIR", help="also profile the service at the largest county count")
    p.add_argument("--profiler", choices=("py-spy", "pyinstrument"), default="py-spy")
    p.add_argument("--quick", action="store_true", help="5,20 counties, 4 s per path in 2 slices (< 1 min)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON to FILE (always printed at the end)")
    p.add_argument("--tmpdir", help="parent of the temporary directory (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.quick:
        args.counties, args.seconds, args.slices, args.warmup = [5, 20], 4.0, 2, 1.0
        args.units = min(args.units, 100)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:
        return child_main(argv)
    args = parse_args(argv)
    return run_benchmark(args, bench, render_table)


if __name__ == "__main__":
    sys.exit(main())
