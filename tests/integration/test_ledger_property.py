"""Property: for random valid event histories, the ledger built incrementally — in random
batches, with redeliveries and restarts — equals a fresh rebuild from the same stream.

Histories are valid by construction: random commands go through the submissions service's own
decision (refused ones simply drop out), so they contain findings, extensions and retractions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts.commands import Role, Submission
from contracts.events import EVENT_SCHEMA_VERSIONS, Actor, EventEnvelope, encode_event, event_type_of
from contracts.programme import load_default_programme
from services.ledger.projection import LedgerProjection, StoredMessage, migrate
from services.submissions.decide import Accept, Sender, authorise, decide
from services.submissions.record import CountyRecord

pytestmark = pytest.mark.integration
PROGRAMME = load_default_programme()
COUNTIES = ("410928", "410923")
MILESTONES = [m.id for m in PROGRAMME.milestones]
START = dt.datetime(2017, 3, 1, 9, tzinfo=dt.timezone(dt.timedelta(hours=8)))
KINDS = [
    "report_progress",
    "complete_milestone",
    "request_review",
    "decide_review",
    "request_extension",
    "decide_extension",
    "start_trial_operation",
    "file_progress_table",
    "retract_submission",
]


def _command(kind: str, n: int, day: dt.date, earlier: Sequence[str]) -> tuple[Role, dict[str, Any]]:
    milestone = MILESTONES[n % len(MILESTONES)]
    review = PROGRAMME.reviews[n % len(PROGRAMME.reviews)]
    match kind:
        case "report_progress":
            m = PROGRAMME.milestone(milestone)
            steps = [s.id for s in m.steps][: n % 3] if m else []
            return Role.COUNTY, {"kind": kind, "milestone_id": milestone, "percent": n % 101, "steps_done": steps}
        case "complete_milestone":
            done = day - dt.timedelta(days=n % 5)
            return Role.COUNTY, {
                "kind": kind,
                "milestone_id": milestone,
                "completed_on": done.isoformat(),
                "evidence": [{"title": f"文件{n}"}],
            }
        case "request_review":
            return Role.COUNTY, {"kind": kind, "review_kind": review.kind}
        case "decide_review":
            role = Role.PROVINCE if review.decided_by.value == "province" else Role.CITY
            outcome = "passed" if n % 3 else "returned"
            return role, {"kind": kind, "review_kind": review.kind, "outcome": outcome, "decided_on": day.isoformat()}
        case "request_extension":
            m = PROGRAMME.milestone(milestone)
            assert m is not None
            proposed = m.deadline + dt.timedelta(days=10 + n % 40)
            return Role.COUNTY, {
                "kind": kind,
                "milestone_id": milestone,
                "proposed_deadline": proposed.isoformat(),
                "reason": "理由",
            }
        case "decide_extension":
            m = PROGRAMME.milestone(milestone)
            assert m is not None
            if n % 2:
                new = m.deadline + dt.timedelta(days=5 + n % 30)
                return Role.CITY, {
                    "kind": kind,
                    "milestone_id": milestone,
                    "outcome": "granted",
                    "new_deadline": new.isoformat(),
                }
            return Role.CITY, {"kind": kind, "milestone_id": milestone, "outcome": "refused", "reason": "不予批准"}
        case "start_trial_operation":
            return Role.COUNTY, {"kind": kind, "started_on": day.isoformat()}
        case "file_progress_table":
            period = f"{day.year:04d}-{day.month:02d}"
            return Role.COUNTY, {
                "kind": kind,
                "period": period,
                "lines": [{"milestone_id": milestone, "percent": n % 101}],
            }
        case _:
            target = earlier[n % len(earlier)] if earlier else "none"
            return Role.CITY, {"kind": "retract_submission", "retracted_submission_id": target, "reason": "撤回"}


def history(steps: list[tuple[int, str, int]]) -> list[StoredMessage]:
    """Run random commands through the real decision; the accepted events, numbered."""
    records = {c: CountyRecord(PROGRAMME.id, c) for c in COUNTIES}
    messages: list[StoredMessage] = []
    now = START
    for i, (county_index, kind, n) in enumerate(steps):
        now += dt.timedelta(days=1 + n % 6)
        county = COUNTIES[county_index]
        record = records[county]
        role, command = _command(kind, n, now.date(), list(record.submissions))
        body = {"submission_id": f"p{i}", "programme_id": PROGRAMME.id, "county_code": county, "command": command}
        submission = msgspec.convert(body, Submission)
        sender = Sender(role, county)
        if not isinstance(authorise(sender, submission, {PROGRAMME.id: PROGRAMME}), type(PROGRAMME)):
            continue
        digest = hashlib.sha256(msgspec.json.encode(submission)).hexdigest()
        decision = decide(PROGRAMME, record, submission, sender, now)
        if not isinstance(decision, Accept):
            continue
        for new in decision.events:
            envelope = EventEnvelope(
                event_id=new.event_id,
                schema_version=EVENT_SCHEMA_VERSIONS[event_type_of(new.payload)],
                programme_id=PROGRAMME.id,
                county_code=county,
                occurred_at=now,
                recorded_at=now,
                actor=Actor(role=role.value),
                submission_id=submission.submission_id,
                submission_digest=digest,
                causation_id=submission.submission_id,
                correlation_id=submission.submission_id,
                payload=new.payload,
            )
            sequence = len(messages) + 1
            record.apply(envelope, sequence)
            messages.append(StoredMessage(sequence, encode_event(envelope)))
    return messages


async def _reset(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await migrate(conn)
        await conn.execute(
            "TRUNCATE ledger.event_log, ledger.county_state, ledger.milestones, ledger.checkpoint, ledger.parked"
        )


async def _snapshot(pool: asyncpg.Pool) -> list[list[tuple[Any, ...]]]:
    async with pool.acquire() as conn:
        return [
            [tuple(r.values()) for r in await conn.fetch(f"SELECT {columns} FROM ledger.{table} ORDER BY 1, 2, 3")]
            for table, columns in (
                ("event_log", "*"),
                ("county_state", "programme_id, county_code, last_sequence, state"),  # not which write (revision)
                ("milestones", "*"),
            )
        ] + [[tuple(r.values()) for r in await conn.fetch("SELECT projection, last_sequence FROM ledger.checkpoint")]]


async def _incremental_then_rebuild(
    dsn: str, messages: list[StoredMessage], cuts: list[int], replays: list[int], writers: list[int]
) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        await _reset(pool)
        # Cut the stream into batches; before some batches, redeliver an earlier window and
        # "restart" (a new projection object: everything it needs is in the database). Two
        # instances share the database (leadership moving): each batch is applied by the one
        # ``writers`` picks, so a cached state is often stale and must be noticed as such.
        bounds = sorted({0, len(messages), *(c % (len(messages) + 1) for c in cuts)})
        projections = [LedgerProjection(pool, {PROGRAMME.id: PROGRAMME}) for _ in range(2)]
        for index, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            if index < len(replays) and lo > 0:
                back = replays[index] % lo
                projections[0] = LedgerProjection(pool, {PROGRAMME.id: PROGRAMME})
                await projections[0].apply_batch(messages[back:lo])  # all already applied: no change
            writer = writers[index] % 2 if index < len(writers) else 0
            await projections[writer].apply_batch(messages[lo:hi])
        projection = projections[0]
        incremental = await _snapshot(pool)
        assert incremental[3] == ([("ledger", len(messages))] if messages else [])

        async def batches() -> AsyncIterator[list[StoredMessage]]:
            for lo in range(0, len(messages), 7):
                yield messages[lo : lo + 7]

        await projection.rebuild(batches())
        rebuilt = await _snapshot(pool)
        if messages:
            assert rebuilt == incremental
    finally:
        await pool.close()


steps_strategy = st.lists(
    st.tuples(st.integers(0, len(COUNTIES) - 1), st.sampled_from(KINDS), st.integers(0, 10_000)), max_size=40
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=steps_strategy,
    cuts=st.lists(st.integers(0, 200), max_size=8),
    replays=st.lists(st.integers(0, 200), max_size=8),
    writers=st.lists(st.integers(0, 1), max_size=8),
)
def test_incremental_with_redeliveries_and_restarts_equals_rebuild(
    fresh_database_sync: str,
    steps: list[tuple[int, str, int]],
    cuts: list[int],
    replays: list[int],
    writers: list[int],
) -> None:
    messages = history(steps)
    asyncio.run(_incremental_then_rebuild(fresh_database_sync, messages, cuts, replays, writers))


def test_generated_histories_are_rich_enough() -> None:
    """The strategy reaches findings, extensions and retractions (else the property is weak)."""
    steps = [(i % 2, KINDS[i % len(KINDS)], i * 7919) for i in range(200)]
    types = {msgspec.json.decode(m.data)["payload"]["type"] for m in history(steps)}
    assert {"procedure_finding_recorded", "extension_decided", "submission_retracted", "review_decided"} <= types
