"""Hostile input against every decoder of outside input, and the logs it may reach.

- ``decode_submission`` and the whole submission path in process (decode, authorise, decide, the
  events' encoding, on a store in memory): random bytes, random JSON, and valid submissions with
  one to three hostile mutations (wrong types, unknown fields, huge strings, deep nesting, invalid
  UTF-8, lone surrogates, control characters and NUL, SQL / shell / HTML / log-forging / ANSI
  strings). Either a refusal with its code (and the field, where the body is a JSON document), or
  an accepted submission whose every string is safe to store and that the published JSON Schema
  (contracts/schemas/submission.schema.json, checked by an independent validator with ECMA-262
  regexes) accepts too, sent on a subject its role and county may use.
- the other decoders: replies, stored events, the ops queries (``json_endpoint``), the YAML data
  files (programme, directory, policy, demo story, calendar year), the gateway's token file;
- the real submissions service on a real nats-server, random bodies: each refusal has a code,
  appends nothing to DUBAN_EVENTS and is kept in DUBAN_REFUSALS, and the service answers
  throughout;
- the logs: a hostile note and URL path stay one JSON line each, escaped, phone numbers masked.

Counts go to tests/faults/report.py: ``offered["fuzz inputs"]``, ``wrongly_accepted[...]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import itertools
import json
import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import jsonschema_rs  # comes with schemathesis: a JSON Schema validator that is not msgspec
import msgspec
import nats
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from contracts.commands import COUNTY_COMMANDS, ReportProgress, Role, Submission, decode_submission
from contracts.directory import DirectoryFileError, load_directory
from contracts.errors import ErrorCode
from contracts.escalation import ConfirmAction, OpsError, WaiveAction
from contracts.events import EventEnvelope, decode_event, encode_event
from contracts.facts import fold
from contracts.ledger import CountyQuery, QueryError, TableQuery
from contracts.payloads import LONGEST_NOTE
from contracts.policy import PolicyFileError, default_policy_path, load_policy
from contracts.programme import ProgrammeFileError, default_programme_path, load_programme
from contracts.replies import Accepted, RefusalRecord, Refused, decode_reply, refused
from contracts.schema import SCHEMA_DIR
from contracts.subjects import EVENTS_STREAM, REFUSALS_STREAM, submit_subject
from contracts.workdays import CalendarFileError, load_year_file
from contracts.yamlfile import DataFileError
from services.common.clock import SimulatedClock
from services.common.logging import configure_logging
from services.common.micro import json_endpoint
from services.demo.script import StoryFileError, default_story_path, load_story
from services.gateway.tokens import TokenStore
from services.submissions.record import CountyRecord, StoredSubmission, stored_submission
from services.submissions.service import SubmissionsService
from services.submissions.store import EventStore
from tests.faults.report import PROFILE, REPORT
from tests.harness import NOW, PROGRAMME, reset_streams, start_service

FUZZ = "fuzz inputs"
MAX_TEXT = LONGEST_NOTE  # the longest free text any field allows (a note)
SUBMISSION_SCHEMA = jsonschema_rs.Draft202012Validator(
    json.loads((SCHEMA_DIR / "submission.schema.json").read_text("utf-8")), validate_formats=True
)
COUNTY = "410928"

# -- what hostile input looks like ------------------------------------------------------------------
INJECTIONS = (
    "'; DROP TABLE ledger.event_log; --",
    "1' OR '1'='1' /*",
    "$(reboot)",
    "`id`; rm -rf / #",
    "| nc 127.0.0.1 4222",
    "<script>alert('x')</script>",
    '"><img src=x onerror=alert(1)>',
    '\n{"level": "error", "event": "forged", "county_code": "410922"}',
    "\r\nDuban-Event-Type: forged\r\n\r\n",
    "\x1b[2J\x1b[31mRED\x1b[0m",
    "\x1b]0;owned\x07",
    "\u202emirrored\u202c",
    "\ufeffbom",
    "\u0085\u2028\u2029",
    "${jndi:ldap://127.0.0.1/a}",
    "{{7*7}}%s%s%n",
    "../../../../etc/passwd",
    "电话 13812345678",
    "+8613812345678",
    "濮政办〔2017〕13号",
    "😀\U0010ffff\ufffe",
)
UNSTORABLE = ("\x00", "a\x00b", "\x00" * 3, "note\u0000tail")
# Raw JSON put where a value goes: invalid UTF-8, lone surrogates, raw controls, odd numbers.
RAW_VALUES = (
    b'"\xff\xfe"',
    b'"caf\xc3"',
    b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8 (CESU-8): not UTF-8
    b'"\xc0\xaf"',  # an overlong "/"
    b'"\xf4\x90\x80\x80"',  # beyond U+10FFFF
    b'"\\ud800"',
    b'"\\udc00x"',
    b'"\\ud83d\\ude00"',  # a proper pair: fine
    b'"a\\u0000b"',
    b'"\x00"',
    b'"\x1b[31m"',
    b'"\\u001b[31m\\u0007"',
    b'"\n"',
    b'"410928\\n"',
    b"NaN",
    b"-Infinity",
    b"1e400",
    b"-0",
    b"60.0",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"true",
    b"null",
    b"{}",
    b"[]",
    b'"\\"',
    b'"',
    b"",
    b'{"$ref": "#"}',
)
FREE_TEXT = ("note", "reason", "comments", "title", "number", "submitted_by", "approval_document_number")


def _deep(depth: int, opener: bytes, closer: bytes, inner: bytes = b"1") -> bytes:
    return opener * depth + inner + closer * depth


hostile_text = st.one_of(
    st.sampled_from(INJECTIONS + UNSTORABLE),
    st.text(max_size=40),  # any code point but surrogates: controls, NUL, RTL marks ...
    st.builds(lambda a, b: a + b, st.sampled_from(INJECTIONS), st.text(max_size=8)),
    st.builds(
        lambda ch, n: ch * n, st.sampled_from(["A", "中", "\x00", "\n", "😀"]), st.sampled_from([100, 2001, 70_000])
    ),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_text,
    st.dates().map(dt.date.isoformat),
    st.from_regex(r"\A[0-9]{4}-(0[1-9]|1[0-2])\Z"),  # periods, "0000-01" among them
    st.datetimes(
        timezones=st.builds(
            dt.timezone, st.timedeltas(min_value=-dt.timedelta(hours=23), max_value=dt.timedelta(hours=23))
        )
    ).map(dt.datetime.isoformat),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=6,
)

EVIDENCE = {"title": "关于同意建设数字化城管系统的批复", "number": "濮政办〔2016〕23号", "sha256": "0" * 64}
BASES: tuple[tuple[Role, dict[str, Any]], ...] = (
    (
        Role.COUNTY,
        {
            "kind": "report_progress",
            "milestone_id": "1.2",
            "percent": 60,
            "note": "项目部已组建",
            "steps_done": ["designer_selected"],
        },
    ),
    (
        Role.COUNTY,
        {
            "kind": "complete_milestone",
            "milestone_id": "1.1",
            "completed_on": "2017-03-28",
            "evidence": [{**EVIDENCE, "url": "https://oa.example/a.pdf"}],
            "note": "已完成",
        },
    ),
    (
        Role.COUNTY,
        {
            "kind": "request_review",
            "review_kind": "plan_pre_review",
            "documents": [{"title": "建设方案"}],
            "note": "请审",
        },
    ),
    (Role.COUNTY, {"kind": "start_trial_operation", "started_on": "2017-06-01", "note": "试运行"}),
    (
        Role.COUNTY,
        {"kind": "file_progress_table", "period": "2017-05", "lines": [{"milestone_id": "1.1", "percent": 100}]},
    ),
    (
        Role.COUNTY,
        {"kind": "request_extension", "milestone_id": "1.3", "proposed_deadline": "2017-08-31", "reason": "招标流标"},
    ),
    (
        Role.CITY,
        {
            "kind": "decide_review",
            "review_kind": "plan_pre_review",
            "outcome": "returned",
            "decided_on": "2017-04-10",
            "comments": "退回修改",
            "approval_document_number": "濮城管〔2017〕1号",
        },
    ),
    (
        Role.CITY,
        {"kind": "decide_extension", "milestone_id": "1.3", "outcome": "granted", "new_deadline": "2017-08-31"},
    ),
    (
        Role.PROVINCE,
        {
            "kind": "decide_review",
            "review_kind": "provincial_plan_review",
            "outcome": "passed",
            "decided_on": "2017-04-28",
            "approval_document_number": "豫建城〔2017〕45号",
        },
    ),
    (Role.CITY, {"kind": "retract_submission", "retracted_submission_id": "s-1", "reason": "误报"}),
)


@dataclass(frozen=True)
class Offer:
    """One hostile body and the subject it is sent on."""

    role: str
    county: str
    body: bytes
    how: str  # what was done to it, for the failure message

    @property
    def subject(self) -> str:
        return f"duban.submit.{self.role}.{self.county}"


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _paths(inner, (*path, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _paths(inner, (*path, index))


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return doc


def _delete(doc: Any, path: tuple[Any, ...]) -> None:
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    del parent[path[-1]]


SLOT = "\ue000slot\ue000"  # a private-use marker, replaced by raw bytes after serialising


@st.composite
def mutated_submissions(draw: st.DrawFn) -> Offer:
    """A valid submission, then up to three hostile changes, then perhaps raw bytes in one value."""
    role, command = draw(st.sampled_from(BASES))
    doc: Any = {
        "submission_id": f"fz-{draw(st.integers(0, 5))}",
        "programme_id": PROGRAMME.id,
        "county_code": COUNTY,
        "command": json.loads(json.dumps(command)),
        "occurred_at": "2017-06-14T09:00:00+08:00",
        "submitted_by": "濮阳县数字城管",
    }
    how: list[str] = []
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["text", "replace", "delete", "unknown field", "free text"]))
        if action == "free text":  # hostile text where text is allowed: accepted unless unstorable
            fields = [p for p in paths if p[-1] in FREE_TEXT]
            path = draw(st.sampled_from(fields)) if fields else path
            _set(doc, path, draw(hostile_text))
        elif action == "text":
            _set(doc, path, draw(hostile_text))
        elif action == "replace":
            _set(doc, path, draw(json_values))
        elif action == "delete":
            _delete(doc, path)
        else:
            containers = [p for p in _paths(doc) if isinstance(_get(doc, p), dict)]
            target = _get(doc, draw(st.sampled_from(containers)))
            target[draw(hostile_text)] = draw(json_values)
        how.append(f"{action} at {list(path)}")
    raw: bytes | None = None
    if draw(st.integers(0, 3)) == 0:
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        raw = draw(
            st.one_of(
                st.sampled_from(RAW_VALUES),
                st.sampled_from([100, 10_000, 150_000]).map(lambda n: _deep(n, b"[", b"]")),
                st.sampled_from([100, 10_000]).map(lambda n: _deep(n, b'{"a":', b"}")),
            )
        )
        _set(doc, path, SLOT)
        how.append(f"raw {raw[:40]!r} at {list(path)}")
    ascii_only = draw(st.booleans())
    body = json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    if raw is not None:
        body = body.replace(json.dumps(SLOT, ensure_ascii=ascii_only).encode(), raw, 1)
    if draw(st.integers(0, 9)) == 0:
        cut = draw(st.integers(0, max(0, len(body) - 1)))
        body = body[:cut]
        how.append(f"truncated at {cut}")
    # Mostly the base's own subject; sometimes another role's or county's (must be refused).
    subject_role = draw(st.sampled_from([role.value] * 6 + ["county", "city", "province"]))
    subject_county = draw(st.sampled_from([COUNTY] * 8 + ["410922", "419999"]))
    return Offer(subject_role, subject_county, body, "; ".join(how) or "valid")


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc


@st.composite
def hostile_texts_in_valid_submissions(draw: st.DrawFn) -> Offer:
    """A valid submission on its own subject whose free text (notes, reasons, titles, document
    numbers, submitted_by) is hostile: stored exactly as sent, or refused by name if unstorable."""
    role, command = draw(st.sampled_from(BASES))
    doc: Any = {
        "submission_id": f"tx-{draw(st.integers(0, 5))}",
        "programme_id": PROGRAMME.id,
        "county_code": COUNTY,
        "command": json.loads(json.dumps(command)),
        "submitted_by": "濮阳县数字城管",
    }
    fields = [p for p in _paths(doc) if p and p[-1] in FREE_TEXT]
    changed = draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True))
    for path in changed:
        _set(doc, path, draw(hostile_text))
    body = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode()
    return Offer(role.value, COUNTY, body, f"hostile text at {[list(p) for p in changed]}")


offers = st.one_of(
    mutated_submissions(),
    mutated_submissions(),
    hostile_texts_in_valid_submissions(),
    hostile_texts_in_valid_submissions(),
    st.binary(max_size=200).map(lambda b: Offer("county", COUNTY, b, "random bytes")),
    json_values.map(lambda v: Offer("county", COUNTY, json.dumps(v).encode("utf-8", "surrogatepass"), "random JSON")),
)


# -- what is safe to store ---------------------------------------------------------------------------
def unstorable(value: Any, path: str = "$") -> list[str]:
    """Every string (anywhere in a message) that could not be stored: NUL, a lone surrogate, or
    longer than any field allows."""
    found: list[str] = []
    if isinstance(value, str):
        if "\x00" in value:
            found.append(f"{path}: NUL")
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            found.append(f"{path}: lone surrogate")
        if len(value) > MAX_TEXT:
            found.append(f"{path}: {len(value)} characters")
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            found += unstorable(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list | tuple):
        for i, inner in enumerate(value):
            found += unstorable(inner, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, inner in value.items():
            found += unstorable(key, f"{path}.<key>") + unstorable(inner, f"{path}.{key}")
    return found


def wrongly_accepted(offer: Offer, submission: Submission) -> str | None:
    """Why an accepted submission should not have been, or None."""
    problems = unstorable(submission)
    if problems:
        return f"unstorable text: {problems[:3]}"
    if not SUBMISSION_SCHEMA.is_valid(json.loads(offer.body)):
        errors = [
            f"{e.instance_path}: {e.message}"[:120] for e in SUBMISSION_SCHEMA.iter_errors(json.loads(offer.body))
        ]
        return f"outside the published JSON Schema: {errors[:3]}"
    if (offer.role == Role.COUNTY) != isinstance(submission.command, COUNTY_COMMANDS):
        return f"a {type(submission.command).__name__} on a {offer.role} subject"
    if submission.county_code != offer.county:
        return f"county {submission.county_code} on {offer.subject}"
    return None


def check_refusal(offer: Offer, refusal: Refused) -> None:
    """A refusal says what: its code, and the field or a detail."""
    assert refusal.code in ErrorCode, refusal
    assert refusal.message_zh and refusal.message_en
    assert refusal.field or refusal.detail, (offer.how, refusal)
    assert refusal.field is None or refusal.field.startswith("$"), refusal


# -- the submission path in process ------------------------------------------------------------------
class MemoryStore:
    """The event store's interface in memory: every append encoded as the real store does."""

    def __init__(self) -> None:
        self.stored: list[bytes] = []
        self.refusals: list[Refused] = []

    async def catch_up(self, record: CountyRecord) -> CountyRecord:
        return record

    async def append(self, record: CountyRecord, events: list[EventEnvelope]) -> list[int]:
        first = len(self.stored) + 1
        self.stored += [encode_event(e) for e in events]
        return list(range(first, len(self.stored) + 1))

    async def index_retractions(self, stored: list[tuple[EventEnvelope, int]]) -> None:
        pass  # (the retraction index is a hint for ledger rebuilds; none here)

    async def load_submission(self, record: CountyRecord, submission_id: str) -> StoredSubmission:
        first = record.submissions[submission_id]
        envelopes = [(decode_event(data), n) for n, data in enumerate(self.stored[first - 1 :], start=first)]
        return stored_submission(list(itertools.takewhile(lambda e: e[0].submission_id == submission_id, envelopes)))

    async def record_refusal(
        self, subject: str, role: str, county: str, body: bytes, refusal: Refused, now: Any
    ) -> None:
        self.refusals.append(refusal)


def _decode_as_the_service_does(body: bytes) -> Submission | Refused:
    try:
        return decode_submission(body)
    except msgspec.ValidationError as exc:
        message, _, path = str(exc).partition(" - at `")
        return refused(ErrorCode.MALFORMED, field=path.rstrip("`") or None, detail=message)
    except msgspec.DecodeError as exc:  # anything else escapes: the property fails
        return refused(ErrorCode.MALFORMED, detail=f"not JSON: {exc}")


def _judge_in_process(offer: Offer) -> None:
    REPORT.offered[FUZZ] += 1
    decoded = _decode_as_the_service_does(offer.body)
    store = MemoryStore()
    service = SubmissionsService(cast(EventStore, store), {PROGRAMME.id: PROGRAMME}, SimulatedClock(NOW))
    outcome = asyncio.run(service.handle(offer.subject, offer.body))
    if isinstance(outcome, Refused):
        check_refusal(offer, outcome)
        assert store.stored == [], "a refusal appended events"
        assert store.refusals == [outcome]
        return
    assert isinstance(decoded, Submission), (offer.how, decoded)
    why = wrongly_accepted(offer, decoded)
    if why is not None:
        REPORT.wrongly_accepted["hostile submission (in process)"] += 1
        raise AssertionError(f"wrongly accepted ({offer.how}): {why}")
    # What was stored reads back as itself, holds nothing unstorable, and folds into a ledger.
    envelopes = [decode_event(data) for data in store.stored]
    assert [encode_event(e) for e in envelopes] == store.stored
    assert len(envelopes) == len(outcome.events) >= 1
    for envelope in envelopes:
        assert unstorable(envelope) == [], (offer.how, unstorable(envelope))
        assert b"\\u0000" not in encode_event(envelope)
    # Text is stored exactly as sent: SQL, HTML, escapes, newlines are just text.
    sent = json.loads(offer.body)
    fact = json.loads(msgspec.json.encode(envelopes[0].payload))
    sent_texts, stored_texts = _free_texts(sent["command"]), _free_texts(fact)
    assert {path: stored_texts.get(path) for path in sent_texts} == sent_texts, offer.how
    assert envelopes[0].actor.user == sent.get("submitted_by")
    fold(PROGRAMME, decoded.county_code, enumerate(envelopes, start=1))


def _free_texts(value: Any) -> dict[tuple[Any, ...], str]:
    return {p: _get(value, p) for p in _paths(value) if p and p[-1] in FREE_TEXT and isinstance(_get(value, p), str)}


@settings(
    max_examples=PROFILE.fuzz_examples * 2,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(offer=offers)
def test_the_submission_path_refuses_or_stores_safely(offer: Offer) -> None:
    """decode → authorise → decide → encode, in process: a refusal that says what, or facts that
    are safe to store; never an exception."""
    _judge_in_process(offer)


def test_every_hostile_text_is_stored_as_sent_or_refused_by_name() -> None:
    """The named cases, each once: injection strings are text (kept byte for byte), a NUL is
    refused naming the field, invalid UTF-8 and lone surrogates are malformed JSON."""

    def body(note: str | None = None, raw_note: bytes | None = None, extra: dict[str, Any] | None = None) -> bytes:
        command = {"kind": "report_progress", "milestone_id": "1.1", "percent": 5, "note": note or ""}
        doc = {"submission_id": "n-1", "programme_id": PROGRAMME.id, "county_code": COUNTY, "command": command}
        data = json.dumps({**doc, **(extra or {})}, ensure_ascii=False).encode()
        return data.replace(b'"note": ""', b'"note": ' + raw_note, 1) if raw_note is not None else data

    for text in INJECTIONS:
        REPORT.offered[FUZZ] += 1
        submission = decode_submission(body(text))
        assert isinstance(submission.command, ReportProgress) and submission.command.note == text
    for text in UNSTORABLE:
        REPORT.offered[FUZZ] += 1
        with pytest.raises(msgspec.ValidationError, match=r"U\+0000 \(NUL\).* - at `\$\.command\.note`"):
            decode_submission(body(text))
    for field, value in (("submitted_by", "王\x00"), ("submitted_by", "x" * 201), ("schema_version", 2)):
        REPORT.offered[FUZZ] += 1
        with pytest.raises(msgspec.ValidationError, match=rf"at `\$\.{field}`"):
            decode_submission(body(extra={field: value}))
    for raw in (b'"\xff\xfe"', b'"\xed\xa0\x80"', b'"\\ud800"', b'"\\udc00"', b'"\x00"', b'"\x1b"'):
        REPORT.offered[FUZZ] += 1
        with pytest.raises(msgspec.DecodeError) as refused_as:
            decode_submission(body(raw_note=raw))
        assert not isinstance(refused_as.value, msgspec.ValidationError)
    # A period whose first day is no date ("0000-01" made the service fail), or with a newline.
    for period in ("0000-01", "2017-05\n", "2017-13"):
        REPORT.offered[FUZZ] += 1
        table = {"kind": "file_progress_table", "period": period, "lines": [{"milestone_id": "1.1", "percent": 1}]}
        doc = {"submission_id": "p-1", "programme_id": PROGRAMME.id, "county_code": COUNTY, "command": table}
        with pytest.raises(msgspec.ValidationError, match=r"at `\$\.command\.period`"):
            decode_submission(json.dumps(doc).encode())
    # Identifiers end where the published schema says: no trailing newline gets through.
    for field, value in (
        ("submission_id", "n-1\n"),
        ("county_code", "410928\n"),
        ("programme_id", PROGRAMME.id + "\n"),
    ):
        REPORT.offered[FUZZ] += 1
        with pytest.raises(msgspec.ValidationError, match=rf"at `\$\.{field}`"):
            decode_submission(body(extra={field: value}))


# -- the other decoders -------------------------------------------------------------------------------
@st.composite
def mutated_json(draw: st.DrawFn, docs: tuple[Any, ...]) -> bytes:
    """One of ``docs`` (a JSON value) with up to three hostile changes, perhaps raw bytes, perhaps cut."""
    doc = json.loads(json.dumps(draw(st.sampled_from(docs))))
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        doc = _set(doc, path, draw(json_values | hostile_text))
    body = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from(RAW_VALUES)) + body[at:]
    if draw(st.integers(0, 5)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    return body


def _stored_event() -> bytes:
    store = MemoryStore()
    service = SubmissionsService(cast(EventStore, store), {PROGRAMME.id: PROGRAMME}, SimulatedClock(NOW))
    body = json.dumps(
        {"submission_id": "ev-1", "programme_id": PROGRAMME.id, "county_code": COUNTY, "command": BASES[1][1]}
    ).encode()
    assert isinstance(asyncio.run(service.handle(submit_subject(Role.COUNTY, COUNTY), body)), Accepted)
    return store.stored[0]


EVENT_DOC = json.loads(_stored_event())
REPLY_DOCS = (
    {
        "status": "accepted",
        "submission_id": "a",
        "events": [{"event_id": "a/0", "event_type": "x", "stream_sequence": 1}],
    },
    json.loads(msgspec.json.encode(refused(ErrorCode.UNKNOWN_MILESTONE, submission_id="a", field="$.command"))),
)


@settings(max_examples=PROFILE.fuzz_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(mutated_json(REPLY_DOCS), st.binary(max_size=100)))
def test_reply_decoding_refuses_cleanly(data: bytes) -> None:
    REPORT.offered[FUZZ] += 1
    try:
        reply = decode_reply(data)
    except msgspec.DecodeError:  # (ValidationError is one): the only way to fail
        return
    assert isinstance(reply, Accepted | Refused)


@settings(max_examples=PROFILE.fuzz_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        mutated_json((EVENT_DOC,)),
        st.sampled_from([b"[1]", b'"x"', b"1", b'{"payload": {"type": []}}', _deep(50_000, b"[", b"]")]),
        st.builds(
            lambda version: json.dumps({**EVENT_DOC, "schema_version": version}).encode(),
            st.one_of(st.integers(-3, 3), st.just("1"), st.just(None), st.just([1]), st.just(1.5)),
        ),
    )
)
def test_stored_event_decoding_fails_only_as_not_an_event(data: bytes) -> None:
    """What consumers and the submissions service's catch-up rely on: DecodeError/ValidationError
    (the bytes are parked or skipped), never another exception."""
    REPORT.offered[FUZZ] += 1
    try:
        envelope = decode_event(data)
    except msgspec.DecodeError:
        return
    assert isinstance(envelope, EventEnvelope)


class FakeRequest:
    """What a json_endpoint handler uses of a NATS micro request."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.answers: list[tuple[str, bytes]] = []

    async def respond(self, data: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.answers.append(("ok", data))

    async def respond_error(self, code: str, description: str, data: bytes = b"", headers: Any = None) -> None:
        self.answers.append((code, data))


OPS_QUERIES: tuple[tuple[type[msgspec.Struct], type[msgspec.Struct], dict[str, Any]], ...] = (
    (ConfirmAction, OpsError, {"action_id": "puyang-2017-13:410928:x", "operator": "市督查局 王科长", "note": "同意"}),
    (WaiveAction, OpsError, {"action_id": "puyang-2017-13:410928:x", "operator": "王科长", "reason": "已约谈"}),
    (CountyQuery, QueryError, {"county_code": COUNTY, "as_of": "2017-09-01T23:59:59+08:00"}),
    (TableQuery, QueryError, {"programme_id": PROGRAMME.id, "as_of": "2017-09-01T23:59:59+08:00"}),
)


@settings(max_examples=PROFILE.fuzz_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(OPS_QUERIES) - 1), data=st.data())
def test_ops_queries_answer_400_or_decode_storable_values(which: int, data: st.DataObject) -> None:
    """Operators' requests (the city may confirm or waive actions; the gateway forwards county
    reads): a 400 with the error body, or a query whose text can be stored (a confirmation's
    operator and note go into an action_confirmed event)."""
    query_type, error_type, example = OPS_QUERIES[which]
    body = data.draw(st.one_of(mutated_json((example,)), st.binary(max_size=80)))
    REPORT.offered[FUZZ] += 1
    seen: list[Any] = []

    async def answer(query: Any) -> dict[str, bool]:
        seen.append(query)
        return {"ok": True}

    request = FakeRequest(body)
    endpoint = json_endpoint("fuzz", "duban.fuzz", query_type, answer, error_type)
    asyncio.run(endpoint.handler(request))  # type: ignore[arg-type]
    [(status, reply)] = request.answers
    if status == "ok":
        [query] = seen
        # What an action_confirmed / action_waived event keeps (the action id is only looked up).
        kept = [unstorable(getattr(query, name, ""), f"$.{name}") for name in ("operator", "note", "reason")]
        if any(kept):
            REPORT.wrongly_accepted[f"ops {query_type.__name__}"] += 1
            raise AssertionError(f"{query_type.__name__} accepted unstorable text: {kept}")
    else:
        assert status == "400" and seen == []
        assert msgspec.json.decode(reply, type=error_type)


# -- operators' files --------------------------------------------------------------------------------
YEAR_FILE = "format: duban.calendar/v1\nyear: 2027\nholidays:\n  - {from: 2027-01-01, to: 2027-01-03, name: 元旦}\n"
DATA_FILES: tuple[tuple[str, str, Callable[[Path], object], type[DataFileError]], ...] = (
    ("programme", default_programme_path().read_text("utf-8"), load_programme, ProgrammeFileError),
    (
        "directory",
        (default_programme_path().parent / "puyang-2017-13.directory.example.yaml").read_text("utf-8"),
        lambda path: load_directory(path, PROGRAMME),
        DirectoryFileError,
    ),
    ("policy", default_policy_path().read_text("utf-8"), load_policy, PolicyFileError),
    ("story", default_story_path().read_text("utf-8"), lambda path: load_story(path, PROGRAMME), StoryFileError),
    ("calendar", YEAR_FILE, load_year_file, CalendarFileError),
)
YAML_VALUES = (
    '"\\0"',
    '"a\\0b"',
    '"\\ud800"',
    '"\\udc00 x"',
    '"\\e[31m red"',
    "'\x1b[31m'",
    "!!python/object/apply:os.system ['true']",
    "!!binary AAAA",
    "*nowhere",
    "&loop [*loop]",
    "[" * 500 + "]" * 500,  # deeper than PyYAML recurses
    "{a: " * 500 + "1" + "}" * 500,
    "2017-02-30",
    "0001-01-01",
    "9999-12-31",
    "1e999",
    ".nan",
    "-.inf",
    "0x7fffffffffffffffffffffff",
    "~",
    "[]",
    "{}",
    '"' + "长" * 3000 + '"',
    "'; DROP TABLE ledger.milestones; --",
    "<script>alert(1)</script>",
)
_KEY_LINE = re.compile(r"^(\s*-?\s*[A-Za-z_]+:)\s*(\S.*)$")


@st.composite
def hostile_data_files(draw: st.DrawFn) -> tuple[str, bytes, Callable[[Path], object], type[DataFileError]]:
    name, text, load, error = draw(st.sampled_from(DATA_FILES))
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        candidates = [i for i, line in enumerate(lines) if _KEY_LINE.match(line)]
        i = draw(st.sampled_from(candidates))
        match = _KEY_LINE.match(lines[i])
        assert match is not None
        # (Short texts: PyYAML's pure-Python scanner takes seconds over a 400 kB scalar.)
        short_text = st.one_of(st.sampled_from(INJECTIONS + UNSTORABLE), st.text(max_size=40))
        value = draw(st.one_of(st.sampled_from(YAML_VALUES), short_text.map(json.dumps)))
        lines[i] = f"{match.group(1)} {value}"
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 5)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\x00", b"\t", b"\x1b"])) + data[at:]
    return name, data, load, error


@settings(max_examples=max(50, PROFILE.fuzz_examples // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=hostile_data_files())
def test_operators_data_files_load_or_say_where_they_are_wrong(
    case: tuple[str, bytes, Callable[[Path], object], type[DataFileError]],
) -> None:
    """Programme, directory, policy, story and calendar files: loaded, or refused with the file's
    own error (file, line, key, what) — never another exception; nothing loaded holds a NUL or a
    lone surrogate."""
    name, data, load, error = case
    REPORT.offered[FUZZ] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_bytes(data)
        try:
            loaded = load(path)
        except error as exc:
            assert str(path) in str(exc)
            return
    if unstorable(loaded):
        REPORT.wrongly_accepted[f"{name} file"] += 1
        raise AssertionError(f"the {name} file loaded unstorable text: {unstorable(loaded)[:3]}")


@settings(max_examples=max(50, PROFILE.fuzz_examples // 3), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_corrupt_token_file_authorises_nobody_and_raises_nothing(data: st.DataObject) -> None:
    """The gateway re-reads its token file on change; whatever it holds, verify() answers a record
    or None (fail closed), never an exception (which would be a 500 for every request)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = TokenStore(Path(tmp) / "tokens.json")
        record, token = store.issue(Role.COUNTY, COUNTY, "濮阳县数字城管", NOW)
        valid = json.loads(store.path.read_bytes())
        store.path.write_bytes(data.draw(st.one_of(mutated_json((valid,)), st.binary(max_size=100))))
        REPORT.offered[FUZZ] += 1
        found = TokenStore(store.path).verify(token)
        assert found is None or found.token_id == record.token_id


# -- the real service on a real nats-server -----------------------------------------------------------
@dataclass
class LiveService:
    """The submissions service as it runs (its own connection), a client, and the streams."""

    nc: NatsClient
    js: JetStreamContext
    stop: Callable[[], Any]
    refusal_ids: set[str]

    @classmethod
    async def start(cls, url: str) -> LiveService:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await reset_streams(js)
        micro, service_nc = await start_service(url, SimulatedClock(NOW))

        async def stop() -> None:
            await micro.stop()
            await service_nc.close()
            await nc.close()

        return cls(nc, js, stop, set())

    async def last(self, stream: str) -> int:
        return int((await self.js.stream_info(stream)).state.last_seq)

    async def offer(self, offer: Offer) -> None:
        REPORT.offered[FUZZ] += 1
        events, refusals = await self.last(EVENTS_STREAM), await self.last(REFUSALS_STREAM)
        msg = await self.nc.request(offer.subject, offer.body, timeout=10)
        assert not (msg.headers or {}).get("Nats-Service-Error-Code"), (offer.how, msg.headers)
        reply = decode_reply(msg.data)
        if isinstance(reply, Refused):
            check_refusal(offer, reply)
            assert await self.last(EVENTS_STREAM) == events, f"a refusal appended events ({offer.how})"
            # Kept in DUBAN_REFUSALS, once per (body, code): a resend is deduplicated there.
            kept = f"{hashlib.sha256(offer.body).hexdigest()}-{reply.code}"
            expected = refusals + (0 if kept in self.refusal_ids else 1)
            assert await self.last(REFUSALS_STREAM) == expected, offer.how
            if kept not in self.refusal_ids and len(offer.body) <= 64 * 1024:
                stored = await self.js.get_msg(REFUSALS_STREAM, expected)
                assert stored.data is not None
                record = msgspec.json.decode(stored.data, type=RefusalRecord)
                assert record.refusal == reply and record.subject == offer.subject
            self.refusal_ids.add(kept)
            return
        submission = decode_submission(offer.body)
        why = wrongly_accepted(offer, submission)
        if why is not None:
            REPORT.wrongly_accepted["hostile submission (nats)"] += 1
            raise AssertionError(f"wrongly accepted ({offer.how}): {why}")
        for stored_event in reply.events:
            raw = await self.js.get_msg(EVENTS_STREAM, stored_event.stream_sequence)
            assert raw.data is not None and unstorable(decode_event(raw.data)) == []


def test_the_real_service_refuses_hostile_bodies_and_keeps_answering(nats_url: str) -> None:
    """Random bodies on the real service over real NATS: a Refused with a code for each refusal,
    nothing appended to DUBAN_EVENTS for it (it is kept in DUBAN_REFUSALS), no service error,
    and afterwards the service still accepts a valid submission."""
    with asyncio.Runner() as runner:
        live = runner.run(LiveService.start(nats_url))
        try:

            @settings(
                max_examples=PROFILE.fuzz_examples,
                deadline=None,
                suppress_health_check=[
                    HealthCheck.too_slow,
                    HealthCheck.data_too_large,
                    HealthCheck.large_base_example,
                ],
            )
            @given(offer=offers.filter(lambda o: len(o.body) < 900_000))
            def offer_one(offer: Offer) -> None:
                runner.run(live.offer(offer))

            offer_one()
            valid = json.dumps(
                {
                    "submission_id": "after-fuzz",
                    "programme_id": PROGRAMME.id,
                    "county_code": COUNTY,
                    "command": BASES[0][1],
                }
            ).encode()
            msg = runner.run(live.nc.request(submit_subject(Role.COUNTY, COUNTY), valid, timeout=10))
            assert isinstance(decode_reply(msg.data), Accepted), msg.data
        finally:
            runner.run(live.stop())
    assert REPORT.wrongly_accepted["hostile submission (nats)"] == 0


# -- the logs ---------------------------------------------------------------------------------------
PHONE = "13812345678"
HOSTILE_NOTE = (
    f'进展顺利\n{{"level": "error", "event": "forged", "county_code": "410922"}}\r\n'
    f"\x1b[31m\x1b]0;owned\x07 联系 {PHONE} 或 +86{PHONE}\u2028end"
)


@contextlib.contextmanager
def json_logs() -> Iterator[io.StringIO]:
    """The services' JSON logging into a buffer; the previous configuration afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buffer = io.StringIO()
    configure_logging("json", "debug", stream=buffer)
    try:
        yield buffer
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)


def check_log_lines(text: str, forbidden: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every line one JSON record, no raw control character, no full phone number, nothing forbidden."""
    records = []
    assert text.endswith("\n"), text[-200:]
    for line in text.split("\n")[:-1]:  # JSON lines end with "\n"; nothing else may end a line
        assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", line), f"raw control character in {line!r}"
        records.append(json.loads(line))  # one record per line: a forged line would not parse as ours
        for secret in (PHONE, *forbidden):
            assert secret not in line, f"{secret!r} in {line!r}"
    return records


def test_hostile_text_is_logged_as_one_escaped_json_line_with_phones_masked() -> None:
    """Whatever text a caller logs (a note, a path, a library's message): each record is one JSON
    line, escapes stay escaped, a forged line stays inside its string, phone numbers are masked."""
    with json_logs() as buffer:
        log = structlog.get_logger("tests.hostile")
        log.info("submission note", note=HOSTILE_NOTE, detail={"note": HOSTILE_NOTE, "items": [HOSTILE_NOTE]})
        log.warning(HOSTILE_NOTE)
        try:
            raise ValueError(HOSTILE_NOTE)
        except ValueError:
            log.exception("failed")
        logging.getLogger("uvicorn.error").warning("stdlib: %s", HOSTILE_NOTE)
        logging.getLogger("nats.aio.client").error("stdlib exception", exc_info=ValueError(HOSTILE_NOTE))
    records = check_log_lines(buffer.getvalue())
    REPORT.offered[FUZZ] += 5
    assert len(records) == 5, [r.get("event") for r in records]
    assert records[0]["note"].startswith("进展顺利\n{") and "\x1b[31m" in records[0]["note"]  # kept, escaped
    assert "138****5678" in records[0]["note"] and "+86138****5678" in records[0]["note"]
    assert not any(r.get("event") == "forged" for r in records)


def test_a_hostile_submission_is_logged_escaped_by_the_real_service(nats_url: str) -> None:
    """The service's own log lines while it refuses and accepts hostile submissions (a note with a
    forged line, escapes and a phone number; an unknown field named like a log line)."""
    bodies: list[dict[str, Any]] = [
        {"command": {**BASES[0][1], "note": HOSTILE_NOTE}, "submitted_by": f"王 {PHONE}"},
        {"command": {**BASES[0][1], "milestone_id": "9.9", "note": HOSTILE_NOTE}},
        {"command": {**BASES[0][1], HOSTILE_NOTE: 1}},
        {"command": {**BASES[0][1], "note": HOSTILE_NOTE + "\x00"}},
    ]
    with json_logs() as buffer, asyncio.Runner() as runner:
        live = runner.run(LiveService.start(nats_url))
        try:
            for i, extra in enumerate(bodies):
                doc = {"submission_id": f"log-{i}", "programme_id": PROGRAMME.id, "county_code": COUNTY, **extra}
                body = json.dumps(doc, ensure_ascii=False).encode()
                REPORT.offered[FUZZ] += 1
                reply = runner.run(live.nc.request(submit_subject(Role.COUNTY, COUNTY), body, timeout=10))
                decode_reply(reply.data)  # answered with a reply, whatever it says
        finally:
            runner.run(live.stop())
    records = check_log_lines(buffer.getvalue())
    assert any(r.get("event") == "submission accepted" for r in records)
    assert sum(r.get("event") == "submission refused" for r in records) == 3
