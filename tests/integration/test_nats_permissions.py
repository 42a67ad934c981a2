"""The generated users and permissions, enforced by a real nats-server (2.15, JetStream on).

Every wait is bounded (about 1-2 s): a message the server must refuse is proven absent by
sending an allowed one after it on the same connection (the server keeps a connection's order)
and checking that the allowed one is the first and only one to arrive.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from contracts.events import SubmissionRetracted
from contracts.programme import load_default_programme
from contracts.subjects import RETRACTIONS_STREAM, SUBMIT_ALL, aggregate_subject, submit_subject
from services.common.embedded import EmbeddedNats, find_nats_server
from services.common.jetstream import (
    complete_retraction_index,
    ensure_streams,
    indexed_retractions,
    read_all,
    stream_names,
)
from services.common.natsauth import (
    NatsUser,
    ensure_generated_passwords,
    load_password,
    render_server_auth,
    users_for,
    write_deploy_files,
)
from services.common.replay import Endpoint, ReplayError, lean_endpoint, replay
from tests.harness import declare_streams
from tests.samples import sample_envelope

pytestmark = pytest.mark.integration

WAIT = 1.5  # seconds: the bound of every wait in this file
FLUSH_S = 2  # nats-py types flush()'s timeout as int


@dataclass
class Secured:
    server: EmbeddedNats
    secrets_dir: Path
    users: dict[str, NatsUser]
    env: dict[str, str]


@dataclass
class Client:
    nc: NATS
    errors: list[Exception] = field(default_factory=list)

    async def wait_error(self, fragment: str) -> Exception:
        """The first reported error containing ``fragment`` (bounded wait)."""

        async def poll() -> Exception:
            while True:
                for err in self.errors:
                    if fragment in str(err).lower():
                        return err
                await asyncio.sleep(0.01)

        return await asyncio.wait_for(poll(), WAIT)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def secured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secured]:
    users = users_for([load_default_programme()])
    base = tmp_path_factory.mktemp("nats-auth")
    # environ={}: a developer's own DUBAN_NATS_PASSWORD_* must not leak into the test
    env = ensure_generated_passwords(users, base / "secrets", environ={})
    server = EmbeddedNats(base / "nats", extra_config=render_server_auth(users), env=env)
    async with server:
        yield Secured(server, base / "secrets", {u.name: u for u in users}, env)


async def _connect(s: Secured, user: str, *, password: str | None = None) -> Client:
    client_errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        client_errors.append(exc)

    options: dict[str, Any] = {
        "user": user,
        "password": password if password is not None else load_password(user, s.secrets_dir, environ={}),
        "name": user,
        "connect_timeout": WAIT,
        "allow_reconnect": False,
        "max_reconnect_attempts": 0,
        "error_cb": on_error,
    }
    prefix = s.users[user].inbox_prefix if user in s.users else None
    if prefix is not None:
        options["inbox_prefix"] = prefix
    nc = await nats.connect(s.server.url, **options)
    return Client(nc, client_errors)


class Inbox:
    """Messages received by one subscription."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[Msg] = asyncio.Queue()

    async def handler(self, msg: Msg) -> None:
        await self.messages.put(msg)

    async def next(self) -> Msg:
        return await asyncio.wait_for(self.messages.get(), WAIT)

    def empty(self) -> bool:
        return self.messages.empty()


async def _closing(*clients: Client) -> None:
    for c in clients:
        if not c.nc.is_closed:
            await c.nc.close()


@pytest_asyncio.fixture(loop_scope="session")
async def connect(secured: Secured) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    opened: list[Client] = []

    async def _open(user: str, **kw: Any) -> Client:
        c = await _connect(secured, user, **kw)
        opened.append(c)
        return c

    yield _open
    await _closing(*opened)


async def _submissions_listener(connect: Callable[..., Awaitable[Client]]) -> tuple[Client, Inbox]:
    svc = await connect("svc-submissions")
    inbox = Inbox()
    await svc.nc.subscribe(SUBMIT_ALL, cb=inbox.handler)
    await svc.nc.flush(timeout=FLUSH_S)
    return svc, inbox


async def test_county_cannot_publish_on_another_countys_subject(
    connect: Callable[..., Awaitable[Client]],
) -> None:
    _, received = await _submissions_listener(connect)
    county = await connect("county-410928")

    await county.nc.publish(submit_subject("county", "410922"), b"impersonation")
    err = await county.wait_error("permissions violation")
    assert isinstance(err, NatsError)
    assert 'for publish to "duban.submit.county.410922"' in str(err).lower()

    # The connection stays up and its own subject still works.
    assert county.nc.is_connected
    await county.nc.publish(submit_subject("county", "410928"), b"own")
    await county.nc.flush(timeout=FLUSH_S)
    msg = await received.next()
    assert (msg.subject, msg.data) == ("duban.submit.county.410928", b"own")
    assert received.empty()
    assert county.nc.is_connected


async def test_county_request_gets_the_services_reply_in_its_own_inbox(
    connect: Callable[..., Awaitable[Client]],
) -> None:
    svc = await connect("svc-submissions")

    async def answer(msg: Msg) -> None:
        await msg.respond(b"accepted:" + msg.subject.encode())

    await svc.nc.subscribe(SUBMIT_ALL, cb=answer)
    await svc.nc.flush(timeout=FLUSH_S)
    county = await connect("county-410928")
    reply = await county.nc.request(submit_subject("county", "410928"), b"{}", timeout=WAIT)
    assert reply.data == b"accepted:duban.submit.county.410928"
    assert reply.subject.startswith("_INBOX_county_410928.")
    assert county.errors == [] and svc.errors == []


async def test_county_cannot_read_another_countys_replies(connect: Callable[..., Awaitable[Client]]) -> None:
    other = await connect("county-410922")
    await other.nc.subscribe("_INBOX_county_410928.>")
    err = await other.wait_error("permissions violation")
    assert "subscription" in str(err).lower()


async def test_county_has_no_jetstream_access(connect: Callable[..., Awaitable[Client]]) -> None:
    svc = await connect("svc-submissions")
    js = svc.nc.jetstream(timeout=WAIT)
    await js.add_stream(StreamConfig(name="PERM_X", subjects=["duban.events.permx.>"], storage=StorageType.FILE))
    await js.publish("duban.events.permx.410928", b"secret event")

    county = await connect("county-410928")
    with pytest.raises(nats.errors.TimeoutError):
        await county.nc.request("$JS.API.STREAM.INFO.PERM_X", b"", timeout=1.0)
    err = await county.wait_error("permissions violation")
    assert '"$js.api.stream.info.perm_x"' in str(err).lower()

    # Nor can it read events by subscribing to them.
    county.errors.clear()
    seen = Inbox()
    await county.nc.subscribe("duban.events.>", cb=seen.handler)
    err = await county.wait_error("permissions violation")
    assert 'subscription to "duban.events.>"' in str(err).lower()
    await js.publish("duban.events.permx.410928", b"another event")
    await county.nc.flush(timeout=FLUSH_S)
    await asyncio.sleep(0.2)
    assert seen.empty()
    assert county.nc.is_connected


async def test_gateway_cannot_read_the_event_stream(connect: Callable[..., Awaitable[Client]]) -> None:
    svc = await connect("svc-submissions")
    js = svc.nc.jetstream(timeout=WAIT)
    await js.add_stream(StreamConfig(name="PERM_GW", subjects=["duban.events.permgw.>"], storage=StorageType.FILE))
    await js.publish("duban.events.permgw.410928", b"secret event")

    gateway = await connect("svc-gateway")
    with pytest.raises(nats.errors.TimeoutError):
        await gateway.nc.request("$JS.API.STREAM.INFO.PERM_GW", b"", timeout=1.0)
    err = await gateway.wait_error("permissions violation")
    assert '"$js.api.stream.info.perm_gw"' in str(err).lower()
    with pytest.raises(nats.errors.TimeoutError):
        await gateway.nc.jetstream(timeout=1.0).get_last_msg("PERM_GW", "duban.events.permgw.410928")

    # Nor by subscribing to the events, nor to the submissions or anyone else's replies.
    for subject in ("duban.events.>", "duban.submit.county.410928", "_INBOX_county_410928.>"):
        gateway.errors.clear()
        seen = Inbox()
        await gateway.nc.subscribe(subject, cb=seen.handler)
        err = await gateway.wait_error("permissions violation")
        assert f'subscription to "{subject.lower()}"' in str(err).lower()
    await js.publish("duban.events.permgw.410928", b"another event")
    await gateway.nc.flush(timeout=FLUSH_S)
    await asyncio.sleep(0.2)
    assert seen.empty()
    assert gateway.nc.is_connected


async def test_gateway_posts_for_any_county_and_gets_replies_in_its_own_inbox(
    connect: Callable[..., Awaitable[Client]],
) -> None:
    svc = await connect("svc-submissions")

    async def answer(msg: Msg) -> None:
        await msg.respond(b"accepted:" + msg.subject.encode())

    await svc.nc.subscribe(SUBMIT_ALL, cb=answer)
    await svc.nc.flush(timeout=FLUSH_S)
    gateway = await connect("svc-gateway")
    for subject in (submit_subject("county", "410928"), submit_subject("city", "410922")):
        reply = await gateway.nc.request(subject, b"{}", timeout=WAIT)
        assert reply.data == b"accepted:" + subject.encode()
        assert reply.subject.startswith("_INBOX_gateway.")
    assert gateway.errors == [] and svc.errors == []
    # It may not answer in the services' place, nor reach the operators' commands.
    await gateway.nc.publish("duban.ops.escalation.confirm", b"{}")
    err = await gateway.wait_error("permissions violation")
    assert '"duban.ops.escalation.confirm"' in str(err).lower()


async def test_a_county_cannot_read_the_gateways_replies(connect: Callable[..., Awaitable[Client]]) -> None:
    county = await connect("county-410928")
    await county.nc.subscribe("_INBOX_gateway.>")
    err = await county.wait_error("permissions violation")
    assert "subscription" in str(err).lower()


async def test_wrong_password_is_refused_at_connect(secured: Secured) -> None:
    # nats-py raises the server's -ERR as it comes during connect: Error("nats: 'Authorization Violation'")
    with pytest.raises(NatsError, match=r"(?i)authorization violation"):
        await _connect(secured, "county-410928", password="Wrong-password-0123456789abcdef")
    with pytest.raises(NatsError, match=r"(?i)authorization violation"):
        await _connect(secured, "county-999999", password="Whatever-0123456789abcdef")
    with pytest.raises(NatsError, match=r"(?i)authorization violation"):
        await _connect(secured, "county-410922", password=load_password("county-410928", secured.secrets_dir, {}))


async def test_city_operator_cannot_impersonate_a_county(connect: Callable[..., Awaitable[Client]]) -> None:
    _, received = await _submissions_listener(connect)
    city = await connect("city")
    await city.nc.publish(submit_subject("county", "410928"), b"pretending to be a county")
    err = await city.wait_error("permissions violation")
    assert '"duban.submit.county.410928"' in str(err).lower()
    await city.nc.publish(submit_subject("city", "410928"), b"city decision")
    await city.nc.flush(timeout=FLUSH_S)
    msg = await received.next()
    assert (msg.subject, msg.data) == ("duban.submit.city.410928", b"city decision")
    assert received.empty()


async def test_province_cannot_use_jetstream(connect: Callable[..., Awaitable[Client]]) -> None:
    province = await connect("province")
    await province.nc.publish("$JS.API.STREAM.NAMES", b"")
    await province.wait_error("permissions violation")


async def test_services_use_jetstream(connect: Callable[..., Awaitable[Client]]) -> None:
    # submissions: create a stream, append, read back the way EventStore.catch_up does.
    svc = await connect("svc-submissions")
    js = svc.nc.jetstream(timeout=WAIT)
    await js.add_stream(StreamConfig(name="PERM_EVENTS", subjects=["duban.events.perm.>"], storage=StorageType.FILE))
    acks = [await js.publish("duban.events.perm.410928", f"e{i}".encode()) for i in range(3)]
    assert [a.stream for a in acks] == ["PERM_EVENTS"] * 3
    last = await js.get_last_msg("PERM_EVENTS", "duban.events.perm.410928")
    assert last.data == b"e2"
    sub = await js.subscribe("duban.events.perm.410928", ordered_consumer=True)
    got = [(await sub.next_msg(timeout=WAIT)).data for _ in range(3)]
    await sub.unsubscribe()
    assert got == [b"e0", b"e1", b"e2"]

    # ledger: a durable pull consumer with explicit acks.
    ledger = await connect("svc-ledger")
    ljs = ledger.nc.jetstream(timeout=WAIT)
    psub = await ljs.pull_subscribe(
        "duban.events.perm.>", durable="perm-ledger", config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT)
    )
    msgs = await psub.fetch(3, timeout=WAIT)
    for m in msgs:
        await m.ack_sync(timeout=WAIT)
    info = await ljs.consumer_info("PERM_EVENTS", "perm-ledger")
    assert info.num_ack_pending == 0 and info.delivered.stream_seq == 3
    assert svc.errors == [] and ledger.errors == []


async def test_services_replay_streams_on_their_own_connection(connect: Callable[..., Awaitable[Client]]) -> None:
    # The replay (services.common.replay) logs in as the service, with its inbox prefix, and
    # answers flow control: every message arrives, and a wrong password is a clear refusal.
    svc = await connect("svc-submissions")
    js = svc.nc.jetstream(timeout=WAIT)
    await js.add_stream(StreamConfig(name="PERM_REPLAY", subjects=["duban.events.replay.>"], storage=StorageType.FILE))
    acks = await asyncio.gather(*[await js.publish_async("duban.events.replay.410928", b"%d" % i) for i in range(2000)])
    ledger = await connect("svc-ledger")
    ljs = ledger.nc.jetstream(timeout=WAIT)
    endpoint = lean_endpoint(ledger.nc)
    assert endpoint is not None and endpoint.auth["user"] == "svc-ledger"
    got = [item async for batch in read_all(ljs, "PERM_REPLAY", "duban.events.replay.>") for item in batch]
    assert got == [(ack.seq, b"%d" % i) for i, ack in enumerate(acks)]

    wrong = Endpoint(endpoint.host, endpoint.port, {"user": "svc-ledger", "pass": "wrong"}, endpoint.name)
    with pytest.raises(ReplayError, match="refused the replay connection: Authorization Violation"):
        async for _ in replay(ljs, ledger.nc, wrong, "PERM_REPLAY", "duban.events.replay.>", 2000, 500, WAIT):
            pass
    assert svc.errors == [] and ledger.errors == []


async def test_submissions_completes_the_retraction_index_with_its_own_permissions(
    connect: Callable[..., Awaitable[Client]],
) -> None:
    # An index created after events were stored covers only the later ones; svc-submissions
    # reads the earlier retractions through the replay, adds them and updates the index's
    # configuration, all within its permissions.
    svc = await connect("svc-submissions")
    js = svc.nc.jetstream(timeout=WAIT)
    for name in await js.streams_info():  # the other tests' streams overlap duban's subjects
        await js.delete_stream(name.config.name or "")
    await ensure_streams(js)
    await js.delete_stream(RETRACTIONS_STREAM)
    envelope = sample_envelope(SubmissionRetracted(retracted_submission_id="qf-3", reason="误报"))
    stored = await js.publish(
        aggregate_subject(envelope.programme_id, envelope.county_code), msgspec.json.encode(envelope)
    )
    await declare_streams(js)
    assert await indexed_retractions(js, stored.seq) is None
    assert await complete_retraction_index(js) == 1
    entries = await indexed_retractions(js, stored.seq)
    assert entries is not None
    assert [(e.stream_sequence, e.retracted_submission_id) for e in entries] == [(stored.seq, "qf-3")]
    assert svc.errors == []
    for name in stream_names():  # they would overlap the other tests' streams
        await js.delete_stream(name)


async def test_ops_has_full_access(connect: Callable[..., Awaitable[Client]]) -> None:
    _, received = await _submissions_listener(connect)
    ops = await connect("ops")
    await ops.nc.publish(submit_subject("county", "410923"), b"ops test")
    await ops.nc.flush(timeout=FLUSH_S)
    assert (await received.next()).subject == "duban.submit.county.410923"
    names = await ops.nc.jetstream(timeout=WAIT).streams_info()
    assert isinstance(names, list)
    assert ops.errors == []


def test_shipped_server_config_is_valid(tmp_path: Path) -> None:
    """`nats-server -t` accepts the deploy files once the password variables are set."""
    programme = load_default_programme()
    write_deploy_files(tmp_path, [programme])
    env = ensure_generated_passwords(users_for([programme]), tmp_path / "secrets", environ={})
    binary = str(find_nats_server())
    conf = str(tmp_path / "nats-server.conf")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("DUBAN_NATS_PASSWORD_")}
    ok = subprocess.run([binary, "-c", conf, "-t"], env={**base_env, **env}, capture_output=True, text=True, timeout=10)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # Without the variables the server refuses to start (no silent empty passwords).
    missing = subprocess.run([binary, "-c", conf, "-t"], env=base_env, capture_output=True, text=True, timeout=10)
    assert missing.returncode != 0
    assert "DUBAN_NATS_PASSWORD_" in missing.stdout + missing.stderr
