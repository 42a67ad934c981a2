"""The fault suite's tally, printed at the end of the run (see conftest.py).

Every fault test records what it offered (submissions, inputs), what it injected (kills,
restarts) and what it found wrong (lost, duplicated, wrongly accepted). The suite's promise is
that the last three are zero; each test also asserts its own counts, so a non-zero figure here
always comes with a failed test.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Profile:
    """How hard the suite pushes: ``quick`` in CI, ``soak`` for a long run (DUBAN_FAULT_PROFILE)."""

    name: str
    submissions_per_phase: int  # offered per county client between two faults
    counties: int  # concurrent county clients
    kills_per_service: int
    fuzz_examples: int  # hypothesis examples per decoder

    @classmethod
    def from_env(cls) -> Profile:
        name = os.environ.get("DUBAN_FAULT_PROFILE", "quick")
        if name == "soak":
            return cls("soak", submissions_per_phase=200, counties=5, kills_per_service=5, fuzz_examples=5000)
        if name != "quick":
            raise ValueError(f"DUBAN_FAULT_PROFILE is quick or soak, not {name!r}")
        return cls("quick", submissions_per_phase=20, counties=5, kills_per_service=1, fuzz_examples=300)


@dataclass
class FaultReport:
    offered: Counter[str] = field(default_factory=Counter)  # e.g. submissions, http requests, fuzz inputs
    injected: Counter[str] = field(default_factory=Counter)  # e.g. "kill -9 ledger", "nats restart"
    lost: Counter[str] = field(default_factory=Counter)
    duplicated: Counter[str] = field(default_factory=Counter)
    wrongly_accepted: Counter[str] = field(default_factory=Counter)

    def lines(self, profile: Profile) -> list[str]:
        def show(counter: Counter[str]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"

        return [
            f"profile: {profile.name}",
            f"offered: {show(self.offered)}",
            f"faults injected: {show(self.injected)}",
            f"lost: {sum(self.lost.values())} ({show(self.lost)})",
            f"duplicated: {sum(self.duplicated.values())} ({show(self.duplicated)})",
            f"wrongly accepted: {sum(self.wrongly_accepted.values())} ({show(self.wrongly_accepted)})",
        ]


REPORT = FaultReport()
PROFILE = Profile.from_env()
