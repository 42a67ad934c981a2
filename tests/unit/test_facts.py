"""The fold (contracts/facts.py): what a county's events establish. Pure: no I/O."""

from __future__ import annotations

import datetime as dt

from contracts.events import (
    EventEnvelope,
    EventPayload,
    ProgressReported,
    ReviewRequested,
    SubmissionRetracted,
)
from contracts.facts import apply, fold, folding
from contracts.programme import load_default_programme
from tests.samples import stored_envelope

PROGRAMME = load_default_programme()
COUNTY = PROGRAMME.counties[0].code
MILESTONE = PROGRAMME.milestones[0].id
START = dt.datetime(2018, 3, 1, 2, 0, tzinfo=dt.UTC)


def event(
    n: int, payload: EventPayload, submission_id: str | None = None, at: dt.datetime | None = None
) -> EventEnvelope:
    return stored_envelope(
        payload,
        programme_id=PROGRAMME.id,
        county_code=COUNTY,
        submission_id=submission_id or f"{COUNTY}-{n:05d}",
        at=at or START + dt.timedelta(hours=n),
    )


def progress(percent: int, *steps: str) -> ProgressReported:
    return ProgressReported(milestone_id=MILESTONE, percent=percent, steps_done=steps)


def test_steps_done_gather_sorted_once_each_and_a_report_without_steps_keeps_them() -> None:
    history = [
        (1, event(1, progress(10, "b_step", "a_step"))),
        (2, event(2, progress(20, "a_step", "c_step"))),
        (3, event(3, progress(30))),
    ]
    milestone = fold(PROGRAMME, COUNTY, history).milestones[MILESTONE]
    assert milestone.steps_done == ["a_step", "b_step", "c_step"]
    assert milestone.percent == 30


def test_a_retracted_report_takes_its_steps_and_progress_out() -> None:
    history = [
        (1, event(1, progress(10, "a_step"))),
        (2, event(2, progress(40, "b_step"), submission_id="wrong")),
        (3, event(3, SubmissionRetracted(retracted_submission_id="wrong", reason="reported by mistake"))),
    ]
    milestone = fold(PROGRAMME, COUNTY, history).milestones[MILESTONE]
    assert milestone.steps_done == ["a_step"]
    assert milestone.percent == 10


def test_a_review_request_is_dated_in_the_programmes_zone_not_in_utc() -> None:
    # 17:30 UTC on 1 March is 01:30 on 2 March in Puyang (UTC+8).
    late = dt.datetime(2018, 3, 1, 17, 30, tzinfo=dt.UTC)
    ledger = folding(PROGRAMME, COUNTY, ())
    assert apply(PROGRAMME, ledger, 1, event(1, ReviewRequested(review_kind="design_review"), at=late))
    assert PROGRAMME.programme.timezone == "Asia/Shanghai"
    assert ledger.reviews["design_review"].requested_on == dt.date(2018, 3, 2)


def test_apply_folds_as_fold_does_and_asks_for_a_refold_on_a_retraction() -> None:
    events = [event(1, progress(10, "a_step")), event(2, progress(20)), event(3, progress(50, "b_step"))]
    ledger = folding(PROGRAMME, COUNTY, ())
    for sequence, envelope in enumerate(events, 1):
        assert apply(PROGRAMME, ledger, sequence, envelope)
    assert apply(PROGRAMME, ledger, 2, events[1])  # a redelivery changes nothing
    assert ledger == fold(PROGRAMME, COUNTY, list(enumerate(events, 1)))
    retraction = event(4, SubmissionRetracted(retracted_submission_id=events[0].submission_id, reason="wrong"))
    assert not apply(PROGRAMME, ledger, 4, retraction)
