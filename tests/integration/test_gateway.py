"""The HTTP gateway, served by a real uvicorn on a loopback port, in front of the real submissions
service (and ledger) on a nats-server that enforces the generated users and permissions: the
gateway connects as ``svc-gateway``, the services as their own users.

"Nothing forwarded" is proven by an ``ops`` connection listening on every submission subject,
and "nothing stored" by reading the event and refusal streams.
"""

from __future__ import annotations

import asyncio
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

from contracts.commands import MAX_SUBMISSION_BYTES, Role
from contracts.events import ProgressReported
from contracts.replies import Accepted, Refused, decode_reply
from services.common.clock import SimulatedClock
from services.common.embedded import EmbeddedNats, free_port
from services.common.natsauth import ensure_generated_passwords, load_password, render_server_auth, users_for
from services.common.runtime import Runtime
from services.common.settings import Settings
from services.gateway import main as gateway_main
from services.gateway.main import GatewayConfig
from services.gateway.tokens import TokenStore
from services.ledger import main as ledger_main
from services.submissions import main as submissions_main
from tests.harness import (
    NOW,
    PROGRAMME,
    Harness,
    clean_service_environment,  # noqa: F401 (autouse)
    new_id,
    reset_streams,
    start_task,
    stop_task,
)

pytestmark = pytest.mark.integration


@dataclass
class Secured:
    server: EmbeddedNats
    base: Path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def secured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secured]:
    users = users_for([PROGRAMME])
    base = tmp_path_factory.mktemp("gateway")
    # environ={}: a developer's own DUBAN_NATS_PASSWORD_* must not leak into the test
    env = ensure_generated_passwords(users, base / "secrets", environ={})
    async with EmbeddedNats(base / "nats", extra_config=render_server_auth(users), env=env) as server:
        yield Secured(server, base)


@dataclass
class Stack:
    """The gateway and the submissions service on fresh streams, an HTTP client, and ways to look."""

    http: httpx.AsyncClient
    tokens: TokenStore
    look: Harness  # reads the streams (as ops)
    runtime: Runtime
    forwarded: list[str]  # submission subjects published while the test ran
    messages: list[Msg]  # ...and the messages themselves
    stoppers: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)

    def issue(self, role: Role = Role.COUNTY, county: str | None = "410928") -> str:
        county = county if role is Role.COUNTY else None
        return self.tokens.issue(role, county, f"test {role.value} {county or ''}", NOW)[1]

    async def post(
        self, token: str | None, body: bytes, *, county: str = "410928", role: Role = Role.COUNTY
    ) -> httpx.Response:
        prefix = "" if role is Role.COUNTY else f"/{role.value}"
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await self.http.post(f"/v1{prefix}/counties/{county}/submissions", content=body, headers=headers)

    async def get(self, token: str, path: str) -> httpx.Response:
        return await self.http.get(path, headers={"Authorization": f"Bearer {token}"})

    async def settled(self) -> None:
        """Let anything published reach the spy."""
        await self.look.nc.flush()
        await asyncio.sleep(0.05)


def submission(command: dict[str, Any], *, county: str = "410928", **envelope: Any) -> bytes:
    body = {
        "submission_id": envelope.pop("submission_id", None) or new_id("gw"),
        "programme_id": PROGRAMME.id,
        "county_code": county,
        "command": command,
        **envelope,
    }
    return json.dumps(body, ensure_ascii=False).encode()


PROGRESS = {"kind": "report_progress", "milestone_id": "1.1", "percent": 60, "note": "项目部已组建"}
DECISION = {
    "kind": "decide_review",
    "review_kind": "plan_pre_review",
    "outcome": "passed",
    "decided_on": "2017-04-10",
    "request_submission_id": "gw-plan",
}


@pytest.fixture
def gateway_rate() -> str:
    """The gateway's per-token limits; a test overrides it with ``parametrize``."""
    return "1000/second"


@pytest_asyncio.fixture(loop_scope="session")
async def stack(secured: Secured, gateway_rate: str, tmp_path: Path) -> AsyncIterator[Stack]:
    url = secured.server.url
    secrets = secured.base / "secrets"
    ops: NatsClient = await nats.connect(url, user="ops", password=load_password("ops", secrets, environ={}))
    js = ops.jetstream()
    await reset_streams(js)  # every test starts from empty streams

    forwarded: list[str] = []
    messages: list[Msg] = []

    async def spy(msg: Msg) -> None:
        forwarded.append(msg.subject)
        messages.append(msg)

    await ops.subscribe("duban.submit.>", cb=spy)
    await ops.flush()

    runtime = Runtime(Settings(state_dir=secured.base), {PROGRAMME.id: PROGRAMME}, url, None)
    clock = SimulatedClock(NOW)
    running: list[tuple[asyncio.Task[None], asyncio.Event]] = []
    tokens_file = tmp_path / "gateway" / "tokens.json"
    port = free_port()
    config = GatewayConfig(tokens_file=tokens_file, rate=gateway_rate, timeout=2.0)
    try:
        submissions = await start_task(
            "submissions", lambda stop, ready: submissions_main.run(runtime, clock, stop, ready)
        )
        running.append(submissions)
        running.append(
            await start_task(
                "gateway",
                lambda stop, ready: gateway_main.run(runtime, clock, stop, ready, "127.0.0.1", port, config=config),
            )
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            yield Stack(
                http,
                TokenStore(tokens_file),
                Harness(ops, js, clock, PROGRAMME),
                runtime,
                forwarded,
                messages,
                {"submissions": lambda: stop_task(*submissions)},
            )
    finally:
        for task, stop in reversed(running):
            if not task.done():
                await stop_task(task, stop)
        await ops.close()


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(stack: Stack, fresh_database: str) -> AsyncIterator[None]:
    runtime = Runtime(stack.runtime.settings, stack.runtime.programmes, stack.runtime.nats_url, fresh_database)
    clock = SimulatedClock(NOW)
    task, stop = await start_task("ledger", lambda stop, ready: ledger_main.run(runtime, clock, stop, ready))
    try:
        yield
    finally:
        await stop_task(task, stop)


# -- submissions ---------------------------------------------------------------------------------
async def test_accepted_is_stored_and_answered_as_the_service_replied(stack: Stack) -> None:
    token = stack.issue()
    response = await stack.post(token, submission(PROGRESS, submission_id="gw-accepted", submitted_by="濮阳县数字城管"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    reply = decode_reply(response.content)  # the service's reply, unchanged: strict decode works
    assert isinstance(reply, Accepted) and not reply.duplicate
    assert [e.event_type for e in reply.events] == ["progress_reported"]
    stored = await stack.look.events("410928")
    assert [seq for seq, _ in stored] == [e.stream_sequence for e in reply.events]
    envelope = stored[0][1]
    assert envelope.submission_id == "gw-accepted" and envelope.actor.role == "county"
    assert envelope.actor.county_code == "410928" and envelope.actor.user == "濮阳县数字城管"
    await stack.settled()
    assert stack.forwarded == ["duban.submit.county.410928"]


async def test_the_body_is_forwarded_byte_for_byte_with_the_token_id(stack: Stack) -> None:
    token = stack.issue()
    # Not as json.dumps would write it: key order, spacing, escapes and a trailing newline stay.
    body = (
        '{ "county_code":"410928",\t"programme_id": "' + PROGRAMME.id + '", "submission_id": "gw-bytes",\n'
        '  "command": {"kind": "report_progress", "milestone_id": "1.1", "percent": 60,'
        ' "note": "\\u9879\\u76ee 项目部"} }\n'
    ).encode()
    response = await stack.post(token, body)
    assert response.status_code == 200, response.text
    await stack.settled()
    [msg] = stack.messages
    assert msg.data == body
    assert msg.headers is not None and msg.headers["Duban-Gateway-Token-Id"] == token.split("_")[1]
    assert msg.reply.startswith("_INBOX_gateway.")  # its own inbox: the only one it may read
    [(_, stored)] = await stack.look.events("410928")
    assert isinstance(stored.payload, ProgressReported) and stored.payload.note == "项目 项目部"


async def test_a_resend_is_a_duplicate_and_stores_nothing_new(stack: Stack) -> None:
    token = stack.issue()
    body = submission(PROGRESS, submission_id="gw-dup")
    first = await stack.post(token, body)
    second = await stack.post(token, body)
    assert first.status_code == second.status_code == 200
    assert first.json()["duplicate"] is False and second.json()["duplicate"] is True
    assert second.json()["events"] == first.json()["events"]
    assert len(await stack.look.events()) == 1


async def test_refusals_have_their_status_and_code_and_store_no_fact(stack: Stack) -> None:
    token = stack.issue()
    cases: list[tuple[bytes, int, str, str | None]] = [
        (b'{"submission_id": "x", ', 400, "malformed", None),
        (submission({**PROGRESS, "percent": "half"}), 400, "malformed", "$.command.percent"),
        (submission({**PROGRESS, "milestone_id": "4.1"}), 422, "unknown_milestone", "$.command.milestone_id"),
        (submission(PROGRESS, county="410922"), 422, "county_mismatch", "$.county_code"),
        (submission(DECISION), 403, "not_authorised", "$.command.kind"),  # an operator's command
    ]
    for body, status, code, where in cases:
        response = await stack.post(token, body)
        assert response.status_code == status, (code, response.text)
        refusal = decode_reply(response.content)
        assert isinstance(refusal, Refused) and refusal.code == code
        assert where is None or refusal.field == where
        assert refusal.message_zh and refusal.message_en
    assert await stack.look.events() == []
    assert [r.refusal.code for r in await stack.look.refusals()] == [c for _, _, c, _ in cases]

    # A reused id with other content: 409.
    assert (await stack.post(token, submission(PROGRESS, submission_id="gw-r"))).status_code == 200
    conflict = await stack.post(token, submission({**PROGRESS, "percent": 90}, submission_id="gw-r"))
    assert conflict.status_code == 409 and conflict.json()["code"] == "submission_id_conflict"
    assert len(await stack.look.events()) == 1


async def test_a_county_token_posts_only_for_its_own_county(stack: Stack) -> None:
    qingfeng = stack.issue(county="410922")
    response = await stack.post(qingfeng, submission(PROGRESS), county="410928")
    assert response.status_code == 403
    body = response.json()
    assert body["code"] == "not_authorised" and "410922" in body["detail"]
    assert body["message_zh"] and body["message_en"]
    # Nor on an operator's route.
    assert (
        await stack.post(qingfeng, submission(PROGRESS, county="410922"), county="410922", role=Role.CITY)
    ).status_code == 403
    await stack.settled()
    assert stack.forwarded == []
    assert await stack.look.events() == [] and await stack.look.refusals() == []


async def test_missing_invalid_and_revoked_tokens_are_401(stack: Stack) -> None:
    body = submission(PROGRESS)
    for headers in ({}, {"Authorization": "Bearer nonsense"}, {"Authorization": "Basic dXNlcjpwYXNz"}):
        response = await stack.http.post("/v1/counties/410928/submissions", content=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["code"] == "unauthenticated"
    forged = stack.issue()[:-4] + "AAAA"
    assert (await stack.post(forged, body)).status_code == 401

    token = stack.issue()
    assert (await stack.post(token, body)).status_code == 200
    token_id = token.split("_")[1]
    TokenStore(stack.tokens.path).revoke(token_id, NOW)  # as `duban gateway token revoke` does
    response = await stack.post(token, submission(PROGRESS))
    assert response.status_code == 401 and "invalid_token" in response.headers["www-authenticate"]
    await stack.settled()
    assert stack.forwarded == ["duban.submit.county.410928"]  # only the one with the live token


async def test_oversized_bodies_are_413_before_anything_is_forwarded(stack: Stack) -> None:
    token = stack.issue()
    exactly = submission(PROGRESS, submission_id="gw-limit")
    exactly += b" " * (MAX_SUBMISSION_BYTES - len(exactly))  # trailing whitespace is still JSON
    assert len(exactly) == MAX_SUBMISSION_BYTES
    assert (await stack.post(token, exactly)).status_code == 200

    too_big = exactly + b" "
    response = await stack.post(token, too_big)  # Content-Length says so
    assert response.status_code == 413 and response.json()["code"] == "oversized"

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length, counted while read
        for _ in range(16):
            yield b" " * 8192

    chunked = await stack.http.post(
        "/v1/counties/410928/submissions",
        content=chunks(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert chunked.status_code == 413 and chunked.json()["code"] == "oversized"
    await stack.settled()
    assert stack.forwarded == ["duban.submit.county.410928"]  # only the one at the limit
    assert len(await stack.look.events()) == 1 and await stack.look.refusals() == []


@pytest.mark.parametrize("gateway_rate", ["3/minute"])
async def test_over_the_rate_limit_is_429_with_retry_after(stack: Stack) -> None:
    token = stack.issue()
    for _ in range(3):
        assert (await stack.post(token, submission(PROGRESS))).status_code == 200
    limited = await stack.post(token, submission(PROGRESS))
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.json()["code"] == "rate_limited" and limited.json()["retryable"] is True
    # Per token: another county's system is not held back.
    assert (
        await stack.post(stack.issue(county="410922"), submission(PROGRESS, county="410922"), county="410922")
    ).status_code == 200
    await stack.settled()
    assert len(stack.forwarded) == 4


async def test_a_city_operator_posts_a_review_decision(stack: Stack) -> None:
    county, city = stack.issue(), stack.issue(Role.CITY)
    request = submission({"kind": "request_review", "review_kind": "plan_pre_review"}, submission_id="gw-plan")
    assert (await stack.post(county, request)).status_code == 200
    decision = submission(DECISION, submitted_by="市督查局 王科长")
    # Not on the county's route, nor on the province's.
    assert (await stack.post(city, decision)).status_code == 403
    assert (await stack.post(city, decision, role=Role.PROVINCE)).status_code == 403
    response = await stack.post(city, decision, role=Role.CITY)
    assert response.status_code == 200, response.text
    assert [e["event_type"] for e in response.json()["events"]] == ["review_decided"]
    stored = await stack.look.events("410928")
    assert stored[-1][1].actor.role == "city" and stored[-1][1].actor.user == "市督查局 王科长"
    await stack.settled()
    assert stack.forwarded == ["duban.submit.county.410928", "duban.submit.city.410928"]


async def test_no_answer_is_503_with_the_error_shape(stack: Stack) -> None:
    await stack.stoppers["submissions"]()
    response = await stack.post(stack.issue(), submission(PROGRESS))
    assert response.status_code == 503
    assert response.headers["retry-after"]
    body = response.json()
    assert body["code"] == "unavailable" and body["retryable"] is True
    assert body["message_zh"] and body["message_en"]


async def test_no_answer_within_the_timeout_is_503(stack: Stack) -> None:
    """A service that takes the request but never answers: 503 after the gateway's timeout (2 s here)."""
    silent = await stack.look.nc.subscribe("duban.query.ledger.county")  # never answers
    try:
        response = await stack.get(stack.issue(Role.CITY), "/v1/counties/410928")
    finally:
        await silent.unsubscribe()
    assert response.status_code == 503 and response.headers["retry-after"]
    body = response.json()
    assert body["code"] == "unavailable" and "within 2 s" in body["detail"]


# -- reads -----------------------------------------------------------------------------------------
async def test_a_county_reads_its_own_county_only(stack: Stack, ledger: None) -> None:
    token = stack.issue()
    assert (await stack.post(token, submission(PROGRESS, submission_id="gw-read"))).status_code == 200

    async def percent_of_1_1() -> int:
        response = await stack.get(token, "/v1/counties/410928")
        assert response.status_code == 200, response.text
        detail = response.json()
        assert detail["county"]["county_code"] == "410928"
        return int(next(m for m in detail["county"]["milestones"] if m["milestone_id"] == "1.1")["percent"])

    async with asyncio.timeout(10):  # the ledger follows the stream
        while await percent_of_1_1() != 60:
            await asyncio.sleep(0.05)
    history = await stack.get(token, "/v1/counties/410928/history")
    assert history.status_code == 200
    assert [e["submission_id"] for e in history.json()["entries"]] == ["gw-read"]

    for path in ("/v1/counties/410922", "/v1/counties/410922/history"):
        other = await stack.get(token, path)
        assert other.status_code == 403 and other.json()["code"] == "not_authorised"

    city = stack.issue(Role.CITY)
    assert (await stack.get(city, "/v1/counties/410922")).status_code == 200
    unknown = await stack.get(city, "/v1/counties/419999")
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_county"  # the ledger's answer
    assert (await stack.get(city, "/v1/counties/nope")).status_code == 404
    assert (await stack.http.get("/v1/counties/410928")).status_code == 401


# -- health and logs ---------------------------------------------------------------------------------
async def test_health_and_readiness_need_no_token(stack: Stack) -> None:
    assert (await stack.http.get("/healthz")).json() == {"status": "ok"}
    ready = await stack.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True


async def test_logs_name_the_token_id_never_the_token(stack: Stack) -> None:
    token = stack.issue()
    token_id = token.split("_")[1]
    with structlog.testing.capture_logs() as logs:
        await stack.post(token, submission(PROGRESS, submission_id="gw-log"))
        await stack.post(token[:-1] + ("B" if token[-1] != "B" else "C"), submission(PROGRESS))
    lines = [entry for entry in logs if entry.get("event") == "http request"]
    assert [(entry["status"], entry["key_id"]) for entry in lines] == [(200, token_id), (401, token_id)]
    assert lines[0]["submission_id"] == "gw-log" and lines[0]["county"] == "410928"
    secret = token.split("_", 2)[2]
    assert not any(secret in repr(entry) for entry in logs)
