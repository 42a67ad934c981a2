"""``decode_stored_event``: ``decode_event``'s answer without re-running msgspec's regex checks.

It must give the same answer for any bytes: the same field values for an event, the same error
(so the same parked reason) for anything else. Checked against ``decode_event`` itself, with
every string in every event type replaced by hostile values (NUL, a trailing newline, too long,
wrong shapes), and with arbitrary mutations of the bytes.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts import events as ev
from contracts.events import EventEnvelope, decode_event, decode_stored_event, encode_event
from contracts.facts import apply, new_facts
from contracts.programme import default_programme_path, load_programme
from services.ledger.projection import _copy_line
from tests.samples import sample_envelope
from tests.unit.test_contracts import ONE_OF_EACH

HOSTILE_STRINGS = (
    "",
    "\x00",
    "a\x00b",
    "招标中\x00",
    "410922\n",
    "1.3\n",
    "\n",
    "x" * 2001,
    "ABC",
    "1.2",
    "410922",
    "puyang-2017-13",
    "2017-13",
    "2017-06",
    "0" * 64,
    "0" * 63 + "g",
    "https://example.org/a b",
    "https://example.org/a",
    "tender_published",
    "Tender",
    "passed",
    "county",
    "\\",
    "\t",
)


def outcome(decode: Any, data: bytes) -> tuple[str, Any]:
    try:
        decoded = decode(data)
    except msgspec.DecodeError as exc:  # (ValidationError is one)
        return type(exc).__name__, str(exc)
    assert isinstance(decoded, EventEnvelope)
    return "ok", encode_event(decoded)


def assert_same(data: bytes) -> None:
    assert outcome(decode_stored_event, data) == outcome(decode_event, data)


def string_paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from string_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from string_paths(item, (*path, index))


def replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = dict(document) if isinstance(document, dict) else list(document)
    copy[path[0]] = replaced(document[path[0]], path[1:], value)
    return copy


@pytest.mark.parametrize("payload", ONE_OF_EACH, ids=lambda p: ev.event_type_of(p))
def test_a_valid_event_decodes_to_the_same_values(payload: ev.EventPayload) -> None:
    original = sample_envelope(payload)
    data = encode_event(original)
    stored = decode_stored_event(data)
    assert encode_event(stored) == data
    assert isinstance(stored, EventEnvelope) and isinstance(stored.payload, type(payload))
    assert stored.event_type == original.event_type
    assert msgspec.structs.asdict(stored).keys() == msgspec.structs.asdict(original).keys()
    for name in original.__struct_fields__:
        assert msgspec.to_builtins(getattr(stored, name)) == msgspec.to_builtins(getattr(original, name)), name


@pytest.mark.parametrize("payload", ONE_OF_EACH, ids=lambda p: ev.event_type_of(p))
def test_every_string_of_every_event_type_gets_decode_events_answer(payload: ev.EventPayload) -> None:
    document = json.loads(encode_event(sample_envelope(payload)))
    paths = [p for p in string_paths(document) if p != ("payload", "type")]
    assert paths
    for path in paths:
        for value in HOSTILE_STRINGS:
            assert_same(json.dumps(replaced(document, path, value), ensure_ascii=False).encode())
            assert_same(json.dumps(replaced(document, path, value), ensure_ascii=True).encode())


def test_nul_is_refused_in_free_text_with_decode_events_words() -> None:
    document = json.loads(encode_event(sample_envelope(ONE_OF_EACH[0])))
    data = json.dumps(replaced(document, ("payload", "note"), "a\x00")).encode()
    with pytest.raises(msgspec.ValidationError, match=r"payload\.note") as refused:
        decode_stored_event(data)
    with pytest.raises(msgspec.ValidationError) as expected:
        decode_event(data)
    assert str(refused.value) == str(expected.value)


def test_values_remembered_as_valid_do_not_let_an_invalid_one_through() -> None:
    data = encode_event(sample_envelope(ONE_OF_EACH[0]))
    for _ in range(3):
        decode_stored_event(data)  # "410922" and "1.3" are now remembered
    document = json.loads(data)
    for path, value in (
        (("county_code",), "410922\n"),
        (("actor", "county_code"), "41092"),
        (("payload", "milestone_id"), "1.3\n"),
        (("payload", "steps_done", 0), "Tender"),
    ):
        bad = json.dumps(replaced(document, path, value)).encode()
        with pytest.raises(msgspec.ValidationError):
            decode_stored_event(bad)
        assert_same(bad)


def test_bytes_that_are_not_an_event_fail_as_decode_event_fails() -> None:
    for data in (b"\xff not an event", b"", b"[1]", b'"x"', b"1", b'{"payload": {"type": []}}', b"[" * 50_000):
        assert_same(data)
    raw = encode_event(sample_envelope(ONE_OF_EACH[0]))
    assert_same(raw.replace(b'"note":"', b'"note":"\x00'))  # a raw NUL byte: malformed JSON
    assert_same(raw.replace(b'"note":"', b'"note":"\\u0000'))  # the escape: a NUL in the text
    assert_same(raw[:-1] + b',"extra":1}')


def test_memoryview_is_decoded_too() -> None:
    data = encode_event(sample_envelope(ONE_OF_EACH[0]))
    assert encode_event(decode_stored_event(memoryview(data))) == data


def test_an_older_version_goes_through_the_upcasters(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def lift(payload: dict[str, Any]) -> dict[str, Any]:
        calls.append(payload)
        return {**payload, "note": payload["note"] + "（v2）"}

    monkeypatch.setitem(ev.EVENT_SCHEMA_VERSIONS, "progress_reported", 2)
    monkeypatch.setitem(ev.UPCASTERS, ("progress_reported", 1), lift)
    decoded = decode_stored_event(encode_event(sample_envelope(ONE_OF_EACH[0], version=1)))
    assert calls and decoded.schema_version == 2
    assert isinstance(decoded.payload, ev.ProgressReported) and decoded.payload.note == "招标中（v2）"


def test_stored_types_keep_the_event_types_configuration() -> None:
    for cls, (stored, _) in ev._stored_types.structs.items():
        if stored is cls:
            continue
        assert issubclass(stored, cls)
        assert stored.__struct_fields__ == cls.__struct_fields__  # type: ignore[attr-defined]
        assert stored.__struct_defaults__ == cls.__struct_defaults__  # type: ignore[attr-defined]
        for option in ("forbid_unknown_fields", "frozen", "tag", "tag_field", "omit_defaults", "array_like"):
            assert getattr(stored.__struct_config__, option) == getattr(cls.__struct_config__, option), (cls, option)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.sampled_from(ONE_OF_EACH),
    cut=st.integers(0, 2000),
    insert=st.binary(max_size=8) | st.sampled_from([b"\\u0000", b"\x00", b"\n", b'"', b"\\", b"\xff", b"1", b","]),
    drop=st.integers(0, 3),
)
def test_mutated_bytes_get_decode_events_answer(payload: ev.EventPayload, cut: int, insert: bytes, drop: int) -> None:
    data = encode_event(sample_envelope(payload))
    at = cut % (len(data) + 1)
    assert_same(data[:at] + insert + data[at + drop :])


def test_a_progress_report_at_datetimes_limit_still_fails_to_fold_as_before() -> None:
    """The fold skips the local date for progress reports; near datetime's limits computing it
    raised (and the event was parked), and still does."""
    programme = load_programme(default_programme_path())
    payload = ev.ProgressReported(milestone_id=programme.milestones[0].id, percent=10)
    late = sample_envelope(payload)
    tz = dt.timezone(dt.timedelta(hours=-5))
    late = msgspec.structs.replace(late, occurred_at=dt.datetime(9999, 12, 31, 23, 0, tzinfo=tz))
    ledger = new_facts(programme, "410922")
    with pytest.raises(OverflowError):
        late.occurred_at.astimezone(ZoneInfo(programme.programme.timezone))
    with pytest.raises(OverflowError):
        apply(programme, ledger, 1, late)
    ordinary = msgspec.structs.replace(late, occurred_at=dt.datetime(2017, 6, 1, 9, tzinfo=tz))
    assert apply(programme, new_facts(programme, "410922"), 1, ordinary)


@pytest.mark.parametrize(
    "instant",
    [
        dt.datetime(2017, 6, 10, 9, 30, tzinfo=ZoneInfo("Asia/Shanghai")),
        dt.datetime(2017, 6, 10, 9, 30, 0, 1, tzinfo=dt.UTC),
        dt.datetime(2017, 6, 10, 1, 31, 5, 123456, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30))),
        dt.datetime(999, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=8))),
    ],
)
def test_a_log_row_writes_the_instants_as_isoformat_would(instant: dt.datetime) -> None:
    """msgspec's RFC 3339 text is isoformat()'s but for "Z" (UTC), which PostgreSQL reads as +00:00."""
    event = msgspec.structs.replace(sample_envelope(ONE_OF_EACH[0]), occurred_at=instant, recorded_at=instant)
    line = _copy_line(7, event, encode_event(event)).decode()
    fields = line.rstrip("\n").split("\t")
    assert fields[:6] == ["7", "puyang-2017-13", "410922", "qf-9/0", "progress_reported", "qf-9"]
    for text in fields[6:8]:
        assert text.replace("Z", "+00:00") == instant.isoformat()
        assert dt.datetime.fromisoformat(text) == instant


def _same_but_pattern(original: Any, relaxed: Any) -> bool:
    """msgspec.inspect's view of two types: equal but for the patterns (none left in ``relaxed``)
    and the struct classes (``relaxed``'s subclasses of ``original``'s)."""
    if type(original) is not type(relaxed):
        return False
    if isinstance(original, msgspec.inspect.StructType):
        return issubclass(relaxed.cls, original.cls)
    for name in original.__struct_fields__:
        a, b = getattr(original, name), getattr(relaxed, name)
        if name == "pattern":
            if b is not None:
                return False
        elif isinstance(a, msgspec.inspect.Type):
            if not _same_but_pattern(a, b):
                return False
        elif isinstance(a, tuple) and a and isinstance(a[0], msgspec.inspect.Type):
            if len(a) != len(b) or not all(_same_but_pattern(x, y) for x, y in zip(a, b, strict=True)):
                return False
        elif a != b:
            return False
    return True


def test_stored_types_keep_every_constraint_but_the_patterns() -> None:
    compared = 0
    for cls, (stored, _) in ev._stored_types.structs.items():
        original_fields = msgspec.inspect.type_info(cls).fields  # type: ignore[attr-defined]
        stored_fields = msgspec.inspect.type_info(stored).fields  # type: ignore[attr-defined]
        assert [f.name for f in original_fields] == [f.name for f in stored_fields]
        for a, b in zip(original_fields, stored_fields, strict=True):
            assert (a.required, a.default, a.encode_name) == (b.required, b.default, b.encode_name), (cls, a.name)
            assert _same_but_pattern(a.type, b.type), (cls, a.name, a.type, b.type)
            compared += 1
    assert compared > 100
