"""The embedded nats-server and PostgreSQL, against real processes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StorageType, StreamConfig

from services.common.embedded import (
    MIN_NATS_VERSION,
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedServerError,
    NatsClusterConfig,
    find_nats_server,
    free_port,
    nats_server_version,
)

pytestmark = pytest.mark.integration

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


async def _connect(url: str) -> NATS:
    nc: NATS = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    return nc


async def _publish_n(url: str, stream: str, n: int) -> list[int]:
    nc = await _connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"], storage=StorageType.FILE))
        seqs = []
        for i in range(n):
            ack = await js.publish(f"{stream}.x", f"m{i}".encode())
            seqs.append(ack.seq)
        return seqs
    finally:
        await nc.close()


async def _read_all(url: str, stream: str) -> list[bytes]:
    nc = await _connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        return [
            (await js.get_msg(stream, seq)).data or b"" for seq in range(info.state.first_seq, info.state.last_seq + 1)
        ]
    finally:
        await nc.close()


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _owner(pid: int) -> tuple[list[str], list[str], str]:
    """(real/effective/saved/fs uids, supplementary groups, ps user name) of a process."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
    groups = next(line for line in status if line.startswith("Groups:")).split()[1:]
    user = subprocess.run(
        ["ps", "-o", "user=", "-p", str(pid)], capture_output=True, text=True, check=True
    ).stdout.strip()
    return uids, groups, user


# ---------------------------------------------------------------------------------------------
# NATS
# ---------------------------------------------------------------------------------------------


def test_binary_is_the_wheels_and_current() -> None:
    binary = find_nats_server()
    assert binary != Path("/usr/sbin/nats-server")
    assert nats_server_version(binary) >= MIN_NATS_VERSION


async def test_jetstream_roundtrip(nats_url: str) -> None:
    nc = await _connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="EMB_RT", subjects=["emb.rt.>"], storage=StorageType.FILE))
        ack = await js.publish("emb.rt.a", b"hello", headers={"Nats-Msg-Id": "rt-1"})
        assert ack.stream == "EMB_RT" and ack.seq >= 1
        dup = await js.publish("emb.rt.a", b"hello", headers={"Nats-Msg-Id": "rt-1"})
        assert dup.duplicate and dup.seq == ack.seq
        msg = await js.get_msg("EMB_RT", ack.seq)
        assert msg.data == b"hello" and msg.subject == "emb.rt.a"
        info = await js.stream_info("EMB_RT")
        assert info.config.storage == StorageType.FILE
    finally:
        await nc.close()


async def test_server_syncs_always(nats_server: EmbeddedNats) -> None:
    assert "sync_interval: always" in nats_server.config_path.read_text()
    varz = await nats_server.monitor("varz")
    assert varz["jetstream"]["config"]["sync_always"] is True
    assert varz["jetstream"]["config"]["store_dir"].startswith(str(nats_server.store_dir))
    assert varz["max_payload"] == nats_server.max_payload
    assert varz["version"] >= "2.12.3"  # fine for 2.1x.y; the binary test checks properly
    assert varz["host"] == "127.0.0.1"


async def test_payload_above_max_is_refused(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path, max_payload=4096) as server:
        nc = await _connect(server.url)
        try:
            assert nc.max_payload == 4096
            await nc.publish("big", b"x" * 4096)  # at the limit: fine
            with pytest.raises(nats.errors.MaxPayloadError):
                await nc.publish("big", b"x" * 4097)
        finally:
            await nc.close()

        # The server itself refuses it too (a client that does not check).
        def raw_publish() -> bytes:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.recv(4096)  # INFO
                s.sendall(b'CONNECT {"verbose":false}\r\nPUB big 5000\r\n' + b"x" * 5000 + b"\r\n")
                return s.recv(4096)

        answer = await asyncio.to_thread(raw_publish)
        assert b"-ERR" in answer and b"Maximum Payload" in answer


async def test_restart_keeps_stored_messages(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path)
    async with server:
        seqs = await _publish_n(server.url, "KEEP", 20)
        url, port = server.url, server.port
        await server.restart()
        assert (server.url, server.port) == (url, port)
        assert await _read_all(server.url, "KEEP") == [f"m{i}".encode() for i in range(20)]
        assert seqs == list(range(1, 21))


async def test_kill_then_restart_keeps_acked_messages(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path)
    async with server:
        await _publish_n(server.url, "CRASH", 50)
        pid = server.pid
        await server.kill()
        assert not server.running
        assert pid is not None and not _alive(pid)
        await server.start()
        assert await _read_all(server.url, "CRASH") == [f"m{i}".encode() for i in range(50)]


async def test_extra_config_and_env_reach_the_server(tmp_path: Path) -> None:
    extra = """
accounts {
  APP { jetstream: enabled, users: [ { user: app, password: $APP_PASS } ] }
}
no_auth_user: ""
"""
    async with EmbeddedNats(tmp_path, extra_config=extra, env={"APP_PASS": "s3cret"}) as server:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(
                server.url,
                user="app",
                password="wrong",
                allow_reconnect=False,
                connect_timeout=2,
                max_reconnect_attempts=0,
            )
        nc = await nats.connect(server.url, user="app", password="s3cret", allow_reconnect=False, connect_timeout=5)
        try:
            await nc.jetstream().add_stream(name="AUTH", subjects=["auth.>"])
        finally:
            await nc.close()


async def test_bad_config_fails_with_log_tail(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path, extra_config="this is { not valid", startup_timeout=10)
    with pytest.raises(EmbeddedServerError) as err:
        await server.start()
    assert "log tail" in str(err.value)
    assert not server.running


async def test_port_in_use_fails_clearly(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path / "a") as first:
        second = EmbeddedNats(tmp_path / "b", port=first.port, startup_timeout=10)
        with pytest.raises(EmbeddedServerError) as err:
            await second.start()
        assert "address already in use" in str(err.value)


async def test_three_node_cluster(tmp_path: Path) -> None:
    route_ports = [free_port() for _ in range(3)]
    routes = [NatsClusterConfig.route_url(p) for p in route_ports]
    nodes = [
        EmbeddedNats(
            tmp_path / f"n{i}",
            server_name=f"n{i}",
            cluster=NatsClusterConfig(port=route_ports[i], routes=routes),
        )
        for i in range(3)
    ]
    await asyncio.gather(*(n.start() for n in nodes))
    try:
        nc = await _connect(nodes[0].url)
        try:
            js = nc.jetstream(timeout=1.0)  # requests before the meta leader go unanswered
            deadline = time.monotonic() + 30
            while True:  # until the meta leader is elected
                try:
                    await js.add_stream(StreamConfig(name="R3", subjects=["r3.>"], num_replicas=3))
                    break
                except (nats.js.errors.Error, nats.errors.TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            # A stream's own leader and peers come after its creation is acknowledged; under load
            # that takes a moment, so wait for them (bounded) instead of asserting at once.
            ack = None
            while ack is None:
                try:
                    ack = await js.publish("r3.a", b"replicated", headers={"Nats-Msg-Id": "r3-1"})
                except (nats.js.errors.Error, nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            while True:
                info = await js.stream_info("R3")
                if (info.cluster is not None and len(info.cluster.replicas or []) == 2) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert info.cluster is not None
            assert len(info.cluster.replicas or []) == 2
            assert ack.seq == 1
        finally:
            await nc.close()
        routez = await nodes[1].monitor("routez")
        assert routez["num_routes"] >= 2
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))


# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------


@pytest.fixture
async def own_postgres(tmp_path: Path) -> AsyncIterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(tmp_path / "pg")
    try:
        await pg.start()
        yield pg
    finally:
        await pg.destroy()


async def test_postgres_accepts_connections(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT current_database()") == "duban"
        assert await conn.fetchval("SHOW server_encoding") == "UTF8"
        assert await conn.fetchval("SELECT '督办'::text") == "督办"
    finally:
        await conn.close()


async def test_fresh_database_is_isolated(fresh_database: str, database_url: str) -> None:
    conn = await asyncpg.connect(fresh_database)
    try:
        name = await conn.fetchval("SELECT current_database()")
        assert name.startswith("t_")
        await conn.execute("CREATE TABLE only_here (x int)")
    finally:
        await conn.close()
    other = await asyncpg.connect(database_url)
    try:
        assert await other.fetchval("SELECT to_regclass('only_here')") is None
    finally:
        await other.close()


async def test_postgres_survives_restart_and_kill(own_postgres: EmbeddedPostgres) -> None:
    pg = own_postgres
    conn = await asyncpg.connect(pg.dsn)
    await conn.execute("CREATE TABLE kept (id int PRIMARY KEY, v text)")
    await conn.execute("INSERT INTO kept VALUES (1, 'before restart')")
    await conn.close()

    await pg.restart()
    conn = await asyncpg.connect(pg.dsn)
    assert await conn.fetchval("SELECT v FROM kept WHERE id = 1") == "before restart"
    await conn.execute("INSERT INTO kept VALUES (2, 'before kill')")
    await conn.close()

    pid = pg.pid
    await pg.kill()
    assert pid is not None and not _alive(pid)
    await pg.start()  # crash recovery
    conn = await asyncpg.connect(pg.dsn)
    try:
        rows = await conn.fetch("SELECT id, v FROM kept ORDER BY id")
        assert [(r["id"], r["v"]) for r in rows] == [(1, "before restart"), (2, "before kill")]
    finally:
        await conn.close()


async def test_postgres_listens_on_loopback_only(own_postgres: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(own_postgres.dsn)
    try:
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SHOW unix_socket_directories") == ""
        assert await conn.fetchval("SHOW fsync") == "on"  # durable by default
    finally:
        await conn.close()


@pytest.mark.skipif(not IS_ROOT, reason="only meaningful when the tests run as root")
async def test_postgres_does_not_run_as_root(own_postgres: EmbeddedPostgres) -> None:
    pid = own_postgres.pid
    assert pid is not None
    uids, groups, user = _owner(pid)
    assert "0" not in uids
    assert "0" not in groups  # root's supplementary groups are dropped
    assert user != "root"
    assert own_postgres.run_as is not None and user == own_postgres.run_as.name
    st = own_postgres.pgdata.stat()
    assert st.st_uid == own_postgres.run_as.uid and st.st_mode & 0o777 == 0o700


@pytest.mark.skipif(not IS_ROOT, reason="only meaningful when the tests run as root")
async def test_unreachable_data_dir_is_relocated_without_loosening(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    before = locked.stat().st_mode
    pg = EmbeddedPostgres(locked / "pg")
    try:
        await pg.start()
        assert pg.relocated
        assert str(pg.pgdata).startswith("/var/tmp/duban-pg/")
        assert (pg.data_dir / "RELOCATED.txt").exists()
        assert locked.stat().st_mode == before
    finally:
        await pg.destroy()
    assert not pg.data_dir.joinpath("RELOCATED.txt").exists()


@pytest.mark.skipif(not IS_ROOT, reason="only meaningful when the tests run as root")
async def test_unknown_run_as_user_is_a_clear_error(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path, run_as="no-such-user-duban")
    with pytest.raises(EmbeddedServerError, match="does not exist"):
        await pg.start()
