"""The tamper-evident record's rules (contracts.audit), without I/O: chains, checkpoints, signed
files. Every kind of tampering is found at its exact place; an untouched record verifies."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from contracts.audit import (
    CHAIN_HASH_HEADER,
    CHAIN_PREV_HEADER,
    GENESIS,
    SIGNATURE_HEADER,
    SIGNER_HEADER,
    ChainHead,
    ChainVerifier,
    Checkpoint,
    chain_headers,
    check_file,
    first_break,
)
from services.common.signing import (
    Signer,
    file_signature_from_header,
    file_signature_header,
    new_seed,
    sign_file,
    signer_from_seed,
    verify_signature,
)

FACTS = "duban.events.p.410928"
ACTIONS = "duban.events.p.410928.actions"
OTHER = "duban.events.p.410922"
AT = dt.datetime(2017, 6, 1, 18, 0, tzinfo=dt.UTC)

Stored = tuple[str, int, dict[str, str], bytes]  # subject, sequence, headers, data


@pytest.fixture(scope="module")
def signer() -> Signer:
    return signer_from_seed(new_seed())


def _write(plan: list[tuple[str, bytes]], signer: Signer | None = None) -> list[Stored]:
    """Append ``plan`` as the writers do: each event chained to its subject's last."""
    heads: dict[str, str] = {}
    stored: list[Stored] = []
    for sequence, (subject, data) in enumerate(plan, start=1):
        headers = chain_headers(subject, heads.get(subject, GENESIS), data)
        heads[subject] = headers[CHAIN_HASH_HEADER]
        if signer is not None and subject == ACTIONS:
            headers[SIGNER_HEADER] = signer.public_key
            headers[SIGNATURE_HEADER] = signer.sign(headers[CHAIN_HASH_HEADER].encode())
        stored.append((subject, sequence, headers, data))
    return stored


def _checkpoint(stored: list[Stored], signer: Signer, number: int = 1, previous: str = GENESIS) -> Checkpoint:
    heads: dict[str, ChainHead] = {}
    for subject, sequence, headers, _ in stored:
        heads[subject] = ChainHead(subject, sequence, headers[CHAIN_HASH_HEADER])
    unsigned = Checkpoint(
        number=number,
        taken_at=AT,
        stream_sequence=stored[-1][1],
        heads=tuple(heads.values()),
        previous=previous,
        signer=signer.public_key,
    )
    return msgspec.structs.replace(unsigned, signature=signer.sign(unsigned.statement()))


def _verify(stored: list[Stored], checkpoints: list[Checkpoint], trusted: frozenset[str]) -> ChainVerifier:
    verifier = ChainVerifier(checkpoints, trusted, verify_signature)
    for subject, sequence, headers, data in stored:
        verifier.observe(subject, sequence, headers, data)
    verifier.check_checkpoints()
    return verifier


PLAN = [
    (FACTS, b'{"event_id":"s1/0","percent":40}'),
    (OTHER, b'{"event_id":"s2/0","percent":10}'),
    (FACTS, b'{"event_id":"s3/0","percent":60}'),
    (ACTIONS, b'{"event_id":"a1","level":"overdue_notice"}'),
    (FACTS, b'{"event_id":"s4/0","percent":80}'),
    (OTHER, b'{"event_id":"s5/0","percent":20}'),
]


def test_an_untouched_record_verifies(signer: Signer) -> None:
    stored = _write(PLAN, signer)
    verifier = _verify(stored, [_checkpoint(stored, signer)], frozenset({signer.public_key}))
    assert verifier.breaks == []
    assert verifier.events == 6 and len(verifier.heads) == 3 and verifier.signed == 1


def test_an_altered_event_is_found_where_it_is(signer: Signer) -> None:
    stored = _write(PLAN, signer)
    checkpoint = _checkpoint(stored, signer)
    subject, sequence, headers, _ = stored[2]
    stored[2] = (subject, sequence, headers, b'{"event_id":"s3/0","percent":90}')
    breaks = _verify(stored, [checkpoint], frozenset({signer.public_key})).breaks
    assert [(b.kind, b.stream_sequence, b.subject) for b in breaks] == [("altered", 3, FACTS)]
    assert "content changed" in breaks[0].detail


def test_an_altered_event_with_its_hash_recomputed_breaks_the_next_link(signer: Signer) -> None:
    stored = _write(PLAN, signer)
    subject, sequence, _, _ = stored[0]
    forged = b'{"event_id":"s1/0","percent":100}'
    stored[0] = (subject, sequence, chain_headers(subject, GENESIS, forged), forged)
    found = first_break(_verify(stored, [], frozenset({signer.public_key})).breaks)
    assert found is not None and (found.kind, found.stream_sequence) == ("relinked", 3)


def test_a_removed_event_breaks_the_chain_at_its_successor(signer: Signer) -> None:
    stored = _write(PLAN, signer)
    del stored[2]  # s3 gone; s4 still links to it
    breaks = _verify(stored, [], frozenset({signer.public_key})).breaks
    assert [(b.kind, b.stream_sequence) for b in breaks] == [("relinked", 5)]


def test_reordered_events_break_the_chain(signer: Signer) -> None:
    stored = _write(PLAN, signer)
    (s1, q1, h1, d1), (s3, q3, h3, d3) = stored[0], stored[2]
    stored[0], stored[2] = (s3, q1, h3, d3), (s1, q3, h1, d1)
    kinds = {(b.kind, b.stream_sequence) for b in _verify(stored, [], frozenset()).breaks}
    assert ("relinked", 1) in kinds


def test_a_truncated_tail_is_found_by_the_checkpoint(signer: Signer) -> None:
    stored = _write(PLAN, signer)
    checkpoint = _checkpoint(stored, signer)
    breaks = _verify(stored[:-2], [checkpoint], frozenset({signer.public_key})).breaks  # the chains alone hold
    kinds = {(b.kind, b.stream_sequence) for b in breaks}
    assert ("checkpoint_truncated", None) in kinds
    assert ("checkpoint_mismatch", 5) in kinds and ("checkpoint_mismatch", 6) in kinds


def test_a_rewritten_last_event_is_found_by_the_checkpoint(signer: Signer) -> None:
    stored = _write(PLAN, signer)
    checkpoint = _checkpoint(stored, signer)
    subject, sequence, headers, _ = stored[-1]
    forged = b'{"event_id":"s5/0","percent":100}'
    stored[-1] = (subject, sequence, chain_headers(subject, headers[CHAIN_PREV_HEADER], forged), forged)
    breaks = _verify(stored, [checkpoint], frozenset({signer.public_key})).breaks
    assert [(b.kind, b.stream_sequence, b.subject) for b in breaks] == [("checkpoint_mismatch", 6, OTHER)]


def test_a_forged_or_untrusted_signature_is_found(signer: Signer) -> None:
    stored = _write(PLAN, signer)
    subject, sequence, headers, data = stored[3]
    stored[3] = (subject, sequence, {**headers, SIGNATURE_HEADER: "00" * 64}, data)
    breaks = _verify(stored, [], frozenset({signer.public_key})).breaks
    assert [(b.kind, b.stream_sequence) for b in breaks] == [("bad_signature", 4)]

    stranger = signer_from_seed(new_seed())
    breaks = _verify(_write(PLAN, stranger), [], frozenset({signer.public_key})).breaks
    assert [(b.kind, b.stream_sequence) for b in breaks] == [("untrusted_signer", 4)]


def test_an_altered_or_removed_checkpoint_is_found(signer: Signer) -> None:
    stored = _write(PLAN, signer)
    first = _checkpoint(stored[:3], signer)
    second = _checkpoint(stored, signer, number=2, previous=first.digest)
    trusted = frozenset({signer.public_key})
    assert _verify(stored, [first, second], trusted).breaks == []

    altered = msgspec.structs.replace(second, stream_sequence=4)
    assert [b.kind for b in _verify(stored, [first, altered], trusted).breaks] == ["bad_signature"]
    assert [b.kind for b in _verify(stored, [second], trusted).breaks] == ["checkpoint_relinked"]


def test_events_from_before_chains_began_are_counted_not_broken(signer: Signer) -> None:
    stored = [(FACTS, 1, {}, b'{"event_id":"old"}'), *[(s, q + 1, h, d) for s, q, h, d in _write(PLAN)]]
    verifier = _verify(stored, [], frozenset())
    assert verifier.breaks == [] and verifier.unchained_before_chain == 1
    # After the chain began, an event without its hash is a break.
    stored.append((FACTS, 8, {}, b'{"event_id":"late"}'))
    assert [(b.kind, b.stream_sequence) for b in _verify(stored, [], frozenset()).breaks] == [("unchained", 8)]


def test_a_signed_file_verifies_and_any_change_is_found(signer: Signer) -> None:
    data = b"PK\x03\x04 an xlsx"
    signature = sign_file(signer, "督查进度一览表 p as of 2018-03-01", "督查进度一览表.xlsx", data, AT)
    assert file_signature_from_header(file_signature_header(signature)) == signature
    trusted = frozenset({signer.public_key})
    assert check_file(data, signature, trusted, verify_signature).ok

    changed = check_file(data[:-1] + b"X", signature, trusted, verify_signature)
    assert not changed.ok and "not the one signed" in changed.problems[0]
    relabelled = msgspec.structs.replace(signature, what="督查进度一览表 p as of 2018-06-01")
    assert not check_file(data, relabelled, trusted, verify_signature).ok
    stranger = check_file(data, signature, frozenset(), verify_signature)
    assert not stranger.ok and stranger.problems == (f"signed by {signer.public_key}, which is not a trusted key",)


def test_a_public_key_that_is_not_an_nkey_verifies_nothing() -> None:
    assert not verify_signature("UABC", b"x", b"y" * 64)
    assert not verify_signature("not base32!", b"x", b"y" * 64)
