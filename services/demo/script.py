"""The demo's story as data (``story.yaml``, format ``duban.demo-story/v1``) and its loader.

A story is a list of steps on given days: a county system, the city or the province posts a
command (exactly the JSON a county system would post, see :mod:`contracts.commands`), or a city
operator confirms or waives a proposed accountability action, named declaratively by its level
and its milestone or progress-table period (the runner looks the action's id up). Each step has
a Chinese caption (``note``) for the live view. The monthly progress tables are written compactly
(``progress_tables``: one entry per county) and expanded here, each table's lines giving the
county's progress as the story has it on the filing day.

Loading validates everything the story can get wrong without playing it — the shape of every
command, who may send it, dates, references to earlier submissions, the levels an operator can
decide — and fails with :class:`StoryFileError` naming the file, the line and the key path.
Playing it through the real decisions is the tests' job (``tests/unit/test_demo_story.py``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import msgspec

from contracts.commands import (
    COUNTY_COMMANDS,
    Command,
    CompleteMilestone,
    DecideReview,
    ReportProgress,
    RetractSubmission,
    Role,
    StartTrialOperation,
)
from contracts.identifiers import CountyCode, MilestoneId, ProgrammeId, SubmissionId
from contracts.payloads import Period, ReviewOutcome
from contracts.policy import Policy, load_default_policy
from contracts.programme import Decider, Programme, load_default_programme
from contracts.yamlfile import DataFileError, load_yaml_struct

STORY_FORMAT = "duban.demo-story/v1"
SHANGHAI = ZoneInfo("Asia/Shanghai")  # every step's day and time of day are local
DEFAULT_AT = dt.time(10, 0)
STORY_FILE = "story.yaml"
# Who signs each role's submissions when a step does not say (``by``).
SENDERS: dict[Role, str] = {Role.CITY: "市城管综合执法局", Role.PROVINCE: "省住房城乡建设厅"}
_DATE_FIELDS = ("completed_on", "started_on", "decided_on")  # a command may not date a fact after its day

Note = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
LevelId = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Sender = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
# "14:30". Unquoted, YAML 1.1 reads 10:00 as the base-60 integer 600: both are accepted.
TimeOfDay = str | int


class StoryFileError(DataFileError):
    """A story file that cannot be played; says where and what."""


class Decision(enum.StrEnum):
    CONFIRM = "confirm"
    WAIVE = "waive"


# -- the file as written ---------------------------------------------------------------------------
class _Spec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class StepSpec(_Spec, frozen=True, kw_only=True):
    day: dt.date
    county: CountyCode
    note: Note
    at: TimeOfDay | None = None
    as_: Role | None = msgspec.field(default=None, name="as")
    submission_id: SubmissionId | None = None
    by: Sender | None = None
    command: dict[str, Any] | None = None
    confirm: LevelId | None = None
    waive: LevelId | None = None
    milestone: MilestoneId | None = None
    period: Period | None = None
    reason: Note | None = None


class ProgressTablesSpec(_Spec, frozen=True, kw_only=True):
    county: CountyCode
    from_: Period = msgspec.field(name="from")
    to: Period
    filed_on_day: Annotated[int, msgspec.Meta(ge=1, le=28)] = 3
    at: TimeOfDay | None = None
    skip: tuple[Period, ...] = ()
    late: dict[Period, dt.date] = msgspec.field(default_factory=dict)  # period -> the day it is filed after all


class StoryFile(_Spec, frozen=True, kw_only=True):
    format: str
    programme: ProgrammeId
    title: str = ""
    start: dt.date
    end: dt.date
    steps: tuple[StepSpec, ...]
    progress_tables: tuple[ProgressTablesSpec, ...] = ()


# -- the story as played ---------------------------------------------------------------------------
@dataclass(frozen=True)
class OperatorAction:
    """A city operator's decision on a proposed action: its level and what it is about."""

    decision: Decision
    level: str  # the policy level id: public_criticism, admonitory_talk, …
    milestone_id: str | None = None
    period: str | None = None
    reason: str | None = None  # a waiver's reason; the step's note when not given


@dataclass(frozen=True)
class Step:
    day: dt.date
    at: dt.time  # local (Asia/Shanghai)
    county_code: str
    role: Role
    submission_id: str
    command: dict[str, Any] | None  # the JSON a county system (or operator) posts, dates as ISO text
    operator_action: OperatorAction | None
    note: str  # the caption; empty for the routine monthly tables
    submitted_by: str = ""
    line: int | None = None  # where the step is written in the story file

    @property
    def when(self) -> dt.datetime:
        return dt.datetime.combine(self.day, self.at, SHANGHAI)

    @property
    def kind(self) -> str:
        """The command's kind, or ``confirm``/``waive``."""
        if self.operator_action is not None:
            return self.operator_action.decision.value
        assert self.command is not None
        return str(self.command["kind"])


@dataclass(frozen=True)
class Story:
    programme_id: str
    title: str
    start: dt.date
    end: dt.date
    steps: tuple[Step, ...]  # in playing order: day, time of day, then as written

    def steps_on(self, day: dt.date) -> tuple[Step, ...]:
        return tuple(step for step in self.steps if step.day == day)

    def days(self, until: dt.date | None = None) -> Iterator[tuple[dt.date, tuple[Step, ...]]]:
        """Every day from ``start`` to ``end`` (or ``until``), with that day's steps (often none)."""
        by_day: dict[dt.date, list[Step]] = {}
        for step in self.steps:
            by_day.setdefault(step.day, []).append(step)
        last = min(self.end, until) if until is not None else self.end
        day = self.start
        while day <= last:
            yield day, tuple(by_day.get(day, ()))
            day += dt.timedelta(days=1)

    def county_steps(self, county_code: str) -> tuple[Step, ...]:
        return tuple(step for step in self.steps if step.county_code == county_code)

    @property
    def submissions(self) -> tuple[Step, ...]:
        return tuple(step for step in self.steps if step.command is not None)

    @property
    def operator_steps(self) -> tuple[Step, ...]:
        return tuple(step for step in self.steps if step.operator_action is not None)


def submission_body(step: Step, programme_id: str) -> bytes:
    """The JSON the runner posts for ``step`` (a :class:`contracts.commands.Submission`)."""
    if step.command is None:
        raise ValueError(f"step {step.submission_id} is an operator decision, not a submission")
    body = {
        "submission_id": step.submission_id,
        "programme_id": programme_id,
        "county_code": step.county_code,
        "command": step.command,
        "occurred_at": step.when.isoformat(),
        "submitted_by": step.submitted_by,
    }
    return msgspec.json.encode(body)


def default_story_path() -> Path:
    return Path(str(resources.files("services.demo") / STORY_FILE))


def load_story(
    path: Path | str | None = None, programme: Programme | None = None, policy: Policy | None = None
) -> Story:
    """Read and validate a story (the shipped one by default) for ``programme`` under ``policy``
    (the shipped programme and policy by default)."""
    path = Path(path) if path is not None else default_story_path()
    spec, locate = load_yaml_struct(path, StoryFile, StoryFileError)
    return _Loader(path, spec, locate, programme or load_default_programme(), policy or load_default_policy()).story()


# -- loading -------------------------------------------------------------------------------------
@dataclass
class _Pending:
    """A step before the monthly tables' lines are known."""

    key: tuple[dt.date, dt.time, int]
    step: Step
    table_period: str | None = None


class _Loader:
    def __init__(
        self, path: Path, spec: StoryFile, locate: Callable[[str], int | None], programme: Programme, policy: Policy
    ) -> None:
        self.path = path
        self.spec = spec
        self.locate = locate
        self.programme = programme
        self.decidable = {level.id for level in policy.levels if level.confirm}
        self._numbers: dict[str, int] = {}

    def _next_id(self, county_code: str) -> str:
        """``demo-<county>-<n>``: the county's n-th step as written."""
        n = self._numbers[county_code] = self._numbers.get(county_code, 0) + 1
        return f"demo-{county_code}-{n}"

    def fail(self, key: str, message: str) -> StoryFileError:
        return StoryFileError(self.path, self.locate(key), key, message)

    def story(self) -> Story:
        spec, programme = self.spec, self.programme
        if spec.format != STORY_FORMAT:
            raise self.fail("$.format", f"expected {STORY_FORMAT!r}, got {spec.format!r}")
        if spec.programme != programme.id:
            raise self.fail("$.programme", f"the story is for {spec.programme!r}, the programme is {programme.id!r}")
        if spec.end < spec.start:
            raise self.fail("$.end", "end is before start")
        pending = [self._step(i, s) for i, s in enumerate(spec.steps)]
        for i, tables in enumerate(spec.progress_tables):
            pending.extend(self._tables(i, tables, len(spec.steps) + 1000 * i))
        pending.sort(key=lambda p: p.key)
        self._check_ids(pending)
        return Story(
            programme_id=spec.programme,
            title=spec.title,
            start=spec.start,
            end=spec.end,
            steps=tuple(self._with_lines(pending)),
        )

    def _at(self, key: str, value: TimeOfDay | None) -> dt.time:
        if value is None:
            return DEFAULT_AT
        if isinstance(value, int):  # YAML 1.1 base 60: 10:30 -> 630
            hours, minutes = divmod(value, 60)
            if 0 <= hours < 24:
                return dt.time(hours, minutes)
        else:
            try:
                return dt.time.fromisoformat(value)
            except ValueError:
                pass
        raise self.fail(key, f'{value!r} is not a time of day such as "14:30"')

    def _county(self, key: str, code: str) -> str:
        county = self.programme.county(code)
        if county is None:
            known = ", ".join(c.code for c in self.programme.counties)
            raise self.fail(key, f"county {code!r} is not in the programme; known: {known}")
        return county.name

    def _in_story(self, key: str, day: dt.date) -> None:
        if not self.spec.start <= day <= self.spec.end:
            raise self.fail(key, f"{day.isoformat()} is outside the story ({self.spec.start} to {self.spec.end})")

    def _step(self, i: int, s: StepSpec) -> _Pending:
        base = f"$.steps[{i}]"
        name = self._county(f"{base}.county", s.county)
        self._in_story(f"{base}.day", s.day)
        at = self._at(f"{base}.at", s.at)
        given = [k for k in ("command", "confirm", "waive") if getattr(s, k) is not None]
        if len(given) != 1:
            raise self.fail(base, "a step needs exactly one of command, confirm, waive")
        if s.command is not None:
            for key in ("milestone", "period", "reason"):
                if getattr(s, key) is not None:
                    raise self.fail(f"{base}.{key}", f"{key} belongs to a confirm or waive step, not a command")
            command, role = self._command(base, s)
            action = None
            by = s.by or (f"{name}数字化城管系统" if role is Role.COUNTY else SENDERS[role])
        else:
            level = s.confirm or s.waive
            assert level is not None
            key = f"{base}.{given[0]}"
            if level not in self.decidable:
                raise self.fail(key, f"{level!r} is not a level an operator confirms; known: {sorted(self.decidable)}")
            if (s.milestone is None) == (s.period is None):
                raise self.fail(base, "name the proposal's milestone or its period (one of them)")
            if s.reason is not None and s.waive is None:
                raise self.fail(f"{base}.reason", "only a waiver has a reason")
            if s.as_ not in (None, Role.CITY):
                raise self.fail(f"{base}.as", "proposals are confirmed or waived by the city")
            if s.milestone is not None and self.programme.milestone(s.milestone) is None:
                raise self.fail(f"{base}.milestone", f"unknown milestone {s.milestone!r}")
            command, role, by = None, Role.CITY, s.by or "市督查局"
            action = OperatorAction(
                decision=Decision.CONFIRM if s.confirm is not None else Decision.WAIVE,
                level=level,
                milestone_id=s.milestone,
                period=s.period,
                reason=s.reason,
            )
        step = Step(
            day=s.day,
            at=at,
            county_code=s.county,
            role=role,
            submission_id=s.submission_id or self._next_id(s.county),
            command=command,
            operator_action=action,
            note=s.note,
            submitted_by=by,
            line=self.locate(base),
        )
        return _Pending((s.day, at, i), step)

    def _command(self, base: str, s: StepSpec) -> tuple[dict[str, Any], Role]:
        assert s.command is not None
        key = f"{base}.command"
        raw: dict[str, Any] = msgspec.to_builtins(s.command)  # dates as ISO text, as on the wire
        try:
            command: Command = msgspec.convert(raw, Command)
        except msgspec.ValidationError as exc:
            message, _, where = str(exc).partition(" - at `$")
            raise self.fail(f"{key}{where.rstrip('`')}", message) from None
        if isinstance(command, COUNTY_COMMANDS):
            expected = Role.COUNTY
        elif isinstance(command, DecideReview):
            review = self.programme.review(command.review_kind)
            if review is None or review.decided_by is Decider.NONE:
                raise self.fail(f"{key}.review_kind", f"{command.review_kind!r} is not decided by an operator")
            expected = Role(review.decided_by.value)
        else:
            expected = Role.CITY
        role = s.as_ or expected
        if role is not expected and not (isinstance(command, RetractSubmission) and role is Role.PROVINCE):
            raise self.fail(f"{base}.as", f"{raw['kind']} is sent as {expected.value}, not {role.value}")
        milestone = getattr(command, "milestone_id", None)
        if milestone is not None and self.programme.milestone(milestone) is None:
            raise self.fail(f"{key}.milestone_id", f"unknown milestone {milestone!r}")
        for name in _DATE_FIELDS:
            value = getattr(command, name, None)
            if isinstance(value, dt.date) and value > s.day:
                raise self.fail(f"{key}.{name}", f"{value.isoformat()} is after the step's day {s.day.isoformat()}")
        return raw, role

    def _tables(self, i: int, spec: ProgressTablesSpec, first_order: int) -> Iterator[_Pending]:
        base = f"$.progress_tables[{i}]"
        name = self._county(f"{base}.county", spec.county)
        periods = self.programme.reporting_periods()
        for key, period in (("from", spec.from_), ("to", spec.to)):
            if period not in periods:
                raise self.fail(f"{base}.{key}", f"{period} is not a reporting period ({periods[0]} to {periods[-1]})")
        chosen = [p for p in periods if spec.from_ <= p <= spec.to]
        for key, listed in (("skip", list(spec.skip)), ("late", list(spec.late))):
            for period in listed:
                if period not in chosen:
                    raise self.fail(f"{base}.{key}", f"{period} is not between {spec.from_} and {spec.to}")
        at = self._at(f"{base}.at", spec.at)
        for n, period in enumerate(chosen):
            if period in spec.skip:
                continue
            due = self.programme.progress_table_due(period)
            day = spec.late.get(period) or due.replace(day=spec.filed_on_day)
            self._in_story(f"{base}.late" if period in spec.late else base, day)
            if day < dt.date(int(period[:4]), int(period[5:]), 1):
                raise self.fail(f"{base}.late", f"{period}'s table cannot be filed on {day.isoformat()}")
            year, month = int(period[:4]), int(period[5:])
            note = f"{name}：补报{year}年{month}月督查进度一览表" if period in spec.late else ""
            step = Step(
                day=day,
                at=at,
                county_code=spec.county,
                role=Role.COUNTY,
                submission_id=f"demo-{spec.county}-table-{period}",
                command=None,  # its lines are the county's progress on the day: filled in below
                operator_action=None,
                note=note,
                submitted_by=f"{name}数字化城管系统",
                line=self.locate(base),
            )
            yield _Pending((day, at, first_order + n), step, period)

    def _check_ids(self, pending: list[_Pending]) -> None:
        """Ids unique; a decision or retraction names an earlier submission of the same county."""
        seen: dict[str, Step] = {}
        for p in pending:
            step = p.step
            base = f"$.steps[{p.key[2]}]" if p.table_period is None else "$.progress_tables"
            if step.submission_id in seen:
                raise self.fail(base, f"submission id {step.submission_id!r} is used twice")
            for ref in ("request_submission_id", "retracted_submission_id"):
                target = (step.command or {}).get(ref)
                if target is None:
                    continue
                earlier = seen.get(target)
                if earlier is None or earlier.county_code != step.county_code or earlier.command is None:
                    raise self.fail(
                        f"{base}.command.{ref}", f"{target!r} is no earlier submission of county {step.county_code}"
                    )
            seen[step.submission_id] = step

    def _with_lines(self, pending: list[_Pending]) -> Iterator[Step]:
        """The steps in order, each monthly table with the county's progress as of its filing."""
        progress: dict[str, dict[str, int]] = {c.code: {} for c in self.programme.counties}
        for p in pending:
            step = p.step
            percents = progress[step.county_code]
            if p.table_period is None:
                if step.command is not None:
                    _advance(self.programme, percents, msgspec.convert(step.command, Command))
                yield step
                continue
            lines = [
                {
                    "milestone_id": m.id,
                    "percent": percents.get(m.id, 0),
                    **({"note": "已完成"} if percents.get(m.id) == 100 else {}),
                }
                for m in self.programme.milestones
            ]
            command = {"kind": "file_progress_table", "period": p.table_period, "lines": lines}
            yield dataclasses.replace(step, command=command)


def _advance(programme: Programme, percents: dict[str, int], command: Command) -> None:
    """What a command tells about a county's progress, as its next table reports it."""
    done: list[str] = []
    if isinstance(command, ReportProgress):
        percents[command.milestone_id] = max(percents.get(command.milestone_id, 0), command.percent)
    elif isinstance(command, CompleteMilestone):
        done.append(command.milestone_id)
    elif isinstance(command, DecideReview) and command.outcome is ReviewOutcome.PASSED:
        done.extend(m.id for m in programme.milestones_completed_by(f"review:{command.review_kind}"))
    elif isinstance(command, StartTrialOperation):
        done.extend(m.id for m in programme.milestones_completed_by("trial_operation_started"))
    for milestone_id in done:
        percents[milestone_id] = 100
