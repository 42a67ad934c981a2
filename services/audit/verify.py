"""Verify the stored record against its chains and checkpoints, and the read models against it.

Reads ``DUBAN_AUDIT`` (the checkpoints) and then ``DUBAN_EVENTS`` from its first event, in
order, through contracts.audit's :class:`ChainVerifier`; then asks the ledger to compare its read
model with the stream (services.ledger.audit). Needs read access to both streams (the ``ops``
user has it) and nothing else.
"""

from __future__ import annotations

import msgspec
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from contracts.audit import (
    AuditReport,
    Break,
    ChainVerifier,
    Checkpoint,
    ReadModelAudit,
    first_break,
)
from contracts.ledger import AUDIT_SUBJECT as LEDGER_AUDIT_SUBJECT
from contracts.notifier import AUDIT_SUBJECT as NOTIFIER_AUDIT_SUBJECT
from contracts.subjects import AUDIT_ALL, AUDIT_STREAM, EVENTS_ALL, EVENTS_STREAM
from services.common.jetstream import read_all, read_messages
from services.common.signing import verify_signature

READ_MODEL_TIMEOUT = 600.0  # a read model of a million events takes a while to compare


class _EventId(msgspec.Struct):
    event_id: str = ""


async def verify_chains(js: JetStreamContext, trusted: frozenset[str]) -> ChainVerifier:
    """Every stored event against its chain, and the chains against the checkpoints."""
    checkpoints: list[Checkpoint] = []
    unreadable: list[Break] = []
    async for batch in read_all(js, AUDIT_STREAM, AUDIT_ALL):
        for sequence, data in batch:
            try:
                checkpoints.append(msgspec.json.decode(data, type=Checkpoint))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                unreadable.append(
                    Break(kind="checkpoint_unreadable", where=f"{AUDIT_STREAM} sequence {sequence}", detail=str(exc))
                )
    verifier = ChainVerifier(checkpoints, trusted, verify_signature)
    async for messages in read_messages(js, EVENTS_STREAM, EVENTS_ALL):
        for sequence, msg in messages:
            verifier.observe(msg.subject, sequence, msg.headers, msg.data)
    verifier.check_checkpoints()
    verifier.breaks[:0] = unreadable
    await _name_events(js, verifier.breaks)
    return verifier


async def _name_events(js: JetStreamContext, breaks: list[Break]) -> None:
    """Put the event id in each break at a stream sequence (read back: breaks are few)."""
    for index, found in enumerate(breaks[:100]):
        if found.stream_sequence is None or found.event_id is not None:
            continue
        try:
            msg = await js.get_msg(EVENTS_STREAM, found.stream_sequence)
            event_id = msgspec.json.decode(msg.data or b"", type=_EventId).event_id
        except (NotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            continue
        breaks[index] = msgspec.structs.replace(found, event_id=event_id or None)


# Each service's comparison of its read model with the stream.
READ_MODEL_AUDITS = {"ledger": LEDGER_AUDIT_SUBJECT, "notifier": NOTIFIER_AUDIT_SUBJECT}


async def audit_read_model(nc: NatsClient, subject: str) -> ReadModelAudit | None:
    """A service's comparison of its read model with the stream; None when it does not answer."""
    try:
        reply = await nc.request(subject, b"{}", timeout=READ_MODEL_TIMEOUT)
    except (NoRespondersError, NatsTimeoutError):
        return None
    if reply.headers and reply.headers.get("Nats-Service-Error-Code"):
        raise RuntimeError(f"{subject} could not compare its read model: {reply.data[:500]!r}")
    return msgspec.json.decode(reply.data, type=ReadModelAudit)


async def verify_record(nc: NatsClient, trusted: frozenset[str], *, read_models: bool = True) -> AuditReport:
    js = nc.jetstream()
    verifier = await verify_chains(js, trusted)
    breaks = list(verifier.breaks)
    checked: list[str] = []
    for name, subject in READ_MODEL_AUDITS.items() if read_models else ():
        audit = await audit_read_model(nc, subject)
        if audit is not None:
            checked.append(f"{name} (to stream sequence {audit.checked_to}, {sum(audit.rows.values())} rows)")
            breaks.extend(audit.breaks)
    info = await js.stream_info(EVENTS_STREAM)
    return AuditReport(
        ok=not breaks,
        events=verifier.events,
        chains=len(verifier.heads),
        signed_events=verifier.signed,
        unchained_before_chain=verifier.unchained_before_chain,
        checkpoints=len(verifier.checkpoints),
        last_checkpoint_at=verifier.checkpoints[-1].taken_at if verifier.checkpoints else None,
        stream_last_sequence=int(info.state.last_seq),
        read_models_checked=tuple(checked),
        first_break=first_break(breaks),
        breaks=tuple(breaks),
    )
