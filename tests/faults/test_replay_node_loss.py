"""A stream replay (services.common.replay, what a ledger rebuild reads with) survives the loss of
the cluster node it reads from: kill -9 of that node mid-replay, and every event still arrives
once, in order, through the node nats-py reconnects to."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
import structlog
from nats.js.api import StorageType, StreamConfig

from services.common.jetstream import read_all
from services.common.replay import lean_endpoint
from tests.faults.cluster import NODES, describe, loopback_cluster

pytestmark = pytest.mark.integration

STREAM = "T_REPLAY_LOSS"
EVENTS = 30_000


async def test_a_replay_follows_the_client_to_another_node_when_its_node_dies(tmp_path: Path) -> None:
    async with loopback_cluster(tmp_path, "duban-replay") as nodes:
        nc = await nats.connect([n.url for n in nodes], reconnect_time_wait=0.2, max_reconnect_attempts=-1)
        try:
            js = nc.jetstream(timeout=5)
            await js.add_stream(
                StreamConfig(name=STREAM, subjects=["t.loss.>"], num_replicas=NODES, storage=StorageType.FILE)
            )
            sent = []
            for start in range(0, EVENTS, 1000):
                numbers = range(start, start + 1000)
                acks = await asyncio.gather(*[await js.publish_async(f"t.loss.{i % 11}", b"e%d" % i) for i in numbers])
                sent += [(ack.seq, b"e%d" % i) for i, ack in zip(numbers, acks, strict=True)]
            reading = lean_endpoint(nc)
            assert reading is not None
            victim = next(n for n in nodes if n.url.endswith(f":{reading.port}"))

            got: list[tuple[int, bytes]] = []
            with structlog.testing.capture_logs() as logs:
                async for batch in read_all(js, STREAM, "t.loss.>", batch_size=500):
                    if not got:
                        await victim.kill()  # the node both connections are on
                    got += batch
                    await asyncio.sleep(0.005)  # a reader with work to do: the kill lands mid-replay
            assert got == sent, describe(nodes)
            restarts = [e for e in logs if e["event"] == "stream replay restarts"]
            assert restarts, "the replay never lost its node"
            after = lean_endpoint(nc)
            assert after is not None and after.port != reading.port
        finally:
            await nc.close()
