"""The stream replay (services.common.replay) against a real nats-server: it gives exactly what
nats-py's ordered consumer gives, and loses nothing when its connection or consumer goes away."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
import pytest_asyncio
import structlog
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from services.common import replay as replay_module
from services.common.jetstream import _read, _sequence_and_data, read_all, read_subjects
from services.common.replay import Endpoint, ReplayError, lean_endpoint, replay

pytestmark = pytest.mark.integration

STREAM = "T_REPLAY"


@pytest_asyncio.fixture(loop_scope="session")
async def stream(nats_url: str) -> AsyncIterator[tuple[NatsClient, JetStreamContext]]:
    nc = await nats.connect(nats_url, name="replay-test")
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=STREAM, subjects=["t.replay.>"]))
    try:
        yield nc, js
    finally:
        await js.delete_stream(STREAM)
        await nc.close()


# Payloads that look like the protocol, binary, empty and large: the frame sizes delimit them.
SHAPES = [b'{"n":1}', b"", b"MSG t 1 5\r\nhello\r\n", b"\r\n\r\n", bytes(range(256)), b"y" * 70_000]


async def fill(js: JetStreamContext, count: int) -> list[tuple[int, str, bytes]]:
    """``count`` messages on two subjects, some with headers: (sequence, subject, data)."""
    stored = []
    for start in range(0, count, 500):
        futures, sent = [], []
        for i in range(start, min(count, start + 500)):
            subject = f"t.replay.{'a' if i % 3 else 'b'}"
            shape = SHAPES[i % len(SHAPES)]
            data = shape + b"%d" % i if shape else shape
            headers = {"Nats-Msg-Id": f"m{i}"} if i % 2 else None
            futures.append(await js.publish_async(subject, data, headers=headers))
            sent.append((subject, data))
        acks = await asyncio.gather(*futures)
        stored += [(ack.seq, subject, data) for ack, (subject, data) in zip(acks, sent, strict=True)]
    return stored


async def replayed(nc: NatsClient, js: JetStreamContext, subject: str, batch_size: int = 700) -> list[list[Any]]:
    endpoint = lean_endpoint(nc)
    assert endpoint is not None
    last = int((await js.get_last_msg(STREAM, subject)).seq or 0)
    return [batch async for batch in replay(js, nc, endpoint, STREAM, subject, last, batch_size, idle_timeout=20)]


async def test_the_replay_gives_exactly_what_nats_py_gives(stream: tuple[NatsClient, JetStreamContext]) -> None:
    nc, js = stream
    stored = await fill(js, 3000)
    wanted = {
        "t.replay.>": [(seq, data) for seq, _, data in stored],
        "t.replay.b": [(seq, data) for seq, subject, data in stored if subject == "t.replay.b"],
    }
    got = {}
    for subject in wanted:
        batches = await replayed(nc, js, subject)
        assert all(0 < len(batch) <= 700 for batch in batches)
        got[subject] = list(itertools.chain.from_iterable(batches))
    assert got == wanted
    # Nothing left behind on the server: the replay deletes its consumers at the end.
    assert [c async for c in _consumers(js)] == []
    for subject, items in got.items():
        through_nats_py = _read(js, STREAM, subject, items[-1][0], _sequence_and_data, 700, 20)
        assert items == [item async for batch in through_nats_py for item in batch]


async def test_several_subjects_are_read_together_in_stream_order_up_to_a_sequence(
    stream: tuple[NatsClient, JetStreamContext],
) -> None:
    _, js = stream
    stored = await fill(js, 3000)

    async def read(subjects: list[str], upto: int) -> list[tuple[int, bytes]]:
        source = await read_subjects(js, STREAM, "t.replay.>", subjects, upto, batch_size=400)
        assert source is not None
        return [item async for batch in source for item in batch]

    upto = stored[2000][0]
    assert await read(["t.replay.b"], upto) == [(q, d) for q, s, d in stored if s == "t.replay.b" and q <= upto]
    assert await read(["t.replay.a", "t.replay.b"], stored[-1][0]) == [(q, d) for q, _, d in stored]
    assert await read(["t.replay.none"], upto) == []


async def test_messages_appended_during_the_replay_are_left_for_the_live_consumer(
    stream: tuple[NatsClient, JetStreamContext],
) -> None:
    _, js = stream
    stored = await fill(js, 1000)
    seen: list[int] = []
    async for batch in read_all(js, STREAM, "t.replay.>", batch_size=100):
        if not seen:
            await fill(js, 200)  # appended after the call
        seen += [seq for seq, _ in batch]
    assert seen == [seq for seq, _, _ in stored]


async def test_a_dropped_connection_resumes_after_the_last_message_taken(
    stream: tuple[NatsClient, JetStreamContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    nc, js = stream
    stored = await fill(js, 2000)
    opened = replay_module._Connection.open
    connections = 0

    async def open_dropping_the_first(endpoint: Endpoint, timeout: float) -> replay_module._Connection:
        nonlocal connections
        connection = await opened(endpoint, timeout)
        connections += 1
        if connections == 1:
            real_read = connection.reader.read
            budget = [400_000]  # bytes, then the connection "drops" mid-frame

            async def read(n: int = -1) -> bytes:
                if budget[0] <= 0:
                    return b""
                chunk = await real_read(min(n, budget[0]))
                budget[0] -= len(chunk)
                return chunk

            monkeypatch.setattr(connection.reader, "read", read)
        return connection

    monkeypatch.setattr(replay_module._Connection, "open", open_dropping_the_first)
    with structlog.testing.capture_logs() as logs:
        got = list(itertools.chain.from_iterable(await replayed(nc, js, "t.replay.>")))
    assert got == [(seq, data) for seq, _, data in stored]
    assert connections == 2
    restarts = [e for e in logs if e["event"] == "stream replay restarts"]
    assert len(restarts) == 1 and "closed" in restarts[0]["reason"]


async def test_a_replay_that_hands_out_little_still_counts_what_it_read_as_progress(
    stream: tuple[NatsClient, JetStreamContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    # With select, thousands of messages may be read before one is handed out: a restart after
    # longer than the idle timeout is not "no progress" while messages were being read.
    nc, js = stream
    await fill(js, 2000)
    marker = f"selected-{uuid.uuid4().hex}".encode()
    last = (await js.publish("t.replay.b", b'{"note":"%b"}' % marker)).seq
    opened = replay_module._Connection.open
    connections = 0

    async def open_slow_then_dropping(endpoint: Endpoint, timeout: float) -> replay_module._Connection:
        nonlocal connections
        connection = await opened(endpoint, timeout)
        connections += 1
        if connections == 1:
            real_read = connection.reader.read
            budget = [300_000]  # bytes, a little at a time, then the connection "drops"

            async def read(n: int = -1) -> bytes:
                if budget[0] <= 0:
                    return b""
                await asyncio.sleep(0.2)
                chunk = await real_read(min(n, 100_000, budget[0]))
                budget[0] -= len(chunk)
                return chunk

            monkeypatch.setattr(connection.reader, "read", read)
        return connection

    monkeypatch.setattr(replay_module._Connection, "open", open_slow_then_dropping)
    endpoint = lean_endpoint(nc)
    assert endpoint is not None
    batches = replay(js, nc, endpoint, STREAM, "t.replay.>", last, 100, idle_timeout=0.5, select=marker)
    got = [message async for batch in batches for message in batch]
    assert got == [(last, b'{"note":"%b"}' % marker)]
    assert connections == 2


async def test_a_consumer_deleted_under_the_replay_is_made_again(stream: tuple[NatsClient, JetStreamContext]) -> None:
    nc, js = stream
    stored = await fill(js, 3000)
    endpoint = lean_endpoint(nc)
    assert endpoint is not None
    got: list[tuple[int, bytes]] = []
    with structlog.testing.capture_logs() as logs:
        async for batch in replay(js, nc, endpoint, STREAM, "t.replay.>", stored[-1][0], 100, idle_timeout=20):
            if not got:
                async for name in _consumers(js):
                    await js.delete_consumer(STREAM, name)
            got += batch
    assert got == [(seq, data) for seq, _, data in stored]
    # A push consumer deleted says nothing: its silence (no heartbeat) is what restarts it.
    assert [e["reason"] for e in logs if e["event"] == "stream replay restarts"] == ["no message or heartbeat for 6 s"]


async def test_a_refused_connection_is_a_clear_error(stream: tuple[NatsClient, JetStreamContext]) -> None:
    nc, js = stream
    await fill(js, 10)
    endpoint = lean_endpoint(nc)
    assert endpoint is not None
    wrong_port = Endpoint(endpoint.host, 1, endpoint.auth, endpoint.name)  # nothing listens there
    with pytest.raises(TimeoutError, match="no progress"):
        async for _ in replay(js, nc, wrong_port, STREAM, "t.replay.>", 10, 100, idle_timeout=0.5):
            pass

    async def not_nats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_nats, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(ReplayError, match="not a NATS server"):
            await replay_module._Connection.open(Endpoint("127.0.0.1", port, {}, "x"), timeout=2)


async def _consumers(js: JetStreamContext) -> AsyncIterator[str]:
    for info in await js.consumers_info(STREAM):
        yield str(info.name)
