"""Writing a county's history as it would be recorded: commands on given days go through the
real submissions decision and come out as stored events (sequence, envelope). Pure: no servers.
Used by tests that play whole programmes under a simulated calendar."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
from typing import Any

import msgspec

from contracts.commands import Role, Submission
from contracts.events import EVENT_SCHEMA_VERSIONS, Actor, EventEnvelope, event_type_of
from contracts.programme import Programme, load_default_programme
from contracts.replies import Refused
from services.submissions.decide import Accept, Sender, authorise, decide
from services.submissions.record import CountyRecord

SHANGHAI = dt.timezone(dt.timedelta(hours=8))


class Story:
    """Commands are written in any order and played in time order (as a stream records them)."""

    def __init__(self, programme: Programme | None = None) -> None:
        self.programme = programme or load_default_programme()
        self._script: list[tuple[str, int, str, dict[str, Any], Role, str]] = []
        self._played: dict[str, list[tuple[int, EventEnvelope]]] | None = None
        self._ids = itertools.count(1)

    def send(
        self, day: str, county: str, command: dict[str, Any], role: Role = Role.COUNTY, submission_id: str | None = None
    ) -> str:
        """Submit ``command`` at 10:00 Shanghai time on ``day``; returns the submission id."""
        sid = submission_id or f"s{next(self._ids)}"
        self._script.append((day, len(self._script), county, command, role, sid))
        self._played = None
        return sid

    @property
    def histories(self) -> dict[str, list[tuple[int, EventEnvelope]]]:
        if self._played is None:
            self._played = self._play()
        return self._played

    @histories.setter
    def histories(self, value: dict[str, list[tuple[int, EventEnvelope]]]) -> None:
        self._played = value

    def _play(self) -> dict[str, list[tuple[int, EventEnvelope]]]:
        records = {c.code: CountyRecord(self.programme.id, c.code) for c in self.programme.counties}
        histories: dict[str, list[tuple[int, EventEnvelope]]] = {c.code: [] for c in self.programme.counties}
        sequence = itertools.count(1)
        for day, _, county, command, role, sid in sorted(self._script):
            self._decide(records[county], histories[county], sequence, day, county, command, role, sid)
        return histories

    def _decide(
        self,
        record: CountyRecord,
        history: list[tuple[int, EventEnvelope]],
        sequence: itertools.count[int],
        day: str,
        county: str,
        command: dict[str, Any],
        role: Role,
        sid: str,
    ) -> None:
        now = dt.datetime.fromisoformat(day).replace(hour=10, tzinfo=SHANGHAI)
        body = {"submission_id": sid, "programme_id": self.programme.id, "county_code": county, "command": command}
        submission = msgspec.convert(body, Submission)
        sender = Sender(role, county, f"{role.value}-user")
        programme = authorise(sender, submission, {self.programme.id: self.programme})
        assert not isinstance(programme, Refused), (day, county, programme)
        digest = hashlib.sha256(msgspec.json.encode(submission)).hexdigest()
        decision = decide(self.programme, record, submission, sender, now)
        assert isinstance(decision, Accept), (day, county, decision)
        for new in decision.events:
            envelope = EventEnvelope(
                event_id=new.event_id,
                schema_version=EVENT_SCHEMA_VERSIONS[event_type_of(new.payload)],
                programme_id=self.programme.id,
                county_code=county,
                occurred_at=now,
                recorded_at=now,
                actor=Actor(role=role.value, user=sender.user),
                submission_id=sid,
                submission_digest=digest,
                causation_id=sid,
                correlation_id=sid,
                payload=new.payload,
            )
            number = next(sequence)
            record.apply(envelope, number)
            history.append((number, envelope))

    def complete(self, day: str, county: str, milestone: str, on: str | None = None) -> str:
        return self.send(
            day,
            county,
            {
                "kind": "complete_milestone",
                "milestone_id": milestone,
                "completed_on": on or day,
                "evidence": [{"title": f"{milestone}完成报告"}],
            },
        )

    def decide_review(self, day: str, county: str, kind: str, role: Role, outcome: str = "passed") -> str:
        return self.send(
            day,
            county,
            {
                "kind": "decide_review",
                "review_kind": kind,
                "outcome": outcome,
                "decided_on": day,
                "approval_document_number": f"{kind}-{county}",
            },
            role=role,
        )

    def report_trial(self, day: str, county: str, period: str, **counts: int) -> str:
        """A month of trial operation; stable by default (100 reported, 98 registered, 96
        dispatched, 92 closed, 85 on time, 2 returned: 98 %, 95.8 %, 92.4 %)."""
        figures = {
            "cases_reported": 100,
            "cases_registered": 98,
            "cases_dispatched": 96,
            "cases_closed": 92,
            "cases_closed_on_time": 85,
            "cases_returned": 2,
        }
        figures.update({f"cases_{name}": value for name, value in counts.items()})
        return self.send(day, county, {"kind": "report_trial_operation", "period": period, **figures})

    def file_table(self, day: str, county: str, period: str) -> str:
        return self.send(
            day,
            county,
            {"kind": "file_progress_table", "period": period, "lines": [{"milestone_id": "1.1", "percent": 100}]},
        )
