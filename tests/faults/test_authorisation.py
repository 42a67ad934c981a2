"""Authorisation probes against the real services on a nats-server with the generated users and
permissions (and the real HTTP gateway), beyond what tests/integration/test_nats_permissions.py
(the server's allow lists, with stand-in services) and test_gateway.py (tokens, routes) prove:

- a county system, with the real submissions service answering: cannot post for another county
  (the server drops it; nothing stored), cannot post another county's payload on its own subject,
  cannot submit operator commands (refused ``not_authorised``), cannot reach operator or query
  subjects, the event or refusal streams, JetStream's API, nor forge an event by publishing it;
  cannot make a service write where it may not by choosing the reply subject;
- operators: county-only commands on a city or province subject are refused, as is a payload
  for another county, a decision of the other level, and ``submitted_by`` changes no actor;
- the gateway: a token's role and county bound what it may do whatever the body says, and a
  client's own ``Duban-Gateway-Token-Id`` header changes nothing;
- secrets: no NATS password and no gateway token in the JSON logs of a service start, accepted
  and refused requests (NATS and HTTP), a wrong token and a wrong password.

Every probe counts in ``offered["authorisation probes"]``; anything that got through counts in
``wrongly_accepted`` and fails its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import pytest_asyncio
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from contracts.commands import Role
from contracts.errors import ErrorCode
from contracts.replies import Accepted, Refused, decode_reply
from contracts.subjects import EVENTS_STREAM, REFUSALS_STREAM, inbox_prefix, submit_subject
from tests.faults.report import REPORT
from tests.faults.test_gateway_fuzz import SecuredNats, gateway_stack, secured_nats
from tests.faults.test_hostile_input import check_log_lines, json_logs
from tests.harness import PROGRAMME

__all__ = ["secured_nats"]  # the module's nats-server (a fixture)

pytestmark = pytest.mark.integration

PROBES = "authorisation probes"
WAIT = 1.5  # seconds: the bound of every wait for something that must not happen
OWN, OTHER = "410928", "410922"
EVENTS_SUBJECT = f"duban.events.{PROGRAMME.id}"


def body(command: dict[str, Any], *, county: str = OWN, sid: str = "", **extra: Any) -> bytes:
    doc = {"submission_id": sid or f"az-{next(_ids)}", "programme_id": PROGRAMME.id, "county_code": county}
    return json.dumps({**doc, "command": command, **extra}, ensure_ascii=False).encode()


_ids = iter(range(1, 1_000_000))
PROGRESS = {"kind": "report_progress", "milestone_id": "1.1", "percent": 40, "note": "推进中"}
REQUEST_REVIEW = {"kind": "request_review", "review_kind": "plan_pre_review"}
CITY_REVIEW = {
    "kind": "decide_review",
    "review_kind": "plan_pre_review",
    "outcome": "passed",
    "decided_on": "2017-04-10",
}
PROVINCE_REVIEW = {**CITY_REVIEW, "review_kind": "provincial_plan_review", "decided_on": "2017-04-28"}
EXTENSION = {"kind": "decide_extension", "milestone_id": "1.3", "outcome": "refused", "reason": "不予批准"}
RETRACT = {"kind": "retract_submission", "retracted_submission_id": "az-x", "reason": "撤回"}
COUNTY_ONLY = (
    PROGRESS,
    REQUEST_REVIEW,
    {"kind": "start_trial_operation", "started_on": "2017-06-01"},
    {
        "kind": "complete_milestone",
        "milestone_id": "1.1",
        "completed_on": "2017-03-28",
        "evidence": [{"title": "批复"}],
    },
    {"kind": "file_progress_table", "period": "2017-05", "lines": [{"milestone_id": "1.1", "percent": 100}]},
    {"kind": "request_extension", "milestone_id": "1.3", "proposed_deadline": "2017-08-31", "reason": "流标"},
)


@dataclass
class User:
    """A NATS connection as one of the generated users, with the errors the server reported."""

    name: str
    nc: NatsClient
    errors: list[Exception] = field(default_factory=list)

    async def violation(self, fragment: str) -> bool:
        """Whether the server reported a permissions violation naming ``fragment`` (bounded wait)."""
        try:
            async with asyncio.timeout(WAIT):
                while not any(
                    "permissions violation" in str(e).lower() and fragment.lower() in str(e).lower()
                    for e in self.errors
                ):
                    await asyncio.sleep(0.01)
            return True
        except TimeoutError:
            return False


@dataclass
class Probe:
    """The secured server, the real submissions service and gateway, and ways to look."""

    secured: SecuredNats
    ops: NatsClient
    last: Callable[[str], Awaitable[int]]
    base_url: str
    issue: Callable[..., str]
    users: list[User] = field(default_factory=list)

    async def connect(self, user: str) -> User:
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        role = user.split("-")[0] if user.startswith("county-") or user in ("city", "province") else None
        county = user.removeprefix("county-") if user.startswith("county-") else None
        nc = await nats.connect(
            self.secured.server.url,
            user=user,
            password=self.secured.password(user),
            name=user,
            inbox_prefix=inbox_prefix(role, county) if role else "_INBOX",
            allow_reconnect=False,
            error_cb=on_error,
        )
        connected = User(user, nc, errors)
        self.users.append(connected)
        return connected

    async def counts(self) -> tuple[int, int]:
        return await self.last(EVENTS_STREAM), await self.last(REFUSALS_STREAM)


@contextlib.asynccontextmanager
async def _probing(secured_nats: SecuredNats, tmp_path: Path, database_url: str | None = None) -> AsyncIterator[Probe]:
    async with gateway_stack(secured_nats, tmp_path / "tokens.json", database_url) as stack:
        found = Probe(secured_nats, stack.ops, stack.last, stack.base_url, stack.issue)
        try:
            yield found
        finally:
            for user in found.users:
                if not user.nc.is_closed:
                    await user.nc.close()


@pytest_asyncio.fixture(loop_scope="session")
async def probe(secured_nats: SecuredNats, tmp_path: Path) -> AsyncIterator[Probe]:
    async with _probing(secured_nats, tmp_path) as found:
        yield found


def refused_as(reply: Accepted | Refused, code: ErrorCode, what: str) -> bool:
    REPORT.offered[PROBES] += 1
    if isinstance(reply, Refused) and reply.code == code:
        return True
    REPORT.wrongly_accepted[f"authorisation: {what}"] += 1
    return False


def kept_out(got_through: bool, what: str) -> bool:
    REPORT.offered[PROBES] += 1
    if got_through:
        REPORT.wrongly_accepted[f"authorisation: {what}"] += 1
    return not got_through


def got_through() -> dict[str, int]:
    """What this file's probes found let in (the tally is shared by the whole fault suite)."""
    return {k: v for k, v in REPORT.wrongly_accepted.items() if k.startswith("authorisation") and v}


# -- a county system ---------------------------------------------------------------------------------
async def test_a_county_cannot_post_for_another_county_nor_call_operator_commands(probe: Probe) -> None:
    county = await probe.connect(f"county-{OWN}")
    before = await probe.counts()

    # Another county's subject: the server drops it, no answer, nothing stored or even refused.
    with pytest.raises(nats.errors.TimeoutError):
        await county.nc.request(submit_subject(Role.COUNTY, OTHER), body(PROGRESS, county=OTHER), timeout=WAIT)
    assert kept_out(not await county.violation(f"duban.submit.county.{OTHER}"), "another county's subject")
    assert await probe.counts() == before

    # Its own subject, another county's payload: refused by the service, no fact stored.
    reply = decode_reply((await county.nc.request(submit_subject(Role.COUNTY, OWN), body(PROGRESS, county=OTHER))).data)
    assert refused_as(reply, ErrorCode.COUNTY_MISMATCH, "another county's payload")
    assert isinstance(reply, Refused) and reply.field == "$.county_code"

    # Operator commands on its own subject: refused as not authorised, naming the command.
    for command in (CITY_REVIEW, PROVINCE_REVIEW, EXTENSION, RETRACT):
        data = (await county.nc.request(submit_subject(Role.COUNTY, OWN), body(command))).data
        reply = decode_reply(data)
        assert refused_as(reply, ErrorCode.NOT_AUTHORISED, f"county submits {command['kind']}")
        assert isinstance(reply, Refused) and reply.field == "$.command.kind" and command["kind"] in reply.detail
    # An operator's subject for its own county: not its to publish on.
    for role in (Role.CITY, Role.PROVINCE):
        await county.nc.publish(submit_subject(role, OWN), body(CITY_REVIEW))
        assert kept_out(not await county.violation(f"duban.submit.{role.value}.{OWN}"), f"county on {role} subject")
    events, refusals = await probe.counts()
    assert events == before[0], "a county's refused command stored a fact"
    assert refusals == before[1] + 5  # the mismatch and the four operator commands, kept for ops
    assert got_through() == {}


async def test_a_county_reaches_no_operator_query_stream_or_jetstream_subject(probe: Probe) -> None:
    county = await probe.connect(f"county-{OWN}")
    accepted = decode_reply((await county.nc.request(submit_subject(Role.COUNTY, OWN), body(PROGRESS))).data)
    assert isinstance(accepted, Accepted)  # its own submission works; the stream has an event
    before = await probe.counts()

    # Publishing (or requesting) anywhere else: operators' commands, ledger queries of another
    # county, the streams (forging an event or a refusal), JetStream's API, the services' discovery.
    forged_event = b'{"event_id": "forged/0", "payload": {"type": "milestone_completed"}}'
    for subject, data in (
        ("duban.ops.escalation.confirm", b'{"action_id": "x", "operator": "county"}'),
        ("duban.ops.ledger.rebuild", b"{}"),
        ("duban.ops.submissions.status", b"{}"),
        ("duban.query.ledger.county", json.dumps({"county_code": OTHER}).encode()),
        ("duban.query.ledger.table", b"{}"),
        (f"{EVENTS_SUBJECT}.{OWN}", forged_event),
        (f"{EVENTS_SUBJECT}.{OTHER}", forged_event),
        (f"duban.refusals.county.{OTHER}", b"{}"),
        ("$JS.API.STREAM.INFO.DUBAN_EVENTS", b""),
        ("$JS.API.STREAM.PURGE.DUBAN_EVENTS", b""),
        ("$JS.API.STREAM.DELETE.DUBAN_REFUSALS", b""),
        ("$JS.API.CONSUMER.CREATE.DUBAN_EVENTS", b'{"config": {"deliver_subject": "_INBOX_county_410928.x"}}'),
        ("$SRV.INFO", b""),
    ):
        await county.nc.publish(subject, data)
        assert kept_out(not await county.violation(f'"{subject}"'), f"county publishes on {subject}")
    # Subscribing to anything but its own inbox: events, refusals, others' submissions and replies.
    for subject in (
        "duban.events.>",
        "duban.refusals.>",
        "duban.submit.>",
        f"_INBOX_county_{OTHER}.>",
        "_INBOX_gateway.>",
        "_INBOX_city.>",
        "_INBOX.>",
        "$JS.API.>",
        ">",
    ):
        await county.nc.subscribe(subject)
        assert kept_out(not await county.violation(f'"{subject}"'), f"county subscribes to {subject}")
    # Through the JetStream client too: no stream info, no consumer, nothing read.
    js = county.nc.jetstream(timeout=1.0)
    with pytest.raises(NatsError):
        await js.stream_info(EVENTS_STREAM)
    with pytest.raises(NatsError):
        await js.get_last_msg(EVENTS_STREAM, f"{EVENTS_SUBJECT}.{OWN}")
    REPORT.offered[PROBES] += 2
    assert await probe.counts() == before, "a county changed a stream"
    assert county.nc.is_connected  # violations are refused, the connection stays
    assert got_through() == {}


@pytest_asyncio.fixture(loop_scope="session")
async def probe_with_ledger(secured_nats: SecuredNats, fresh_database: str, tmp_path: Path) -> AsyncIterator[Probe]:
    async with _probing(secured_nats, tmp_path, fresh_database) as found:
        yield found


async def test_a_county_cannot_have_a_service_write_for_it_through_the_reply_subject(
    probe_with_ledger: Probe,
) -> None:
    """The reply subject is the requester's choice and the answer goes out with the service's
    permissions. A county (or an operator) choosing another county's event subject, the refusal
    stream, a submission subject or JetStream's API as its "reply" would have the service write
    there: the services answer only to an inbox (and drop the request otherwise)."""
    probe = probe_with_ledger
    county = await probe.connect(f"county-{OWN}")
    city = await probe.connect("city")
    before = await probe.counts()
    targets = (
        f"{EVENTS_SUBJECT}.{OTHER}",
        f"{EVENTS_SUBJECT}.{OWN}",
        f"duban.refusals.county.{OTHER}",
        submit_subject(Role.COUNTY, OTHER),
        "$JS.API.STREAM.PURGE.DUBAN_EVENTS",
        "$JS.API.STREAM.DELETE.DUBAN_REFUSALS",
    )
    spy: list[Msg] = []

    async def seen(msg: Msg) -> None:
        spy.append(msg)

    for target in ("duban.events.>", "duban.refusals.>", "duban.submit.>", "$JS.API.STREAM.>"):
        await probe.ops.subscribe(target, cb=seen)
    await probe.ops.flush()
    with structlog.testing.capture_logs() as logs:
        for target in targets:
            await county.nc.publish(submit_subject(Role.COUNTY, OWN), body(PROGRESS), reply=target)
            await city.nc.publish("duban.query.ledger.table", b"{}", reply=target)
            await city.nc.publish("duban.ops.submissions.status", b"{}", reply=target)
        await county.nc.flush()
        await city.nc.flush()

        def settled() -> bool:  # every request dropped, or an answer went where it must not
            dropped = sum(e["event"] == "request dropped: its reply subject is not an inbox" for e in logs)
            return dropped >= 3 * len(targets) or any(m.subject in targets for m in spy)

        async with asyncio.timeout(10):
            while not settled():
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
    written = [m.subject for m in spy if not m.subject.startswith("duban.submit.county." + OWN)]
    for target in targets:
        assert kept_out(target in written, f"service writes to the reply subject {target}")
    assert await probe.counts() == before, "a chosen reply subject changed a stream"
    # The same requests with an inbox are answered as ever.
    reply = decode_reply((await county.nc.request(submit_subject(Role.COUNTY, OWN), body(PROGRESS))).data)
    assert isinstance(reply, Accepted)
    status = await city.nc.request("duban.ops.submissions.status", b"{}", timeout=5)
    assert json.loads(status.data)["programmes"] == [PROGRAMME.id]
    table = await city.nc.request("duban.query.ledger.table", b"{}", timeout=5)
    assert not (table.headers or {}).get("Nats-Service-Error-Code"), table.data[:300]
    assert got_through() == {}


# -- operators ---------------------------------------------------------------------------------------
async def test_an_operator_cannot_submit_as_a_county_nor_for_another_level(probe: Probe) -> None:
    city, province = await probe.connect("city"), await probe.connect("province")
    before = await probe.counts()
    refusals = 0
    # County-only commands on the operator's own subjects: refused, whatever submitted_by claims.
    for operator, role in ((city, Role.CITY), (province, Role.PROVINCE)):
        for command in COUNTY_ONLY:
            data = body(command, submitted_by=f"county-{OWN}")
            reply = decode_reply((await operator.nc.request(submit_subject(role, OWN), data)).data)
            assert refused_as(reply, ErrorCode.NOT_AUTHORISED, f"{role} submits {command['kind']}")
            refusals += 1
        # The county's own subject: the server's to refuse (nothing reaches the service).
        await operator.nc.publish(submit_subject(Role.COUNTY, OWN), body(PROGRESS))
        assert kept_out(not await operator.violation(f"duban.submit.county.{OWN}"), f"{role} on a county subject")
    # A payload for another county than the subject's.
    reply = decode_reply((await city.nc.request(submit_subject(Role.CITY, OWN), body(EXTENSION, county=OTHER))).data)
    assert refused_as(reply, ErrorCode.COUNTY_MISMATCH, "city decides for another county")
    # The other level's decisions: the city decides no provincial review, the province no
    # extension nor city review.
    for operator, role, command in (
        (city, Role.CITY, PROVINCE_REVIEW),
        (province, Role.PROVINCE, EXTENSION),
        (province, Role.PROVINCE, CITY_REVIEW),
    ):
        reply = decode_reply((await operator.nc.request(submit_subject(role, OWN), body(command))).data)
        assert refused_as(reply, ErrorCode.NOT_AUTHORISED, f"{role} decides {command['kind']}")
    refusals += 4
    # The province may not reach the operators' commands (the city may).
    await province.nc.publish("duban.ops.escalation.confirm", b'{"action_id": "x", "operator": "p"}')
    assert kept_out(not await province.violation('"duban.ops.escalation.confirm"'), "province confirms actions")
    events, refused_count = await probe.counts()
    assert events == before[0] and refused_count == before[1] + refusals
    # What an operator may do is stored as the operator's, whatever submitted_by claims.
    decision = body(EXTENSION, submitted_by=f"county-{OWN}")
    accepted = decode_reply((await city.nc.request(submit_subject(Role.CITY, OWN), decision)).data)
    assert isinstance(accepted, Accepted)
    stored = await probe.ops.jetstream().get_msg(EVENTS_STREAM, accepted.events[0].stream_sequence)
    assert stored.data is not None
    actor = json.loads(stored.data)["actor"]
    assert actor == {"role": "city", "county_code": None, "user": f"county-{OWN}"}
    assert got_through() == {}


# -- the gateway -------------------------------------------------------------------------------------
async def test_the_gateway_binds_a_token_to_its_role_and_county_whatever_the_request_says(probe: Probe) -> None:
    county, city, province = probe.issue(Role.COUNTY, OWN), probe.issue(Role.CITY), probe.issue(Role.PROVINCE)
    forwarded: list[Msg] = []

    async def spy(msg: Msg) -> None:
        forwarded.append(msg)

    await probe.ops.subscribe("duban.submit.>", cb=spy)
    await probe.ops.flush()
    before = await probe.counts()
    city_token_id = city.split("_")[1]
    async with httpx.AsyncClient(base_url=probe.base_url, timeout=10) as http:

        async def post(token: str, path: str, data: bytes, **headers: str) -> httpx.Response:
            REPORT.offered[PROBES] += 1
            sent = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **headers}
            return await http.post(path, content=data, headers=sent)

        # County-only commands through an operator's route: the service refuses them.
        for token, role in ((city, "city"), (province, "province")):
            response = await post(token, f"/v1/{role}/counties/{OWN}/submissions", body(PROGRESS))
            assert response.status_code == 403 and response.json()["code"] == "not_authorised", response.text
        # An operator's decision through the county's route, with a county token: refused.
        response = await post(county, f"/v1/counties/{OWN}/submissions", body(EXTENSION))
        assert response.status_code == 403 and response.json()["code"] == "not_authorised"
        # Another county's payload on the token's own county route.
        response = await post(county, f"/v1/counties/{OWN}/submissions", body(PROGRESS, county=OTHER))
        assert response.status_code == 422 and response.json()["code"] == "county_mismatch"
        # A county token claiming the city's token id in the header the gateway sets: ignored.
        spoofed = body(PROGRESS)
        response = await post(
            county, f"/v1/counties/{OWN}/submissions", spoofed, **{"Duban-Gateway-Token-Id": city_token_id}
        )
        assert response.status_code == 200, response.text
        # Paths that name no county, or something else than one: refused before anything is sent.
        for path in (
            f"/v1/city/counties/{OWN}%0A/submissions",
            f"/v1/city/counties/{OWN}%00/submissions",
            f"/v1/city/counties/{OWN}.%3E/submissions",
            "/v1/city/counties/%2A/submissions",
            "/v1/city/counties/%EF%BC%94%EF%BC%91%EF%BC%90%EF%BC%99%EF%BC%92%EF%BC%98/submissions",  # full width
            f"/v1/counties/{OWN}%0A/submissions",
        ):
            response = await post(city if "/city/" in path else county, path, body(EXTENSION))
            assert response.status_code in (403, 404), (path, response.status_code, response.text)
            assert "code" in response.json()
    await probe.ops.flush()
    await asyncio.sleep(0.1)
    subjects = [m.subject for m in forwarded]
    assert all(
        s in (f"duban.submit.city.{OWN}", f"duban.submit.province.{OWN}", f"duban.submit.county.{OWN}")
        for s in subjects
    )
    # The spoofed header did not travel: the forwarded message names the caller's own token.
    [message] = [m for m in forwarded if m.data == spoofed]
    assert kept_out(
        (message.headers or {}).get("Duban-Gateway-Token-Id") != county.split("_")[1], "a spoofed token id header"
    )
    events, _ = await probe.counts()
    assert events == before[0] + 1  # only the county's own progress report
    assert got_through() == {}


# -- secrets in logs ---------------------------------------------------------------------------------
async def test_no_password_or_token_reaches_the_logs(secured_nats: SecuredNats, tmp_path: Path) -> None:
    """A service start, accepted and refused requests over NATS and HTTP, a wrong token and a wrong
    password, with the services' JSON logs captured: every line JSON, no secret anywhere."""
    with json_logs() as buffer:
        async with gateway_stack(secured_nats, tmp_path / "tokens.json") as stack:
            county_token, city_token = stack.issue(Role.COUNTY, OWN), stack.issue(Role.CITY)
            async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as http:
                for token, path, data in (
                    (county_token, f"/v1/counties/{OWN}/submissions", body(PROGRESS)),
                    (county_token, f"/v1/counties/{OWN}/submissions", body(EXTENSION)),
                    (county_token, f"/v1/counties/{OTHER}/submissions", body(PROGRESS, county=OTHER)),
                    (city_token, f"/v1/city/counties/{OWN}/submissions", b"{not json"),
                    (county_token[:-2] + "xx", f"/v1/counties/{OWN}/submissions", body(PROGRESS)),
                ):
                    REPORT.offered[PROBES] += 1
                    await http.post(path, content=data, headers={"Authorization": f"Bearer {token}"})
                await http.get(f"/v1/counties/{OWN}", headers={"Authorization": f"Bearer {city_token}"})
            county = await nats.connect(
                secured_nats.server.url,
                user=f"county-{OWN}",
                password=secured_nats.password(f"county-{OWN}"),
                inbox_prefix=inbox_prefix(Role.COUNTY, OWN),
            )
            try:
                await county.request(submit_subject(Role.COUNTY, OWN), body(PROGRESS, submitted_by="系统"))
            finally:
                await county.close()
            REPORT.offered[PROBES] += 1
            with pytest.raises(NatsError):
                await nats.connect(
                    secured_nats.server.url,
                    user=f"county-{OWN}",
                    password=secured_nats.password(f"county-{OTHER}"),
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    connect_timeout=WAIT,
                )
    text = buffer.getvalue()
    secrets = (
        *secured_nats.env.values(),
        county_token,
        city_token,
        county_token.split("_", 2)[2],
        city_token.split("_", 2)[2],
        county_token[:-2] + "xx",
    )
    leaked = [s[:6] + "…" for s in secrets if s in text]
    REPORT.offered[PROBES] += len(secrets)
    if leaked:
        REPORT.wrongly_accepted["secret in the logs"] += len(leaked)
    assert leaked == []
    records = check_log_lines(text)
    events = {r.get("event") for r in records}
    assert {"gateway serving", "http request", "submission accepted", "submission refused"} <= events, events
