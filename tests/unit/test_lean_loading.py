"""What a service process loads and keeps at start (its peak memory: tests/bench/bench_memory.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from contracts.directory import DirectoryFileError, example_directory_path, load_directory
from contracts.programme import load_default_programme

ROOT = Path(__file__).resolve().parents[2]


def test_a_valid_file_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The node tree for error lines is composed only for an error (it costs ~100× the text)."""

    def compose(*args: object, **kwargs: object) -> None:
        raise AssertionError("composed without an error to locate")

    monkeypatch.setattr(yaml, "compose", compose)
    load_directory(example_directory_path(), load_default_programme())


def test_an_invalid_file_still_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "directory.yaml"
    path.write_text("# contacts\npeople: []\nformat: duban.directory/v0\n", encoding="utf-8")
    with pytest.raises(DirectoryFileError) as caught:
        load_directory(path)
    assert (caught.value.line, caught.value.key) == (3, "$.format")


def test_running_one_service_does_not_import_the_gateway() -> None:
    """`duban up --services escalation` carries neither FastAPI nor FastStream (~20 MB)."""
    code = (
        "import sys; import services.cli.main; "
        "from services.common.supervisor import service_runners; "
        "service_runners(('escalation', 'notifier', 'ledger', 'submissions')); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'faststream'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
