"""Run escalation: follow the event stream, judge counties on their events and on every tick,
record actions, and answer the operators' subjects (a NATS micro service)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from importlib.metadata import version
from typing import Any

import structlog
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from contracts.escalation import (
    ACTIONS_SUBJECT,
    AUDIT_CHECKPOINT_SUBJECT,
    CONFIRM_SUBJECT,
    ESCALATION_SERVICE,
    PARKED_SUBJECT,
    STATUS_SUBJECT,
    TICK_SUBJECT,
    WAIVE_SUBJECT,
    WHY_SUBJECT,
    ActionList,
    ActionsQuery,
    CheckpointList,
    ConfirmAction,
    EscalationStatus,
    OpsError,
    TickReport,
    WaiveAction,
    WhyQuery,
)
from contracts.events import decode_event
from contracts.replies import ParkedList, StatusQuery
from contracts.subjects import EVENTS_ALL, EVENTS_STREAM
from services.common import metrics
from services.common.clock import Clock
from services.common.jetstream import ensure_streams
from services.common.leader import Leadership, either
from services.common.micro import MicroService, json_endpoint, start_micro
from services.common.runtime import Runtime, load_policy_and_calendar
from services.common.signing import load_signer
from services.escalation.checkpoints import Checkpointer, checkpoint_forever
from services.escalation.ladder import Judge
from services.escalation.service import EscalationService, OpsFailure

SERVICE_USER = "svc-escalation"
log = structlog.get_logger(__name__)


async def follow(
    js: JetStreamContext,
    service: EscalationService,
    stop: asyncio.Event,
    caught_up: asyncio.Event,
    checkpointer: Checkpointer | None = None,
) -> None:
    """Fold every stored event in order; once caught up, judge each county as its events arrive.

    A pull consumer without acks: escalation's state is rebuilt from the stream at every start,
    and pulling means a slow judge is never outrun (a push consumer would drop messages).
    The consumer is ephemeral: when it is lost (a NATS restart, its cluster node gone) or
    delivers out of order, reading resumes after the last event handled, never folding one twice.
    """
    position = _Position()
    backlog_end: int | None = None
    delay = 0.5
    while not stop.is_set():
        try:
            if backlog_end is None:
                backlog_end = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
                if backlog_end == 0:
                    caught_up.set()
                    await _judge(service)
            await _follow_from(js, service, stop, caught_up, backlog_end, position, checkpointer)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Without this the task died unseen (readiness stayed 200) and escalation stopped
            # following the stream when a NATS node was lost.
            log.exception("escalation stopped reading the stream; resuming", after=position.last, retry_in=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 10.0)


async def _judge(service: EscalationService, keys: set[tuple[str, str]] | None = None) -> None:
    """Judge now; a failure (NATS unreachable while appending) is logged and the next tick retries."""
    try:
        await service.judge(keys)
    except Exception:
        log.exception("judging failed; the next tick judges again")


class _Position:
    """The last stream sequence escalation has handled (folded in or parked)."""

    last = 0


class _Gap(Exception):
    """The consumer skipped events (delivered and lost with a connection): read again from the gap."""


IDLE_CHECK_SECONDS = 5.0  # how often an idle reader makes sure its consumer still exists


async def _follow_from(
    js: JetStreamContext,
    service: EscalationService,
    stop: asyncio.Event,
    caught_up: asyncio.Event,
    backlog_end: int,
    position: _Position,
    checkpointer: Checkpointer | None,
) -> None:
    sub = await js.pull_subscribe(
        EVENTS_ALL,
        stream=EVENTS_STREAM,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=position.last + 1,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60,
        ),
    )
    loop = asyncio.get_running_loop()
    idle_since = loop.time()
    try:
        while not stop.is_set():
            try:
                messages = await sub.fetch(1000, timeout=0.5)
            except (NatsTimeoutError, TimeoutError):
                if loop.time() - idle_since > IDLE_CHECK_SECONDS:
                    await sub.consumer_info()  # raises when the consumer is gone: subscribe again
                    idle_since = loop.time()
                continue
            idle_since = loop.time()
            touched: set[tuple[str, str]] = set()
            gap: _Gap | None = None
            for msg in messages:
                sequence = msg.metadata.sequence.stream
                if sequence <= position.last:
                    continue  # delivered again after a reconnect: folded in already
                if sequence != position.last + 1:
                    gap = _Gap(f"expected stream sequence {position.last + 1}, got {sequence}")
                    break
                position.last = sequence
                if checkpointer is not None:
                    checkpointer.observe(msg.subject, sequence, msg.headers)
                metrics.EVENTS_APPLIED.labels(consumer="escalation").inc()
                try:
                    key = service.observe(sequence, decode_event(msg.data))
                except Exception as exc:  # not judged on; kept for ops, tried again at the next start
                    service.park(sequence, msg.data, f"{type(exc).__name__}: {exc}")
                    continue
                if key is not None:
                    touched.add(key)
            metrics.CHECKPOINT.labels(consumer="escalation").set(position.last)
            if not caught_up.is_set():
                if position.last >= backlog_end:
                    caught_up.set()
                    await _judge(service)  # everything, once, after the backlog
            elif touched:
                await _judge(service, touched)
            if gap is not None:
                raise gap
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def tick_forever(
    service: EscalationService, stop: asyncio.Event, caught_up: asyncio.Event, seconds: float
) -> None:
    await caught_up.wait()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        if not stop.is_set():
            try:
                await service.judge()
            except Exception:
                log.exception("escalation tick failed; next tick retries")


async def start_service(
    nc: Any,
    service: EscalationService,
    clock: Clock,
    release: str,
    caught_up: asyncio.Event | None = None,
    checkpointer: Checkpointer | None = None,
) -> MicroService:
    js = nc.jetstream()

    async def actions(q: ActionsQuery) -> ActionList:
        return ActionList(items=tuple(service.actions(q.programme_id, q.county_code, q.state)))

    async def why(q: WhyQuery) -> Any:
        return service.view(q.action_id)

    async def tick(_: ActionsQuery) -> TickReport:
        count = await service.judge()
        return TickReport(judged_on=clock.now().date(), counties=len(service.counties()), new_actions=count)

    async def status(_: StatusQuery) -> EscalationStatus:
        last = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
        return EscalationStatus(
            observed_sequence=service.observed_sequence,
            stream_last_sequence=last,
            lag=max(0, last - service.observed_sequence),
            caught_up=caught_up.is_set() if caught_up is not None else True,
            judged_on=clock.now().date(),
            counties=len(service.counties()),
            actions=service.action_counts(),
        )

    async def parked(_: StatusQuery) -> ParkedList:
        return ParkedList(items=tuple(service.parked))

    async def checkpoint(_: StatusQuery) -> CheckpointList:
        if checkpointer is None:
            raise OpsFailure("unavailable", "未启用审计检查点", "audit checkpoints are not enabled here")
        return CheckpointList(items=tuple(await checkpointer.record()))

    return await start_micro(
        nc,
        name=ESCALATION_SERVICE,
        version=release,
        description="duban escalation: the accountability ladder",
        endpoints=[
            json_endpoint("actions", ACTIONS_SUBJECT, ActionsQuery, actions, OpsError),
            json_endpoint("confirm", CONFIRM_SUBJECT, ConfirmAction, service.confirm, OpsError),
            json_endpoint("waive", WAIVE_SUBJECT, WaiveAction, service.waive, OpsError),
            json_endpoint("why", WHY_SUBJECT, WhyQuery, why, OpsError),
            json_endpoint("tick", TICK_SUBJECT, ActionsQuery, tick, OpsError),
            json_endpoint("status", STATUS_SUBJECT, StatusQuery, status, OpsError),
            json_endpoint("parked", PARKED_SUBJECT, StatusQuery, parked, OpsError),
            json_endpoint("checkpoint", AUDIT_CHECKPOINT_SUBJECT, StatusQuery, checkpoint, OpsError),
        ],
    )


async def run(
    runtime: Runtime,
    clock: Clock,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    tick_seconds: float = 60.0,
    checkpoint_seconds: float | None = None,
) -> None:
    nc = await runtime.connect_as(SERVICE_USER)
    try:
        js = nc.jetstream()
        await ensure_streams(js, runtime.settings.stream_replicas)
        policy, calendar = load_policy_and_calendar(runtime.settings)
        judges = {p.id: Judge(p, {policy.version: policy}, policy, calendar) for p in runtime.programmes.values()}
        signer = load_signer(runtime.settings)
        service = EscalationService(js, judges, clock, signer=signer)
        service.active = False  # until elected: a standby folds the stream and judges nothing
        checkpointer = Checkpointer(js, signer, clock)
        if checkpoint_seconds is None:
            checkpoint_seconds = float(os.environ.get("DUBAN_CHECKPOINT_SECONDS", "300"))
        caught_up = asyncio.Event()
        serving = asyncio.Event()  # elected, caught up, and answering the operators
        follower = asyncio.create_task(follow(js, service, stop, caught_up, checkpointer))

        async def lead(until: asyncio.Event) -> None:
            await caught_up.wait()
            service.active = True
            try:
                try:
                    await service.judge()  # whatever fell due while another instance was active
                except Exception:
                    log.exception("judging on election failed; the next tick retries")
                micro = await start_service(nc, service, clock, version("duban"), caught_up, checkpointer)
                serving.set()
                log.info(
                    "escalation serving",
                    policy=policy.version,
                    roll_rest_day_deadlines=policy.roll_rest_day_deadlines,
                    signer=signer.public_key,
                )
                await asyncio.gather(
                    tick_forever(service, until, caught_up, tick_seconds),
                    checkpoint_forever(checkpointer, until, checkpoint_seconds),
                )
                await micro.stop()
            finally:
                serving.clear()
                service.active = False

        # One instance judges and answers the operators; the others fold the stream, standing by.
        leadership = Leadership(js, "escalation", replicas=runtime.settings.stream_replicas)
        leading = asyncio.create_task(leadership.run(stop, lead))
        await either(caught_up, stop)
        waits = [
            asyncio.ensure_future(w) for w in (leadership.active.wait(), leadership.standing_by.wait(), stop.wait())
        ]
        await asyncio.wait([*waits, leading], return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if leading.done():
            leading.result()  # raises what stopped it
        if ready is not None:
            ready.set()
        await stop.wait()
        await asyncio.gather(follower, leading)
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
        log.info("escalation stopped")
