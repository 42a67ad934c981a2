"""The event store on JetStream: load a county's record, append a decision's events.

One subject per aggregate. An append carries ``Nats-Expected-Last-Subject-Sequence`` (the
record's last sequence, 0 for a new aggregate): if someone else appended first the server
answers 10071 and the caller reloads and decides again. A decision with several events goes
in one atomic batch, so its facts and findings are stored together or not at all. Every event
carries ``Nats-Msg-Id`` = its deterministic event id, so a retried append is stored once, and
the chain headers linking it to the county's previous fact (contracts.audit).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib

import msgspec
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError

from contracts.audit import CHAIN_HASH_HEADER, chain_headers
from contracts.events import EventEnvelope, decode_event, encode_event
from contracts.replies import RefusalRecord, Refused
from contracts.subjects import (
    EVENTS_STREAM,
    aggregate_subject,
    event_headers,
    refusal_subject,
)
from services.common.jetstream import index_retractions
from services.submissions.record import CountyRecord, StoredSubmission, stored_submission

log = structlog.get_logger(__name__)

WRONG_LAST_SEQUENCE = 10071
BATCH_DUPLICATE_MSG_ID = 10201
REFUSAL_BODY_LIMIT = 64 * 1024
# Records caught up at once. Each is an ordered push consumer, and the server pushes up to its
# flow-control window to each before it waits: 64 at once (a restart meeting 100 counties'
# first requests, ~1,700 events each) overflowed the connection's 64 MB of pending data, the
# server cut it off as a slow consumer and the requests in flight were refused "unavailable".
CONCURRENT_CATCH_UPS = 8


class AppendConflict(Exception):
    """Someone appended to the aggregate first (or these events are already stored): reload."""


class AppendUncertain(Exception):
    """No answer in time: the events may or may not be stored. Reload before deciding again."""


def _apply_stored(record: CountyRecord, msg: Msg) -> None:
    sequence = msg.metadata.sequence.stream
    if sequence > record.last_sequence and msg.headers and CHAIN_HASH_HEADER in msg.headers:
        record.chain_head = msg.headers[CHAIN_HASH_HEADER]
    try:
        envelope = decode_event(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # Not a fact we wrote (only services may publish here): skip it, loudly; the
        # projections park it for ops to see.
        log.error("stored event skipped: cannot decode", stream_sequence=sequence, error=str(exc))
        record.last_sequence = max(record.last_sequence, sequence)
        return
    record.apply(envelope, sequence)


class EventStore:
    def __init__(self, nc: NatsClient, js: JetStreamContext, timeout: float = 5.0) -> None:
        self._nc = nc
        self._js = js
        self._timeout = timeout
        self._catching_up = asyncio.Semaphore(CONCURRENT_CATCH_UPS)

    async def catch_up(self, record: CountyRecord) -> CountyRecord:
        """Apply the aggregate's events stored after ``record.last_sequence``.

        An ordered consumer whose callback folds each event in as it arrives. (Reading with
        ``next_msg`` costs a task and a timer per message: a fresh record caught up at about a
        third of the rate the stream can be read.) Raises nats' TimeoutError when nothing
        arrives for ``timeout`` seconds. At most CONCURRENT_CATCH_UPS at once."""
        async with self._catching_up:
            return await self._catch_up(record)

    async def _catch_up(self, record: CountyRecord) -> CountyRecord:
        subject = aggregate_subject(record.programme_id, record.county_code)
        try:
            last = await self._js.get_last_msg(EVENTS_STREAM, subject)
        except NotFoundError:
            return record
        last_seq = int(last.seq or 0)
        if last_seq <= record.last_sequence:
            return record
        reached = asyncio.Event()
        failure: list[BaseException] = []

        async def on_msg(msg: Msg) -> None:
            if reached.is_set():
                return  # appended after we looked: the caller's append check sees it
            try:
                _apply_stored(record, msg)
            except Exception as exc:  # not lost in nats-py's error callback: raised below
                failure.append(exc)
                reached.set()
                return
            if record.last_sequence >= last_seq:
                reached.set()

        sub = await self._js.subscribe(
            subject,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=record.last_sequence + 1,
            ),
            cb=on_msg,
        )
        try:
            while not reached.is_set():
                before = record.last_sequence
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reached.wait(), self._timeout)
                if not reached.is_set() and record.last_sequence == before:
                    raise NatsTimeoutError
        finally:
            await sub.unsubscribe()
        if failure:
            raise failure[0]
        return record

    async def load_submission(self, record: CountyRecord, submission_id: str) -> StoredSubmission:
        """A stored submission, read back from the aggregate's subject: its events are stored
        together (one atomic append), from its first sequence on."""
        subject = aggregate_subject(record.programme_id, record.county_code)
        sequence = record.submissions[submission_id]
        stored: list[tuple[EventEnvelope, int]] = []
        while sequence <= record.last_sequence:
            try:
                msg = await self._js.get_msg(EVENTS_STREAM, seq=sequence, subject=subject, next=True)
            except NotFoundError:
                break
            envelope = decode_event(msg.data or b"")
            if envelope.submission_id != submission_id:
                break
            stored.append((envelope, int(msg.seq or sequence)))
            sequence = stored[-1][1] + 1
        if not stored:
            raise NotFoundError(description=f"submission {submission_id} not at sequence {sequence} of {subject}")
        return stored_submission(stored)

    async def append(self, record: CountyRecord, events: list[EventEnvelope]) -> list[int]:
        """Append atomically after ``record.last_sequence``, chained after ``record.chain_head``;
        returns the stream sequences (and moves ``record.chain_head``)."""
        subject = aggregate_subject(record.programme_id, record.county_code)
        expected = str(record.last_sequence)
        messages: list[tuple[bytes, dict[str, str]]] = []
        head = record.chain_head
        for event in events:
            data = encode_event(event)
            chain = chain_headers(subject, head, data)
            head = chain[CHAIN_HASH_HEADER]
            messages.append((data, {**event_headers(event.event_id, event.event_type, event.correlation_id), **chain}))
        try:
            if len(messages) == 1:
                data, headers = messages[0]
                ack = await self._js.publish(
                    subject,
                    data,
                    timeout=self._timeout,
                    headers={**headers, "Nats-Expected-Last-Subject-Sequence": expected},
                )
                if ack.duplicate:
                    raise AppendConflict("already stored")
                sequences = [int(ack.seq)]
            else:
                sequences = await self._append_batch(subject, expected, messages)
            record.chain_head = head
            return sequences
        except BadRequestError as exc:
            if exc.err_code in (WRONG_LAST_SEQUENCE, BATCH_DUPLICATE_MSG_ID):
                raise AppendConflict(exc.description) from exc
            raise
        except NatsTimeoutError as exc:
            raise AppendUncertain(str(exc)) from exc

    async def index_retractions(self, stored: list[tuple[EventEnvelope, int]]) -> None:
        """Add the retractions just stored to the retraction index (contracts.subjects). The index
        is a hint for ledger rebuilds: when this fails (or the process stops before it), the
        submission stays accepted and a rebuild folds that county again."""
        try:
            await index_retractions(self._js, stored)
        except Exception as exc:  # (any failure: the events are stored, and the answer must go out)
            log.warning("retraction not indexed", error=repr(exc))

    async def _append_batch(
        self, subject: str, expected: str, messages: list[tuple[bytes, dict[str, str]]]
    ) -> list[int]:
        # JetStream atomic batch (server >= 2.12); nats-py has no helper for it.
        batch_id = hashlib.sha256(messages[0][1]["Nats-Msg-Id"].encode()).hexdigest()[:32]
        last = len(messages)
        for number, (data, event_headers_) in enumerate(messages, start=1):
            headers = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(number), **event_headers_}
            if number == 1:
                headers["Nats-Expected-Last-Subject-Sequence"] = expected
            if number < last:
                await self._nc.publish(subject, data, headers=headers)
                continue
            headers["Nats-Batch-Commit"] = "1"
            reply = await self._nc.request(subject, data, headers=headers, timeout=self._timeout)
            answer = msgspec.json.decode(reply.data)
            if "error" in answer:
                error = answer["error"]
                raise BadRequestError(
                    code=error.get("code"),
                    err_code=error.get("err_code"),
                    description=error.get("description"),
                )
            final = int(answer["seq"])
            if int(answer.get("count", 0)) != last:
                raise AppendUncertain(f"batch ack for {answer.get('count')} of {last} events")
            return list(range(final - last + 1, final + 1))
        raise AssertionError("unreachable: a batch has at least one event")

    async def record_refusal(
        self,
        subject: str,
        role_token: str,
        county_token: str,
        body: bytes,
        refusal: Refused,
        now: dt.datetime,
    ) -> None:
        """Keep a refused submission where operators can list it. Never raises."""
        digest = hashlib.sha256(body).hexdigest()
        kept = body[:REFUSAL_BODY_LIMIT]
        try:
            text, encoding = kept.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(kept).decode("ascii"), "base64"
        record = RefusalRecord(
            received_at=now,
            subject=subject,
            refusal=refusal,
            size=len(body),
            sha256=digest,
            body=text,
            body_encoding=encoding,
            body_truncated=len(body) > REFUSAL_BODY_LIMIT,
        )
        try:
            await self._js.publish(
                refusal_subject(role_token, county_token),
                msgspec.json.encode(record),
                timeout=self._timeout,
                headers={"Nats-Msg-Id": f"refusal-{digest}-{refusal.code}"},
            )
        except Exception as exc:  # a lost refusal record must not turn into a lost reply
            log.error("refusal not recorded", subject=subject, code=refusal.code, error=str(exc))
