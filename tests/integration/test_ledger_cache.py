"""The live projection's county-state cache on a real PostgreSQL: used while the row still has
the revision it cached, bypassed when another writer changed the row, never left stale by a
transaction that did not commit; and only changed milestone rows are rewritten."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest
import pytest_asyncio

import services.ledger.projection as projection_module
from contracts.events import (
    Actor,
    EventPayload,
    ProgressReported,
    SubmissionRetracted,
    decode_event,
    encode_event,
)
from contracts.facts import CountyFacts, fold
from contracts.programme import load_default_programme
from services.ledger.audit import _Audit
from services.ledger.projection import CachedState, LedgerProjection, StoredMessage, migrate
from tests.samples import stored_envelope

pytestmark = pytest.mark.integration
PROGRAMME = load_default_programme()
PROGRAMMES = {PROGRAMME.id: PROGRAMME}
X, Y = "410928", "410923"
START = dt.datetime(2017, 3, 1, 9, tzinfo=dt.timezone(dt.timedelta(hours=8)))


def event(sequence: int, county: str, payload: EventPayload, submission: str | None = None) -> StoredMessage:
    submission_id = submission or f"s{sequence}"
    envelope = stored_envelope(
        payload,
        programme_id=PROGRAMME.id,
        county_code=county,
        submission_id=submission_id,
        at=START + dt.timedelta(hours=sequence),
        actor=Actor(role="county"),
        digest=hashlib.sha256(submission_id.encode()).hexdigest(),
    )
    return StoredMessage(sequence, encode_event(envelope))


def progress(sequence: int, county: str, milestone: str, percent: int) -> StoredMessage:
    return event(sequence, county, ProgressReported(milestone_id=milestone, percent=percent))


def expected(messages: list[StoredMessage], county: str, skip: frozenset[int] = frozenset()) -> CountyFacts:
    history = [(m.sequence, decode_event(m.data)) for m in messages if m.sequence not in skip]
    return fold(PROGRAMME, county, [(s, e) for s, e in history if e.county_code == county])


class CountingDecoder:
    """Counts the states decoded from rows (a cache hit decodes none)."""

    def __init__(self) -> None:
        self.calls = 0
        self._decoder = msgspec.json.Decoder(CountyFacts)

    def decode(self, data: Any) -> CountyFacts:
        self.calls += 1
        return self._decoder.decode(data)


@pytest_asyncio.fixture(loop_scope="session")
async def pool(fresh_database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(fresh_database, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> CountingDecoder:
    counter = CountingDecoder()
    monkeypatch.setattr(projection_module, "_state_decoder", counter)
    return counter


async def state(pool: asyncpg.Pool, county: str) -> CountyFacts:
    async with pool.acquire() as conn:
        raw = await conn.fetchval(
            "SELECT state FROM ledger.county_state WHERE programme_id = $1 AND county_code = $2", PROGRAMME.id, county
        )
    return msgspec.json.decode(raw, type=CountyFacts)


async def milestone_xmins(pool: asyncpg.Pool, county: str) -> dict[str, int]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT milestone_id, xmin::text::bigint AS xmin FROM ledger.milestones"
            " WHERE programme_id = $1 AND county_code = $2",
            PROGRAMME.id,
            county,
        )
    return {r["milestone_id"]: r["xmin"] for r in rows}


async def test_several_batches_on_the_same_counties_use_the_cache_and_equal_a_rebuild(
    pool: asyncpg.Pool, decoded: CountingDecoder
) -> None:
    milestones = [m.id for m in PROGRAMME.milestones]
    messages = [progress(i, (X, Y)[i % 2], milestones[i % len(milestones)], i % 101) for i in range(1, 41)]
    messages.append(event(41, X, SubmissionRetracted(retracted_submission_id="s3", reason="撤回")))
    messages += [progress(i, (X, Y)[i % 2], milestones[i % 3], 50) for i in range(42, 50)]
    live = LedgerProjection(pool, PROGRAMMES)
    for lo in range(0, len(messages), 4):
        await live.apply_batch(messages[lo : lo + 4])
    # Both counties were new in the first batch and in the cache from then on.
    assert decoded.calls == 0
    live_states = {c: await state(pool, c) for c in (X, Y)}
    assert live_states == {c: expected(messages, c) for c in (X, Y)}
    async with pool.acquire() as conn:
        live_milestones = await conn.fetch("SELECT * FROM ledger.milestones ORDER BY 1, 2, 3")

    async def batches() -> AsyncIterator[list[StoredMessage]]:
        yield messages

    await LedgerProjection(pool, PROGRAMMES).rebuild(batches())
    assert {c: await state(pool, c) for c in (X, Y)} == live_states
    async with pool.acquire() as conn:
        assert await conn.fetch("SELECT * FROM ledger.milestones ORDER BY 1, 2, 3") == live_milestones


async def test_a_change_by_another_instance_bypasses_the_cache(pool: asyncpg.Pool, decoded: CountingDecoder) -> None:
    first, second = LedgerProjection(pool, PROGRAMMES), LedgerProjection(pool, PROGRAMMES)
    messages = [progress(1, X, "1.1", 10), progress(2, Y, "1.1", 10)]
    await first.apply_batch(messages)
    # Leadership moves: the other instance applies the next event of X (and its own cache is empty).
    messages.append(progress(3, X, "1.2", 30))
    await second.apply_batch(messages[2:])
    assert decoded.calls == 1
    # Back to the first: its cached X is stale (no 1.2), its Y is not.
    messages += [progress(4, X, "1.3", 40), progress(5, Y, "1.2", 50)]
    await first.apply_batch(messages[3:])
    assert decoded.calls == 2  # X read again; Y from the cache
    assert await state(pool, X) == expected(messages, X)
    assert (await state(pool, X)).milestones["1.2"].percent == 30
    assert await state(pool, Y) == expected(messages, Y)


async def test_a_replay_of_parked_events_by_another_instance_bypasses_the_cache(pool: asyncpg.Pool) -> None:
    first, second = LedgerProjection(pool, PROGRAMMES), LedgerProjection(pool, PROGRAMMES)
    messages = [progress(1, X, "1.1", 10), progress(2, X, "1.2", 20)]
    await first.apply_batch(messages)
    messages.append(progress(3, X, "1.3", 30))
    await first.park(3, messages[2].data, "for the test")
    report = await second.replay_parked()
    assert report.replayed == (3,)
    assert (await state(pool, X)).milestones["1.3"].percent == 30
    messages.append(progress(4, X, "1.4", 40))
    await first.apply_batch(messages[3:])  # its cached X never saw event 3
    assert await state(pool, X) == expected(messages, X)
    assert (await state(pool, X)).milestones["1.3"].percent == 30


async def test_a_batch_that_does_not_commit_leaves_no_stale_state_in_the_cache(pool: asyncpg.Pool) -> None:
    live = LedgerProjection(pool, PROGRAMMES)
    messages = [progress(1, X, "1.1", 10), progress(2, X, "1.2", 20), progress(3, Y, "1.1", 5)]
    await live.apply_batch(messages)
    async with pool.acquire() as conn:
        # The checkpoint's write fails once, after the batch's states were folded and written.
        await conn.execute(
            "CREATE SEQUENCE ledger.fail_once;"
            " CREATE FUNCTION ledger.fail_once() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF nextval('ledger.fail_once') = 1 THEN RAISE EXCEPTION 'checkpoint refused'; END IF;"
            " RETURN NEW; END $$;"
            " CREATE TRIGGER fail_once BEFORE UPDATE ON ledger.checkpoint"
            " FOR EACH ROW EXECUTE FUNCTION ledger.fail_once()"
        )
    poisoned = progress(4, X, "1.3", 99)
    with pytest.raises(asyncpg.RaiseError, match="checkpoint refused"):
        await live.apply_batch([poisoned])
    # As the consumer would after the event failed again alone: parked, never applied.
    await live.park(4, poisoned.data, "for the test")
    messages += [poisoned, progress(5, X, "1.4", 50), progress(6, Y, "1.2", 60)]
    await live.apply_batch(messages[4:])
    assert await state(pool, X) == expected(messages, X, skip=frozenset({4}))
    assert (await state(pool, X)).milestones["1.3"].percent == 0
    assert await state(pool, Y) == expected(messages, Y)
    async with pool.acquire() as conn:
        percent = await conn.fetchval(
            "SELECT percent FROM ledger.milestones WHERE county_code = $1 AND milestone_id = '1.3'", X
        )
    assert percent == 0


async def test_only_the_milestone_rows_that_changed_are_rewritten(pool: asyncpg.Pool) -> None:
    live = LedgerProjection(pool, PROGRAMMES)
    await live.apply_batch([progress(1, X, "1.1", 10), progress(2, Y, "1.1", 10)])
    before = await milestone_xmins(pool, X)
    assert len(before) == len(PROGRAMME.milestones)  # a new county: all its rows
    await live.apply_batch([progress(3, X, "1.2", 20)])  # from the cache
    after = await milestone_xmins(pool, X)
    assert {m for m in before if after[m] != before[m]} == {"1.2"}
    # The same from a state read from the database (a new instance has nothing cached).
    await LedgerProjection(pool, PROGRAMMES).apply_batch([progress(4, X, "1.1", 40)])
    again = await milestone_xmins(pool, X)
    assert {m for m in after if again[m] != after[m]} == {"1.1"}
    assert await milestone_xmins(pool, Y) != {} and (await state(pool, X)).milestones["1.1"].percent == 40


async def test_every_write_of_a_state_takes_a_new_revision_even_across_a_rebuild(pool: asyncpg.Pool) -> None:
    live = LedgerProjection(pool, PROGRAMMES)
    messages = [progress(1, X, "1.1", 10)]
    await live.apply_batch(messages)

    async def revision() -> int:
        async with pool.acquire() as conn:
            return int(await conn.fetchval("SELECT revision FROM ledger.county_state WHERE county_code = $1", X))

    seen = [await revision()]
    messages.append(progress(2, X, "1.2", 20))
    await live.apply_batch(messages[1:])
    seen.append(await revision())

    async def batches() -> AsyncIterator[list[StoredMessage]]:
        yield messages

    await live.rebuild(batches())
    seen.append(await revision())
    messages.append(progress(3, X, "1.3", 30))
    await live.apply_batch(messages[2:])
    seen.append(await revision())
    assert seen == sorted(set(seen))
    assert await state(pool, X) == expected(messages, X)


async def test_the_audit_ignores_the_revision_and_still_catches_an_altered_state(pool: asyncpg.Pool) -> None:
    messages = [progress(1, X, "1.1", 10), progress(2, X, "1.2", 20)]
    await LedgerProjection(pool, PROGRAMMES).apply_batch(messages)

    async def breaks() -> list[tuple[str, str]]:
        audit = _Audit(PROGRAMMES)
        audit.states = {(PROGRAMME.id, X): expected(messages, X)}
        async with pool.acquire() as conn:
            audit.compare_states(await conn.fetch("SELECT * FROM ledger.county_state"))
        return [(b.kind, b.where) for b in audit.breaks]

    assert await breaks() == []
    async with pool.acquire() as conn:
        await conn.execute("UPDATE ledger.county_state SET revision = nextval('ledger.state_revision')")
    assert await breaks() == []
    async with pool.acquire() as conn:
        await conn.execute("UPDATE ledger.county_state SET state = jsonb_set(state, '{milestones,1.2,percent}', '95')")
    assert await breaks() == [("read_model_altered", f"ledger.county_state {PROGRAMME.id} {X}")]


def test_the_cache_keeps_the_most_recently_written_states_within_its_byte_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(projection_module, "STATE_CACHE_BYTES", 3_000)
    cache = LedgerProjection(None, {PROGRAMME.id: PROGRAMME})  # type: ignore[arg-type]  # (no database used)
    entries = {(PROGRAMME.id, f"4109{i:02d}"): CachedState(i, i, b"x" * 1_000) for i in range(5)}
    for key, entry in entries.items():
        cache._remember({key: entry})
    assert list(cache._cache) == list(entries)[2:]  # the two least recent went
    assert cache._cache_bytes == 3_000
    cache._remember({list(entries)[2]: CachedState(9, 9, b"y" * 2_000)})  # rewritten: most recent now
    assert list(cache._cache) == [list(entries)[4], list(entries)[2]] and cache._cache_bytes == 3_000
    assert cache._take([list(entries)[4]]) == {list(entries)[4]: entries[list(entries)[4]]}
    assert cache._cache_bytes == 2_000


async def test_a_batch_touching_more_states_than_the_cache_holds_keeps_the_last_written_within_budget(
    pool: asyncpg.Pool, decoded: CountingDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch may touch every county (~40 MB of JSON at a million events): what the cache could
    # not keep is let go while the batch is written, and the rest is read back when needed.
    counties = [c.code for c in PROGRAMME.counties]
    first = [progress(i + 1, county, "1.1", 10) for i, county in enumerate(counties)]
    sizer = LedgerProjection(pool, PROGRAMMES)
    await sizer.apply_batch(first)
    sizes = {key[1]: len(entry.state) for key, entry in sizer._cache.items()}
    assert list(sizes) == counties
    budget = 2 * max(sizes.values()) + 500  # room for two states, not for all
    monkeypatch.setattr(projection_module, "STATE_CACHE_BYTES", budget)
    live = LedgerProjection(pool, PROGRAMMES)
    second = [progress(len(first) + i + 1, county, "1.1", 20) for i, county in enumerate(counties)]
    await live.apply_batch(second)
    cached = [key[1] for key in live._cache]
    assert cached == counties[-len(cached) :] and 0 < len(cached) < len(counties)  # the last written
    assert live._cache_bytes == sum(len(entry.state) for entry in live._cache.values()) <= budget
    third = [progress(2 * len(first) + i + 1, county, "1.1", 30) for i, county in enumerate(counties)]
    calls = decoded.calls
    await live.apply_batch(third)
    assert decoded.calls - calls == len(counties) - len(cached)  # the cached ones were not read back
    for county in counties:
        assert await state(pool, county) == expected(first + second + third, county)
