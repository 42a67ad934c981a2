"""Two checkouts' ledger rebuilds on one stream, taking turns: the A/B behind a change to the
rebuild. A program, not a pytest test::

    git worktree add /tmp/before HEAD~1
    .venv/bin/python tests/bench/ab_rebuild.py /tmp/before . --rounds 2

The stream (synthetic events, as ``bench_ledger.py`` makes them) is appended once into a
directory of its own and kept there (``--store``; appending 1M events takes 2-4 minutes). Then,
round after round, each checkout in turn runs in a child process that imports that checkout's
code: nats-py's raw ordered consumer over the stream (the baseline), the checkout's rebuild into
an empty read model on a fresh PostgreSQL, and its rebuild replacing that read model. On these
machines a rate drifts by 20% within minutes, so the runs alternate and every ratio is against
the baseline of its own run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


async def child(checkout: Path, store: Path, events: int) -> dict[str, Any]:
    """One run with ``checkout``'s code (already first on sys.path)."""
    import gc

    import nats

    from services.common.embedded import EmbeddedNats, EmbeddedPostgres
    from tests.bench import bench_ledger as bench

    nats_server = EmbeddedNats(store, server_name="duban-ab")
    with tempfile.TemporaryDirectory(prefix="duban-ab-pg-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "postgres", durable=True)
        await nats_server.start()
        await pg.start()
        try:
            nc = await nats.connect(nats_server.url)
            js = nc.jetstream()
            await bench.ensure_streams(js)
            programme = bench.synthetic_programme(2844)
            if (await js.stream_info(bench.EVENTS_STREAM)).state.messages == 0:
                source = bench.EventSource(programme, events, 1, bench.Rates())
                await bench.bulk_append(nc, source, events, 256, chunk=20_000)
            last = int((await js.stream_info(bench.EVENTS_STREAM)).state.last_seq)
            pool = await bench.create_pool(pg.dsn, min_size=2, max_size=5)
            async with pool.acquire() as conn:
                await bench.migrate(conn)
            projection = bench.LedgerProjection(pool, {programme.id: programme})
            pg_proc = getattr(pg, "_proc", None)
            pg_pid = pg_proc.pid if pg_proc is not None else None
            raw = last / await bench.raw_consume_cb(js, last, decode=False)
            run: dict[str, Any] = {"checkout": str(checkout), "events": last, "raw_ev_s": round(raw)}
            for name in ("into_empty", "replacing"):
                gc.collect()
                with bench.Phase(pg_pid, nats_server.pid) as phase:
                    result = await bench.rebuild_from_stream(js, projection, last)
                run[name] = {
                    "seconds": round(result.seconds, 2),
                    "ratio": round(last / result.seconds / raw, 3),
                    "phases": dict(getattr(result, "phases", {})),  # (a checkout before phases: none)
                    "cpu": phase.cpu,
                }
            await pool.close()
            await nc.close()
            return run
        finally:
            await nats_server.stop()
            await pg.destroy()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkouts", nargs="+", type=Path, help="checkouts to compare (a git worktree, '.')")
    parser.add_argument("--store", type=Path, help="where the stream is kept (default: a new temporary directory)")
    parser.add_argument("--events", type=int, default=1_000_000, help="events to append if the store is empty")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    store = (args.store or Path(tempfile.mkdtemp(prefix="duban-ab-stream-"))).resolve()
    if args.child is not None:
        sys.path.insert(0, str(args.child))
        import logging

        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        print(json.dumps(asyncio.run(child(args.child, store, args.events))), flush=True)
        return 0
    runs: list[dict[str, Any]] = []
    for round_ in range(1, args.rounds + 1):
        for checkout in args.checkouts:
            command = [sys.executable, str(HERE), str(checkout.resolve()), "--store", str(store)]
            command += ["--events", str(args.events), "--child", str(checkout.resolve())]
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode != 0 or not lines:
                print(f"round {round_}, {checkout}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
                return 1
            run = json.loads(lines[-1]) | {"round": round_}
            runs.append(run)
            print(json.dumps(run), flush=True)
    print(f"\nstream kept in {store}\n")
    print(f"{'round':>5}  {'checkout':<40} {'raw ev/s':>9}  {'into empty':>16}  {'replacing':>16}")
    for run in runs:
        cells = [f"{run[k]['seconds']:6.2f} s {run[k]['ratio']:.3f}×" for k in ("into_empty", "replacing")]
        print(f"{run['round']:>5}  {run['checkout'][-40:]:<40} {run['raw_ev_s']:>9,}  {cells[0]:>16}  {cells[1]:>16}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
