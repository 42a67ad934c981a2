"""Checkpoints of the event chains' heads (contracts.audit), recorded by the active escalation.

Escalation reads the whole stream in order anyway; it notes each chain's head as it goes
(:meth:`Checkpointer.observe`, standby instances too, so a new active one can go on). The
active instance records, every ``DUBAN_CHECKPOINT_SECONDS`` (300) and when it stops, the heads
that moved since the last checkpoint, signed and chained to it, in ``DUBAN_AUDIT``. A chain that
did not move stays anchored by the checkpoint that last named it. A checkpoint names at most
``MAX_HEADS`` heads (a message stays well under the stream's 1 MB limit); more make several.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from contracts.audit import CHAIN_HASH_HEADER, GENESIS, ChainHead, Checkpoint
from contracts.subjects import AUDIT_STREAM, CHECKPOINTS_SUBJECT
from services.common.clock import Clock
from services.common.signing import Signer

log = structlog.get_logger(__name__)

MAX_HEADS = 4000
_decoder = msgspec.json.Decoder(Checkpoint)


class Checkpointer:
    def __init__(self, js: JetStreamContext, signer: Signer, clock: Clock) -> None:
        self._js = js
        self._signer = signer
        self._clock = clock
        self._heads: dict[str, ChainHead] = {}
        self._moved: set[str] = set()  # chains whose head moved since the last checkpoint recorded here
        self.position = 0  # the last stream sequence observed
        self._recorded_to = 0  # the stream sequence the last checkpoint saw
        self._lock = asyncio.Lock()

    def observe(self, subject: str, sequence: int, headers: Mapping[str, str] | None) -> None:
        self.position = max(self.position, sequence)
        head = headers.get(CHAIN_HASH_HEADER) if headers else None
        if head is not None:
            self._heads[subject] = ChainHead(subject, sequence, head)
            self._moved.add(subject)

    async def record(self) -> list[Checkpoint]:
        """Record the heads that moved since the last checkpoint; [] when nothing moved."""
        async with self._lock:
            last, audit_sequence = await self._last()
            if last is not None and last.stream_sequence > self._recorded_to:
                # Another instance recorded up to there: what it saw need not be said again.
                self._recorded_to = last.stream_sequence
                self._moved = {s for s in self._moved if self._heads[s].sequence > last.stream_sequence}
            if self.position <= self._recorded_to or not self._moved:
                return []
            moved = sorted(self._moved)
            recorded: list[Checkpoint] = []
            for start in range(0, len(moved), MAX_HEADS):
                checkpoint = Checkpoint(
                    number=(last.number if last is not None else 0) + 1,
                    taken_at=self._clock.now(),
                    stream_sequence=self.position,
                    heads=tuple(self._heads[s] for s in moved[start : start + MAX_HEADS]),
                    previous=last.digest if last is not None else GENESIS,
                    signer=self._signer.public_key,
                )
                checkpoint = msgspec.structs.replace(checkpoint, signature=self._signer.sign(checkpoint.statement()))
                ack = await self._js.publish(
                    CHECKPOINTS_SUBJECT,
                    msgspec.json.encode(checkpoint),
                    headers={
                        "Nats-Msg-Id": f"checkpoint-{checkpoint.number}",
                        "Nats-Expected-Last-Subject-Sequence": str(audit_sequence),
                    },
                )
                last, audit_sequence = checkpoint, int(ack.seq)
                recorded.append(checkpoint)
            self._recorded_to = self.position
            self._moved.clear()
            log.info(
                "audit checkpoint recorded",
                number=recorded[-1].number,
                stream_sequence=self.position,
                heads=len(moved),
            )
            return recorded

    async def _last(self) -> tuple[Checkpoint | None, int]:
        try:
            msg = await self._js.get_last_msg(AUDIT_STREAM, CHECKPOINTS_SUBJECT)
        except NotFoundError:
            return None, 0
        return _decoder.decode(msg.data or b""), int(msg.seq or 0)


async def checkpoint_forever(checkpointer: Checkpointer, stop: asyncio.Event, seconds: float) -> None:
    """Record a checkpoint every ``seconds`` and once more when stopping."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        try:
            await checkpointer.record()
        except Exception as exc:  # another instance raced us (10071), or NATS is away: next time
            log.warning("audit checkpoint not recorded; next time", error=str(exc))
        if stop.is_set():
            return
