"""A stored event nothing can read, on a county's actions subject: every projection parks it,
ops see it on each service's parked subject, and everything after it is still applied."""

from __future__ import annotations

import asyncio
import datetime as dt

import msgspec

from contracts.escalation import PARKED_SUBJECT as ESCALATION_PARKED
from contracts.ledger import PARKED_SUBJECT as LEDGER_PARKED
from contracts.ledger import PROJECTION_STATUS_SUBJECT, ProjectionStatus
from contracts.notifier import PARKED_SUBJECT as NOTIFIER_PARKED
from contracts.notifier import REPLAY_PARKED_SUBJECT as NOTIFIER_REPLAY
from contracts.replies import ParkedList, ReplayParkedReport
from contracts.subjects import actions_subject
from tests.stack import SHANGHAI, Running


async def _parked(running: Running, subject: str) -> ParkedList:
    return msgspec.json.decode((await running.nc.request(subject, b"", timeout=5)).data, type=ParkedList)


async def test_every_projection_parks_what_it_cannot_read_and_goes_on(running: Running) -> None:
    running.clock.set(dt.datetime(2017, 4, 5, 10, 0, tzinfo=SHANGHAI))  # 1.1 overdue everywhere
    js = running.nc.jetstream()
    ack = await js.publish(actions_subject("puyang-2017-13", "410928"), b"{not an event")
    await running.nc.request("duban.ops.escalation.tick", b"{}", timeout=10)  # actions follow the poison
    last = int((await js.stream_info("DUBAN_EVENTS")).state.last_seq)
    assert last > ack.seq
    for _ in range(200):
        status = msgspec.json.decode(
            (await running.nc.request(PROJECTION_STATUS_SUBJECT, b"", timeout=5)).data, type=ProjectionStatus
        )
        parked = {s: await _parked(running, s) for s in (LEDGER_PARKED, NOTIFIER_PARKED, ESCALATION_PARKED)}
        if status.checkpoint >= last and all(p.items for p in parked.values()):
            break
        await asyncio.sleep(0.05)
    for subject, listed in parked.items():
        assert [(p.stream_sequence, p.event_id) for p in listed.items] == [(ack.seq, None)], subject
        assert listed.items[0].reason
    assert status.checkpoint >= last  # the ledger went on past it
    replay = msgspec.json.decode(
        (await running.nc.request(NOTIFIER_REPLAY, b"", timeout=10)).data, type=ReplayParkedReport
    )
    assert replay.replayed == () and replay.still_parked == 1  # garbage stays garbage
