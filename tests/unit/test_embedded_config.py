"""Config generation of the embedded servers: pure functions, no processes."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import pytest

from services.common.embedded import (
    MIN_NATS_VERSION,
    ONE_MIB,
    EmbeddedNats,
    EmbeddedPostgres,
    NatsClusterConfig,
    _nats_candidates,
    free_port,
    render_nats_config,
)


def _render(**kw: object) -> str:
    args: dict[str, object] = {
        "server_name": "n1",
        "port": 4333,
        "monitor_port": 8333,
        "store_dir": Path("/data/nats"),
    }
    args.update(kw)
    return render_nats_config(**args)  # type: ignore[arg-type]


def test_listens_on_loopback_only() -> None:
    text = _render()
    assert 'listen: "127.0.0.1:4333"' in text
    assert 'http: "127.0.0.1:8333"' in text
    assert "0.0.0.0" not in text


def test_jetstream_block_syncs_always() -> None:
    text = _render()
    block = re.search(r"jetstream \{(.*?)\n\}", text, re.S)
    assert block is not None
    assert re.search(r"^\s*sync_interval:\s*always\s*$", block.group(1), re.M)
    assert 'store_dir: "/data/nats"' in block.group(1)


def test_max_payload_default_and_custom() -> None:
    assert f"max_payload: {ONE_MIB}" in _render()
    assert "max_payload: 4096" in _render(max_payload=4096)
    with pytest.raises(ValueError):
        _render(max_payload=0)


def test_server_name_and_paths_are_quoted() -> None:
    text = _render(server_name='we"ird', store_dir=Path('/data/with space/"q"'))
    assert 'server_name: "we\\"ird"' in text
    assert 'store_dir: "/data/with space/\\"q\\""' in text


def test_no_cluster_block_by_default() -> None:
    assert "cluster" not in _render()


def test_cluster_block() -> None:
    routes = [NatsClusterConfig.route_url(p) for p in (6001, 6002, 6003)]
    text = _render(cluster=NatsClusterConfig(port=6001, routes=routes, name="c1"))
    block = re.search(r"cluster \{(.*?)\n\}", text, re.S)
    assert block is not None
    body = block.group(1)
    assert 'name: "c1"' in body
    assert 'listen: "127.0.0.1:6001"' in body
    for port in (6001, 6002, 6003):
        assert f'"nats-route://127.0.0.1:{port}"' in body


def test_extra_config_is_appended_last() -> None:
    extra = "accounts {\n  A { users: [ { user: a, password: $A_PASS } ] }\n}\n"
    text = _render(extra_config=extra)
    assert text.rstrip().endswith(extra.rstrip())
    assert text.index("jetstream {") < text.index("accounts {")
    assert "$A_PASS" in text  # left for the server to resolve from its environment


def test_blank_extra_config_adds_nothing() -> None:
    assert _render(extra_config="  \n") == _render()


def test_embedded_nats_picks_distinct_ports_and_urls(tmp_path: Path) -> None:
    a = EmbeddedNats(tmp_path / "a")
    b = EmbeddedNats(tmp_path / "b")
    assert len({a.port, a.monitor_port, b.port, b.monitor_port}) == 4
    assert a.url == f"nats://127.0.0.1:{a.port}"
    assert a.monitor_url == f"http://127.0.0.1:{a.monitor_port}"
    assert a.log_path.parent == a.store_dir
    assert f'listen: "127.0.0.1:{a.port}"' in a.config_text()


def test_embedded_nats_explicit_port(tmp_path: Path) -> None:
    n = EmbeddedNats(tmp_path, port=14222, server_name="x", max_payload=2048)
    text = n.config_text()
    assert 'listen: "127.0.0.1:14222"' in text
    assert 'server_name: "x"' in text
    assert "max_payload: 2048" in text


def test_free_port_is_bindable_and_unique() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))


def test_nats_candidates_never_search_path() -> None:
    cands = _nats_candidates()
    assert Path(sys.executable).parent / "nats-server" in cands
    assert all(not str(c).startswith(("/usr/sbin", "/usr/bin", "/usr/local/bin")) for c in cands)


def test_min_version() -> None:
    assert MIN_NATS_VERSION == (2, 12, 3)


def test_postgres_dsn(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path, port=15432)
    assert pg.dsn == "postgresql://duban@127.0.0.1:15432/duban"
    assert pg.admin_dsn == "postgresql://duban@127.0.0.1:15432/postgres"
    assert pg.dsn_for("t_1") == "postgresql://duban@127.0.0.1:15432/t_1"
