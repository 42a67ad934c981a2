"""A stored event a projection cannot apply is parked after bounded retries, visible to ops, and
the rest go on; replaying it after the fix makes the read model what a rebuild gives."""

from __future__ import annotations

from typing import Any

import pytest

from contracts.replies import Accepted
from services.common import consumer
from services.ledger import projection as ledger_projection
from services.ledger.consumer import read_stream
from tests.harness import Harness
from tests.ledger_harness import Ledger

PROGRESS = {"kind": "report_progress", "milestone_id": "2.1", "percent": 10}


def poison(monkeypatch: pytest.MonkeyPatch, event_id_prefix: str) -> list[str]:
    """Make the ledger's fold fail on one submission's events (a bug the fix will remove)."""
    tried: list[str] = []
    real_apply = ledger_projection.apply

    def failing_apply(programme: Any, facts: Any, sequence: int, envelope: Any) -> bool:
        if envelope.event_id.startswith(event_id_prefix):
            tried.append(envelope.event_id)
            raise ValueError("a fold bug")
        return real_apply(programme, facts, sequence, envelope)

    monkeypatch.setattr(ledger_projection, "apply", failing_apply)
    monkeypatch.setattr(consumer, "POISON_ATTEMPTS", 2)
    return tried


async def test_a_poison_event_is_parked_and_the_rest_continue(
    harness: Harness, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried = poison(monkeypatch, "poison-1/")
    for sid in ("before-1", "poison-1", "after-1"):
        reply = await harness.send({**PROGRESS, "percent": 10 + len(sid)}, submission_id=sid)
        assert isinstance(reply, Accepted), reply
    checkpoint = await ledger.caught_up(harness)  # the consumer moved past the poison
    assert len(tried) >= 2  # tried alone, more than once, before parking

    parked = await ledger.projection.parked()
    assert [(p.event_id, p.county_code) for p in parked] == [("poison-1/0", "410928")]
    assert "a fold bug" in parked[0].reason
    async with ledger.pool.acquire() as conn:
        logged = [r["submission_id"] for r in await conn.fetch("SELECT submission_id FROM ledger.event_log")]
    assert "after-1" in logged and "poison-1" not in logged

    # The fix ships: the fold works again; replaying puts the event where it belongs.
    monkeypatch.setattr(ledger_projection, "apply", ledger_projection.fold.__globals__["apply"])
    report = await ledger.projection.replay_parked()
    assert report.replayed == (parked[0].stream_sequence,) and report.still_parked == 0
    assert await ledger.projection.parked() == []
    live = await ledger.snapshot()

    await ledger.projection.rebuild(read_stream(harness.js), expected_last=checkpoint)
    assert await ledger.snapshot() == live  # replayed = as if never parked


async def test_bytes_that_do_not_decode_stay_parked(harness: Harness, ledger: Ledger) -> None:
    await harness.send(PROGRESS, submission_id="ok-1")
    await harness.js.publish("duban.events.puyang-2017-13.410928", b"\xff not an event")
    await harness.send({**PROGRESS, "percent": 20}, submission_id="ok-2")
    await ledger.caught_up(harness)
    parked = await ledger.projection.parked()
    assert len(parked) == 1 and parked[0].event_id is None and parked[0].size == len(b"\xff not an event")
    report = await ledger.projection.replay_parked()
    assert report.replayed == () and report.still_parked == 1
