"""Infrastructure fixtures: the project's own nats-server and PostgreSQL for the test session.

- ``nats_url`` / ``database_url``: use these in tests. They come from the environment
  (``DUBAN_TEST_NATS_URL``, ``DUBAN_TEST_DATABASE_URL``) when set, otherwise from servers this
  session starts itself (``nats_server``, ``postgres``) on free loopback ports in tmp dirs.
- ``fresh_database``: a new, uniquely named database per test (dropped afterwards); yields its DSN.

Servers are started lazily: a run that needs neither starts neither. The session PostgreSQL runs
with ``durable=False`` (fsync off: a killed process loses nothing, only an OS crash would); tests
about durability start their own instances.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from services.common.embedded import EmbeddedNats, EmbeddedPostgres

NATS_URL_ENV = "DUBAN_TEST_NATS_URL"
DATABASE_URL_ENV = "DUBAN_TEST_DATABASE_URL"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """The session's own nats-server (JetStream, file store, sync_interval always)."""
    if os.environ.get(NATS_URL_ENV):
        pytest.skip(f"{NATS_URL_ENV} is set: tests use that server, not an embedded one")
    async with EmbeddedNats(tmp_path_factory.mktemp("nats"), server_name="duban-test") as server:
        yield server


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def postgres(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedPostgres]:
    """The session's own PostgreSQL (superuser ``duban``, database ``duban``)."""
    if os.environ.get(DATABASE_URL_ENV):
        pytest.skip(f"{DATABASE_URL_ENV} is set: tests use that database, not an embedded one")
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("postgres"), durable=False)
    try:
        await pg.start()
        yield pg
    finally:
        await pg.destroy()  # also removes a cluster relocated out of pytest's 0700 tmp dir


@pytest.fixture(scope="session")
def nats_url(request: pytest.FixtureRequest) -> str:
    """URL of the NATS server for tests: ``$DUBAN_TEST_NATS_URL`` or the embedded one."""
    url = os.environ.get(NATS_URL_ENV)
    if url:
        return url
    server: EmbeddedNats = request.getfixturevalue("nats_server")
    return server.url


@pytest.fixture(scope="session")
def database_url(request: pytest.FixtureRequest) -> str:
    """DSN of a database the tests may use: ``$DUBAN_TEST_DATABASE_URL`` or the embedded one."""
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        return url
    pg: EmbeddedPostgres = request.getfixturevalue("postgres")
    return pg.dsn


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_database(database_url: str) -> AsyncIterator[str]:
    """A new empty database for one test; yields its DSN and drops it afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(database_url)
    try:
        # template0: never "source database is being accessed by other users"
        await admin.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'")
    finally:
        await admin.close()
    try:
        yield _with_database(database_url, name)
    finally:
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
def fresh_database_sync(database_url: str) -> Iterator[str]:
    """Like ``fresh_database``, for synchronous tests (e.g. hypothesis) that run their own loops."""
    import asyncio

    name = f"t_{uuid.uuid4().hex[:16]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}" TEMPLATE template0'))
    try:
        yield _with_database(database_url, name)
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
