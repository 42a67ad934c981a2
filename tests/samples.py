"""Stored events for tests and benchmarks, built without any server (pure, no I/O)."""

from __future__ import annotations

import datetime as dt

from contracts.events import EVENT_SCHEMA_VERSIONS, Actor, EventEnvelope, EventPayload, event_type_of

SHANGHAI = dt.timezone(dt.timedelta(hours=8))


def stored_envelope(
    payload: EventPayload,
    *,
    programme_id: str,
    county_code: str,
    submission_id: str,
    at: dt.datetime,
    actor: Actor | None = None,
    recorded_at: dt.datetime | None = None,
    version: int | None = None,
    digest: str = "0" * 64,
    correlation_id: str | None = None,
) -> EventEnvelope:
    """The first event of a submission, as the submissions service stores it: its id
    ``<submission_id>/0``, caused by the submission, at the payload's current version unless
    ``version`` says otherwise; recorded when it occurred unless ``recorded_at`` says otherwise."""
    return EventEnvelope(
        event_id=f"{submission_id}/0",
        schema_version=version if version is not None else EVENT_SCHEMA_VERSIONS[event_type_of(payload)],
        programme_id=programme_id,
        county_code=county_code,
        occurred_at=at,
        recorded_at=recorded_at or at,
        actor=actor or Actor(role="county", county_code=county_code, user="tester"),
        submission_id=submission_id,
        submission_digest=digest,
        causation_id=submission_id,
        correlation_id=correlation_id or submission_id,
        payload=payload,
    )


def sample_envelope(payload: EventPayload, *, version: int | None = None) -> EventEnvelope:
    """One event of 清丰县 (410922), as stored: its payload at its current version, or ``version``."""
    return stored_envelope(
        payload,
        programme_id="puyang-2017-13",
        county_code="410922",
        submission_id="qf-9",
        at=dt.datetime(2017, 6, 10, 9, 30, tzinfo=SHANGHAI),
        recorded_at=dt.datetime(2017, 6, 10, 1, 31, tzinfo=dt.UTC),
        actor=Actor(role="county", county_code="410922", user="qf-system"),
        version=version,
        correlation_id="corr-1",
    )
