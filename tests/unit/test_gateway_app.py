"""The gateway's application without a NATS connection: its FastStream broker not connected (yet,
or any more) means not ready, and a request that would be forwarded answers 503 at once."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import httpx
import pytest
from faststream.nats import NatsBroker

from contracts.commands import Role
from services.gateway.app import Gateway, create_app
from services.gateway.tokens import TokenStore

NOW = dt.datetime(2017, 6, 15, 10, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))


@pytest.mark.parametrize("connection", ["no broker", "not connected"])
async def test_without_a_connection_it_is_not_ready_and_answers_503(tmp_path: Path, connection: str) -> None:
    store = TokenStore(tmp_path / "gateway" / "tokens.json")
    broker = NatsBroker("nats://127.0.0.1:1") if connection == "not connected" else None
    gateway = Gateway(broker, store)
    assert not gateway.connected
    token = store.issue(Role.COUNTY, "410928", "test", NOW)[1]
    auth = {"Authorization": f"Bearer {token}"}
    transport = httpx.ASGITransport(app=create_app(gateway))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"ready": False, "nats": "disconnected"}
        assert (await client.get("/healthz")).status_code == 200
        posted = await client.post("/v1/counties/410928/submissions", content=b"{}", headers=auth)
        assert posted.status_code == 503 and posted.headers["retry-after"]
        assert posted.json()["code"] == "unavailable" and "not connected" in posted.json()["detail"]
        assert (await client.get("/v1/counties/410928", headers=auth)).status_code == 503
