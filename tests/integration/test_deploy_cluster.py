"""The cluster configuration `duban deploy nats-config --cluster 3` writes forms a real cluster.

Three nats-servers started with ``nats-server -c <node>.conf`` from the generated files (on
loopback, on free ports given to the generator) elect a JetStream meta leader; the services'
own ``ensure_streams(js, 3)`` creates the streams at R3, each with a leader and two current
replicas; routes authenticate; a password kept in the reloadable passwords file is rotated by
``--signal reload`` (SIGHUP) without a restart. The committed ``deploy/nats-cluster`` files
pass ``nats-server -t`` with their variables set, and not with the example's placeholders.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError

from contracts.programme import load_default_programme
from contracts.subjects import EVENTS_STREAM, REFUSALS_STREAM, aggregate_subject
from services.common.embedded import find_nats_server, free_port
from services.common.jetstream import ensure_streams
from services.common.natsauth import (
    CLUSTER_ENV_EXAMPLE,
    ROUTE_PASSWORD_ENV,
    ClusterLayout,
    ClusterNode,
    cluster_layout,
    ensure_generated_passwords,
    new_password,
    password_env_var,
    users_for,
    write_cluster_files,
)

pytestmark = pytest.mark.integration

DEPLOY_CLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "nats-cluster"
PASSWORDS_FILE = "passwords.conf"
ROTATED_USER = "county-410928"  # its password lives in the reloadable file, not the environment
WAIT = 20.0  # seconds: the bound of every wait here (the whole file runs in about 8 s)
T = TypeVar("T")


def _clean_environ() -> dict[str, str]:
    """This process's environment without a developer's own duban NATS variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DUBAN_NATS_")}


@dataclass
class Cluster:
    layout: ClusterLayout
    conf_dir: Path
    env: dict[str, str]  # every variable the nodes read from the environment
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in self.logs)

    async def connect(self, user: str, password: str, node: ClusterNode | None = None) -> NatsClient:
        """Connect to any node, or to ``node`` alone."""
        return await nats.connect(
            [node.client_url] if node else self.layout.nats_url.split(","),
            user=user,
            password=password,
            allow_reconnect=False,
            connect_timeout=2,
            max_reconnect_attempts=0,
        )


def _routes(monitor_port: int) -> int:
    """How many other nodes this node has routes to (its monitoring /routez)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/routez", timeout=1) as answer:
        routez = json.load(answer)
    return len({r.get("remote_name") for r in routez.get("routes", [])})


async def _eventually(probe: Callable[[], Awaitable[T | None]], what: str, cluster: Cluster) -> T:
    deadline = time.monotonic() + WAIT
    last: BaseException | None = None
    while time.monotonic() < deadline:
        for proc in cluster.procs:
            if proc.poll() is not None:
                pytest.fail(f"a node exited ({proc.returncode}) while waiting for {what}:\n{cluster.log_tails()}")
        try:
            result = await probe()
        except (NatsError, OSError, TimeoutError) as exc:
            last, result = exc, None
        if result is not None:
            return result
        await asyncio.sleep(0.1)
    pytest.fail(f"no {what} within {WAIT} s (last error: {last!r}):\n{cluster.log_tails()}")


def _start_node(conf: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``nats-server -c <node>.conf``, as an operator starts it, with the node's environment."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(find_nats_server()), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**_clean_environ(), **env},
            start_new_session=True,
        )


@pytest_asyncio.fixture(loop_scope="session")
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    programme = load_default_programme()
    ports = [free_port() for _ in range(9)]
    layout = cluster_layout(
        3,
        hosts=["127.0.0.1"] * 3,
        client_port=ports[0:3],
        cluster_port=ports[3:6],
        monitor_port=ports[6:9],
        listen_host="127.0.0.1",
        store_dir=str(tmp_path / "store" / "{name}"),
    )
    conf_dir = tmp_path / "conf"
    written = write_cluster_files(conf_dir, [programme], layout, passwords_file=PASSWORDS_FILE)
    assert {p.name for p in written} == {"auth.conf", "nats-1.conf", "nats-2.conf", "nats-3.conf", CLUSTER_ENV_EXAMPLE}

    env = ensure_generated_passwords(users_for([programme]), tmp_path / "secrets", environ={})
    rotated_var = password_env_var(ROTATED_USER)
    (conf_dir / PASSWORDS_FILE).write_text(f'{rotated_var}: "{env.pop(rotated_var)}"\n', encoding="utf-8")
    route_password = new_password()
    env[ROUTE_PASSWORD_ENV] = route_password
    for node in layout.nodes:
        env[node.route_url_env] = node.route_url(route_password)

    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"{node.name}.log" for node in layout.nodes]
    try:
        for node, log in zip(layout.nodes, logs, strict=True):
            procs.append(_start_node(conf_dir / node.config_name, log, env))
        yield Cluster(layout, conf_dir, env, procs, logs)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


async def test_generated_configs_form_a_cluster_with_streams_at_r3(cluster: Cluster) -> None:
    monitor_ports = [n.monitor_port for n in cluster.layout.nodes]

    async def all_routed() -> bool | None:
        return True if all(_routes(port) == 2 for port in monitor_ports) else None

    await _eventually(all_routed, "full mesh of routes", cluster)

    ops = await _eventually(
        lambda: cluster.connect("ops", cluster.env[password_env_var("ops")]), "connection as ops", cluster
    )
    try:
        js = ops.jetstream(timeout=5)

        async def streams_created() -> bool | None:
            await ensure_streams(js, replicas=3)  # the services' own call (DUBAN_STREAM_REPLICAS=3)
            return True

        await _eventually(streams_created, "streams created at R3 (JetStream meta leader elected)", cluster)
        ack = await js.publish(aggregate_subject("puyang-2017-13", "410928"), b"{}", headers={"Nats-Msg-Id": "t-1"})
        assert ack.stream == EVENTS_STREAM and ack.seq == 1

        for stream in (EVENTS_STREAM, REFUSALS_STREAM):

            async def replicated(stream: str = stream) -> bool | None:
                info = await js.stream_info(stream)
                assert info.config.num_replicas == 3
                state = info.cluster
                if state is None or not state.leader or not state.replicas or len(state.replicas) != 2:
                    return None
                return True if all(r.current for r in state.replicas) else None

            await _eventually(replicated, f"{stream}: a leader and 2 current replicas", cluster)

        info = await js.stream_info(EVENTS_STREAM)
        assert info.cluster is not None and info.cluster.name == cluster.layout.name
        names = {info.cluster.leader, *(r.name for r in info.cluster.replicas or [])}
        assert names == {n.name for n in cluster.layout.nodes}
        assert info.state.messages == 1
    finally:
        await ops.close()


async def test_routes_must_authenticate(cluster: Cluster) -> None:
    """A route that does not give the route user's password is refused (no bypass of auth.conf)."""
    node = cluster.layout.nodes[0]

    async def refused() -> bytes | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.cluster_port)
        try:
            assert (await asyncio.wait_for(reader.readline(), 2)).startswith(b"INFO ")
            writer.write(b'CONNECT {"verbose":false,"pedantic":false,"name":"intruder","cluster":"duban"}\r\nPING\r\n')
            await writer.drain()
            return await asyncio.wait_for(reader.readline(), 2)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    answer = await _eventually(refused, "an answer on the route port", cluster)
    assert b"Authorization Violation" in answer, answer


async def test_password_in_the_passwords_file_rotates_on_reload(cluster: Cluster) -> None:
    """`nats-server --signal reload` (SIGHUP) re-reads the passwords file: the new password works
    on every node at once, the old one is refused; no node restarts."""
    passwords = cluster.conf_dir / PASSWORDS_FILE
    var = password_env_var(ROTATED_USER)
    old = passwords.read_text(encoding="utf-8").split('"')[1]
    # Every node serving before the signal: a node still starting has no handler for it yet,
    # and SIGHUP's default action ends it.
    for node in cluster.layout.nodes:
        county = await _eventually(
            lambda node=node: cluster.connect(ROTATED_USER, old, node),
            f"connection as the county to {node.name}",
            cluster,
        )
        await county.close()

    new = new_password()
    passwords.write_text(f'{var}: "{new}"\n', encoding="utf-8")
    pids = [proc.pid for proc in cluster.procs]
    for pid in pids:
        os.kill(pid, signal.SIGHUP)  # what `nats-server --signal reload=<pid>` sends

    for node in cluster.layout.nodes:  # each node on its own

        async def old_refused(node: ClusterNode = node) -> bool | None:
            try:
                nc = await cluster.connect(ROTATED_USER, old, node)
            except NatsError as exc:
                assert "authorization violation" in str(exc).lower()
                return True
            await nc.close()
            return None

        await _eventually(old_refused, f"the old password refused on {node.name}", cluster)
        nc = await cluster.connect(ROTATED_USER, new, node)
        await nc.close()
    assert [proc.pid for proc in cluster.procs] == pids and all(p.poll() is None for p in cluster.procs)


def _check(conf: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(find_nats_server()), "-c", str(conf), "-t"],
        env={**_clean_environ(), **env},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


def _example_env() -> Iterator[tuple[str, str]]:
    for line in (DEPLOY_CLUSTER / CLUSTER_ENV_EXAMPLE).read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            yield name, value


def test_committed_cluster_configs_are_valid_with_their_variables(tmp_path: Path) -> None:
    example = dict(_example_env())
    env = {name: new_password() for name in example}
    for node in cluster_layout().nodes:  # the committed files are the default layout
        assert node.route_url_env in example
        env[node.route_url_env] = node.route_url(env[ROUTE_PASSWORD_ENV])
    for conf in sorted(DEPLOY_CLUSTER.glob("nats-*.conf")):
        ok = _check(conf, env)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        # The example as shipped (placeholders) stops the server: nothing runs with a missing password.
        placeholders = _check(conf, example)
        assert placeholders.returncode != 0
        assert "DUBAN_NATS_" in placeholders.stdout + placeholders.stderr
