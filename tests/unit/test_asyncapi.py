"""The committed AsyncAPI document matches the code, resolves, is valid AsyncAPI 3.0.0, has a
channel for every subject in ``contracts``, and its examples validate against its schemas."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

import contracts
from contracts.asyncapi import ASYNCAPI_PATH, REGENERATE, asyncapi_document, render_asyncapi
from contracts.commands import Role

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = ROOT / "examples"
# The official JSON Schema of AsyncAPI 3.0.0 ships in the npm package @asyncapi/specs (no PyPI
# package has it): `npm install -g @asyncapi/specs`, or point this variable at its folder.
SPECS_ENV = "DUBAN_ASYNCAPI_SPECS"
SPECS_FILE = Path("schemas") / "3.0.0-without-$id.json"
DOC_URI = "urn:duban:asyncapi"
SUBJECT_NAME = re.compile(r"^[A-Z][A-Z0-9_]*_(SUBJECT|ALL|PREFIX)$")


@cache
def _document() -> dict[str, Any]:
    """The document as the code renders it (the drift test compares it with the committed file)."""
    document: dict[str, Any] = json.loads(render_asyncapi())
    return document


def _walk(node: Any, path: str = "#") -> Iterator[tuple[str, str, Any]]:
    """(JSON pointer, key, value) of every member of every object, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from _walk(value, f"{path}/{key.replace('~', '~0').replace('/', '~1')}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _walk(item, f"{path}/{index}")


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} is not a reference inside the document"
    node: Any = document
    for token in ref[2:].split("/"):
        key = token.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and key in node, f"{ref} does not resolve ({key!r} missing)"
        node = node[key]
    return node


# -- (1) drift ----------------------------------------------------------------------------------
def test_committed_document_matches_the_code() -> None:
    assert ASYNCAPI_PATH.exists(), f"{ASYNCAPI_PATH} is missing: run `{REGENERATE}`"
    committed = ASYNCAPI_PATH.read_text("utf-8")
    rendered = render_asyncapi()
    if committed != rendered:
        line = next(
            (
                i
                for i, (a, b) in enumerate(zip(committed.splitlines(), rendered.splitlines(), strict=False), 1)
                if a != b
            ),
            min(committed.count("\n"), rendered.count("\n")) + 1,
        )
        pytest.fail(
            f"{ASYNCAPI_PATH.name} drifted from the code (first difference at line {line}): run `{REGENERATE}`",
            pytrace=False,
        )


def test_the_document_is_asyncapi_3_with_the_embedded_server() -> None:
    document = asyncapi_document()
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "duban 督办"
    assert (document["servers"]["embedded"]["host"], document["servers"]["embedded"]["protocol"]) == (
        "127.0.0.1:4333",
        "nats",
    )


# -- (2) references -----------------------------------------------------------------------------
def test_every_ref_resolves_and_every_schema_is_used() -> None:
    document = _document()
    refs = [value for _, key, value in _walk(document) if key == "$ref"]
    assert refs
    for ref in refs:
        _resolve(document, ref)
    for _, key, value in _walk(document):
        if key == "x-discriminator":
            for target in value["mapping"].values():
                _resolve(document, target)
    used = {ref.rsplit("/", 1)[1] for ref in refs if ref.startswith("#/components/schemas/")}
    unused = set(document["components"]["schemas"]) - used
    assert not unused, f"schemas nobody references: {sorted(unused)}"


def test_operations_use_their_channels_messages_and_parameters_match_addresses() -> None:
    document = _document()
    channels, operations = document["channels"], document["operations"]
    operated = set()
    for operation_id, operation in operations.items():
        channel_ref = operation["channel"]["$ref"]
        operated.add(channel_ref)
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), f"{operation_id}: {message}"
        if "reply" in operation:
            reply_channel = operation["reply"]["channel"]["$ref"]
            assert operation["reply"]["messages"], operation_id
            for message in operation["reply"]["messages"]:
                assert message["$ref"].startswith(reply_channel + "/messages/"), f"{operation_id}: {message}"
    for channel_id, channel in channels.items():
        address = channel["address"]
        if address is None:
            continue
        assert f"#/channels/{channel_id}" in operated, f"channel {channel_id} has no operation"
        placeholders = re.findall(r"\{([^}]+)\}", address)
        assert sorted(placeholders) == sorted(channel.get("parameters", {})), channel_id


def test_request_reply_subjects_answer_what_the_services_answer() -> None:
    operations = _document()["operations"]

    def replies(operation_id: str) -> set[str]:
        return {m["$ref"].rsplit("/", 1)[1] for m in operations[operation_id]["reply"]["messages"]}

    assert replies("receiveSubmit") == {"Accepted", "Refused"}
    for operation_id, operation in operations.items():
        service = operation.get("tags", [{}])[0].get("name")
        if operation["action"] == "send":
            assert "reply" not in operation, operation_id
        elif operation_id.startswith("receiveLedger"):
            assert "QueryError" in replies(operation_id), operation_id
        elif service in {"escalation", "notifier"} or operation_id == "receiveSubmissionsStatus":
            assert "OpsError" in replies(operation_id), operation_id
    report = _document()["components"]["messages"]["ProgressTableXlsx"]
    assert report["contentType"] == "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


# -- (3) every subject in contracts has a channel -----------------------------------------------
def _subject_definitions() -> Iterator[tuple[str, str]]:
    """(where, value) of every ``*_SUBJECT``/``*_ALL``/``*_PREFIX`` constant and, called with
    sample tokens, every ``*_subject`` function of every module in ``contracts``."""
    for info in pkgutil.iter_modules(contracts.__path__):
        module = importlib.import_module(f"contracts.{info.name}")
        for name, value in vars(module).items():
            if SUBJECT_NAME.match(name) and isinstance(value, str):
                yield f"contracts.{info.name}.{name}", value
            elif (
                inspect.isfunction(value)
                and value.__module__ == module.__name__
                and name.endswith("_subject")
                and not name.startswith("parse_")
            ):
                yield f"contracts.{info.name}.{name}()", _call_with_samples(value)


def _call_with_samples(function: Callable[..., Any]) -> str:
    arguments = [
        Role.COUNTY.value if "role" in parameter else f"token{index}"
        for index, parameter in enumerate(inspect.signature(function).parameters)
    ]
    result = function(*arguments)
    assert isinstance(result, str), f"{function.__name__} does not return a subject"
    return result


def _address_pattern(address: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", address)
    return re.compile("".join("[^.]+" if p.startswith("{") else re.escape(p) for p in parts))


def _sample(address: str) -> str:
    return re.sub(r"\{[^}]+\}", "token", address)


def _filter_pattern(subject_filter: str) -> re.Pattern[str]:
    tokens = {"*": "[^.]+", ">": ".+"}
    return re.compile(r"\.".join(tokens.get(t, re.escape(t)) for t in subject_filter.split(".")))


def _has_channel(value: str, addresses: list[str]) -> bool:
    tokens = value.split(".")
    if "*" in tokens or ">" in tokens:  # a filter: some channel's subjects fall under it
        return any(_filter_pattern(value).fullmatch(_sample(a)) for a in addresses)
    return any(_address_pattern(a).fullmatch(value) or a.startswith(value + ".") for a in addresses)


def test_every_subject_in_contracts_has_a_channel() -> None:
    addresses = [c["address"] for c in _document()["channels"].values() if c["address"] is not None]
    definitions = list(_subject_definitions())
    found = {where for where, _ in definitions}
    # The scan sees the modules it must (a renamed module would silently drop out of it).
    assert {
        "contracts.subjects.SUBMIT_ALL",
        "contracts.ledger.TABLE_SUBJECT",
        "contracts.escalation.OPS_PREFIX",
    } <= found
    assert "contracts.subjects.refusal_subject()" in found
    missing = [f"{where} = {value!r}" for where, value in definitions if not _has_channel(value, addresses)]
    assert not missing, (
        f"subjects without a channel in the AsyncAPI document: {missing}; add a Channel to CHANNELS in "
        f"contracts/asyncapi.py and run `{REGENERATE}`"
    )


def test_the_subject_check_notices_a_missing_channel() -> None:
    addresses = [c["address"] for c in _document()["channels"].values() if c["address"] is not None]
    assert _has_channel("duban.submit.county.410928", addresses)
    assert _has_channel("duban.events.>", addresses)
    assert not _has_channel("duban.ops.ledger.compact", addresses)
    assert not _has_channel("duban.ops.archive", addresses)
    assert not _has_channel("duban.query.*.table.x", addresses)


# -- (4) the official AsyncAPI 3.0.0 JSON Schema -------------------------------------------------
def _official_schema() -> Path | None:
    roots: list[Path] = []
    if configured := os.environ.get(SPECS_ENV):
        roots.append(Path(configured))
    roots.append(ROOT / "node_modules" / "@asyncapi" / "specs")
    npm = shutil.which("npm")
    if npm:
        try:
            answer = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            answer = None
        if answer is not None and answer.returncode == 0 and answer.stdout.strip():
            roots.append(Path(answer.stdout.strip()) / "@asyncapi" / "specs")
    for root in roots:
        for candidate in (root, root / SPECS_FILE, root / "@asyncapi" / "specs" / SPECS_FILE):
            if candidate.is_file():
                return candidate
    return None


def test_the_document_is_valid_against_the_official_asyncapi_3_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    path = _official_schema()
    if path is None:
        pytest.skip(
            f"the AsyncAPI 3.0.0 JSON Schema is not installed: `npm install -g @asyncapi/specs`, "
            f"or set {SPECS_ENV} to the folder of @asyncapi/specs"
        )
    official = json.loads(path.read_text("utf-8"))
    validator = jsonschema.Draft7Validator(official)
    errors = sorted(validator.iter_errors(_document()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors[:10])
    broken = json.loads(json.dumps(_document()))
    broken["operations"]["receiveSubmit"]["action"] = "publish"  # AsyncAPI 2's word, not 3's
    assert not validator.is_valid(broken)


# -- examples validate against their schemas ------------------------------------------------------
def _validator(pointer: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    jsonschema_specs = pytest.importorskip("referencing.jsonschema")
    resource = referencing.Resource.from_contents(_document(), default_specification=jsonschema_specs.DRAFT202012)
    registry = referencing.Registry().with_resource(DOC_URI, resource)
    return jsonschema.Draft202012Validator(
        {"$ref": f"{DOC_URI}{pointer}"},
        registry=registry,
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )


def _message_examples() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, message in _document()["components"]["messages"].items():
        for example in message.get("examples", []):
            yield name, example


@pytest.mark.parametrize(
    ("message", "example"), list(_message_examples()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_each_example_in_the_document_validates(message: str, example: dict[str, Any]) -> None:
    pointer = f"#/components/messages/{message}"
    if "payload" in example:
        errors = list(_validator(f"{pointer}/payload").iter_errors(example["payload"]))
        assert not errors, [e.message for e in errors]
    if "headers" in example:
        errors = list(_validator(f"{pointer}/headers").iter_errors(example["headers"]))
        assert not errors, [e.message for e in errors]


@pytest.mark.parametrize("path", sorted(EXAMPLES_DIR.glob("*.json")), ids=lambda p: p.name)
def test_the_example_submissions_validate_against_the_submit_channel(path: Path) -> None:
    channel = _document()["channels"]["submit"]
    (message_ref,) = [m["$ref"] for m in channel["messages"].values()]
    errors = list(_validator(f"{message_ref}/payload").iter_errors(json.loads(path.read_text("utf-8"))))
    assert not errors, [e.message for e in errors]


def test_a_wrong_submission_does_not_validate() -> None:
    example = json.loads((EXAMPLES_DIR / "progress-410928.json").read_text("utf-8"))
    validator = _validator("#/components/messages/Submission/payload")
    assert validator.is_valid(example)
    assert not validator.is_valid(example | {"colour": "red"})  # unknown fields are refused
    assert not validator.is_valid(example | {"command": example["command"] | {"kind": "report_rumour"}})
    actions = _validator("#/components/messages/ActionEvent/payload")
    fact = _document()["components"]["messages"]["FactEvent"]["examples"][0]["payload"]
    assert not actions.is_valid(fact)  # a fact is not an action


def test_every_channel_has_an_example() -> None:
    document = _document()
    messages = document["components"]["messages"]
    for operation_id, operation in document["operations"].items():
        refs = [*operation["messages"], *operation.get("reply", {}).get("messages", [])]
        names = [m["$ref"].rsplit("/", 1)[1] for m in refs]
        assert any(messages[n].get("examples") for n in names), (
            f"{operation_id}: none of {names} has an example; add one to EXAMPLES in contracts/asyncapi.py"
        )
