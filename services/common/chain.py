"""Appending chained events to subjects one service alone writes (escalation's actions, the
notifier's notifications): each linked to the subject's last event (contracts.audit), appended
with ``Nats-Expected-Last-Subject-Sequence`` so the chain cannot fork, and signed when the
writer has a key.
"""

from __future__ import annotations

import structlog
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import BadRequestError, NotFoundError

from contracts.audit import CHAIN_HASH_HEADER, GENESIS, SIGNATURE_HEADER, SIGNER_HEADER, chain_headers
from contracts.subjects import EVENTS_STREAM
from services.common.signing import Signer

log = structlog.get_logger(__name__)

WRONG_LAST_SEQUENCE = 10071


class ChainedPublisher:
    def __init__(
        self,
        js: JetStreamContext,
        *,
        stream: str = EVENTS_STREAM,
        signer: Signer | None = None,
        timeout: float = 5.0,
        attempts: int = 5,
    ) -> None:
        self._js = js
        self._stream = stream
        self._signer = signer
        self._timeout = timeout
        self._attempts = attempts
        self._heads: dict[str, tuple[int, str]] = {}  # subject -> (last stream sequence, its hash)

    async def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> PubAck:
        """Append ``data`` to ``subject`` after its last event. Another writer's append in between
        (a standby that was briefly active) is read back and the link made again, a bounded
        number of times; a duplicate ``Nats-Msg-Id`` answers the stored event's ack."""
        for attempt in range(1, self._attempts + 1):
            sequence, previous = await self._head(subject)
            chain = chain_headers(subject, previous, data)
            signed = dict(chain)
            if self._signer is not None:
                signed[SIGNER_HEADER] = self._signer.public_key
                signed[SIGNATURE_HEADER] = self._signer.sign(chain[CHAIN_HASH_HEADER].encode())
            try:
                ack = await self._js.publish(
                    subject,
                    data,
                    timeout=self._timeout,
                    headers={**headers, **signed, "Nats-Expected-Last-Subject-Sequence": str(sequence)},
                )
            except BadRequestError as exc:
                self._heads.pop(subject, None)
                if exc.err_code == WRONG_LAST_SEQUENCE and attempt < self._attempts:
                    log.info("chained append retried", subject=subject, attempt=attempt)
                    continue
                raise
            except BaseException:
                self._heads.pop(subject, None)  # stored or not: read the head back next time
                raise
            if ack.duplicate:
                self._heads.pop(subject, None)
            else:
                self._heads[subject] = (int(ack.seq), chain[CHAIN_HASH_HEADER])
            return ack
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _head(self, subject: str) -> tuple[int, str]:
        cached = self._heads.get(subject)
        if cached is not None:
            return cached
        try:
            last = await self._js.get_last_msg(self._stream, subject)
        except NotFoundError:
            return 0, GENESIS
        headers = last.headers or {}
        # An event from before chains began: the chain starts after it.
        head = (int(last.seq or 0), headers.get(CHAIN_HASH_HEADER, GENESIS))
        self._heads[subject] = head
        return head
