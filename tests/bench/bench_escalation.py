#!/usr/bin/env python
"""Escalation benchmark: one evaluation tick over every unit, and a what-if replay. In-process.

A program, not a pytest test (no servers)::

    .venv/bin/python tests/bench/bench_escalation.py --units 300 --events 100000   # quick check
    .venv/bin/python tests/bench/bench_escalation.py --json /tmp/bench-escalation.json   # full size

1. **Tick**: the shipped programme with ``--units`` (default 2,844) synthetic county-level units
   (codes 900000+i) × its 9 milestones, facts built directly with varied states (completed early
   or late, never completed, granted extensions, procedure findings, progress tables filed on
   time / late / never). Measured, each ``--repeats`` times: a *cold* tick (nothing on record)
   on 2017-06-15 and on today's date (everything missed is overdue: many actions), and a *steady*
   tick on both days with every due action already on record (the service's normal case); and
   the worst case: today, with nothing ever completed or filed by any unit. The
   baseline in the same run is the floor: iterating over the same facts and reading each
   milestone's state. Goal: a tick under one second.
2. **What-if replay**: histories totalling ``--events`` events. The structure of every county's
   history (completions, review requests and decisions, extensions, trial operation,
   retractions, progress tables on time / late / missing, and the procedure findings these
   cause) goes through the real submissions decision (``tests/story.py``); bulk progress reports
   and a few operators' confirmations are built directly as envelopes. Every event is encoded
   and decoded with ``contracts.events`` (so all of them are valid stored events) and each
   county's history is folded once as a check. Then ``replay(judge_a)`` (default policy) +
   ``replay(judge_b)`` (public_criticism after 3 working days instead of 5) + ``compare`` over
   2017-03-01..2018-11-30: seconds, events/s, peak RSS. Baselines in the same run: folding the
   same events (``apply``, in replay order) and the bare county × day loop.

   ``replay`` judges every county on every day, so its cost is ~units × days × (one steady
   judgement) plus the events folded. When the tick measured in part 1 predicts the full replay
   above ``--replay-budget`` seconds (default 300), the replay runs at ``--scaled`` event counts
   (default 100k and 300k) with the units scaled in proportion (same events per unit), and the
   full size is extrapolated from them. ``--force-full`` runs the full size anyway.
3. Prints a table and all figures as JSON (also to ``--json FILE``). ``--profile DIR`` writes
   pyinstrument profiles (steady tick, one replay of a slice) — pyinstrument is not a project
   dependency: ``.venv/bin/pip install pyinstrument``.

Throughput on these machines drifts by up to 60% between runs: compare the RATIOS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

from contracts.commands import Role  # noqa: E402
from contracts.events import (  # noqa: E402
    ActionConfirmed,
    Actor,
    EventEnvelope,
    ProgressReported,
    decode_event,
    encode_event,
    event_type_of,
)
from contracts.facts import (  # noqa: E402
    ActionFacts,
    CountyFacts,
    FindingFacts,
    ProgressTableFacts,
    apply,
    fold,
    new_facts,
)
from contracts.policy import Policy, load_default_policy  # noqa: E402
from contracts.programme import Programme  # noqa: E402
from contracts.workdays import WorkdayCalendar  # noqa: E402
from services.escalation.ladder import Judge, due_actions  # noqa: E402
from services.escalation.replay import compare, replay  # noqa: E402
from tests.bench.synthetic import (  # noqa: E402
    log,
    synthetic_programme,
)
from tests.samples import stored_envelope  # noqa: E402
from tests.story import Story  # noqa: E402

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
START, END = dt.date(2017, 3, 1), dt.date(2018, 11, 30)
EARLY_DAY = dt.date(2017, 6, 15)
GOAL_TICK_SECONDS = 1.0
TICK_CASES = {
    "early": "varied facts as of 2017-06-15",
    "today": "varied facts, today: the whole programme past",
    "worst": "today, nothing ever completed or filed",
}
STRICT_LEVEL, STRICT_WORKDAYS = "public_criticism", 3


# ------------------------------------------------------------------------------------------
# programme, policies
# ------------------------------------------------------------------------------------------


def stricter(policy: Policy) -> Policy:
    levels = tuple(
        msgspec.structs.replace(lv, workdays=STRICT_WORKDAYS) if lv.id == STRICT_LEVEL else lv for lv in policy.levels
    )
    return msgspec.structs.replace(policy, version=f"{policy.version}-strict{STRICT_WORKDAYS}", levels=levels)


def make_judge(programme: Programme, policy: Policy, calendar: WorkdayCalendar) -> Judge:
    return Judge(programme, {policy.version: policy}, policy, calendar)


def at(day: dt.date, hour: int = 10, minute: int = 0) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=SHANGHAI)


# ------------------------------------------------------------------------------------------
# part 1: facts for the tick
# ------------------------------------------------------------------------------------------


def tick_facts(programme: Programme, day: dt.date, seed: int) -> tuple[dict[str, CountyFacts], Counter[str]]:
    """Varied facts per unit as they stand at the end of ``day`` (nothing after it is known)."""
    out: dict[str, CountyFacts] = {}
    states: Counter[str] = Counter()
    periods = programme.reporting_periods()
    rules = programme.rules
    for i, county in enumerate(programme.counties):
        rng = random.Random(seed * 1_000_003 + i)
        facts = new_facts(programme, county.code)
        for m in programme.milestones:
            state = facts.milestones[m.id]
            deadline = m.deadline
            # a granted extension, decided 10 days before the deadline
            if rng.random() < 0.12 and m.deadline - dt.timedelta(days=10) <= day:
                deadline = m.deadline + dt.timedelta(days=rng.choice((20, 30, 45, 60)))
                state.extended_deadline = deadline
            r = rng.random()
            if r < 0.10:
                done = None  # never completed
            elif r < 0.35:
                done = deadline + dt.timedelta(days=rng.randint(1, 60))  # late
            else:
                done = deadline - dt.timedelta(days=rng.randint(0, 25))  # on time
            if done is not None and done <= day:
                state.completed_on, state.completed_via, state.percent = done, m.completed_by, 100
            else:
                state.percent = rng.randint(0, 95)
            states["extended" if state.extended_deadline else "not_extended"] += 1
            states["completed" if state.completed_on else "open"] += 1
        for k in range(rng.choice((0, 0, 0, 1, 1, 2, 3))):
            rule = rng.choice(rules)
            found = START + dt.timedelta(days=rng.randint(0, (END - START).days))
            if found <= day:
                facts.findings.append(
                    FindingFacts(
                        event_id=f"{county.code}-f{k}/1",
                        rule_id=rule.id,
                        finding_zh=rule.finding_zh,
                        finding_en=rule.finding_en,
                        detail="synthetic",
                        milestone_id=rng.choice(programme.milestones).id,
                        recorded_at=at(found),
                    )
                )
                states["findings"] += 1
        for period in periods:
            due = programme.progress_table_due(period)
            r = rng.random()
            if r < 0.06:
                states["tables_missing"] += 1 if due <= day else 0
                continue
            filed = (
                due + dt.timedelta(days=rng.randint(1, 15)) if r < 0.18 else due - dt.timedelta(days=rng.randint(0, 3))
            )
            if filed <= day:
                facts.progress_tables[period] = ProgressTableFacts(
                    period=period, filed_on=filed, submission_id=f"{county.code}-t{period}", lines=9
                )
                states["tables_late" if filed > due else "tables_on_time"] += 1
        out[county.code] = facts
    return out, states


def record(facts: CountyFacts, action: Any, issued: bool) -> None:
    """As the live service records it; ``issued`` says an operator confirmed a proposal."""
    state = "issued" if issued or event_type_of(action) == "action_issued" else "proposed"
    facts.actions[action.action_id] = ActionFacts(
        action_id=action.action_id,
        level_id=action.level_id,
        level_name=action.level_name,
        state=state,
        policy_version=action.policy_version,
        due_on=action.due_on,
        milestone_id=action.milestone_id,
        period=action.period,
        explanation_zh=action.explanation_zh,
    )


def settle(judge: Judge, facts: dict[str, CountyFacts], day: dt.date, seed: int) -> int:
    """Put every due action on record (about half the proposals confirmed, so second offences
    come due too), until judging finds nothing new. Returns the actions recorded."""
    rng = random.Random(seed)
    total = 0
    for _ in range(5):
        new = 0
        for f in facts.values():
            for action in due_actions(judge, f, day):
                record(f, action, issued=rng.random() < 0.5)
                new += 1
        total += new
        if not new:
            return total
    raise AssertionError("judging did not settle")


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return times, result


def summary(times: list[float], **extra: Any) -> dict[str, Any]:
    best, med = min(times), statistics.median(times)
    return {"min_s": best, "median_s": med, "ticks_per_s": 1 / med if med else None, "runs": len(times), **extra}


def bench_tick(programme: Programme, judge: Judge, today: dt.date, repeats: int, seed: int) -> dict[str, Any]:
    n_units = len(programme.counties)
    milestones = programme.milestones
    results: dict[str, Any] = {"units": n_units, "milestones": len(milestones), "today": today.isoformat()}
    for label, day in (("early", EARLY_DAY), ("today", today), ("worst", today)):
        t = time.perf_counter()
        if label == "worst":  # nothing ever done or filed: every ladder at its top, every table missed
            facts, states = {c.code: new_facts(programme, c.code) for c in programme.counties}, Counter(open=1)
        else:
            facts, states = tick_facts(programme, day, seed)
        built = time.perf_counter() - t

        def floor(facts: dict[str, CountyFacts] = facts) -> int:
            n = 0
            for f in facts.values():
                for m in milestones:
                    s = f.milestones[m.id]
                    if s.completed_on is None and (s.extended_deadline or m.deadline) is not None:
                        n += 1
            return n

        def tick(facts: dict[str, CountyFacts] = facts, day: dt.date = day) -> int:
            return sum(len(due_actions(judge, f, day)) for f in facts.values())

        floor_times, open_count = timed(floor, max(repeats, 5))
        cold_times, cold_actions = timed(tick, repeats)
        recorded = settle(judge, facts, day, seed)
        steady_times, steady_actions = timed(tick, repeats)
        on_record = sum(len(f.actions) for f in facts.values())
        floor_med = statistics.median(floor_times)
        results[label] = {
            "day": day.isoformat(),
            "facts_built_s": built,
            "states": dict(states),
            "open_milestones": open_count,
            "floor": summary(floor_times),
            "cold": summary(cold_times, actions=cold_actions, ratio_to_floor=statistics.median(cold_times) / floor_med),
            "steady": summary(
                steady_times,
                actions=steady_actions,
                on_record=on_record,
                recorded_while_settling=recorded,
                ratio_to_floor=statistics.median(steady_times) / floor_med,
            ),
            "per_unit_steady_us": statistics.median(steady_times) / n_units * 1e6,
        }
        results[label]["goal_met"] = (
            max(statistics.median(cold_times), statistics.median(steady_times)) < GOAL_TICK_SECONDS
        )
        log(
            f"tick {label} {day}: floor {floor_med * 1e3:.1f} ms, cold {statistics.median(cold_times):.3f} s "
            f"({cold_actions} actions), steady {statistics.median(steady_times):.3f} s ({steady_actions} new, "
            f"{on_record} on record)"
        )
    return results


# ------------------------------------------------------------------------------------------
# part 2: histories for the replay
# ------------------------------------------------------------------------------------------


def _d(day: dt.date) -> str:
    return day.isoformat()


def script_county(story: Story, code: str, rng: random.Random) -> None:
    """One county's structural history, sent through the real decision. Varied lateness,
    extensions, returned reviews, procedure breaches, retractions, late and missing tables."""
    p = story.programme
    ms = {m.id: m for m in p.milestones}

    def day_for(mid: str) -> dt.date:
        deadline = ms[mid].deadline
        r = rng.random()
        if r < 0.04:
            off = rng.randint(40, 120)  # very late
        elif r < 0.28:
            off = rng.randint(1, 30)  # late
        else:
            off = -rng.randint(1, 20)  # on time
        return min(END, deadline + dt.timedelta(days=off))

    if rng.random() < 0.10:  # an extension request, granted or refused by the city
        mid = rng.choice(("1.3", "2.1", "2.2", "2.3", "3.1", "3.2"))
        m = ms[mid]
        proposed = m.deadline + dt.timedelta(days=rng.choice((20, 30, 45)))
        asked = m.deadline - dt.timedelta(days=12)
        sid = story.send(
            _d(asked),
            code,
            {
                "kind": "request_extension",
                "milestone_id": mid,
                "proposed_deadline": _d(proposed),
                "reason": "资金未到位",
            },
            submission_id=f"{code}-ext",
        )
        granted = rng.random() < 0.7
        decision: dict[str, Any] = {"kind": "decide_extension", "milestone_id": mid, "request_submission_id": sid}
        decision |= (
            {"outcome": "granted", "new_deadline": _d(proposed)}
            if granted
            else {"outcome": "refused", "reason": "不予批准"}
        )
        story.send(_d(asked + dt.timedelta(days=3)), code, decision, role=Role.CITY)

    story.complete(_d(day_for("1.1")), code, "1.1")
    d12 = day_for("1.2")
    if rng.random() < 0.95:
        story.send(_d(d12 - dt.timedelta(days=20)), code, {"kind": "request_review", "review_kind": "plan_pre_review"})
        story.decide_review(_d(d12 - dt.timedelta(days=15)), code, "plan_pre_review", Role.CITY)
    # else: asks the province with no passed pre-review: a procedure finding
    story.send(
        _d(d12 - dt.timedelta(days=14)), code, {"kind": "request_review", "review_kind": "provincial_plan_review"}
    )
    if rng.random() < 0.15:
        story.decide_review(_d(d12 - dt.timedelta(days=7)), code, "provincial_plan_review", Role.PROVINCE, "returned")
        story.send(
            _d(d12 - dt.timedelta(days=5)), code, {"kind": "request_review", "review_kind": "provincial_plan_review"}
        )
    story.decide_review(_d(d12), code, "provincial_plan_review", Role.PROVINCE)  # completes 1.2
    d13 = day_for("1.3")
    if rng.random() < 0.93:
        story.send(
            _d(d13 - dt.timedelta(days=25)), code, {"kind": "request_review", "review_kind": "tender_pre_review"}
        )
        story.decide_review(_d(d13 - dt.timedelta(days=21)), code, "tender_pre_review", Role.CITY)
    story.send(
        _d(d13 - dt.timedelta(days=20)),
        code,
        {"kind": "report_progress", "milestone_id": "1.3", "percent": 60, "steps_done": ["tender_published"]},
    )
    story.complete(_d(d13), code, "1.3")
    d21 = day_for("2.1")
    if rng.random() < 0.03:  # wrong evidence: the city retracts the completion, reported again later
        wrong = story.complete(_d(d21 - dt.timedelta(days=10)), code, "2.1")
        story.send(
            _d(d21 - dt.timedelta(days=6)),
            code,
            {"kind": "retract_submission", "retracted_submission_id": wrong, "reason": "佐证材料有误"},
            role=Role.CITY,
        )
    story.complete(_d(d21), code, "2.1")
    story.complete(_d(day_for("2.2")), code, "2.2")
    story.complete(_d(day_for("2.3")), code, "2.3")
    d31 = day_for("3.1")
    if rng.random() < 0.97:
        story.send(_d(d31), code, {"kind": "start_trial_operation", "started_on": _d(d31)})  # completes 3.1
    d32 = max(day_for("3.2"), d31 + dt.timedelta(days=200))
    if d32 <= END:
        story.send(_d(d32 - dt.timedelta(days=20)), code, {"kind": "request_review", "review_kind": "self_acceptance"})
        story.send(_d(d32 - dt.timedelta(days=15)), code, {"kind": "request_review", "review_kind": "pre_acceptance"})
        story.decide_review(_d(d32), code, "pre_acceptance", Role.PROVINCE)  # completes 3.2
        d33 = max(day_for("3.3"), d32 + dt.timedelta(days=30))
        if d33 <= END and rng.random() < 0.95:
            story.send(
                _d(d33 - dt.timedelta(days=12)), code, {"kind": "request_review", "review_kind": "formal_acceptance"}
            )
            story.decide_review(_d(d33), code, "formal_acceptance", Role.PROVINCE)  # completes 3.3
    for period in p.reporting_periods():
        due = p.progress_table_due(period)
        r = rng.random()
        if r < 0.04:
            continue  # never filed
        filed = due + dt.timedelta(days=rng.randint(1, 20)) if r < 0.14 else due - dt.timedelta(days=rng.randint(0, 3))
        story.file_table(_d(min(filed, END)), code, period)


def bulk_events(
    programme: Programme, judge: Judge, code: str, skeleton: list[EventEnvelope], n: int, rng: random.Random
) -> list[EventEnvelope]:
    """``n`` more events for a county: progress reports on the milestone in hand (no steps, so
    they break no procedure rule), and the city's confirmation of some proposed 通报批评."""
    completed: dict[str, dt.date] = {}
    for e in skeleton:
        if event_type_of(e.payload) == "milestone_completed":
            completed.setdefault(e.payload.milestone_id, e.payload.completed_on)
    order = sorted(programme.milestones, key=lambda m: m.deadline)
    out: list[EventEnvelope] = []
    county_actor = Actor(role="county", county_code=code, user="county-user")
    city_actor = Actor(role="city", user="city-user")
    for m in order:  # confirmations of the default policy's 通报批评 for late milestones
        done = completed.get(m.id)
        deadline = judge.deadline(judge.current, m.deadline)
        due = judge.calendar.add_workdays(deadline, 5)
        if (done is None or done > due) and rng.random() < 0.5 and due + dt.timedelta(days=3) <= END:
            action_id = f"{programme.id}:{code}:{STRICT_LEVEL}:{m.id}:{deadline.isoformat()}"
            sid = f"{code}-op-{m.id}"
            when = at(due + dt.timedelta(days=3), 16)
            out.append(
                _envelope(
                    programme, code, sid, when, city_actor, ActionConfirmed(action_id=action_id, operator="市督查局")
                )
            )
    span = (END - START).days
    days = sorted(START + dt.timedelta(days=rng.randint(0, span)) for _ in range(max(0, n - len(out))))
    percent: dict[str, int] = {}
    for k, day in enumerate(days):
        current = next((m for m in order if completed.get(m.id, dt.date.max) > day), None)
        if current is None:
            current = order[-1]
        pct = percent[current.id] = min(99, percent.get(current.id, 0) + rng.randint(0, 3))
        sid = f"{code}-p{k:06d}"
        when = at(day, rng.randint(8, 20), rng.randint(0, 59))
        payload = ProgressReported(milestone_id=current.id, percent=pct, note="按计划推进")
        out.append(_envelope(programme, code, sid, when, county_actor, payload))
    return out


def _envelope(
    programme: Programme, code: str, sid: str, when: dt.datetime, actor: Actor, payload: Any
) -> EventEnvelope:
    return stored_envelope(
        payload, programme_id=programme.id, county_code=code, submission_id=sid, at=when, actor=actor
    )


def build_histories(
    programme: Programme, judge: Judge, events: int, seed: int
) -> tuple[dict[str, list[tuple[int, EventEnvelope]]], dict[str, Any]]:
    """Valid histories of all units totalling ``events`` (± the skeleton's share when small)."""
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    story = Story(programme)
    rngs = {c.code: random.Random(seed * 7_919 + i) for i, c in enumerate(programme.counties)}
    for c in programme.counties:
        script_county(story, c.code, rngs[c.code])
    skeletons = story.histories  # played through the real decision
    stats["decided_s"] = time.perf_counter() - t0
    skeleton_events = sum(len(h) for h in skeletons.values())
    stats["decided_events"] = skeleton_events
    t1 = time.perf_counter()
    units = len(programme.counties)
    extra_total = max(0, events - skeleton_events)
    base, rest = divmod(extra_total, units)
    merged: dict[str, list[EventEnvelope]] = {}
    for i, c in enumerate(programme.counties):
        skeleton = [e for _, e in skeletons[c.code]]
        extra = bulk_events(programme, judge, c.code, skeleton, base + (1 if i < rest else 0), rngs[c.code])
        merged[c.code] = sorted(skeleton + extra, key=lambda e: e.recorded_at)  # stable: decisions keep order
    stats["bulk_s"] = time.perf_counter() - t1
    # Round trip through the stored form: every event must decode as a stored event does.
    t2 = time.perf_counter()
    histories: dict[str, list[tuple[int, EventEnvelope]]] = {}
    seq, nbytes = 0, 0
    types: Counter[str] = Counter()
    for c in programme.counties:
        out = histories[c.code] = []
        for e in merged[c.code]:
            data = encode_event(e)
            nbytes += len(data)
            seq += 1
            decoded = decode_event(data)
            types[decoded.event_type] += 1
            out.append((seq, decoded))
    stats["roundtrip_s"] = time.perf_counter() - t2
    stats["events"] = seq
    stats["bytes"] = nbytes
    stats["types"] = dict(types.most_common())
    del merged, skeletons, story
    return histories, stats


def fold_check(programme: Programme, histories: dict[str, list[tuple[int, EventEnvelope]]]) -> dict[str, Any]:
    t = time.perf_counter()
    completed = extended = findings = tables = 0
    for code, history in histories.items():
        f = fold(programme, code, history)
        completed += sum(1 for m in f.milestones.values() if m.completed_on)
        extended += sum(1 for m in f.milestones.values() if m.extended_deadline)
        findings += len(f.findings)
        tables += len(f.progress_tables)
    units = len(histories)
    return {
        "fold_s": time.perf_counter() - t,
        "milestones_completed_share": completed / (units * len(programme.milestones)),
        "extensions_granted": extended,
        "findings": findings,
        "tables_filed_share": tables / (units * len(programme.reporting_periods())),
    }


def replay_floor(programme: Programme, histories: dict[str, list[tuple[int, EventEnvelope]]]) -> tuple[float, float]:
    """(events folded day by day as replay does, with no judging; the bare county × day loop)."""
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(programme.programme.timezone)
    t = time.perf_counter()
    for county in programme.counties:
        by_day: dict[dt.date, list[tuple[int, EventEnvelope]]] = {}
        for seq, envelope in sorted(histories.get(county.code, ()), key=lambda item: item[0]):
            by_day.setdefault(envelope.recorded_at.astimezone(zone).date(), []).append((seq, envelope))
        facts = new_facts(programme, county.code)
        early = [item for day, items in by_day.items() if day < START for item in items]
        for seq, envelope in early:
            apply(programme, facts, seq, envelope)
        day = START
        while day <= END:
            for seq, envelope in by_day.get(day, ()):
                if not apply(programme, facts, seq, envelope):
                    facts = fold(programme, county.code, [h for h in histories[county.code] if h[0] <= seq])
            day += dt.timedelta(days=1)
    folded = time.perf_counter() - t
    t = time.perf_counter()
    n = 0
    for _county in programme.counties:
        day = START
        while day <= END:
            n += 1
            day += dt.timedelta(days=1)
    return folded, time.perf_counter() - t


def probe_replay(args: argparse.Namespace, calendar: WorkdayCalendar, policy: Policy) -> float:
    """Seconds the two full-size replays would take, from one replay over ~1% of the units."""
    units = min(args.units, max(20, args.units // 100))
    small = synthetic_programme(units)
    histories, _ = build_histories(
        small, make_judge(small, policy, calendar), args.events * units // args.units, args.seed
    )
    t = time.perf_counter()
    replay(make_judge(small, policy, calendar), histories, START, END)
    return 2 * (time.perf_counter() - t) * args.units / units


def bench_replay(
    programme: Programme, calendar: WorkdayCalendar, policy: Policy, events: int, seed: int
) -> dict[str, Any]:
    units = len(programme.counties)
    judge_a, judge_b = make_judge(programme, policy, calendar), make_judge(programme, stricter(policy), calendar)
    rss_before = rss_now()
    reset_peak_rss()
    histories, gen = build_histories(programme, judge_a, events, seed)
    n = gen["events"]
    log(
        f"histories: {n} events for {units} units (decided {gen['decided_s']:.1f} s, bulk {gen['bulk_s']:.1f} s, "
        f"round trip {gen['roundtrip_s']:.1f} s)"
    )
    check = fold_check(programme, histories)
    folded_s, loop_s = replay_floor(programme, histories)
    rss_histories = rss_now()
    reset_peak_rss()
    gc.collect()
    t = time.perf_counter()
    before = replay(judge_a, histories, START, END)
    t_a = time.perf_counter() - t
    t = time.perf_counter()
    after = replay(judge_b, histories, START, END)
    t_b = time.perf_counter() - t
    t = time.perf_counter()
    what = compare(before, after)
    t_c = time.perf_counter() - t
    total = t_a + t_b + t_c
    peak = peak_rss()
    days = (END - START).days + 1
    result = {
        "units": units,
        "events": n,
        "events_per_unit": n / units,
        "days": days,
        "unit_days": units * days,
        "generation": gen,
        "fold_check": check,
        "baseline_fold_day_by_day_s": folded_s,
        "baseline_loop_s": loop_s,
        "replay_a_s": t_a,
        "replay_b_s": t_b,
        "compare_s": t_c,
        "total_s": total,
        "events_per_s": 2 * n / (t_a + t_b),  # two replays each fold every event
        "ratio_to_fold_floor": (t_a + t_b) / (2 * folded_s),
        "per_unit_day_us": (t_a + t_b) / (2 * units * days) * 1e6,
        "actions_a": len(before),
        "actions_b": len(after),
        "actions_by_level_a": dict(Counter(r.action.level_id for r in before).most_common()),
        "added": len(what.added),
        "removed": len(what.removed),
        "moved": len(what.moved),
        "moved_by_level": dict(Counter(b.action.level_id for b, _ in what.moved).most_common()),
        "rss_before_mib": mib(rss_before),
        "rss_with_histories_mib": mib(rss_histories),
        "peak_rss_mib": mib(peak),
        "peak_rss_source": PEAK_SOURCE,
    }
    log(
        f"replay {n} events / {units} units: A {t_a:.1f} s, B {t_b:.1f} s, compare {t_c:.2f} s; "
        f"{len(before)} → {len(after)} actions, moved {len(what.moved)}, added {len(what.added)}, "
        f"removed {len(what.removed)}; peak RSS {mib(peak):.0f} MiB"
    )
    del histories, before, after, what
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------

PEAK_SOURCE = "VmHWM (reset via /proc/self/clear_refs)"


def _vm(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_now() -> int:
    return _vm("VmRSS")


def reset_peak_rss() -> None:
    global PEAK_SOURCE
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        PEAK_SOURCE = "getrusage ru_maxrss (process lifetime)"


def peak_rss() -> int:
    hwm = _vm("VmHWM")
    return hwm or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mib(n: float) -> float:
    return n / (1 << 20)


# ------------------------------------------------------------------------------------------
# profiling (optional)
# ------------------------------------------------------------------------------------------


def profile(
    directory: Path,
    programme: Programme,
    judge: Judge,
    calendar: WorkdayCalendar,
    policy: Policy,
    seed: int,
    today: dt.date,
) -> dict[str, str]:
    try:
        from pyinstrument import Profiler
    except ImportError:
        log("--profile: pyinstrument is not installed (.venv/bin/pip install pyinstrument); skipped")
        return {}
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    facts, _ = tick_facts(programme, today, seed)
    settle(judge, facts, today, seed)
    profiler = Profiler(interval=0.0005)
    profiler.start()
    for _ in range(3):
        for f in facts.values():
            due_actions(judge, f, today)
    profiler.stop()
    path = directory / "steady-tick.txt"
    path.write_text(profiler.output_text(unicode=True, color=False, show_all=False))
    written["steady_tick"] = str(path)
    empty = {c.code: new_facts(programme, c.code) for c in programme.counties}
    profiler = Profiler(interval=0.0005)
    profiler.start()
    for f in empty.values():
        due_actions(judge, f, today)
    profiler.stop()
    path = directory / "worst-cold-tick.txt"
    path.write_text(profiler.output_text(unicode=True, color=False, show_all=False))
    written["worst_cold_tick"] = str(path)
    small = synthetic_programme(max(20, len(programme.counties) // 20))
    histories, _ = build_histories(small, make_judge(small, policy, calendar), 352 * len(small.counties), seed)
    profiler = Profiler(interval=0.0005)
    profiler.start()
    replay(make_judge(small, policy, calendar), histories, START, END)
    profiler.stop()
    path = directory / "replay.txt"
    path.write_text(profiler.output_text(unicode=True, color=False, show_all=False))
    written["replay"] = str(path)
    return written


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def render(r: dict[str, Any]) -> str:
    lines = [f"Escalation benchmark {r['date']} — {r['machine']}", ""]
    t = r.get("tick")
    if t:
        lines.extend(_render_tick(t))
    return _render_replay(r, lines)


def _render_tick(t: dict[str, Any]) -> list[str]:
    lines = []
    lines.append(
        f"1. Tick: {t['units']} units × {t['milestones']} milestones (median of {t['early']['cold']['runs']} runs)"
    )
    lines.append(f"   {'case':<26}{'min s':>9}{'median s':>10}{'ticks/s':>9}{'actions':>9}{'× floor':>9}")
    for label in ("early", "today", "worst"):
        c = t[label]
        floor = c["floor"]
        lines.append(f"   [{label}: {TICK_CASES[label]}]")
        lines.append(
            f"   {'floor ' + c['day']:<26}{floor['min_s']:>9.4f}{floor['median_s']:>10.4f}"
            f"{floor['ticks_per_s']:>9.0f}{c['open_milestones']:>9}{1:>9.0f}"
        )
        for kind in ("cold", "steady"):
            k = c[kind]
            lines.append(
                f"   {kind + ' ' + c['day']:<26}{k['min_s']:>9.3f}{k['median_s']:>10.3f}{k['ticks_per_s']:>9.2f}"
                f"{k['actions']:>9}{k['ratio_to_floor']:>9.0f}"
            )
        lines.append(
            f"     (steady: {c['steady']['on_record']} actions on record, {c['per_unit_steady_us']:.0f} µs per unit; "
            f"goal < {GOAL_TICK_SECONDS:.0f} s: {'met' if c['goal_met'] else 'NOT met'})"
        )
    lines.append("")
    return lines


def _render_replay(r: dict[str, Any], lines: list[str]) -> str:
    lines.append(
        f"2. What-if replay {START}..{END}, default policy vs {STRICT_LEVEL} at {STRICT_WORKDAYS} working days"
    )
    lines.append(
        f"   {'events':>9}{'units':>7}{'gen s':>8}{'fold s':>8}{'A s':>8}{'B s':>8}{'cmp s':>7}{'total s':>9}"
        f"{'events/s':>10}{'µs/unit-day':>12}{'× fold':>8}{'peak MiB':>9}{'moved':>7}{'added':>7}"
    )
    for rp in r["replay"]["runs"]:
        gen = rp["generation"]
        lines.append(
            f"   {rp['events']:>9}{rp['units']:>7}{gen['decided_s'] + gen['bulk_s'] + gen['roundtrip_s']:>8.1f}"
            f"{rp['baseline_fold_day_by_day_s']:>8.2f}{rp['replay_a_s']:>8.1f}{rp['replay_b_s']:>8.1f}{rp['compare_s']:>7.2f}"
            f"{rp['total_s']:>9.1f}{rp['events_per_s']:>10.0f}{rp['per_unit_day_us']:>12.1f}{rp['ratio_to_fold_floor']:>8.1f}"
            f"{rp['peak_rss_mib']:>9.0f}{rp['moved']:>7}{rp['added']:>7}"
        )
    ex = r["replay"].get("extrapolated")
    if ex:
        lines.append(
            f"   full size ({ex['events']} events, {ex['units']} units) extrapolated: ~{ex['total_s']:.0f} s "
            f"(~{ex['total_s'] / 60:.1f} min) — {ex['why']}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, default=2844)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5, help="runs per tick case")
    ap.add_argument("--seed", type=int, default=2017)
    ap.add_argument("--today", type=dt.date.fromisoformat, default=dt.date.today())
    ap.add_argument("--replay-budget", type=float, default=300.0, help="seconds the full replay may take")
    ap.add_argument(
        "--scaled", default="100000,300000", help="event counts to measure when the full replay is too slow"
    )
    ap.add_argument("--force-full", action="store_true")
    ap.add_argument("--skip-tick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", type=Path, help="directory for pyinstrument profiles")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    calendar = WorkdayCalendar.official()
    policy = load_default_policy()
    programme = synthetic_programme(args.units)
    judge = make_judge(programme, policy, calendar)
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}",
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    if not args.skip_tick:
        result["tick"] = bench_tick(programme, judge, args.today, args.repeats, args.seed)
    predicted = probe_replay(args, calendar, policy)
    log(f"full replay predicted from a probe on a slice of the units: ~{predicted:.0f} s")
    runs = []
    if args.force_full or predicted <= args.replay_budget:
        runs.append(bench_replay(programme, calendar, policy, args.events, args.seed))
        result["replay"] = {"runs": runs, "predicted_full_s": predicted}
    else:
        per_unit_events = args.events / args.units
        for n in (int(x) for x in args.scaled.split(",")):
            units = max(1, round(n / per_unit_events))
            runs.append(bench_replay(synthetic_programme(units), calendar, policy, n, args.seed))
        # Linear in unit-days (events per unit fixed): fit time = a + b × units over the runs.
        if len(runs) >= 2:
            (u1, s1), (u2, s2) = (runs[0]["units"], runs[0]["total_s"]), (runs[-1]["units"], runs[-1]["total_s"])
            slope = (s2 - s1) / (u2 - u1)
            full = s1 + slope * (args.units - u1)
        else:
            full = runs[0]["total_s"] * args.units / runs[0]["units"]
        rss = runs[-1]["peak_rss_mib"] * args.units / runs[-1]["units"]
        result["replay"] = {
            "runs": runs,
            "predicted_full_s": predicted,
            "extrapolated": {
                "events": args.events,
                "units": args.units,
                "total_s": full,
                "peak_rss_mib_linear": rss,
                "why": "replay judges every unit on every day: cost ∝ units × days, events are a small share",
            },
        }
    if args.profile:
        result["profiles"] = profile(args.profile, programme, judge, calendar, policy, args.seed, args.today)
    text = json.dumps(result, indent=1, ensure_ascii=False, default=str)
    if args.json:
        args.json.write_text(text)
    print(render(result))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
