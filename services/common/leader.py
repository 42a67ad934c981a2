"""One active instance per consumer, the others on hot standby: a lease in a NATS key-value bucket.

Several instances of the ledger, escalation or notifier may run at once (for availability); each
asks for the lease of its role (``ledger``, …) in the bucket ``duban_leaders``. The holder renews
it every third of the TTL and does the work; the bucket's max age expires a lease that is no
longer renewed, so when the holder dies a standby takes over within one TTL. A holder that cannot
renew for half a TTL steps down by itself, before anyone else can be elected: two instances are
never active at once for longer than that, and the work they do is idempotent besides (checkpoints
under row locks, deterministic ids, JetStream's duplicate window). On a clean stop the holder
deletes its lease, so the standby takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = structlog.get_logger(__name__)

LEADERS_BUCKET = "duban_leaders"
DEFAULT_TTL = 6.0
STREAM_NAME_IN_USE = 10058  # JetStream: "stream name already in use with a different configuration"


async def either(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


class Leadership:
    """Run ``lead`` while this instance holds the lease of ``role``; wait as a standby otherwise."""

    def __init__(
        self,
        js: JetStreamContext,
        role: str,
        *,
        ttl: float = DEFAULT_TTL,
        replicas: int = 1,
        bucket: str = LEADERS_BUCKET,
    ) -> None:
        self._js = js
        self._bucket = bucket
        self.role = role
        self.instance = uuid.uuid4().hex[:12]
        self.ttl = ttl
        self._replicas = replicas
        self.active = asyncio.Event()  # set while this instance leads
        self.standing_by = asyncio.Event()  # set while another instance leads

    async def run(self, stop: asyncio.Event, lead: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
        """Until ``stop``: be elected, then ``await lead(until)`` where ``until`` is set when the lease
        is lost or ``stop`` is set (``lead`` must return soon after)."""
        kv = await self._lease_bucket()
        while not stop.is_set():
            revision = await self._acquire(kv, stop)
            if revision is None:
                return
            until = asyncio.Event()
            self.active.set()
            log.info("elected: this instance is active", role=self.role, instance=self.instance)
            work = asyncio.create_task(lead(until))
            try:
                revision = await self._hold(kv, revision, stop, work)
            finally:
                until.set()
                self.active.clear()
                await asyncio.gather(work, return_exceptions=True)
            failed = work.done() and not work.cancelled() and work.exception() is not None
            if failed:
                # The work broke (a bug, or NATS gone at the wrong moment): hand the lease over and
                # stand again after a pause, rather than sit elected and idle.
                log.error("active work failed; handing over", role=self.role, error=repr(work.exception()))
                with contextlib.suppress(NatsError, KeyWrongLastSequenceError):
                    if revision:
                        await kv.delete(self.role, last=revision)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.ttl)
                continue
            if stop.is_set() and revision:
                with contextlib.suppress(NatsError, KeyWrongLastSequenceError):
                    await kv.delete(self.role, last=revision)  # hand over at once
                log.info("lease released", role=self.role, instance=self.instance)
            elif not stop.is_set():
                log.warning("lease lost: standing by", role=self.role, instance=self.instance)

    async def _lease_bucket(self) -> KeyValue:
        try:
            return await self._js.create_key_value(
                bucket=self._bucket, history=1, ttl=self.ttl, replicas=self._replicas
            )
        except BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
            # Made by another version with other settings: use it as it is (its max age rules).
            log.warning("lease bucket exists with other settings; using it", bucket=self._bucket)
            return await self._js.key_value(self._bucket)

    async def _acquire(self, kv: KeyValue, stop: asyncio.Event) -> int | None:
        announced = False
        while not stop.is_set():
            try:
                revision = await kv.create(self.role, self.instance.encode())
                self.standing_by.clear()
                return revision
            except KeyWrongLastSequenceError:
                self.standing_by.set()
                if not announced:
                    log.info("standing by: another instance is active", role=self.role, instance=self.instance)
                    announced = True
            except NatsError as exc:
                log.warning("cannot reach the lease", role=self.role, error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.ttl / 3)
        return None

    async def _hold(self, kv: KeyValue, revision: int, stop: asyncio.Event, work: asyncio.Task[None]) -> int:
        """Renew until stopped, the work ends, or the lease is lost; returns the last revision
        held (0 when lost)."""
        renewed = time.monotonic()
        while not stop.is_set() and not work.done():
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait([stopping, work], timeout=self.ttl / 3, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if stop.is_set() or work.done():
                break
            try:
                revision = await kv.update(self.role, self.instance.encode(), last=revision)
                renewed = time.monotonic()
            except KeyWrongLastSequenceError:
                return 0  # expired and taken by another instance
            except NatsError as exc:
                if time.monotonic() - renewed > self.ttl / 2:
                    log.warning("lease not renewed in time: stepping down", role=self.role, error=repr(exc))
                    return 0
        return revision
