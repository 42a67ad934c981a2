"""A three-node NATS cluster on loopback for the fault tests (each test module its own)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import Error as JsError

from services.common.embedded import EmbeddedNats, NatsClusterConfig, free_port
from tests.faults.procs import tail

NODES = 3


async def wait_for_jetstream(urls: list[str], timeout: float = 30.0) -> None:
    """Until the cluster can place a stream on every node. JetStream requests go unanswered
    before the meta leader is elected, and for a moment after it a stream replicated on every
    node is refused "no suitable peers for placement, peer offline" (seen in CI)."""
    nc = await nats.connect(urls, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=1.0)
        deadline = time.monotonic() + timeout
        while True:
            try:
                await js.add_stream(PROBE)
                await js.delete_stream(PROBE.name or "")
                return
            except (JsError, NatsError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


PROBE = StreamConfig(
    name="DUBAN_PLACEMENT_PROBE", subjects=["duban.placement.probe"], num_replicas=NODES, storage=StorageType.MEMORY
)


@asynccontextmanager
async def loopback_cluster(root: Path, name: str) -> AsyncIterator[list[EmbeddedNats]]:
    route_ports = [free_port() for _ in range(NODES)]
    routes = [NatsClusterConfig.route_url(p) for p in route_ports]
    nodes = [
        EmbeddedNats(
            root / f"n{i}",
            server_name=f"n{i}",
            cluster=NatsClusterConfig(port=route_ports[i], routes=routes, name=name),
        )
        for i in range(NODES)
    ]
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        await wait_for_jetstream([n.url for n in nodes])
        yield nodes
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


def describe(nodes: list[EmbeddedNats]) -> str:
    return "\n".join(f"--- {n.server_name} log (running: {n.running}) ---\n{tail(n.log_path, 12)}" for n in nodes)


def on_cluster(nodes: list[EmbeddedNats]) -> dict[str, Any]:
    """A scenario's arguments for services on the cluster: its URLs, streams at R3, its logs."""
    return {
        "nats_urls": [n.url for n in nodes],
        "extra_env": {"DUBAN_STREAM_REPLICAS": str(NODES)},
        "describe_infra": lambda: describe(nodes),
    }
