"""JSON Schema for every message duban sends or stores, from the msgspec types themselves.

``duban schema`` writes them to contracts/schemas/; a test fails when the committed files
drift from the code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from contracts.commands import Submission
from contracts.directory import Directory
from contracts.events import EventEnvelope
from contracts.programme import Programme
from contracts.replies import RefusalRecord, Reply

MESSAGES: dict[str, Any] = {
    "submission": Submission,
    "reply": Reply,
    "event-envelope": EventEnvelope,
    "refusal-record": RefusalRecord,
    "programme-file": Programme,
    "directory-file": Directory,
}

SCHEMA_DIR = Path(__file__).parent / "schemas"


def render_schemas() -> dict[str, str]:
    """File name → JSON text, deterministic."""
    out = {}
    for name, type_ in MESSAGES.items():
        schema = msgspec.json.schema(type_)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = f"duban {name}"
        out[f"{name}.schema.json"] = json.dumps(schema, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
    return out


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in render_schemas().items():
        path = directory / file_name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
