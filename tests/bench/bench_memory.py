#!/usr/bin/env python
"""Memory benchmark: peak RSS of each service process with ~1M events in the stream.

A program, not a pytest test::

    .venv/bin/python tests/bench/bench_memory.py --quick                  # 20,000 events, < 1 min
    .venv/bin/python tests/bench/bench_memory.py                          # 1,000,000 events (long: see below)
    .venv/bin/python tests/bench/bench_memory.py --events 200000 --services ledger,submissions

    # as deployed: an environment without the test dependencies (see "aiohttp" below)
    python3 -m venv /tmp/duban-prod && /tmp/duban-prod/bin/pip install -e .
    /tmp/duban-prod/bin/python tests/bench/bench_memory.py

It starts, in a temporary directory removed at the end (``--keep`` keeps it), an ``EmbeddedNats``
(JetStream file store, ``sync_interval: always``) and an ``EmbeddedPostgres(durable=True)``, writes
a programme file with ``--units`` (2,844) synthetic counties (``tests/bench/synthetic.py``) and a
directory file that reaches every county's people, and appends ``--events`` valid events with the
ledger bench's generator (``bench_ledger.EventSource``: interleaved county histories, 87% progress
reports; publish with a reply inbox, at most 20,000 unacknowledged).

Then, one service at a time, in this order (escalation issues the actions the notifier plans):

- ``duban up --services <name>`` as a subprocess, with ``NATS_URL`` / ``DATABASE_URL`` pointing
  at those servers, the programme and directory files in ``DUBAN_PROGRAMMES`` /
  ``DUBAN_DIRECTORY``, no ops port, JSON logs to a file;
- waits until it has caught up, asking its ops subject as an operator would:
  ledger ``duban.ops.ledger.status`` lag 0; escalation ``duban.ops.escalation.status`` caught_up
  and lag 0; notifier: its durable consumer has nothing pending (every action planned), then up to
  ``--send-wait`` seconds for the outbox to drain (``duban.ops.notifier.status``); submissions:
  after it has answered one ``report_progress`` from each of ``--submission-counties`` counties
  (each first one catches that county's record up from the stream) and then 4 more from each of
  ``--hot-counties`` (100);
- reads ``VmHWM`` (peak RSS) and ``VmRSS`` from ``/proc/<pid>/status`` (and samples VmRSS every
  0.2 s for the timeline), then stops it with SIGTERM.

Each peak is printed against the goal (≤ 200 MB). For a service over the goal, ``--trace``
(default: on) runs it once more in a child of this program that does what ``duban up`` does
under ``tracemalloc`` and, once caught up, writes where the Python heap is: the top allocation
sites, the top files, and object counts by type. (tracemalloc slows the service and adds its own
overhead; its figures attribute memory, they are not the peak.)

aiohttp: nats-py imports it (for WebSockets) whenever it is installed, and it is one of duban's
test dependencies, so run from the tests' environment every service carries it: ~8-10 MB of
RSS more than installed as the README's run command installs it. The table's second line says
which of the two was measured.

With 1,000,000 events the run is long: generating and appending takes ~4-5 minutes on 2 cores
(~4,500 ev/s with ``sync_interval: always``) and the ledger's live catch-up as shipped
~1,200-3,000 ev/s (``--catchup-max`` caps every wait, default 1,200 s; a capped service is
reported as "not caught up" with the peak so far). ``--quick`` is 20,000 events over 200 units.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import json
import os
import signal
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import nats  # noqa: E402
from nats.aio.client import Client as NatsClient  # noqa: E402

from contracts.subjects import EVENTS_STREAM, submit_subject  # noqa: E402
from services.common.jetstream import ensure_streams  # noqa: E402
from tests.bench.synthetic import (  # noqa: E402
    bench_servers,
    log,
    run_benchmark,
    run_header,
    synthetic_programme,
    tear_down,
)

SELF = str(Path(__file__).resolve())
GOAL_MB = 200.0  # peak RSS per service process, in MB (10^6 bytes)
ORDER = ("ledger", "escalation", "notifier", "submissions")
STATUS = {
    "ledger": "duban.ops.ledger.status",
    "escalation": "duban.ops.escalation.status",
    "notifier": "duban.ops.notifier.status",
    "submissions": "duban.ops.submissions.status",
}
NOTIFIER_DURABLE = "notifier"


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, … of a process in bytes ({} once it is gone)."""
    fields: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if line.startswith("Vm") and line.endswith(" kB"):
            name, _, value = line.partition(":")
            fields[name] = int(value.split()[0]) * 1024
    return fields


def mb(n: float) -> float:
    return round(n / 1e6, 1)


def mib(n: float) -> float:
    return round(n / (1024 * 1024), 1)


# ------------------------------------------------------------------------------------------
# the traced child: what `duban up --services NAME` does, under tracemalloc
# ------------------------------------------------------------------------------------------


def heap_report(top: int = 25) -> str:
    """Where the traced Python heap is, plus object counts by type (the gc's view)."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>"))
    )
    current, peak = tracemalloc.get_traced_memory()
    lines = [f"tracemalloc: traced now {mib(current)} MiB, traced peak {mib(peak)} MiB", "", "top allocation sites:"]
    for stat in snapshot.statistics("lineno")[:top]:
        frame = stat.traceback[0]
        where = frame.filename.replace(str(ROOT) + "/", "").split("site-packages/")[-1]
        lines.append(f"  {mib(stat.size):8.1f} MiB  {stat.count:>10,} blocks  {where}:{frame.lineno}")
    lines += ["", "top files:"]
    for stat in snapshot.statistics("filename")[:15]:
        where = stat.traceback[0].filename.replace(str(ROOT) + "/", "").split("site-packages/")[-1]
        lines.append(f"  {mib(stat.size):8.1f} MiB  {stat.count:>10,} blocks  {where}")
    lines += ["", "biggest sites with their callers (5 frames):"]
    for stat in snapshot.statistics("traceback")[:5]:
        lines.append(f"  {mib(stat.size):.1f} MiB in {stat.count:,} blocks:")
        for frame in stat.traceback[-5:]:
            where = frame.filename.replace(str(ROOT) + "/", "").split("site-packages/")[-1]
            lines.append(f"      {where}:{frame.lineno}")
    counts: Counter[str] = Counter(type(o).__qualname__ for o in gc.get_objects())
    lines += ["", "gc-tracked objects by type (count):"]
    lines += [f"  {n:>12,}  {name}" for name, n in counts.most_common(20)]
    return "\n".join(lines)


def traced_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_memory.py --traced-up")
    p.add_argument("--traced-up", required=True, help="the service to run")
    p.add_argument("--report", required=True, help="where to write the heap report on SIGUSR1")
    p.add_argument("--frames", type=int, default=3)
    a = p.parse_args(argv)
    from services.cli.main import _up
    from services.common.logging import configure_logging
    from services.common.settings import Settings
    from services.common.supervisor import service_runners

    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    runners = service_runners((a.traced_up,))  # imports every service's modules: before tracing
    tracemalloc.start(a.frames)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def write_report() -> None:
            Path(a.report).write_text(heap_report(), encoding="utf-8")

        loop.add_signal_handler(signal.SIGUSR1, write_report)
        await _up(settings, runners)

    asyncio.run(main())
    return 0


# ------------------------------------------------------------------------------------------
# the parent
# ------------------------------------------------------------------------------------------


class ServiceProcess:
    """One service as its own process; samples its RSS."""

    def __init__(
        self, name: str, env: dict[str, str], log_path: Path, traced_report: Path | None = None, frames: int = 3
    ) -> None:
        self.name, self.env, self.log_path, self.traced_report = name, env, log_path, traced_report
        self.frames = frames
        self.proc: asyncio.subprocess.Process | None = None
        self.samples: list[tuple[float, int]] = []
        self.t0 = 0.0
        self._sampler: asyncio.Task[None] | None = None
        self.last_status: dict[str, int] = {}

    async def start(self) -> None:
        if self.traced_report is None:
            duban = str(Path(sys.executable).with_name("duban"))
            cmd = [duban, "up", "--services", self.name]
        else:
            cmd = [sys.executable, SELF, "--traced-up", self.name, "--report", str(self.traced_report)]
            cmd += ["--frames", str(self.frames)]
        with self.log_path.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, env=self.env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
            )
        self.t0 = time.monotonic()
        self._sampler = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        assert self.proc is not None
        while self.proc.returncode is None:
            status = proc_status(self.proc.pid)
            if status:
                self.last_status = status
                self.samples.append((time.monotonic() - self.t0, status.get("VmRSS", 0)))
            await asyncio.sleep(0.2)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def status(self) -> dict[str, int]:
        assert self.proc is not None
        return proc_status(self.proc.pid) or self.last_status

    async def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._sampler is not None:
            self._sampler.cancel()
        return self.proc.returncode

    def timeline(self, points: int = 8) -> list[tuple[float, float]]:
        if not self.samples:
            return []
        step = max(1, len(self.samples) // points)
        picked = [*self.samples[::step], self.samples[-1]]
        return [(round(t, 1), mib(rss)) for t, rss in picked]


async def ask(nc: NatsClient, subject: str) -> dict[str, Any] | None:
    try:
        msg = await nc.request(subject, b"{}", timeout=10)
    except Exception:
        return None
    if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
        return None
    try:
        data: dict[str, Any] = msgspec.json.decode(msg.data)
    except msgspec.DecodeError:
        return None
    return data


async def wait_caught_up(
    name: str,
    svc: ServiceProcess,
    nc: NatsClient,
    args: argparse.Namespace,
    programme_id: str,
    units: list[str],
    cap: float,
) -> dict[str, Any]:
    """Poll until ``name`` says it has caught up (or ``cap`` seconds); returns what it said last."""
    deadline = time.monotonic() + cap
    js = nc.jetstream()
    result: dict[str, Any] = {"caught_up": False}
    last_log = 0.0
    while time.monotonic() < deadline and svc.alive:
        status = await ask(nc, STATUS[name])
        result["status"] = status
        done = False
        if status is not None:
            if name == "ledger":
                done = status.get("lag") == 0
            elif name == "escalation":
                done = bool(status.get("caught_up")) and status.get("lag") == 0
            elif name == "notifier":
                with contextlib.suppress(Exception):
                    info = await js.consumer_info(EVENTS_STREAM, NOTIFIER_DURABLE)
                    result["consumer_pending"] = info.num_pending
                    done = info.num_pending == 0 and info.num_ack_pending == 0 and status.get("checkpoint", 0) > 0
            elif name == "submissions":
                done = True
        if done:
            break
        if time.monotonic() - last_log > 15:
            last_log = time.monotonic()
            rss = svc.status().get("VmRSS", 0)
            log(f"  {name}: waiting ({json.dumps(status, ensure_ascii=False)[:200]}); RSS {mib(rss)} MiB")
        await asyncio.sleep(0.5)
    else:
        result["seconds_to_catch_up"] = round(time.monotonic() - svc.t0, 1)
        return result
    result["caught_up"] = True
    result["seconds_to_catch_up"] = round(time.monotonic() - svc.t0, 1)
    if name == "notifier" and args.send_wait > 0:
        send_deadline = time.monotonic() + args.send_wait
        while time.monotonic() < send_deadline and svc.alive:
            status = await ask(nc, STATUS[name])
            result["status"] = status
            if status is not None and status.get("due_now") == 0 and not status.get("events_unpublished"):
                result["outbox_drained"] = True
                break
            await asyncio.sleep(1.0)
        else:
            result["outbox_drained"] = False
    if name == "submissions":
        try:
            left = max(1.0, deadline - time.monotonic())
            result["submissions"] = await asyncio.wait_for(
                serve_submissions(nc, programme_id, units, args.concurrency, args.hot_counties), left
            )
        except TimeoutError:
            result["submissions"] = {"counties": len(units), "outcomes": {"cut": 1}, "cut_after_s": round(cap)}
        result["status"] = await ask(nc, STATUS[name])
    return result


async def serve_submissions(
    nc: NatsClient, programme_id: str, codes: list[str], concurrency: int, hot: int
) -> dict[str, Any]:
    """One report_progress from each county (its record caught up from the stream first), then 4
    more each from the first ``hot`` counties (records the service still holds, or catches up
    again if it dropped them)."""
    slots = asyncio.Semaphore(concurrency)
    outcome: Counter[str] = Counter()

    async def one(code: str, n: int) -> None:
        body = msgspec.json.encode(
            {
                "submission_id": f"{code}-bench-memory-{n}",
                "programme_id": programme_id,
                "county_code": code,
                "command": {"kind": "report_progress", "milestone_id": "1.3", "percent": 10 + n},
            }
        )
        async with slots:
            try:
                msg = await nc.request(submit_subject("county", code), body, timeout=60)
            except Exception as exc:
                outcome[type(exc).__name__] += 1
                return
        outcome["refused" if b'"refused"' in msg.data else "accepted"] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(code, 0) for code in codes))
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    await asyncio.gather(*(one(code, n) for n in range(1, 5) for code in codes[:hot]))
    return {
        "counties": len(codes),
        "hot_counties": min(hot, len(codes)),
        "outcomes": dict(outcome),
        "first_round_seconds": round(first, 1),
        "hot_rounds_seconds": round(time.perf_counter() - t1, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }


async def measure_service(
    name: str,
    env: dict[str, str],
    tmp: Path,
    nc: NatsClient,
    args: argparse.Namespace,
    programme_id: str,
    codes: list[str],
    traced: bool = False,
) -> dict[str, Any]:
    report = tmp / f"{name}-heap.txt" if traced else None
    svc = ServiceProcess(name, env, tmp / f"{name}{'-traced' if traced else ''}.log", report, args.trace_frames)
    await svc.start()
    try:
        cap = args.trace_max if traced else args.catchup_max
        caught = await wait_caught_up(name, svc, nc, args, programme_id, codes, cap)
        await asyncio.sleep(1.0)
        status = svc.status()
        heap = ""
        if traced and report is not None and svc.alive:
            assert svc.proc is not None
            svc.proc.send_signal(signal.SIGUSR1)
            for _ in range(600):
                if report.exists() and report.stat().st_size > 0:
                    await asyncio.sleep(0.5)
                    break
                await asyncio.sleep(0.5)
            heap = report.read_text(encoding="utf-8") if report.exists() else "(no report)"
    finally:
        died = not svc.alive
        code = await svc.stop()
    tail = ""
    if died:
        lines = svc.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        tail = "\n".join(lines[-15:])
        log(f"  {name}: the process exited (code {code}); its log ends:\n{tail}")
    return {
        "service": name,
        "traced": traced,
        "peak_rss_mb": mb(status.get("VmHWM", 0)),
        "peak_rss_mib": mib(status.get("VmHWM", 0)),
        "rss_now_mib": mib(status.get("VmRSS", 0)),
        "sampled_peak_mib": mib(max((r for _, r in svc.samples), default=0)),
        # a process that died or never caught up has no figure to hold against the goal
        "goal_met": (status.get("VmHWM", 0) <= GOAL_MB * 1e6) if (caught["caught_up"] and not died) else None,
        "exit_code": code,
        "died": died,
        "log_tail": tail,
        "timeline_s_mib": svc.timeline(),
        **caught,
        **({"heap_report": heap} if traced else {}),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from tests.bench.bench_ledger import EventSource, Rates, bulk_append
        from tests.bench.bench_notifier import synthetic_directory
    except ImportError as exc:
        raise SystemExit(f"cannot import the event generator from tests/bench/bench_ledger.py: {exc}") from exc

    results: dict[str, Any] = {
        **run_header(args),
        "goal_mb": GOAL_MB,
        # nats-py imports aiohttp (for WebSockets) whenever it can: in the tests' environment
        # (aiohttp is a test dependency) every service carries it, ~8-10 MB more than installed as
        # the README's run command installs it. Run this from such an install to measure that.
        "aiohttp_loaded": importlib.util.find_spec("aiohttp") is not None,
        "services": [],
    }
    tmp, nats_server, pg = bench_servers("duban-bench-mem-", "duban-bench-memory", args.tmpdir)
    assert pg is not None
    nc: NatsClient | None = None
    try:
        await nats_server.start()
        await pg.start()
        nc = await nats.connect(nats_server.url, name="bench-memory")
        js = nc.jetstream()
        await ensure_streams(js)

        programme = synthetic_programme(args.units)
        programme_file = tmp / "programme.yaml"
        programme_file.write_bytes(msgspec.yaml.encode(programme))
        directory_file = tmp / "directory.yaml"
        directory_file.write_bytes(msgspec.yaml.encode(synthetic_directory(programme)))

        log(f"appending {args.events:,} events for {args.units:,} units …")
        source = EventSource(programme, args.events, args.seed, Rates())
        append = await bulk_append(nc, source, args.events, 20_000, chunk=20_000)
        info = await js.stream_info(EVENTS_STREAM)
        append["stream_messages"] = info.state.messages
        append["stream_mib"] = mib(info.state.bytes)
        append["mean_event_bytes"] = round(source.bytes / max(1, source.produced))
        results["append"] = {k: v for k, v in append.items() if k != "event_types"}
        log(f"  {append['events_per_s_publish_only']:,} ev/s; stream {append['stream_mib']} MiB")
        del source
        gc.collect()

        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DUBAN_", "NATS_", "DATABASE_"))},
            "NATS_URL": nats_server.url,
            "DATABASE_URL": pg.dsn,
            "DUBAN_STATE_DIR": str(tmp / "state"),
            "DUBAN_PROGRAMMES": str(programme_file),
            "DUBAN_DIRECTORY": str(directory_file),
            "DUBAN_OPS_ADDR": "",
            "DUBAN_HTTP_ADDR": "",
            "DUBAN_LOG_FORMAT": "json",
            "DUBAN_LOG_LEVEL": args.log_level,
            "DUBAN_NOTIFY_CHANNELS": "file",
        }
        codes = [c.code for c in programme.counties][: args.submission_counties]
        for name in [s for s in ORDER if s in args.services]:
            log(f"{name}: duban up --services {name} …")
            r = await measure_service(name, env, tmp, nc, args, programme.id, codes)
            log(
                f"  {name}: peak RSS {r['peak_rss_mb']} MB ({r['peak_rss_mib']} MiB), caught up {r['caught_up']}"
                f" after {r['seconds_to_catch_up']} s; goal ≤ {GOAL_MB:g} MB: {verdict(r)}"
            )
            if r["goal_met"] is False and args.trace:
                log(f"  {name}: over the goal: once more under tracemalloc …")
                if name == "ledger":
                    # its checkpoint is at the end now: a fresh read model makes it catch up again
                    await reset_ledger(pg.dsn)
                if name == "notifier":
                    await reset_notifier(pg.dsn, js)
                t = await measure_service(name, env, tmp, nc, args, programme.id, codes, traced=True)
                r["heap_report"] = t.get("heap_report", "")
                r["traced_peak_rss_mib"] = t["peak_rss_mib"]
            results["services"].append(r)
        return results
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        await tear_down(tmp, args.keep, nats_server, pg)


async def reset_ledger(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS ledger CASCADE")
    finally:
        await conn.close()


async def reset_notifier(dsn: str, js: Any) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS notifier CASCADE")
    finally:
        await conn.close()
    with contextlib.suppress(Exception):
        await js.delete_consumer(EVENTS_STREAM, NOTIFIER_DURABLE)


def verdict(s: dict[str, Any]) -> str:
    if s.get("died"):
        return "DIED"
    if s["goal_met"] is None:
        return "NO FIGURE"
    return "MET" if s["goal_met"] else "NOT MET"


def render_table(r: dict[str, Any]) -> str:
    a = r["append"]
    lines = [
        f"duban memory bench {r['date']}: {a['stream_messages']:,} events in the stream ({a['stream_mib']} MiB),"
        f" {r['args']['units']:,} units; goal: peak RSS ≤ {GOAL_MB:g} MB per service process",
        "installed with the test dependencies: nats-py loads aiohttp in every service (~8-10 MB more)"
        if r.get("aiohttp_loaded")
        else "installed as the README's run command installs it (no test dependencies)",
        f"{'service':<12} {'peak RSS (VmHWM)':>18} {'RSS at end':>11} {'vs goal':>8} {'goal':>8}"
        f"  {'caught up':>9} {'after s':>8}  note",
        "-" * 110,
    ]
    for s in r["services"]:
        note = ""
        if s["service"] == "submissions" and "submissions" in s:
            sub = s["submissions"]
            note = (
                f"{sub['counties']:,} counties × 1 in {sub.get('first_round_seconds')} s, then"
                f" {sub.get('hot_counties')} × 4: {sub['outcomes']}"
            )
        elif s["service"] == "notifier":
            st = s.get("status") or {}
            note = f"outbox {st.get('outbox')}, drained {s.get('outbox_drained')}"
        elif s["service"] == "escalation":
            st = s.get("status") or {}
            note = f"actions {st.get('actions')}"
        lines.append(
            f"{s['service']:<12} {s['peak_rss_mb']:>12,.1f} MB {s['rss_now_mib']:>7,.1f} MiB"
            f" {s['peak_rss_mb'] / GOAL_MB:>7.2f}× {verdict(s):>8}"
            f"  {s['caught_up']!s:>9} {s['seconds_to_catch_up']:>8}  {note}"
        )
    lines.append("")
    for s in r["services"]:
        lines.append(f"{s['service']} RSS timeline (s, MiB): {s['timeline_s_mib']}")
    for s in r["services"]:
        if s.get("heap_report"):
            lines += ["", f"=== {s['service']}: where the memory goes (tracemalloc, second run) ===", s["heap_report"]]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="events in the stream (default 1,000,000)")
    p.add_argument("--units", type=int, default=2844, help="synthetic counties (default 2,844)")
    p.add_argument("--seed", type=int, default=20170301)
    p.add_argument(
        "--services",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(ORDER),
        help=f"comma-separated, run in this order: {','.join(ORDER)} (default all)",
    )
    p.add_argument("--submission-counties", type=int, default=2844, help="counties that submit (default all units)")
    p.add_argument("--concurrency", type=int, default=32, help="submissions outstanding at once (default 32)")
    p.add_argument("--hot-counties", type=int, default=100, help="counties that submit 4 more times (default 100)")
    p.add_argument("--catchup-max", type=float, default=1200.0, help="cap on each wait for catch-up, s (1,200)")
    p.add_argument("--send-wait", type=float, default=60.0, help="notifier: wait for the outbox to drain, s (60)")
    p.add_argument("--log-level", default="info", help="the services' log level (default info)")
    p.add_argument(
        "--trace-max", type=float, default=300.0, help="cap on the traced run; the snapshot is taken then (300 s)"
    )
    p.add_argument("--trace-frames", type=int, default=3, help="frames kept per allocation by tracemalloc (3)")
    p.add_argument("--no-trace", dest="trace", action="store_false", help="no tracemalloc run for a service over goal")
    p.add_argument("--quick", action="store_true", help="20,000 events over 200 units, no tracemalloc (< 1 min)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON to FILE (always printed at the end)")
    p.add_argument("--tmpdir", help="parent of the temporary directory (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.units, args.trace, args.send_wait = 20_000, 200, False, 10.0
    args.submission_counties = min(args.submission_counties, args.units)
    unknown = [s for s in args.services if s not in ORDER]
    if unknown:
        p.error(f"unknown services {unknown}; known: {', '.join(ORDER)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--traced-up"]:
        return traced_main(argv)
    args = parse_args(argv)
    return run_benchmark(args, bench, render_table)


if __name__ == "__main__":
    sys.exit(main())
