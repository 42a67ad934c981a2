"""The fault suite's load: county systems posting progress reports, as real ones would.

Each county client has its own NATS connection and posts ``report_progress`` submissions with
unique ids to ``duban.submit.county.<code>``, one after another. A submission that gets no
answer (timeout, no responders, a connection being re-established, or the service answering
``unavailable``) is sent again with the SAME id and the same bytes until it is answered: that is
what the idempotency of submissions is for. Every answered-accepted id is recorded; any other
refusal is recorded too (a valid submission must never be refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError

from contracts.commands import Role
from contracts.errors import ErrorCode
from contracts.programme import Programme
from contracts.replies import Accepted, decode_reply
from contracts.subjects import submit_subject

REQUEST_TIMEOUT = 2.0


@dataclass
class CountyClient:
    """One county system: posts, resends until answered, remembers what was accepted."""

    programme_id: str
    county_code: str
    run_id: str
    milestones: Sequence[str]
    accepted: list[str] = field(default_factory=list)
    duplicates_answered: int = 0  # resends answered "duplicate": true (stored once, answered again)
    refused: dict[str, str] = field(default_factory=dict)  # id -> code, for refusals other than unavailable
    sends: int = 0  # every request put on the wire, resends included
    resends: int = 0
    offered: int = 0  # distinct submissions
    in_flight: str | None = None

    def body(self, n: int) -> tuple[str, bytes]:
        submission_id = f"{self.run_id}-{self.county_code}-{n}"
        milestone = self.milestones[n % len(self.milestones)]
        submission = {
            "submission_id": submission_id,
            "programme_id": self.programme_id,
            "county_code": self.county_code,
            "submitted_by": f"fault-load-{self.county_code}",
            "command": {
                "kind": "report_progress",
                "milestone_id": milestone,
                "percent": n % 101,
                "note": f"第{n}次进度报告",
            },
        }
        return submission_id, json.dumps(submission, ensure_ascii=False).encode()

    async def run(self, nc: NatsClient, stop: asyncio.Event, pace: float) -> None:
        """Post until ``stop``; a submission being sent when it is set is still seen through."""
        subject = submit_subject(Role.COUNTY, self.county_code)
        n = 0
        while not stop.is_set():
            n += 1
            submission_id, body = self.body(n)
            self.offered += 1
            self.in_flight = submission_id
            await self._until_answered(nc, subject, submission_id, body)
            self.in_flight = None
            if pace:
                await asyncio.sleep(pace)

    async def _until_answered(self, nc: NatsClient, subject: str, submission_id: str, body: bytes) -> None:
        first = True
        while True:
            if not first:
                self.resends += 1
            first = False
            self.sends += 1
            try:
                msg = await nc.request(subject, body, timeout=REQUEST_TIMEOUT)
            except (NatsError, TimeoutError):
                await asyncio.sleep(0.1)  # no answer: the same id again
                continue
            try:
                reply = decode_reply(msg.data)
            except msgspec.DecodeError:
                await asyncio.sleep(0.1)  # e.g. a service error status without a reply body
                continue
            if isinstance(reply, Accepted):
                if reply.submission_id != submission_id:
                    self.refused[submission_id] = f"answered for {reply.submission_id}"
                    return
                self.accepted.append(submission_id)
                self.duplicates_answered += reply.duplicate
                return
            if reply.code is ErrorCode.UNAVAILABLE:
                await asyncio.sleep(0.2)  # "try again": the event store was unreachable
                continue
            self.refused[submission_id] = reply.code.value
            return


class Load:
    """Several county clients posting concurrently until :meth:`stop`."""

    def __init__(self, nats_urls: Sequence[str], programme: Programme, counties: int, *, pace: float = 0.0) -> None:
        codes = [c.code for c in programme.counties]
        if counties > len(codes):
            raise ValueError(f"the programme has {len(codes)} counties, not {counties}")
        run_id = f"fault-{uuid.uuid4().hex[:10]}"
        milestones = [m.id for m in programme.milestones]
        self.clients = [CountyClient(programme.id, code, run_id, milestones) for code in codes[:counties]]
        self._urls = list(nats_urls)
        self._pace = pace
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._connections: list[NatsClient] = []

    async def start(self) -> None:
        for client in self.clients:
            nc = await nats.connect(
                self._urls,
                name=f"county-{client.county_code}",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.2,
                connect_timeout=2,
            )
            self._connections.append(nc)
            self._tasks.append(asyncio.create_task(client.run(nc, self._stop, self._pace)))

    @property
    def accepted(self) -> int:
        return sum(len(c.accepted) for c in self.clients)

    @property
    def offered(self) -> int:
        return sum(c.offered for c in self.clients)

    def accepted_ids(self) -> list[str]:
        return [i for c in self.clients for i in c.accepted]

    def refused(self) -> dict[str, str]:
        return {i: code for c in self.clients for i, code in c.refused.items()}

    def summary(self) -> str:
        return ", ".join(
            f"{c.county_code}: offered {c.offered} accepted {len(c.accepted)} resends {c.resends}"
            f" duplicate answers {c.duplicates_answered} in flight {c.in_flight}"
            for c in self.clients
        )

    def failed(self) -> BaseException | None:
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                return task.exception()
        return None

    async def wait_accepted(self, count: int, timeout: float) -> None:
        """Until at least ``count`` submissions are accepted in all (bounded)."""
        deadline = time.monotonic() + timeout
        while self.accepted < count:
            if (failure := self.failed()) is not None:
                raise AssertionError(f"a county client failed: {failure!r}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the load got {self.accepted} of {count} submissions accepted in {timeout:g} s ({self.summary()})"
                )
            await asyncio.sleep(0.05)

    async def more(self, per_client: int, timeout: float) -> None:
        """Until every client has had ``per_client`` more submissions accepted."""
        targets = [len(c.accepted) + per_client for c in self.clients]
        deadline = time.monotonic() + timeout
        while any(len(c.accepted) < t for c, t in zip(self.clients, targets, strict=True)):
            if (failure := self.failed()) is not None:
                raise AssertionError(f"a county client failed: {failure!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the load did not get {per_client} more accepted per county ({self.summary()})")
            await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 60.0) -> None:
        """Stop offering; the submissions in flight are seen through until answered (bounded)."""
        self._stop.set()
        try:
            done, pending = await asyncio.wait(self._tasks, timeout=timeout)
            if pending:
                raise AssertionError(f"county clients still waiting for answers after {timeout:g} s ({self.summary()})")
            for task in done:
                task.result()
        finally:
            await self.close()

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for nc in self._connections:
            with contextlib.suppress(Exception):
                await nc.close()
        self._connections.clear()
