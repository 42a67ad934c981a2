"""The escalation policy file (format ``duban.policy/v1``): the accountability ladder as data.

Each level says when it applies, in working days relative to a milestone's effective deadline
(after granted extensions), whom it addresses (roles resolved through the directory), and whether
a city operator must confirm it before it is issued (通报批评, 约谈, provincial measures are only
*proposed* by the system). The shipped default follows DOMAIN.md; another policy is another file.

A milestone is judged under the policy version it was first judged under, unless a recorded
migration moves it (see services/escalation).
"""

from __future__ import annotations

import enum
from importlib import resources
from pathlib import Path
from typing import Annotated

import msgspec

from contracts.directory import ContactRole
from contracts.yamlfile import DataFileError, load_yaml_struct

POLICY_FORMAT = "duban.policy/v1"

LevelId = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class Trigger(enum.StrEnum):
    BEFORE_DEADLINE = "before_deadline"  # N working days before the effective deadline, if not done
    AFTER_DEADLINE = "after_deadline"  # N working days after it, if not done (1 = the first day late)
    MISSED_PROGRESS_TABLE = "missed_progress_table"  # the table not filed by its due date
    SECOND_OFFENCE = "second_offence"  # a county's second issued public criticism
    PROCEDURE_FINDING = "procedure_finding"  # a step reported out of the procedure's order
    PROGRAMME_FAILED = "programme_failed"  # the final milestone missed: provincial measures
    # Acceptance readiness (contracts.readiness): the earliest day to apply for pre-acceptance is
    # past its effective deadline (trial started too late, or a month missing or not stable).
    READINESS_LOST = "readiness_lost"
    MISSED_TRIAL_REPORT = "missed_trial_report"  # a monthly trial-operation report not filed by its due date


class PolicySpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class Level(PolicySpec, frozen=True, kw_only=True):
    id: LevelId
    name: str  # 提醒, 催办, 逾期, 通报批评, 约谈, 限批/停批/问责
    trigger: Trigger
    workdays: Annotated[int, msgspec.Meta(ge=0, le=250)] = 0
    addressed: tuple[ContactRole, ...]
    confirm: bool = False  # proposed, issued only when a city operator confirms
    urgent: bool = False  # may be sent in quiet hours
    milestones: tuple[str, ...] = ()  # only these milestones (empty: all)
    offence: bool = False  # once issued, counts towards the second-offence rule


class Policy(PolicySpec, frozen=True, kw_only=True):
    format: str
    version: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    roll_rest_day_deadlines: bool = True
    due_soon_workdays: Annotated[int, msgspec.Meta(ge=0, le=60)] = 5
    levels: tuple[Level, ...]

    def level(self, level_id: str) -> Level | None:
        return next((lv for lv in self.levels if lv.id == level_id), None)


class PolicyFileError(DataFileError):
    pass


def load_policy(path: Path | str) -> Policy:
    path = Path(path)
    policy, locate = load_yaml_struct(path, Policy, PolicyFileError)
    if policy.format != POLICY_FORMAT:
        raise PolicyFileError(path, locate("$.format"), "$.format", f"expected {POLICY_FORMAT!r}")
    ids = [lv.id for lv in policy.levels]
    for i, level in enumerate(policy.levels):
        key = f"$.levels[{i}]"
        if ids.index(level.id) != i:
            raise PolicyFileError(path, locate(f"{key}.id"), f"{key}.id", f"level {level.id!r} appears twice")
        if level.trigger is Trigger.AFTER_DEADLINE and level.workdays < 1:
            raise PolicyFileError(
                path, locate(f"{key}.workdays"), f"{key}.workdays", "after_deadline counts from 1 (the first day late)"
            )
        if not level.addressed:
            raise PolicyFileError(path, locate(f"{key}.addressed"), f"{key}.addressed", "address at least one role")
    return policy


def default_policy_path() -> Path:
    return Path(str(resources.files("contracts") / "policies" / "default.yaml"))


def load_default_policy() -> Policy:
    return load_policy(default_policy_path())
