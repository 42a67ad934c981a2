"""Run the notifier: follow issued actions, keep the outbox, send, and record every outcome.

Channels come from the environment (credentials too, or from secret files; never logged):
- ``DUBAN_NOTIFY_CHANNELS``: which to use, e.g. ``sms,email`` (default ``file,email`` when no SMS
  provider is configured: the demo's SMS file ``<state>/sms.jsonl``);
- e-mail: ``DUBAN_SMTP_HOST``, ``DUBAN_SMTP_PORT``, ``DUBAN_SMTP_SECURITY`` (starttls|tls|none),
  ``DUBAN_SMTP_USER``, ``DUBAN_SMTP_PASSWORD`` (or ``DUBAN_SMTP_PASSWORD_FILE``), ``DUBAN_SMTP_SENDER``;
- SMS: ``DUBAN_SMS_PROVIDER`` (aliyun|tencent), with ``DUBAN_ALIYUN_ACCESS_KEY_ID``,
  ``DUBAN_ALIYUN_ACCESS_KEY_SECRET``, ``DUBAN_SMS_SIGN_NAME`` or ``DUBAN_TENCENT_SECRET_ID``,
  ``DUBAN_TENCENT_SECRET_KEY``, ``DUBAN_TENCENT_SDK_APP_ID``; ``DUBAN_SMS_TEMPLATES`` as
  ``level=code,level=code``;
- ``DUBAN_DIRECTORY``: the directory file (default: the shipped example, which reaches nobody).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Coroutine, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import structlog
from nats.js import JetStreamContext

from contracts.directory import Directory, example_directory_path, load_directory
from contracts.escalation import OpsError
from contracts.notifier import (
    AUDIT_SUBJECT,
    NOTIFIER_SERVICE,
    PARKED_SUBJECT,
    REPLAY_PARKED_SUBJECT,
    STATUS_SUBJECT,
    StatusQuery,
)
from contracts.replies import ParkedList
from contracts.subjects import ACTIONS_ALL, EVENTS_STREAM
from services.common.clock import Clock
from services.common.consumer import follow
from services.common.jetstream import ensure_streams
from services.common.leader import Leadership
from services.common.micro import json_endpoint, start_micro
from services.common.postgres import TRANSIENT_ERRORS, create_pool
from services.common.runtime import Runtime
from services.notifier import outbox
from services.notifier.audit import audit_outbox
from services.notifier.channels.base import Channel, Secret
from services.notifier.channels.file import FileChannel
from services.notifier.channels.smtp import SmtpChannel
from services.notifier.delivery import NotifierSettings
from services.notifier.service import Notifier

SERVICE_USER = "svc-notifier"
DURABLE = "notifier"
log = structlog.get_logger(__name__)


def _secret(env: Mapping[str, str], name: str) -> Secret:
    if env.get(f"{name}_FILE"):
        return Secret.from_file(env[f"{name}_FILE"])
    return Secret.from_env(name, environ=env)


def channels_from_env(state_dir: Path, env: Mapping[str, str] | None = None) -> dict[str, Channel]:
    env = dict(os.environ if env is None else env)
    channels: dict[str, Channel] = {"file": FileChannel(state_dir / "sms.jsonl")}
    if env.get("DUBAN_SMTP_HOST"):
        channels["email"] = SmtpChannel(
            env["DUBAN_SMTP_HOST"],
            int(env.get("DUBAN_SMTP_PORT", "587")),
            username=env.get("DUBAN_SMTP_USER") or None,
            password=_secret(env, "DUBAN_SMTP_PASSWORD") if env.get("DUBAN_SMTP_USER") else None,
            security=env.get("DUBAN_SMTP_SECURITY", "starttls"),  # type: ignore[arg-type]
            sender=env.get("DUBAN_SMTP_SENDER", "duban@localhost"),
        )
    provider = env.get("DUBAN_SMS_PROVIDER")
    if provider == "aliyun":
        from services.notifier.channels.aliyun import AliyunSmsChannel

        channels["sms"] = AliyunSmsChannel(
            env["DUBAN_ALIYUN_ACCESS_KEY_ID"],
            _secret(env, "DUBAN_ALIYUN_ACCESS_KEY_SECRET"),
            env["DUBAN_SMS_SIGN_NAME"],
        )
    elif provider == "tencent":
        from services.notifier.channels.tencent import TencentSmsChannel

        channels["sms"] = TencentSmsChannel(
            env["DUBAN_TENCENT_SECRET_ID"],
            _secret(env, "DUBAN_TENCENT_SECRET_KEY"),
            env["DUBAN_TENCENT_SDK_APP_ID"],
            env["DUBAN_SMS_SIGN_NAME"],
        )
    return channels


def settings_from_env(channels: Mapping[str, Channel], env: Mapping[str, str] | None = None) -> NotifierSettings:
    env = dict(os.environ if env is None else env)
    default = ("sms" if "sms" in channels else "file", *(["email"] if "email" in channels else []))
    chosen = tuple(c for c in env.get("DUBAN_NOTIFY_CHANNELS", ",".join(default)).split(",") if c)
    templates = dict(item.split("=", 1) for item in env.get("DUBAN_SMS_TEMPLATES", "").split(",") if "=" in item)
    return NotifierSettings(channels=chosen, sms_templates=templates)  # type: ignore[arg-type]


def directory_from_env(runtime: Runtime) -> Directory:
    path = os.environ.get("DUBAN_DIRECTORY") or str(example_directory_path())
    programme = next(iter(runtime.programmes.values()))
    return load_directory(path, programme)


async def consume(js: JetStreamContext, notifier: Notifier, stop: asyncio.Event) -> None:
    """Issued actions → outbox rows, in one transaction with the checkpoint; ack after commit."""
    await follow(
        js,
        name=DURABLE,
        stream=EVENTS_STREAM,
        subject=ACTIONS_ALL,
        checkpoint=notifier.checkpoint,
        apply=notifier.apply_batch,
        stop=stop,
        batch_size=500,
        transient=TRANSIENT_ERRORS,
        park=notifier.park,
    )


async def _parked(notifier: Notifier) -> ParkedList:
    return ParkedList(items=tuple(await notifier.parked()))


async def send_forever(
    notifier: Notifier, stop: asyncio.Event, interval: float = 0.5, receipts_every: float = 30.0
) -> None:
    loop = asyncio.get_running_loop()
    next_receipts = loop.time()
    while not stop.is_set():
        try:
            handled = await notifier.work_once()
            if loop.time() >= next_receipts:
                await notifier.pull_receipts()
                next_receipts = loop.time() + receipts_every
            await notifier.publish_events()
        except Exception:
            log.exception("notifier sender failed; retrying")
            handled = 0
        if not handled:
            # Idle: wait for new outbox rows (the consumer wakes us) or for rows falling due.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(stop.wait(), notifier.work_arrived.wait()), interval)
            notifier.work_arrived.clear()


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def run(
    runtime: Runtime,
    clock: Clock,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    *,
    channels: dict[str, Channel] | None = None,
    directory: Directory | None = None,
    settings: NotifierSettings | None = None,
) -> None:
    """Channels, directory and settings come from the environment unless given (the demo's are its own)."""
    if runtime.database_url is None:
        raise RuntimeError("the notifier needs PostgreSQL: set DATABASE_URL or let duban start its own")
    pool = await create_pool(runtime.database_url)
    nc = await runtime.connect_as(SERVICE_USER)
    channels = channels if channels is not None else channels_from_env(runtime.settings.state_dir)
    try:
        async with pool.acquire() as conn:
            await outbox.migrate(conn)
        js = nc.jetstream()
        await ensure_streams(js, runtime.settings.stream_replicas)
        settings = settings or settings_from_env(channels)
        notifier = Notifier(
            pool, js, channels, directory or directory_from_env(runtime), settings, runtime.programmes, clock
        )

        async def lead(until: asyncio.Event) -> None:
            await asyncio.gather(consume(js, notifier, until), send_forever(notifier, until))

        # One instance at a time plans and sends (the others stand by and answer ops).
        leadership = Leadership(js, "notifier", replicas=runtime.settings.stream_replicas)
        tasks = [asyncio.create_task(leadership.run(stop, lead))]
        micro = await start_micro(
            nc,
            name=NOTIFIER_SERVICE,
            version=version("duban"),
            description="duban notifier: SMS and e-mail to the responsible people, once in effect",
            endpoints=[
                json_endpoint("status", STATUS_SUBJECT, StatusQuery, lambda _: notifier.status(), OpsError),
                json_endpoint("parked", PARKED_SUBJECT, StatusQuery, lambda _: _parked(notifier), OpsError),
                json_endpoint("audit", AUDIT_SUBJECT, StatusQuery, lambda _: audit_outbox(pool, js), OpsError),
                json_endpoint(
                    "replay-parked", REPLAY_PARKED_SUBJECT, StatusQuery, lambda _: notifier.replay_parked(), OpsError
                ),
            ],
        )
        log.info("notifier serving", channels=list(settings.channels))
        if ready is not None:
            ready.set()
        await stop.wait()
        await micro.stop()
        await asyncio.gather(*tasks)
    finally:
        for channel in channels.values():
            with contextlib.suppress(Exception):
                await channel.aclose()
        with contextlib.suppress(Exception):
            await nc.drain()
        await pool.close()
        log.info("notifier stopped")
