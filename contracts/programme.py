"""The programme file: a supervised programme as data (format ``duban.programme/v1``).

A programme is a ledger (工作台账) of milestones in phases with deadlines, the review gates of
its procedure and the order they impose, the reporting rhythm of the progress table, and the
participating counties with their responsible unit and person. Another city or programme is
another file; no code changes. The notice's programme ships as ``programmes/puyang-2017-13.yaml``
and documents every key in its comments.

Loading validates everything and fails with :class:`ProgrammeFileError`, naming the file, the
line and the key path of what is wrong.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from contracts.identifiers import (
    CountyCode,
    MilestoneId,
    PersonId,
    ProgrammeId,
    normalise_name,
)
from contracts.yamlfile import DataFileError, load_yaml_struct

PROGRAMME_FORMAT = "duban.programme/v1"
DEFAULT_PROGRAMME_ID = "puyang-2017-13"

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
StepId = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
ReviewKind = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
RuleId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9.-]{0,63}$")]


class Decider(enum.StrEnum):
    """Who decides a review: the city bureau, the province, or nobody (a reported fact)."""

    CITY = "city"
    PROVINCE = "province"
    NONE = "none"


class Spec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every struct read from a data file: unknown keys are errors (typos get caught)."""


class ProgrammeInfo(Spec, frozen=True):
    id: ProgrammeId
    title: NonEmpty
    document_number: NonEmpty
    issuer: NonEmpty
    timezone: str = "Asia/Shanghai"
    aim: str = ""


class Phase(Spec, frozen=True):
    id: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,2}$")]
    name: NonEmpty


class Step(Spec, frozen=True):
    id: StepId
    name: NonEmpty


class Milestone(Spec, frozen=True):
    id: MilestoneId
    phase: str
    title: NonEmpty
    task: NonEmpty
    deadline: dt.date
    deadline_text: str = ""
    steps: tuple[Step, ...] = ()
    # How completion is established: reported by the county, by a passed review of this kind
    # ("review:provincial_plan_review"), or by the start of trial operation.
    completed_by: str = "county"

    def step(self, step_id: str) -> Step | None:
        return next((s for s in self.steps if s.id == step_id), None)


class Review(Spec, frozen=True):
    kind: ReviewKind
    name: NonEmpty
    decided_by: Decider
    milestone: MilestoneId | None = None


class Trigger(Spec, frozen=True):
    """What a county reports that a rule looks at. Exactly one key is set."""

    review_requested: ReviewKind | None = None
    step_done: str | None = None  # "1.3/tender_published"
    milestone_completed: tuple[MilestoneId, ...] | None = None
    trial_operation_started: bool | None = None
    trial_operation_reported: bool | None = None  # a monthly trial-operation report


class Requirement(Spec, frozen=True):
    """What must already be on record when the trigger happens. Exactly one key is set."""

    review_passed: ReviewKind | None = None
    milestone_completed: MilestoneId | None = None
    trial_operation_months: Annotated[int, msgspec.Meta(ge=1, le=60)] | None = None
    # Trial operation started no later than the reported month (for a monthly report: the month
    # reported is not before the month trial operation started in).
    trial_operation_started: bool | None = None


class ProcedureRule(Spec, frozen=True):
    """One ordering rule of the procedure. Breaking it is recorded as a finding, not refused."""

    id: RuleId
    when: Trigger
    requires: Requirement
    finding_zh: NonEmpty
    finding_en: NonEmpty
    source: str = ""  # where the notice says so


class ProgressTableRhythm(Spec, frozen=True):
    first_period: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}-[0-9]{2}$")]
    last_period: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}-[0-9]{2}$")]
    # The table's name as the notice gives it (《…督查进度一览表》); empty: derived from the title.
    title: str = ""
    rhythm: Literal["monthly"] = "monthly"
    due_day_of_following_month: Annotated[int, msgspec.Meta(ge=1, le=28)] = 5
    is_default: bool = True  # the notice defers the rhythm to another document


Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class TrialOperation(Spec, frozen=True):
    """Monthly trial-operation reports and what makes a month "stable operation".

    A reported month is stable when each rate meets its threshold; a rate whose denominator is
    zero (no cases to dispatch or close that month) counts as met. Defaults apply when the
    programme file has no ``trial_operation`` section; they are ours, not the notice's (which
    says only "试运行6个月后"): 95 % of registered cases dispatched, 90 % of dispatched cases
    closed, 80 % of closed cases closed on time; reports due by the 5th of the following month
    like the progress table; six stable months before pre-acceptance.
    """

    min_dispatch_rate: Rate = 0.95  # dispatched / registered
    min_closure_rate: Rate = 0.9  # closed / dispatched
    min_on_time_rate: Rate = 0.8  # closed_on_time / closed
    report_due_day: Annotated[int, msgspec.Meta(ge=1, le=28)] = 5  # of the month after the one reported
    stable_months: Annotated[int, msgspec.Meta(ge=1, le=60)] = 6
    is_default: bool = True  # the notice gives no thresholds


class Person(Spec, frozen=True):
    id: PersonId
    name: NonEmpty


class County(Spec, frozen=True):
    code: CountyCode
    name: NonEmpty
    responsible_unit: NonEmpty
    responsible_person: Person


class Programme(Spec, frozen=True):
    format: str
    programme: ProgrammeInfo
    phases: tuple[Phase, ...]
    milestones: tuple[Milestone, ...]
    reviews: tuple[Review, ...]
    rules: tuple[ProcedureRule, ...]
    progress_table: ProgressTableRhythm
    counties: tuple[County, ...]
    trial_operation: TrialOperation = TrialOperation()

    @property
    def id(self) -> str:
        return self.programme.id

    def milestone(self, milestone_id: str) -> Milestone | None:
        return next((m for m in self.milestones if m.id == milestone_id), None)

    def county(self, county_code: str) -> County | None:
        return next((c for c in self.counties if c.code == county_code), None)

    def review(self, kind: str) -> Review | None:
        return next((r for r in self.reviews if r.kind == kind), None)

    def milestones_completed_by(self, how: str) -> tuple[Milestone, ...]:
        return tuple(m for m in self.milestones if m.completed_by == how)

    def reporting_periods(self) -> list[str]:
        """The progress-table periods, "YYYY-MM", first to last."""
        year, month = int(self.progress_table.first_period[:4]), int(self.progress_table.first_period[5:])
        periods = []
        while f"{year:04d}-{month:02d}" <= self.progress_table.last_period:
            periods.append(f"{year:04d}-{month:02d}")
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        return periods

    def trial_report_due(self, period: str) -> dt.date:
        """The day a month's trial-operation report is due: the set day of the following month."""
        year, month = int(period[:4]), int(period[5:])
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        return dt.date(year, month, self.trial_operation.report_due_day)

    def progress_table_due(self, period: str) -> dt.date:
        """The day a period's table is due: the set day of the following month."""
        year, month = int(period[:4]), int(period[5:])
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        return dt.date(year, month, self.progress_table.due_day_of_following_month)


class ProgrammeFileError(DataFileError):
    """A programme or directory file that cannot be used; says where and what."""


def load_programme(path: Path | str) -> Programme:
    """Read, validate and normalise a programme file."""
    path = Path(path)
    programme, locate = load_yaml_struct(path, Programme, ProgrammeFileError)
    programme = _normalised(programme)
    problems = list(_semantic_problems(programme))
    if problems:
        key, message = problems[0]
        raise ProgrammeFileError(path, locate(key), key, message)
    return programme


def default_programme_path() -> Path:
    return Path(str(resources.files("contracts") / "programmes" / f"{DEFAULT_PROGRAMME_ID}.yaml"))


def load_default_programme() -> Programme:
    return load_programme(default_programme_path())


def _normalised(p: Programme) -> Programme:
    counties = tuple(
        msgspec.structs.replace(
            c,
            name=normalise_name(c.name),
            responsible_unit=normalise_name(c.responsible_unit),
            responsible_person=msgspec.structs.replace(
                c.responsible_person, name=normalise_name(c.responsible_person.name)
            ),
        )
        for c in p.counties
    )
    return msgspec.structs.replace(p, counties=counties)


def _duplicates(values: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    dup: list[str] = []
    for v in values:
        if v in seen:
            dup.append(v)
        seen.add(v)
    return dup


def _semantic_problems(p: Programme) -> Iterable[tuple[str, str]]:
    """Cross-reference checks msgspec's types cannot express; yields (key path, message)."""
    if p.format != PROGRAMME_FORMAT:
        yield "$.format", f"expected {PROGRAMME_FORMAT!r}, got {p.format!r}"
    phase_ids = {ph.id for ph in p.phases}
    review_kinds = {r.kind for r in p.reviews}
    milestone_ids = {m.id for m in p.milestones}
    for dup in _duplicates(ph.id for ph in p.phases):
        i = [ph.id for ph in p.phases].index(dup)
        yield f"$.phases[{i}].id", f"phase id {dup!r} appears twice"
    for dup in _duplicates(m.id for m in p.milestones):
        i = [m.id for m in p.milestones].index(dup)
        yield f"$.milestones[{i}].id", f"milestone id {dup!r} appears twice"
    for dup in _duplicates(c.code for c in p.counties):
        i = [c.code for c in p.counties].index(dup)
        yield f"$.counties[{i}].code", f"county code {dup!r} appears twice"
    for dup in _duplicates(c.responsible_person.id for c in p.counties):
        i = [c.responsible_person.id for c in p.counties].index(dup)
        yield f"$.counties[{i}].responsible_person.id", f"person id {dup!r} appears twice"
    for dup in _duplicates(r.kind for r in p.reviews):
        i = [r.kind for r in p.reviews].index(dup)
        yield f"$.reviews[{i}].kind", f"review kind {dup!r} appears twice"
    for i, m in enumerate(p.milestones):
        if m.phase not in phase_ids:
            yield f"$.milestones[{i}].phase", f"unknown phase {m.phase!r}"
        how = m.completed_by
        if how.startswith("review:"):
            if how.removeprefix("review:") not in review_kinds:
                yield f"$.milestones[{i}].completed_by", f"unknown review kind in {how!r}"
        elif how not in ("county", "trial_operation_started"):
            yield (
                f"$.milestones[{i}].completed_by",
                "must be 'county', 'trial_operation_started' or 'review:<kind>'",
            )
        for dup in _duplicates(s.id for s in m.steps):
            yield f"$.milestones[{i}].steps", f"step id {dup!r} appears twice"
    for i, r in enumerate(p.reviews):
        if r.milestone is not None and r.milestone not in milestone_ids:
            yield f"$.reviews[{i}].milestone", f"unknown milestone {r.milestone!r}"
    for dup in _duplicates(r.id for r in p.rules):
        i = [r.id for r in p.rules].index(dup)
        yield f"$.rules[{i}].id", f"rule id {dup!r} appears twice"
    for i, rule in enumerate(p.rules):
        yield from _rule_problems(p, i, rule, review_kinds, milestone_ids)
    if p.progress_table.first_period > p.progress_table.last_period:
        yield "$.progress_table.last_period", "last_period is before first_period"
    if not p.counties:
        yield "$.counties", "a programme needs at least one county"
    if not p.milestones:
        yield "$.milestones", "a programme needs at least one milestone"


def _rule_problems(
    p: Programme, i: int, rule: ProcedureRule, review_kinds: set[str], milestone_ids: set[str]
) -> Iterable[tuple[str, str]]:
    base = f"$.rules[{i}]"
    when = rule.when
    set_triggers = [k for k in msgspec.structs.fields(Trigger) if getattr(when, k.name) is not None]
    if len(set_triggers) != 1:
        yield f"{base}.when", "exactly one trigger must be given"
    if when.review_requested is not None and when.review_requested not in review_kinds:
        yield f"{base}.when.review_requested", f"unknown review kind {when.review_requested!r}"
    if when.step_done is not None:
        mid, _, step = when.step_done.partition("/")
        m = p.milestone(mid)
        if m is None or m.step(step) is None:
            yield f"{base}.when.step_done", f"unknown milestone/step {when.step_done!r}"
    for mid in when.milestone_completed or ():
        if mid not in milestone_ids:
            yield f"{base}.when.milestone_completed", f"unknown milestone {mid!r}"
    req = rule.requires
    set_reqs = [k for k in msgspec.structs.fields(Requirement) if getattr(req, k.name) is not None]
    if len(set_reqs) != 1:
        yield f"{base}.requires", "exactly one requirement must be given"
    if req.review_passed is not None and req.review_passed not in review_kinds:
        yield f"{base}.requires.review_passed", f"unknown review kind {req.review_passed!r}"
    if req.milestone_completed is not None and req.milestone_completed not in milestone_ids:
        yield (
            f"{base}.requires.milestone_completed",
            f"unknown milestone {req.milestone_completed!r}",
        )
