"""Replaying a stream fast: a read-only NATS connection of its own that splits the frames itself.

A rebuild reads every event once and needs only its stream sequence and its bytes. nats-py spends
about 11 µs delivering each message (a regex per frame, an awaited coroutine, a header dict, a
``Msg``, a queue, the callback): the whole of a rebuild's budget against the raw rate. Here the
server pushes the stream to an inbox on a plain connection of ours, and :class:`FrameSplitter`
cuts the frames out of the socket's bytes (about 2 µs a message).

- The consumer is the ordered consumer nats-py would make (ephemeral, push, no acks, flow
  control, idle heartbeats, in memory), created through nats-py's JetStream API on the caller's
  connection; only the delivery comes here.
- Lossless, in order: the consumer sequence must go 1, 2, 3…, and a heartbeat names the last
  one sent. On a gap, a dropped connection or missed heartbeats, the consumer is made again from
  the last stream sequence taken + 1 (the ordered consumer's recovery), a new connection if need
  be. Nothing is skipped, nothing is given twice.
- Paced: the socket is read only when the caller asks for the next batch; flow control is
  answered for the frames read, so a slow caller holds the server back.
- It speaks plain TCP with user and password, a token or no auth (what duban's servers use).
  For anything else (TLS, nkeys, credentials files) :func:`lean_endpoint` says no and the caller
  reads through nats-py (services.common.jetstream.read_all does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

log = structlog.get_logger(__name__)

HEARTBEAT_SECONDS = 2.0
MISSED_HEARTBEATS = 3  # silence this long (×heartbeat) means the consumer or connection is gone
READ_CHUNK = 1024 * 1024  # and the reader's buffer: what the socket holds beyond it waits in the kernel
ACK_PREFIX = b"$JS.ACK."


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to open the replay connection (the caller's current server)."""

    host: str
    port: int
    auth: dict[str, str]
    name: str


def lean_endpoint(nc: NatsClient) -> Endpoint | None:
    """The caller's server and credentials, if this reader can speak them; otherwise None."""
    url = nc.connected_url
    options = nc.options
    if url is None or url.scheme not in ("nats", "") or options.get("tls") is not None:
        return None
    if any(getattr(nc, attr, None) for attr in ("_signature_cb", "_user_jwt_cb", "_nkeys_seed", "_user_credentials")):
        return None
    auth: dict[str, str] = {}
    user, password, token = options.get("user"), options.get("password"), options.get("token")
    if callable(user) or callable(password) or callable(token):
        return None
    if user is not None and password is not None:
        auth = {"user": str(user), "pass": str(password)}
    elif token is not None:
        auth = {"auth_token": str(token)}
    elif url.username is not None:
        auth = (
            {"user": url.username, "pass": url.password} if url.password is not None else {"auth_token": url.username}
        )
    name = f"{options.get('name') or 'duban'}-replay"
    return Endpoint(host=url.hostname or "127.0.0.1", port=url.port or 4222, auth=auth, name=name)


class ReplayError(Exception):
    """The server refused the replay connection or the consumer (not a transient fault)."""


class _Restart(Exception):
    """The delivery broke (gap, lost connection, silence): make the consumer again."""


class FrameSplitter:
    """Cuts NATS protocol frames out of a byte buffer (pure: no I/O).

    Stream messages (reply ``$JS.ACK…``) up to ``last`` go into the caller's list as (stream
    sequence, data), only those of the ``keep`` subjects and with the ``select`` bytes in their
    data when given; the consumer sequence is checked on the way. Everything else is noted for the
    connection to act on: pings to answer, flow-control and stalled-consumer replies to send,
    heartbeats, server errors.
    """

    def __init__(self, last: int, keep: Collection[bytes] | None = None, select: bytes | None = None) -> None:
        self.last = last  # the stream sequence to stop at
        self.keep = keep  # the subjects whose messages are handed out (None: all)
        self.select = select  # handed out only if their data contain these bytes (None: all)
        self.taken = 0  # the last stream sequence handed out
        self.delivered = 0  # the last consumer sequence seen (per consumer)
        self.pings = 0
        self.replies: list[bytes] = []  # flow control / stalled consumer: answer with an empty message
        self.gap: str | None = None
        self.error: str | None = None
        self.done = False
        self._pending = b""  # the start of a frame whose end has not arrived yet

    def new_consumer(self) -> None:
        """A new consumer on a new connection: its sequences start again at 1."""
        self.delivered = 0
        self.gap = None
        self._pending = b""

    def feed(self, chunk: bytes, out: list[tuple[int, bytes]]) -> None:
        """Take the whole frames of what arrived so far; keep an incomplete one for the next chunk."""
        buf = self._pending + chunk if self._pending else chunk
        self._pending = buf[self._split(buf, out) :]

    def _split(self, buf: bytes, out: list[tuple[int, bytes]]) -> int:
        """Take the whole frames of ``buf``; returns where the first incomplete frame starts.
        Stops early (at the frame after) on a gap, a server error or the last sequence."""
        find, startswith, size = buf.find, buf.startswith, len(buf)
        taken, delivered, last, keep, select = self.taken, self.delivered, self.last, self.keep, self.select
        pos = 0
        try:
            while True:
                eol = find(b"\r\n", pos)
                if eol < 0:
                    return pos
                if startswith(b"HMSG ", pos):
                    args = buf[pos + 5 : eol].split(b" ")  # subject sid [reply] header-size total-size
                    reply = args[2] if len(args) == 5 else b""
                    body = eol + 2
                    end = body + int(args[-1])
                    if end + 2 > size:
                        return pos
                    headers_end = body + int(args[-2])
                elif startswith(b"MSG ", pos):
                    args = buf[pos + 4 : eol].split(b" ")  # subject sid [reply] size
                    reply = args[2] if len(args) == 4 else b""
                    body = headers_end = eol + 2
                    end = body + int(args[-1])
                    if end + 2 > size:
                        return pos
                else:
                    self._control(buf[pos:eol])
                    pos = eol + 2
                    if self.error is not None:
                        return pos
                    continue
                pos = end + 2
                if not reply.startswith(ACK_PREFIX):
                    self._status(reply, buf[body:headers_end], delivered)
                    if self.gap is not None:
                        return pos
                    continue
                tokens = reply.split(b".")
                # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>,
                # or with <domain>.<account hash> after ACK and a token at the end.
                if len(tokens) == 9:
                    sequence, consumer_sequence = int(tokens[5]), int(tokens[6])
                else:
                    sequence, consumer_sequence = int(tokens[7]), int(tokens[8])
                if consumer_sequence != delivered + 1 or sequence <= taken:
                    self.gap = (
                        f"consumer sequence {consumer_sequence} after {delivered} (stream {sequence} after {taken})"
                    )
                    return pos
                delivered = consumer_sequence
                if sequence > last:
                    self.done = True
                    return pos
                taken = sequence
                if (keep is None or args[0] in keep) and (select is None or find(select, headers_end, end) >= 0):
                    out.append((sequence, buf[headers_end:end]))
                if sequence == last:
                    self.done = True
                    return pos
        finally:
            self.taken, self.delivered = taken, delivered

    def _control(self, line: bytes) -> None:
        if line.startswith(b"PING"):
            self.pings += 1
        elif line.startswith(b"-ERR"):
            self.error = line[5:].strip(b" '").decode(errors="replace")
        # +OK, PONG, INFO: nothing to do

    def _status(self, reply: bytes, headers: bytes, delivered: int) -> None:
        """A status message from the consumer (100 flow control or idle heartbeat; 4xx errors)."""
        status_line, _, rest = headers.partition(b"\r\n")
        fields = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(b":") for line in rest.split(b"\r\n") if line)
        )
        if b"FlowControl" in status_line and reply:
            self.replies.append(reply)
        elif b"Idle Heartbeat" in status_line:
            stalled = fields.get(b"nats-consumer-stalled")
            if stalled:
                self.replies.append(stalled)
            last_delivered = fields.get(b"nats-last-consumer")
            if last_delivered is not None and int(last_delivered) != delivered:
                self.gap = f"heartbeat says consumer sequence {int(last_delivered)}; {delivered} arrived"
        elif status_line[9:12].startswith(b"4"):  # 404/408/409: the consumer is gone or refused
            self.gap = status_line.decode(errors="replace")


async def replay(
    js: JetStreamContext,
    nc: NatsClient,
    endpoint: Endpoint | None,
    stream: str,
    subject: str,
    last: int,
    batch_size: int,
    idle_timeout: float,
    keep: Collection[str] | None = None,
    select: bytes | None = None,
) -> AsyncIterator[list[tuple[int, bytes]]]:
    """Every message of ``subject`` in ``stream`` up to sequence ``last``, in order, in batches
    of (stream sequence, data); with ``keep``, only those of these subjects (of the subjects
    ``subject`` matches: a consumer with many filter subjects is slow to deliver on the server);
    with ``select``, only those whose data contain these bytes. Raises TimeoutError after
    ``idle_timeout`` seconds without one message read, however many restarts that took.

    ``endpoint`` None: the server ``nc`` is connected to at each (re)start, so that when a
    cluster's node goes away mid-replay, the replay follows nats-py to the node it reconnects to.
    """
    splitter = FrameSplitter(last, None if keep is None else frozenset(s.encode() for s in keep), select)
    taken: list[tuple[int, bytes]] = []  # split off the socket, not yet handed out
    progressed, reached = time.monotonic(), 0
    while not splitter.done:
        connection: _Connection | None = None
        consumer: str | None = None
        try:
            server = endpoint or lean_endpoint(nc)
            if server is None:  # nats-py is between servers: try again in a moment
                raise _Restart("the connection is reconnecting")
            connection = await _Connection.open(server, timeout=HEARTBEAT_SECONDS * MISSED_HEARTBEATS)
            inbox = nc.new_inbox()
            await connection.subscribe(inbox)
            splitter.new_consumer()
            info = await js.add_consumer(stream, _ordered_consumer(inbox, subject, splitter.taken + 1))
            consumer = info.name
            async for batch in _deliveries(connection, splitter, taken, batch_size):
                yield batch
        except (TimeoutError, _Restart, OSError, EOFError) as exc:  # nats' timeouts are TimeoutErrors too
            if taken:  # what arrived before the break is good: the restart begins after it
                batch, taken = taken, []
                yield batch
            if splitter.taken > reached:  # (read, if not handed out)
                progressed, reached = time.monotonic(), splitter.taken
            if time.monotonic() - progressed > idle_timeout:
                raise TimeoutError(f"reading {stream} made no progress for {idle_timeout:g} s: {exc}") from exc
            log.warning("stream replay restarts", stream=stream, from_sequence=splitter.taken + 1, reason=str(exc))
            await asyncio.sleep(0.2)
        finally:
            if connection is not None:
                connection.close()
            if consumer is not None:
                with contextlib.suppress(Exception):  # ephemeral: the server removes it anyway
                    await js.delete_consumer(stream, consumer)


def _ordered_consumer(inbox: str, subject: str, start: int) -> ConsumerConfig:
    return ConsumerConfig(
        deliver_subject=inbox,
        filter_subject=subject,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start,
        ack_policy=AckPolicy.NONE,
        max_deliver=1,
        flow_control=True,
        idle_heartbeat=HEARTBEAT_SECONDS,
        mem_storage=True,
        num_replicas=1,
        inactive_threshold=60.0,
    )


async def _deliveries(
    connection: _Connection, splitter: FrameSplitter, taken: list[tuple[int, bytes]], batch_size: int
) -> AsyncIterator[list[tuple[int, bytes]]]:
    """Batches of ``batch_size`` from the connection until the splitter is done (the rest in
    ``taken`` at the end); raises _Restart when the delivery breaks, with ``taken`` kept."""
    silence = HEARTBEAT_SECONDS * MISSED_HEARTBEATS
    while not splitter.done:
        try:
            chunk = await asyncio.wait_for(connection.reader.read(READ_CHUNK), silence)
        except TimeoutError:
            raise _Restart(f"no message or heartbeat for {silence:.0f} s") from None
        if not chunk:
            raise _Restart("the server closed the connection")
        splitter.feed(chunk, taken)
        connection.answer(splitter)
        if splitter.error is not None:
            if "permission" in splitter.error.lower() or "authori" in splitter.error.lower():
                raise ReplayError(f"the server refused the replay: {splitter.error}")
            raise _Restart(f"server error: {splitter.error}")
        while len(taken) >= batch_size:
            yield taken[:batch_size]
            del taken[:batch_size]
        if splitter.gap is not None:
            raise _Restart(splitter.gap)
    if taken:
        yield taken[:]
        taken.clear()


class _Connection:
    """A plain NATS client connection that subscribes once and answers the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, endpoint: Endpoint, timeout: float) -> _Connection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(endpoint.host, endpoint.port, limit=READ_CHUNK), timeout
        )
        connection = cls(reader, writer)
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line.startswith(b"INFO "):
                raise ReplayError(f"not a NATS server at {endpoint.host}:{endpoint.port}")
            info = json.loads(line[5:])
            if info.get("tls_required") or not info.get("headers"):
                raise ReplayError("the server wants TLS or does not speak headers")
            options = {
                "verbose": False,
                "pedantic": False,
                "protocol": 1,
                "headers": True,
                "no_responders": True,
                "lang": "python",
                "version": "duban-replay",
                "name": endpoint.name,
                **endpoint.auth,
            }
            writer.write(b"CONNECT %b\r\nPING\r\n" % json.dumps(options).encode())
            await connection._until_pong(timeout)
        except BaseException:
            connection.close()
            raise
        return connection

    async def subscribe(self, subject: str) -> None:
        """Subscribe (sid 1) and wait until the server has it (PING answered)."""
        self.writer.write(b"SUB %b 1\r\nPING\r\n" % subject.encode())
        await self._until_pong(HEARTBEAT_SECONDS * MISSED_HEARTBEATS)

    async def _until_pong(self, timeout: float) -> None:
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise _Restart("the server closed the connection")
            if line.startswith(b"-ERR"):
                reason = line[5:].strip(b" '\r\n").decode(errors="replace")
                raise ReplayError(f"the server refused the replay connection: {reason}")
            if line.startswith(b"PONG"):
                return
            if line.startswith(b"PING"):
                self.writer.write(b"PONG\r\n")

    def answer(self, splitter: FrameSplitter) -> None:
        """PONG for each PING; an empty message to each flow-control or stalled-consumer reply."""
        if splitter.pings:
            self.writer.write(b"PONG\r\n" * splitter.pings)
            splitter.pings = 0
        for reply in splitter.replies:
            self.writer.write(b"PUB %b 0\r\n\r\n" % reply)
        splitter.replies.clear()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
