"""Run duban's services side by side in one process: `duban up` and `duban demo` both do.

Each service is a coroutine ``run(runtime, clock, stop, ready)`` that connects as its own NATS
user, sets ``ready`` once it serves and returns after ``stop``, having finished its work in
flight. If one fails, the others are stopped and the failure is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from services.common.clock import Clock
from services.common.opshttp import Readiness, serve_ops
from services.common.runtime import Runtime

ServiceRun = Callable[[Runtime, Clock, asyncio.Event, asyncio.Event | None], Coroutine[Any, Any, None]]
SERVICES = ("submissions", "ledger", "escalation", "notifier")
GATEWAY = "gateway"  # the HTTP gateway for county systems that cannot speak NATS
log = structlog.get_logger(__name__)


def service_runners(names: tuple[str, ...] = SERVICES) -> dict[str, ServiceRun]:
    # Only the services asked for are imported: a process running one does not carry the
    # others' libraries (the gateway's FastAPI and FastStream are ~20 MB of memory).
    known: dict[str, str] = {
        "submissions": "services.submissions.main",
        "ledger": "services.ledger.main",
        "escalation": "services.escalation.main",
        "notifier": "services.notifier.main",
        GATEWAY: "services.gateway.main",
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return {name: importlib.import_module(known[name]).run for name in names}


def settle_heap() -> None:
    """Once serving: collect what starting left behind, then freeze what is alive (modules,
    programmes, wiring: ~50,000 objects) out of the cyclic collector's reach.

    A full collection walks every tracked object, and it stops the event loop while it does:
    the submissions service's took ~25 ms with the startup heap, and were the tail of its
    latency; frozen, they take a few ms (tests/bench/README.md, "Submissions"). Frozen objects
    are still freed by reference counting; only a cycle among them would wait for the stop."""
    gc.collect()
    gc.freeze()


async def run_services(
    runtime: Runtime,
    clock: Clock,
    stop: asyncio.Event,
    services: dict[str, ServiceRun],
    *,
    readiness: Readiness | None = None,
    ops_address: str | None = None,
) -> None:
    """Run ``services`` until ``stop`` is set (or one fails); serve the ops HTTP port if asked."""
    readiness = readiness or Readiness(list(services))
    tasks = {
        name: asyncio.create_task(run(runtime, clock, stop, readiness.event(name)), name=name)
        for name, run in services.items()
    }
    ops = asyncio.create_task(serve_ops(ops_address, readiness, stop)) if ops_address else None
    settle = asyncio.create_task(_settle_once_ready(readiness))
    try:
        done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in done if not t.cancelled() and t.exception() is not None]
        if failed:
            log.error("a service failed; stopping the others", service=failed[0].get_name())
            readiness.stopping()
            stop.set()
            await asyncio.wait(tasks.values(), timeout=15)
            raise failed[0].exception()  # type: ignore[misc]
    finally:
        readiness.stopping()
        stop.set()
        settle.cancel()
        gc.unfreeze()  # a process that runs services again (tests, the demo) frees what it froze
        for task in tasks.values():
            if not task.done():
                task.cancel()
        if ops is not None:
            with contextlib.suppress(Exception):
                await ops


async def _settle_once_ready(readiness: Readiness) -> None:
    await readiness.wait()
    settle_heap()
