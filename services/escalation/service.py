"""The escalation application service: follows the facts, judges counties, records actions.

State is the county facts folded from the event stream (the same meaning the ledger uses),
including the actions already recorded there. Judging is the pure ladder. New actions are
appended to the county's actions subject with ``Nats-Msg-Id`` = the action id, so an action
judged twice before its event comes back from the stream is still stored once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import Iterable
from typing import ClassVar
from zoneinfo import ZoneInfo

import msgspec
import structlog
from nats.js import JetStreamContext

from contracts.escalation import ActionView, ConfirmAction, WaiveAction
from contracts.events import (
    EVENT_SCHEMA_VERSIONS,
    ActionConfirmed,
    ActionIssued,
    ActionProposed,
    ActionWaived,
    Actor,
    EventEnvelope,
    EventPayload,
    encode_event,
    event_type_of,
)
from contracts.facts import ActionFacts, CountyFacts, apply, fold, new_facts
from contracts.payloads import recorded_as
from contracts.programme import Programme
from contracts.replies import ParkedEvent, parked_event
from contracts.subjects import actions_subject, event_headers
from services.common import metrics
from services.common.chain import ChainedPublisher
from services.common.clock import Clock
from services.common.micro import EndpointFailure
from services.common.signing import Signer
from services.escalation.history import CountyHistory
from services.escalation.ladder import Judge, due_actions

log = structlog.get_logger(__name__)
Key = tuple[str, str]


class OpsFailure(EndpointFailure):
    """An operator's request refused: no such action (404), malformed (400), or its state (409)."""

    STATUS: ClassVar[dict[str, str]] = {"unknown_action": "404", "bad_request": "400"}

    def __init__(self, code: str, zh: str, en: str, detail: str = "") -> None:
        super().__init__(code, zh, en, detail, self.STATUS.get(code, "409"))


class EscalationService:
    def __init__(
        self,
        js: JetStreamContext,
        judges: dict[str, Judge],
        clock: Clock,
        timeout: float = 5.0,
        signer: Signer | None = None,
    ) -> None:
        self._js = js
        # Actions are chained per county and signed: they are what a county may contest.
        self._publisher = ChainedPublisher(js, signer=signer, timeout=timeout)
        self._judges = judges
        self._clock = clock
        self._timeout = timeout
        self._facts: dict[Key, CountyFacts] = {}
        # What a refold and _proposal read of each county's events (not the envelopes: history.py).
        self._history: dict[Key, CountyHistory] = {}
        self._appended: set[str] = set()  # action ids appended and not yet seen back
        self._lock = asyncio.Lock()
        self.observed_sequence = 0  # the last stream sequence folded in
        self.active = True  # False while another instance is active (services/common/leader.py)
        self.parked: list[ParkedEvent] = []  # events it could not fold (kept in memory: refolded at start)

    # -- following the stream ------------------------------------------------------------------
    def observe(self, sequence: int, envelope: EventEnvelope) -> Key | None:
        """Fold one stored event in; returns the county it concerns (None: not ours)."""
        self.observed_sequence = max(self.observed_sequence, sequence)
        judge = self._judges.get(envelope.programme_id)
        if judge is None:
            return None
        key = (envelope.programme_id, envelope.county_code)
        history = self._history.get(key)
        if history is None:
            history = self._history[key] = CountyHistory()
        kept = history.append(sequence, envelope)
        if kept is not envelope.payload:  # fold the kept payload (it folds the same): the facts share it
            envelope = msgspec.structs.replace(envelope, payload=kept)
        facts = self._facts.get(key) or new_facts(judge.programme, envelope.county_code)
        try:
            if not apply(judge.programme, facts, sequence, envelope):
                facts = fold(judge.programme, envelope.county_code, history.events())
        except Exception:
            history.pop()  # the county as if the event were not there (apply may have half-changed it)
            self._facts[key] = fold(judge.programme, envelope.county_code, history.events())
            raise
        self._facts[key] = facts
        action_id = getattr(envelope.payload, "action_id", None)
        if action_id is not None:
            self._appended.discard(action_id)
        return key

    def park(self, sequence: int, data: bytes, reason: str) -> None:
        self.observed_sequence = max(self.observed_sequence, sequence)
        log.error("event parked", consumer="escalation", stream_sequence=sequence, error=reason)
        metrics.PARKED.labels(consumer="escalation").inc()
        self.parked.append(parked_event("escalation", sequence, data, reason, self._clock.now()))

    def facts(self, key: Key) -> CountyFacts | None:
        return self._facts.get(key)

    # -- judging ------------------------------------------------------------------------------
    def _today(self, programme: Programme) -> dt.date:
        return self._clock.now().astimezone(ZoneInfo(programme.programme.timezone)).date()

    async def judge(self, keys: Iterable[Key] | None = None) -> int:
        """Judge the given counties (all: every county of every programme) now; returns new actions.

        Only the active instance judges (``active``); a standby only folds the stream, ready to
        take over."""
        if not self.active:
            return 0
        async with self._lock:
            with metrics.JUDGE_SECONDS.time():
                return await self._judge(keys)

    async def _judge(self, keys: Iterable[Key] | None) -> int:
        count = 0
        targets = list(keys) if keys is not None else self._all_counties()
        for programme_id, county_code in targets:
            judge = self._judges[programme_id]
            key = (programme_id, county_code)
            facts = self._facts.get(key) or new_facts(judge.programme, county_code)
            for action in due_actions(judge, facts, self._today(judge.programme)):
                if action.action_id in self._appended:
                    continue
                await self._append(programme_id, county_code, [action], action.action_id)
                self._appended.add(action.action_id)
                count += 1
        return count

    def action_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for facts in self._facts.values():
            for action in facts.actions.values():
                counts[action.state] = counts.get(action.state, 0) + 1
        return counts

    def counties(self) -> list[Key]:
        return self._all_counties()

    def _all_counties(self) -> list[Key]:
        return [(j.programme.id, c.code) for j in self._judges.values() for c in j.programme.counties]

    async def _append(self, programme_id: str, county_code: str, payloads: list[EventPayload], event_key: str) -> None:
        now = self._clock.now()
        subject = actions_subject(programme_id, county_code)
        for index, payload in enumerate(payloads):
            event_type = event_type_of(payload)
            event_id = f"{event_key}/{event_type}" if len(payloads) > 1 else event_key
            envelope = EventEnvelope(
                event_id=event_id,
                schema_version=EVENT_SCHEMA_VERSIONS[event_type],
                programme_id=programme_id,
                county_code=county_code,
                occurred_at=now,
                recorded_at=now,
                actor=Actor(role="system", user="escalation"),
                submission_id=_safe_id(event_key),
                submission_digest=hashlib.sha256(msgspec.json.encode(payload)).hexdigest(),
                causation_id=event_key,
                correlation_id=event_key,
                payload=payload,
            )
            await self._publisher.publish(
                subject,
                encode_event(envelope),
                event_headers(f"{event_id}#{index}", event_type, envelope.correlation_id),
            )
            log.info("action recorded", action=event_key, type=event_type, county_code=county_code)
            level = getattr(payload, "level_id", None) or "-"
            metrics.ACTIONS.labels(level=level, state=event_type.removeprefix("action_")).inc()

    # -- operators ------------------------------------------------------------------------------
    def _find(self, action_id: str) -> tuple[Key, CountyFacts]:
        for key, facts in self._facts.items():
            if action_id in facts.actions:
                return key, facts
        raise OpsFailure("unknown_action", "找不到该督办事项", "no such action", action_id)

    def view(self, action_id: str) -> ActionView:
        key, facts = self._find(action_id)
        return _view(key, facts.actions[action_id])

    def actions(self, programme_id: str | None, county_code: str | None, state: str | None) -> list[ActionView]:
        out = [
            _view(key, action)
            for key, facts in self._facts.items()
            if (programme_id is None or key[0] == programme_id) and (county_code is None or key[1] == county_code)
            for action in facts.actions.values()
            if state is None or action.state == state
        ]
        return sorted(out, key=lambda a: (a.due_on, a.action_id))

    async def confirm(self, request: ConfirmAction) -> ActionView:
        async with self._lock:
            key, facts = self._find(request.action_id)
            action = facts.actions[request.action_id]
            if action.state != "proposed":
                raise OpsFailure(
                    "not_proposed", "该事项不是待确认状态", "the action is not awaiting confirmation", action.state
                )
            proposal = self._proposal(key, request.action_id)
            issued = recorded_as(ActionIssued, proposal, confirmed_by=request.operator)
            confirmed = ActionConfirmed(action_id=request.action_id, operator=request.operator, note=request.note)
            await self._append(key[0], key[1], [confirmed, issued], f"{request.action_id}:confirmed")
            # Stored: reflect it now, so a second confirmation is refused before the events come
            # back through the stream (folding them then changes nothing).
            action.state, action.decided_by = "issued", request.operator
            return _view(key, action)

    async def waive(self, request: WaiveAction) -> ActionView:
        async with self._lock:
            key, facts = self._find(request.action_id)
            action = facts.actions[request.action_id]
            if action.state != "proposed":
                raise OpsFailure(
                    "not_proposed", "该事项不是待确认状态", "the action is not awaiting confirmation", action.state
                )
            if not request.reason.strip():
                raise OpsFailure("bad_request", "免予处理须说明理由", "a waiver needs a reason")
            waived = ActionWaived(action_id=request.action_id, operator=request.operator, reason=request.reason)
            await self._append(key[0], key[1], [waived], f"{request.action_id}:waived")
            action.state, action.decided_by, action.waive_reason = "waived", request.operator, request.reason
            return _view(key, action)

    def _proposal(self, key: Key, action_id: str) -> ActionProposed:
        history = self._history.get(key)
        proposal = history.proposal(action_id) if history is not None else None
        if proposal is not None:
            return proposal
        raise OpsFailure("unknown_action", "找不到该督办事项的提议", "the proposal is not on record", action_id)


def _safe_id(key: str) -> str:
    """Envelope submission ids are limited to 128 safe characters; long keys are hashed."""
    return key if len(key) <= 128 else hashlib.sha256(key.encode()).hexdigest()


def _view(key: Key, action: ActionFacts) -> ActionView:
    return ActionView(programme_id=key[0], county_code=key[1], **msgspec.structs.asdict(action))
