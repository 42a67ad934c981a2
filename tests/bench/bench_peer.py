#!/usr/bin/env python
"""Peer benchmark: the same append-then-project workload through duban and through John Bywater's
``eventsourcing`` library, on the same PostgreSQL, in the same run.

A program, not a pytest test::

    .venv/bin/pip install 'eventsourcing[postgres]' psycopg-binary   # not project dependencies
    .venv/bin/python tests/bench/bench_peer.py --quick    # 3,000 events, < 1 min
    .venv/bin/python tests/bench/bench_peer.py            # 20,000 events, a few minutes

Without ``eventsourcing`` installed it says so and exits 0.

The workload: ``--units`` counties, each one aggregate; each first gets one event that creates it
(not timed), then ``--events`` "progress reported" events are appended by ``--clients``
concurrent writers (each writer its own counties, round robin), each append awaited before the
writer's next; then a projection catches up into a PostgreSQL table from the first event.

- **eventsourcing** (``eventsourcing.postgres``, psycopg 3): a ``CountyProgress`` aggregate with a
  ``ProgressReported`` event; ``Application.save`` per event (one transaction each, optimistic
  concurrency on the aggregate's version), the writers as threads, the application's aggregate
  cache on (``AGGREGATE_CACHE_MAXSIZE``; without it every append would replay the aggregate).
  Projection: ``eventsourcing.projection.ProjectionRunner`` with a ``Projection`` whose view is a
  ``PostgresTrackingRecorder`` subclass that upserts a row per county and records the tracking
  position in the same transaction (the library's way: one transaction per event).
- **duban**: the append path is the submissions service (``services.submissions.app.start`` in a
  child process, as ``bench_submissions.py`` runs it: decode, authorise, decide, append to
  JetStream with the expected-sequence check, ``sync_interval: always``), the writers are NATS
  connections posting ``report_progress`` submissions; the projection is the ledger's rebuild,
  ``LedgerProjection.rebuild(read_stream(js))`` into its PostgreSQL tables, and then (the closer
  analogue of eventsourcing's runner, a follower) the ledger's live consumer from an empty read
  model until its checkpoint reaches the end (``bench_ledger.live_catchup``).

PostgreSQL is one ``EmbeddedPostgres(durable=True)`` (fsync and synchronous_commit on) for both.
Printed: append rate and projection rate of each, and duban's over eventsourcing's. Throughput on
these machines drifts by up to 60% between runs: compare the RATIOS. Never fails on a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nats  # noqa: E402

from contracts.subjects import submit_subject  # noqa: E402
from services.common.embedded import EmbeddedNats, EmbeddedPostgres  # noqa: E402
from services.common.jetstream import ensure_streams  # noqa: E402
from tests.bench.synthetic import (  # noqa: E402
    bench_servers,
    log,
    run_benchmark,
    run_header,
    synthetic_programme,
    tear_down,
)

MISSING = (
    "bench_peer: the 'eventsourcing' library is not installed, so there is nothing to compare with.\n"
    "Install it into the dev venv (it is not a project dependency):\n"
    "    .venv/bin/pip install 'eventsourcing[postgres]' psycopg-binary\n"
    "then run this again."
)


def have_eventsourcing() -> bool:
    try:
        import eventsourcing.postgres
        import eventsourcing.projection  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------
# eventsourcing: aggregate, application, projection (defined only when the library is there)
# ------------------------------------------------------------------------------------------


def eventsourcing_side(pg_port: int, args: argparse.Namespace, codes: list[str]) -> dict[str, Any]:
    """Append then project through eventsourcing; blocking (threads)."""
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event
    from eventsourcing.persistence import Tracking
    from eventsourcing.postgres import PostgresTrackingRecorder
    from eventsourcing.projection import Projection, ProjectionRunner
    from psycopg.sql import SQL, Identifier

    class CountyProgress(Aggregate):
        @staticmethod
        def create_id(county_code: str) -> uuid.UUID:
            return uuid.uuid5(uuid.NAMESPACE_URL, f"duban-bench-peer/{county_code}")

        @event("Registered")
        def __init__(self, county_code: str) -> None:
            self.county_code = county_code
            self.reports = 0
            self.percent: dict[str, int] = {}

        @event("ProgressReported")
        def report_progress(
            self, submission_id: str, milestone_id: str, percent: int, note: str, steps_done: list[str]
        ) -> None:
            self.reports += 1
            self.percent[milestone_id] = percent

    class Counties(Application[uuid.UUID]):
        def register(self, county_code: str) -> uuid.UUID:
            county = CountyProgress(county_code)
            self.save(county)
            return county.id

        def report(self, county_id: uuid.UUID, submission_id: str, percent: int) -> None:
            county: CountyProgress = self.repository.get(county_id)
            county.report_progress(submission_id, "1.3", percent, NOTE, list(STEPS))
            self.save(county)

    class ProgressView(PostgresTrackingRecorder):
        """The projection's table: a row per county, written with the tracking position."""

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.table = "peer_county_progress"
            schema = Identifier(self.datastore.schema)
            self.sql_create_statements.append(
                SQL(
                    "CREATE TABLE IF NOT EXISTS {0}.{1} (county_id uuid PRIMARY KEY, county_code text,"
                    " reports bigint NOT NULL DEFAULT 0, percent int, last_submission text)"
                ).format(schema, Identifier(self.table))
            )
            self.register_statement = SQL(
                "INSERT INTO {0}.{1} (county_id, county_code) VALUES (%s, %s) ON CONFLICT DO NOTHING"
            ).format(schema, Identifier(self.table))
            self.progress_statement = SQL(
                "UPDATE {0}.{1} SET reports = reports + 1, percent = %s, last_submission = %s WHERE county_id = %s"
            ).format(schema, Identifier(self.table))

        def registered(self, county_id: uuid.UUID, county_code: str, tracking: Tracking) -> None:
            with self.datastore.transaction(commit=True) as curs:
                curs.execute(self.register_statement, (county_id, county_code), prepare=True)
                self._insert_tracking(curs, tracking)

        def progress(self, county_id: uuid.UUID, percent: int, submission_id: str, tracking: Tracking) -> None:
            with self.datastore.transaction(commit=True) as curs:
                curs.execute(self.progress_statement, (percent, submission_id, county_id), prepare=True)
                self._insert_tracking(curs, tracking)

        def counts(self) -> tuple[int, int]:
            with self.datastore.transaction(commit=False) as curs:
                curs.execute(SQL("SELECT count(*), coalesce(sum(reports), 0) FROM {0}").format(Identifier(self.table)))
                row = curs.fetchone()
                assert row is not None
                values = list(row.values())
                return int(values[0]), int(values[1])

    class ProgressProjection(Projection[ProgressView]):
        name = "peerprogress"

        def process_event(self, domain_event: Any, tracking: Tracking) -> None:
            if isinstance(domain_event, CountyProgress.Registered):  # type: ignore[attr-defined]
                self.view.registered(domain_event.originator_id, domain_event.county_code, tracking)
            elif isinstance(domain_event, CountyProgress.ProgressReported):  # type: ignore[attr-defined]
                self.view.progress(
                    domain_event.originator_id, domain_event.percent, domain_event.submission_id, tracking
                )
            else:
                self.view.insert_tracking(tracking)

    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": "duban",
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(pg_port),
        "POSTGRES_USER": "duban",
        "POSTGRES_PASSWORD": "trust",  # the embedded cluster trusts loopback
        "POSTGRES_POOL_SIZE": str(args.clients + 2),
        "POSTGRES_MAX_OVERFLOW": "4",
        "AGGREGATE_CACHE_MAXSIZE": str(len(codes) * 2),
        "CREATE_TABLE": "y",
    }
    import psycopg

    result: dict[str, Any] = {"psycopg": psycopg.__version__, "psycopg_impl": psycopg.pq.__impl__}
    from importlib.metadata import version

    result["eventsourcing"] = version("eventsourcing")
    app = Counties(env=env)
    try:
        ids = [app.register(code) for code in codes]
        errors: list[str] = []
        counter = iter(range(args.events))
        lock = threading.Lock()

        def writer(lane: int) -> None:
            mine = ids[lane :: args.clients] or ids
            i = 0
            while True:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                try:
                    app.report(mine[i % len(mine)], f"peer-{lane}-{i}", 1 + n % 99)
                except Exception as exc:
                    errors.append(repr(exc))
                i += 1

        threads = [threading.Thread(target=writer, args=(lane,)) for lane in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        result["append"] = {
            "events": args.events,
            "seconds": round(seconds, 2),
            "events_per_s": round(args.events / seconds, 1),
            "errors": len(errors),
            "first_error": errors[0] if errors else "",
        }
        log(f"  eventsourcing append: {args.events / seconds:,.0f} ev/s ({len(errors)} errors)")
        last = app.recorder.max_notification_id()
        result["notifications"] = last
    finally:
        app.close()

    t0 = time.perf_counter()
    with ProjectionRunner(
        application_class=Counties, projection_class=ProgressProjection, view_class=ProgressView, env=env
    ) as runner:
        deadline = time.monotonic() + args.projection_max
        while time.monotonic() < deadline:
            try:
                runner.wait(last, timeout=1.0)
                break
            except TimeoutError:
                continue
        seconds = time.perf_counter() - t0
        view: ProgressView = runner.view
        position = view.max_tracking_id(Counties.name)
        rows, reports = view.counts()
    complete = position is not None and last is not None and position >= last
    result["projection"] = {
        "events": last,
        "seconds": round(seconds, 2),
        "events_per_s": round((last or 0) / seconds, 1),
        "complete": complete,
        "rows": rows,
        "reports_counted": reports,
    }
    log(f"  eventsourcing projection: {(last or 0) / seconds:,.0f} ev/s, complete={complete}")
    return result


NOTE = "财政评审批复已取得，项目已立项"
STEPS = ("fiscal_review_approved", "project_registered")


# ------------------------------------------------------------------------------------------
# duban: the submissions service (append), the ledger rebuild (project)
# ------------------------------------------------------------------------------------------


async def duban_side(
    nats_server: EmbeddedNats, pg: EmbeddedPostgres, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    from tests.bench import bench_submissions as bs

    programme = synthetic_programme(args.units)
    bs.PROGRAMME_ID = programme.id
    codes = [c.code for c in programme.counties]
    ctl = await nats.connect(nats_server.url, name="bench-peer")
    result: dict[str, Any] = {}
    try:
        js = ctl.jetstream()
        await ensure_streams(js)
        child_args = argparse.Namespace(units=args.units, max_in_flight=64)
        child = bs.ServerChild("service", "peer", ctl, nats_server.url, child_args, tmp)
        await child.start()
        conns = [await nats.connect(nats_server.url, name=f"writer-{i}") for i in range(args.clients)]
        try:
            await child.request("on")
            # one first submission per county (its aggregate's first event), not timed
            first = [
                conns[i % args.clients].request(
                    submit_subject("county", code), bs.submission_body(code, f"{code}-peer-first", 1), timeout=60
                )
                for i, code in enumerate(codes)
            ]
            await asyncio.gather(*first)
            counter = iter(range(args.events))
            problems: list[str] = []

            async def writer(lane: int) -> None:
                nc = conns[lane]
                mine = codes[lane :: args.clients] or codes
                i = 0
                while (n := next(counter, None)) is not None:
                    code = mine[i % len(mine)]
                    body = bs.submission_body(code, f"{code}-peer-{lane}-{i}", 1 + n % 99)
                    msg = await nc.request(submit_subject("county", code), body, timeout=60)
                    if b'"accepted"' not in msg.data or b'"duplicate": true' in msg.data:
                        problems.append(msg.data[:200].decode(errors="replace"))
                    i += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(writer(lane) for lane in range(args.clients)))
            seconds = time.perf_counter() - t0
        finally:
            for nc in conns:
                with contextlib.suppress(Exception):
                    await nc.close()
            await child.stop()
        result["append"] = {
            "events": args.events,
            "seconds": round(seconds, 2),
            "events_per_s": round(args.events / seconds, 1),
            "errors": len(problems),
            "first_error": problems[0] if problems else "",
        }
        log(f"  duban append (submissions service): {args.events / seconds:,.0f} ev/s ({len(problems)} problems)")

        from services.common.postgres import create_pool
        from services.ledger.consumer import read_stream
        from services.ledger.projection import LedgerProjection, migrate

        info = await js.stream_info("DUBAN_EVENTS")
        last = int(info.state.last_seq)
        pool = await create_pool(pg.dsn, min_size=2, max_size=5)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            projection = LedgerProjection(pool, {programme.id: programme})
            t0 = time.perf_counter()
            rebuilt = await projection.rebuild(read_stream(js))
            seconds = time.perf_counter() - t0
            async with pool.acquire() as conn:
                rows = await conn.fetchval("SELECT count(*) FROM ledger.event_log")
            # the ledger's follower (what a running ledger does), from an empty read model
            from tests.bench.bench_ledger import live_catchup, stop_live

            live_result, live = await live_catchup(js, pool, projection, last, args.projection_max)
            await stop_live(live)
        finally:
            await pool.close()
        result["projection"] = {
            "events": last,
            "applied": rebuilt.events,
            "seconds": round(seconds, 2),
            "events_per_s": round(last / seconds, 1),
            "complete": rows == last,
            "event_log_rows": rows,
        }
        result["live"] = {k: live_result.get(k) for k in ("seconds", "events_per_s", "finished")}
        log(f"  duban ledger rebuild: {last / seconds:,.0f} ev/s, complete={rows == last}")
        log(
            f"  duban ledger live catch-up: {live_result.get('events_per_s'):,} ev/s,"
            f" finished={live_result.get('finished')}"
        )
    finally:
        await ctl.close()
    return result


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = run_header(args)
    tmp, nats_server, pg = bench_servers("duban-bench-peer-", "duban-bench-peer", args.tmpdir)
    assert pg is not None
    codes = [c.code for c in synthetic_programme(args.units).counties]
    try:
        await nats_server.start()
        await pg.start()
        log(f"duban: {args.events:,} events over {args.units} counties, {args.clients} writers …")
        results["duban"] = await duban_side(nats_server, pg, args, tmp)
        log(f"eventsourcing: {args.events:,} events over {args.units} counties, {args.clients} writers …")
        results["eventsourcing"] = await asyncio.to_thread(eventsourcing_side, pg.port, args, codes)
        d, e = results["duban"], results["eventsourcing"]
        results["ratios_duban_over_eventsourcing"] = {
            "append": round(d["append"]["events_per_s"] / e["append"]["events_per_s"], 2),
            "projection": round(d["projection"]["events_per_s"] / e["projection"]["events_per_s"], 2),
            "live": round((d["live"]["events_per_s"] or 0) / e["projection"]["events_per_s"], 2),
        }
        return results
    finally:
        await tear_down(tmp, args.keep, nats_server, pg)


def render_table(r: dict[str, Any]) -> str:
    d, e, q = r["duban"], r["eventsourcing"], r["ratios_duban_over_eventsourcing"]
    a = r["args"]
    lines = [
        f"peer bench {r['date']}: {a['events']:,} progress events over {a['units']} county aggregates,"
        f" {a['clients']} concurrent writers; eventsourcing {e.get('eventsourcing')} (psycopg {e.get('psycopg')},"
        f" {e.get('psycopg_impl')} libpq wrapper); PostgreSQL durable; JetStream sync_interval always",
        f"{'phase':<12} {'duban':>14} {'eventsourcing':>16} {'duban / eventsourcing':>22}  how",
        "-" * 120,
        f"{'append':<12} {d['append']['events_per_s']:>9,.0f} ev/s {e['append']['events_per_s']:>11,.0f} ev/s"
        f" {q['append']:>21}×  duban: submissions service → JetStream; eventsourcing: Application.save → PostgreSQL",
        f"{'projection':<12} {d['projection']['events_per_s']:>9,.0f} ev/s {e['projection']['events_per_s']:>11,.0f}"
        f" ev/s {q['projection']:>21}×  duban: ledger rebuild (read_stream → LedgerProjection.rebuild);"
        f" eventsourcing: ProjectionRunner",
        f"{'follower':<12} {d['live']['events_per_s'] or 0:>9,.0f} ev/s {e['projection']['events_per_s']:>11,.0f}"
        f" ev/s {q['live']:>21}×  duban: the ledger's live consumer (supervise_live) from an empty read model;"
        f" eventsourcing: ProjectionRunner",
        "",
        f"duban: append {d['append']['seconds']} s, errors {d['append']['errors']}; projection of"
        f" {d['projection']['events']:,} events in {d['projection']['seconds']} s,"
        f" complete={d['projection']['complete']}",
        f"eventsourcing: append {e['append']['seconds']} s, errors {e['append']['errors']}; projection of"
        f" {e['projection']['events']:,} events in {e['projection']['seconds']} s,"
        f" complete={e['projection']['complete']} ({e['projection']['rows']} rows,"
        f" {e['projection']['reports_counted']:,} reports counted)",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=20_000, help="progress events to append (default 20,000)")
    p.add_argument("--units", type=int, default=100, help="counties, one aggregate each (default 100)")
    p.add_argument("--clients", type=int, default=20, help="concurrent writers (default 20)")
    p.add_argument("--projection-max", type=float, default=900.0, help="cap on the eventsourcing projection, s")
    p.add_argument("--quick", action="store_true", help="3,000 events (< 1 min)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON to FILE (always printed at the end)")
    p.add_argument("--tmpdir", help="parent of the temporary directory (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.quick:
        args.events = 3_000
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not have_eventsourcing():
        print(MISSING)
        return 0
    return run_benchmark(args, bench, render_table)


if __name__ == "__main__":
    sys.exit(main())
