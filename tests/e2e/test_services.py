"""All four services running as `duban up` runs them, on a real nats-server and PostgreSQL: each
is a NATS micro service answering the service protocol, each ops subject answers JSON a person can
read, and the ops HTTP port serves readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
from typing import Any

import httpx
import msgspec
from nats.aio.client import Client as NatsClient

from contracts.commands import Role
from contracts.escalation import STATUS_SUBJECT as ESCALATION_STATUS
from contracts.events import decode_event
from contracts.ledger import PROJECTION_STATUS_SUBJECT, TABLE_SUBJECT
from contracts.notifier import STATUS_SUBJECT as NOTIFIER_STATUS
from contracts.programme import load_default_programme
from contracts.replies import Accepted, decode_reply
from contracts.subjects import EVENTS_ALL, EVENTS_STREAM, SUBMISSIONS_STATUS_SUBJECT, submit_subject
from services.common.jetstream import read_all
from services.common.supervisor import SERVICES
from tests.stack import Running

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
SERVICE_NAMES = {f"duban-{name}" for name in SERVICES}


async def _srv(nc: NatsClient, subject: str, expect: int, timeout: float = 1.0) -> list[dict[str, object]]:
    """Every service's answer to a $SRV request (the protocol gathers replies on one inbox)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, b"", reply=inbox)
    answers = []
    with contextlib.suppress(TimeoutError):
        while len(answers) < expect:
            msg = await sub.next_msg(timeout=timeout)
            answers.append(json.loads(msg.data))
    await sub.unsubscribe()
    return answers


async def test_each_service_answers_the_nats_service_protocol(running: Running) -> None:
    pings = await _srv(running.nc, "$SRV.PING", expect=len(SERVICES))
    assert {p["name"] for p in pings} == SERVICE_NAMES
    assert all(p["type"] == "io.nats.micro.v1.ping_response" for p in pings)

    infos = {i["name"]: i for i in await _srv(running.nc, "$SRV.INFO", expect=len(SERVICES))}
    subjects = {name: {e["subject"] for e in info["endpoints"]} for name, info in infos.items()}  # type: ignore[attr-defined]
    assert "duban.submit.*.*" in subjects["duban-submissions"]
    assert {TABLE_SUBJECT, PROJECTION_STATUS_SUBJECT} <= subjects["duban-ledger"]
    assert ESCALATION_STATUS in subjects["duban-escalation"]
    assert NOTIFIER_STATUS in subjects["duban-notifier"]

    # A submission shows in the submissions service's stats for its submit endpoint.
    body = {
        "submission_id": "e2e-1",
        "programme_id": load_default_programme().id,
        "county_code": "410928",
        "command": {"kind": "report_progress", "milestone_id": "1.1", "percent": 40},
    }
    reply = decode_reply(
        (await running.nc.request(submit_subject(Role.COUNTY, "410928"), json.dumps(body).encode(), timeout=2)).data
    )
    assert isinstance(reply, Accepted)
    (stats,) = await _srv(running.nc, "$SRV.STATS.duban-submissions", expect=1)
    submit = next(e for e in stats["endpoints"] if e["name"] == "submit")  # type: ignore[attr-defined]
    assert submit["num_requests"] >= 1 and submit["num_errors"] == 0


async def test_ops_subjects_answer_readable_json(running: Running) -> None:
    for subject in (SUBMISSIONS_STATUS_SUBJECT, PROJECTION_STATUS_SUBJECT, ESCALATION_STATUS, NOTIFIER_STATUS):
        msg = await running.nc.request(subject, b"", timeout=5)
        text = msg.data.decode()
        assert text.startswith("{\n  "), (subject, text)  # indented for a terminal
        assert "Nats-Service-Error-Code" not in (msg.headers or {}), (subject, msg.headers)
        json.loads(text)
    # A malformed request is a clear error with the service error headers, in the same readable form.
    msg = await running.nc.request(ESCALATION_STATUS, b"{not json", timeout=5)
    assert (msg.headers or {}).get("Nats-Service-Error-Code") == "400"
    error = msgspec.json.decode(msg.data)
    assert error["code"] == "bad_request" and error["message_zh"]


async def test_readiness_and_metrics_over_http(running: Running) -> None:
    async with httpx.AsyncClient(base_url=running.ops_url) as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"ready": True, "services": dict.fromkeys(SERVICES, "ready")}
        assert (await http.get("/livez")).status_code == 200
        await running.nc.request(SUBMISSIONS_STATUS_SUBJECT, b"", timeout=5)
        metrics = (await http.get("/metrics")).text
    assert 'duban_ready{service="ledger"} 1.0' in metrics
    assert 'duban_request_seconds_count{endpoint="status",service="duban-submissions"}' in metrics
    assert "process_resident_memory_bytes" in metrics


async def test_the_startup_heap_is_frozen_once_serving_and_given_back_on_stop(running: Running) -> None:
    # settle_heap: full collections then walk only what serving creates, not the ~50,000
    # objects of imports, programmes and wiring (tests/bench/README.md, "Submissions").
    for _ in range(50):
        if gc.get_freeze_count():
            break
        await asyncio.sleep(0.1)
    assert gc.get_freeze_count() > 10_000
    running.stop.set()
    await asyncio.wait_for(running.services, 30)
    assert gc.get_freeze_count() == 0


async def test_stopping_answers_what_is_in_flight_and_loses_nothing(running: Running) -> None:
    programme_id = load_default_programme().id
    counties = ["410928", "410922", "410923", "410926", "410927"]
    sent: dict[str, asyncio.Task[Any]] = {}
    for i in range(100):
        county = counties[i % 5]
        body = {
            "submission_id": f"stop-{i}",
            "programme_id": programme_id,
            "county_code": county,
            "command": {"kind": "report_progress", "milestone_id": "1.1", "percent": i % 100},
        }
        subject = submit_subject(Role.COUNTY, county)
        sent[f"stop-{i}"] = asyncio.create_task(running.nc.request(subject, json.dumps(body).encode(), timeout=2))
    await asyncio.sleep(0.01)
    running.stop.set()  # as SIGTERM does, while submissions are being decided
    outcomes = dict(zip(sent, await asyncio.gather(*sent.values(), return_exceptions=True), strict=True))
    await asyncio.wait_for(running.services, 30)  # every service stops, none fails
    accepted = {sid for sid, o in outcomes.items() if not isinstance(o, BaseException)}
    assert accepted, "requests received before the stop are answered"
    assert all(isinstance(decode_reply(outcomes[sid].data), Accepted) for sid in accepted)
    stored = [
        decode_event(data).submission_id
        for batch in [b async for b in read_all(running.nc.jetstream(), EVENTS_STREAM, EVENTS_ALL)]
        for _, data in batch
    ]
    stored_stop = [sid for sid in stored if sid.startswith("stop-")]
    assert len(stored_stop) == len(set(stored_stop)), "none twice"
    # What was taken in was decided, stored and answered; what was still queued was never taken
    # (no reply: the county system resends it, with the same id, to the next instance).
    assert set(stored_stop) == accepted
