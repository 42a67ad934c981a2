"""A three-node NATS cluster on loopback, the event streams at R3 (``DUBAN_STREAM_REPLICAS=3``),
the services given all three URLs: the DUBAN_EVENTS stream's leader node is killed under county
load and brought back. Nothing lost, nothing stored twice, the services carry on by themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from nats.errors import Error as NatsError
from nats.js.errors import Error as JsError

from contracts.subjects import EVENTS_STREAM
from services.common.embedded import EmbeddedNats
from tests.faults.cluster import NODES, loopback_cluster, on_cluster
from tests.faults.report import FaultReport, Profile
from tests.faults.scenario import Scenario, time_bound

pytestmark = [pytest.mark.integration, pytest.mark.timeout(time_bound(300))]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[list[EmbeddedNats]]:
    async with loopback_cluster(tmp_path_factory.mktemp("faults-cluster"), "duban-faults") as nodes:
        yield nodes


async def _stream_leader(sc: Scenario, timeout: float = 30.0, not_: str | None = None) -> str:
    """The server name of DUBAN_EVENTS' leader (another than ``not_``), once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = await sc.nc.jetstream(timeout=2.0).stream_info(EVENTS_STREAM)
            leader = info.cluster.leader if info.cluster else None
            if leader and leader != not_:
                return leader
        except (JsError, NatsError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"DUBAN_EVENTS has no leader (other than {not_}) after {timeout:g} s\n{sc.describe()}")
        await asyncio.sleep(0.2)


async def _replicas_current(sc: Scenario, timeout: float = 60.0) -> None:
    """Until all three replicas of DUBAN_EVENTS are current again."""
    deadline = time.monotonic() + timeout
    state = "no answer"
    while True:
        try:
            info = await sc.nc.jetstream(timeout=2.0).stream_info(EVENTS_STREAM)
            replicas = (info.cluster.replicas or []) if info.cluster else []
            state = ", ".join(f"{r.name} current={r.current} offline={r.offline}" for r in replicas)
            leader = info.cluster.leader if info.cluster else None
            if leader and len(replicas) == NODES - 1 and all(r.current and not r.offline for r in replicas):
                return
        except (JsError, NatsError, TimeoutError) as exc:
            state = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise AssertionError(f"DUBAN_EVENTS replicas not current after {timeout:g} s: {state}\n{sc.describe()}")
        await asyncio.sleep(0.2)


async def test_stream_leader_killed_under_load(
    cluster: list[EmbeddedNats], fresh_database: str, tmp_path: Path, profile: Profile, fault_report: FaultReport
) -> None:
    async with Scenario(
        tmp_path, database_url=fresh_database, profile=profile, report=fault_report, **on_cluster(cluster)
    ) as sc:
        await sc.start()
        info = await sc.js.stream_info(EVENTS_STREAM)
        assert info.config.num_replicas == NODES, f"DUBAN_EVENTS has {info.config.num_replicas} replicas"
        await sc.phase()

        leader = await _stream_leader(sc)
        node = next(n for n in cluster if n.server_name == leader)
        await node.kill()
        sc.injected("kill -9 DUBAN_EVENTS leader node")
        new_leader = await _stream_leader(sc, not_=leader)
        await sc.phase()  # the load goes on with one node down

        await node.start()
        sc.injected("start the killed node again")
        await _replicas_current(sc)
        await sc.phase()
        await sc.finish()
        for process in sc.services:
            assert process.starts == 1, f"{process.name} had to be restarted\n{sc.describe()}"
        print(f"DUBAN_EVENTS leader {leader} killed; {new_leader} took over")
