"""What the benchmark programs share: a programme with thousands of county-level units, their
servers in a temporary directory, progress lines and the ending that prints the results.

The benchmarks are run as scripts (``python tests/bench/bench_x.py``); importing this module puts
the project root on ``sys.path`` for them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

from contracts.programme import County, Person, Programme, load_default_programme  # noqa: E402
from services.common.embedded import EmbeddedNats, EmbeddedPostgres  # noqa: E402


def synthetic_programme(units: int) -> Programme:
    """The shipped programme with ``units`` synthetic county-level units (codes 900000+i)."""
    base = load_default_programme()
    counties = tuple(
        County(
            code=f"{900000 + i:06d}",
            name=f"合成县{i:04d}",
            responsible_unit=f"合成县{i:04d}政府",
            responsible_person=Person(id=f"p{900000 + i}", name=f"负责人{i:04d}"),
        )
        for i in range(units)
    )
    return msgspec.structs.replace(base, counties=counties)


def print_results(table: str, results: object, json_path: str | None) -> None:
    """Every benchmark's ending: the table, then the figures as JSON (also to ``json_path``)."""
    import json

    print(table)
    text = json.dumps(results, ensure_ascii=False, indent=2, default=str)
    if json_path:
        Path(json_path).write_text(text + "\n", encoding="utf-8")
    print("\nJSON:")
    print(text)


def log(text: str) -> None:
    """A benchmark's progress line, on stderr (stdout carries the results)."""
    import time

    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_header(args: object, exclude: tuple[str, ...] = ("json",)) -> dict[str, Any]:
    """The start of every benchmark's results: when, on what, with which arguments."""
    import datetime as dt
    import os
    import platform

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "args": {k: v for k, v in vars(args).items() if k not in exclude},
    }


def bench_servers(
    prefix: str, server_name: str, tmpdir: str | None, *, postgres: bool = True
) -> tuple[Path, EmbeddedNats, EmbeddedPostgres | None]:
    """A temporary directory with a nats-server and (durable) PostgreSQL in it, not started yet;
    :func:`tear_down` stops them and removes it."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=tmpdir))
    nats_server = EmbeddedNats(tmp / "nats", server_name=server_name)
    return tmp, nats_server, EmbeddedPostgres(tmp / "postgres", durable=True) if postgres else None


async def tear_down(tmp: Path, keep: bool, nats_server: EmbeddedNats, pg: EmbeddedPostgres | None = None) -> None:
    import contextlib
    import shutil

    with contextlib.suppress(Exception):
        await nats_server.stop()
    if pg is not None:
        with contextlib.suppress(Exception):
            await pg.destroy()
    if keep:
        log(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def run_benchmark(
    args: Any, bench: Callable[[Any], Coroutine[Any, Any, dict[str, Any]]], render_table: Callable[[Any], str]
) -> int:
    """Every benchmark's main: quiet service logs, run, print the table and the JSON."""
    import asyncio
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    results = asyncio.run(bench(args))
    print_results(render_table(results), results, args.json)
    return 0
