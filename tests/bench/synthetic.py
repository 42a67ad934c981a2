"""Synthetic data the benchmark programs share: a programme with thousands of county-level units.

The benchmarks are run as scripts (``python tests/bench/bench_x.py``); importing this module puts
the project root on ``sys.path`` for them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

from contracts.programme import County, Person, Programme, load_default_programme  # noqa: E402


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
