"""The submissions application service: one submission in, one reply out.

Thin orchestration around the pure decision (services.submissions.decide): decode with a size
limit, authorise against the subject, load the county's record, decide, append, and on a
concurrent append reload and decide again (bounded). Refusals are recorded too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import random
from collections import OrderedDict, defaultdict

import msgspec
import structlog
from nats.errors import Error as NatsError

from contracts.commands import MAX_SUBMISSION_BYTES, Role, Submission, decode_submission, encode
from contracts.errors import ErrorCode
from contracts.events import EVENT_SCHEMA_VERSIONS, Actor, EventEnvelope, event_type_of
from contracts.programme import Programme
from contracts.replies import Accepted, Refused, refused
from contracts.subjects import parse_submit_subject
from services.common.clock import Clock
from services.submissions.decide import Accept, Resent, Sender, answer_resend, authorise, decide
from services.submissions.record import CountyRecord, stored_submission
from services.submissions.store import AppendConflict, AppendUncertain, EventStore

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 16
# County records held in memory, counted in submissions (about 0.15 kB each): beyond this the
# least recently used counties are dropped and caught up from the stream again when they next
# submit. Without a bound a long-running instance holds every county's whole history.
MAX_CACHED_SUBMISSIONS = 400_000


class SubmissionsService:
    def __init__(
        self,
        store: EventStore,
        programmes: dict[str, Programme],
        clock: Clock,
        max_attempts: int = MAX_ATTEMPTS,
        max_cached_submissions: int = MAX_CACHED_SUBMISSIONS,
    ) -> None:
        self._store = store
        self._programmes = programmes
        self._clock = clock
        self._max_attempts = max_attempts
        # Least recently used first; the sizes (submissions held) as last seen, and their sum.
        self._records: OrderedDict[tuple[str, str], CountyRecord] = OrderedDict()
        self._record_sizes: dict[tuple[str, str], int] = {}
        self._cached_submissions = 0
        self._max_cached_submissions = max_cached_submissions
        # One decision at a time per aggregate in this process; other processes are kept in
        # order by the expected-sequence check on append.
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)

    @property
    def programmes(self) -> dict[str, Programme]:
        return self._programmes

    @property
    def records_cached(self) -> int:
        return len(self._records)

    async def handle(self, subject: str, body: bytes) -> Accepted | Refused:
        tokens = parse_submit_subject(subject)
        role_token, county_token = tokens if tokens else ("unknown", "unknown")
        outcome = await self._handle(role_token, county_token, body)
        if isinstance(outcome, Refused):
            log.info(
                "submission refused",
                subject=subject,
                code=outcome.code,
                field=outcome.field,
                correlation_id=outcome.submission_id,
            )
            if outcome.code is not ErrorCode.UNAVAILABLE:
                await self._store.record_refusal(subject, role_token, county_token, body, outcome, self._clock.now())
        return outcome

    async def _handle(self, role_token: str, county_token: str, body: bytes) -> Accepted | Refused:
        if len(body) > MAX_SUBMISSION_BYTES:
            return refused(ErrorCode.OVERSIZED, detail=f"{len(body)} bytes; the limit is {MAX_SUBMISSION_BYTES}")
        try:
            submission = decode_submission(body)
        except msgspec.ValidationError as exc:
            message, _, path = str(exc).partition(" - at `")
            return refused(ErrorCode.MALFORMED, field=path.rstrip("`") or None, detail=message)
        except msgspec.DecodeError as exc:
            return refused(ErrorCode.MALFORMED, detail=f"not JSON: {exc}")
        try:
            sender = Sender(Role(role_token), county_token, submission.submitted_by)
        except ValueError:
            return refused(ErrorCode.NOT_AUTHORISED, submission_id=submission.submission_id)
        authorised = authorise(sender, submission, self._programmes)
        if isinstance(authorised, Refused):
            return authorised
        # What bound_contextvars does, without its scan of every context variable (twice per
        # submission, about 6% of the service's CPU in the profile): the tokens restore the
        # previous values exactly.
        tokens = structlog.contextvars.bind_contextvars(
            correlation_id=submission.submission_id, county_code=submission.county_code
        )
        try:
            return await self._decide_and_append(authorised, sender, submission)
        except (NatsError, OSError) as exc:
            log.warning("event store unavailable", error=str(exc))
            return refused(ErrorCode.UNAVAILABLE, submission_id=submission.submission_id, detail=str(exc))
        finally:
            structlog.contextvars.reset_contextvars(**tokens)

    async def _decide_and_append(
        self, programme: Programme, sender: Sender, submission: Submission
    ) -> Accepted | Refused:
        key = (programme.id, submission.county_code)
        digest = hashlib.sha256(encode(submission)).hexdigest()
        async with self._locks[key]:
            try:
                return await self._decide_and_append_locked(key, programme, sender, submission, digest)
            finally:
                self._keep_cached(key)

    async def _decide_and_append_locked(
        self, key: tuple[str, str], programme: Programme, sender: Sender, submission: Submission, digest: str
    ) -> Accepted | Refused:
        record = self._records.get(key)
        if record is None:
            record = await self._store.catch_up(CountyRecord(*key))
            self._records[key] = record
        for attempt in range(1, self._max_attempts + 1):
            now = self._clock.now()
            decision = decide(programme, record, submission, sender, now)
            if isinstance(decision, Refused):
                return decision
            if isinstance(decision, Resent):
                stored = await self._store.load_submission(record, submission.submission_id)
                return answer_resend(stored, submission.submission_id, digest)
            envelopes = _envelopes(decision, submission, sender, digest, now)
            try:
                sequences = await self._store.append(record, envelopes)
            except (AppendConflict, AppendUncertain) as exc:
                # Another instance appended for this county first: catch up and decide again,
                # after a short random pause so that two instances do not keep colliding.
                log.info("append retried", attempt=attempt, reason=str(exc))
                await asyncio.sleep(random.uniform(0, 0.002 * attempt))
                record = await self._store.catch_up(record)
                continue
            appended = list(zip(envelopes, sequences, strict=True))
            await self._store.index_retractions(appended)
            for envelope, sequence in appended:
                record.apply(envelope, sequence)
            stored = stored_submission(appended)
            log.info("submission accepted", events=len(envelopes), findings=len(stored.findings))
            return Accepted(submission_id=submission.submission_id, events=stored.events, findings=stored.findings)
        return refused(
            ErrorCode.UNAVAILABLE,
            submission_id=submission.submission_id,
            detail=f"the county's record kept changing; gave up after {self._max_attempts} attempts",
        )

    def _keep_cached(self, key: tuple[str, str]) -> None:
        """Mark ``key``'s record as just used and drop the least recently used records (whose
        county is not being decided right now) while more submissions are held than allowed."""
        record = self._records.get(key)
        if record is None:
            return
        self._records.move_to_end(key)
        size = len(record.submissions)
        self._cached_submissions += size - self._record_sizes.get(key, 0)
        self._record_sizes[key] = size
        if self._cached_submissions <= self._max_cached_submissions:
            return
        for old in list(self._records):
            if self._cached_submissions <= self._max_cached_submissions:
                break
            if old == key or self._locks[old].locked():
                continue
            del self._records[old]
            self._cached_submissions -= self._record_sizes.pop(old, 0)


def _envelopes(
    decision: Accept, submission: Submission, sender: Sender, digest: str, now: dt.datetime
) -> list[EventEnvelope]:
    actor = Actor(
        role=sender.role.value,
        county_code=sender.county_code if sender.role is Role.COUNTY else None,
        user=sender.user,
    )
    envelopes = []
    for new in decision.events:
        event_type = event_type_of(new.payload)
        causation = getattr(new.payload, "trigger_event_id", submission.submission_id)
        envelopes.append(
            EventEnvelope(
                event_id=new.event_id,
                schema_version=EVENT_SCHEMA_VERSIONS[event_type],
                programme_id=submission.programme_id,
                county_code=submission.county_code,
                occurred_at=decision.occurred_at,
                recorded_at=now,
                actor=actor,
                submission_id=submission.submission_id,
                submission_digest=digest,
                causation_id=causation,
                correlation_id=submission.submission_id,
                payload=new.payload,
            )
        )
    return envelopes
