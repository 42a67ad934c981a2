"""The fault suite's process harness: every service in its own OS process, as it is deployed.

Each service runs as ``duban up --services <name>`` (the ``duban`` script beside
``sys.executable``) with its own environment: the test's NATS URL(s) and database, its own state
directory, its own ops port (``/readyz`` says when it serves), no HTTP gateway, JSON logs into a
file per process. The notifier sends e-mail to an SMTP server running in the test
(:class:`SmtpRecorder`, counting every message id it receives) and SMS to the file channel
``<state>/sms.jsonl``.

A process is started, killed (SIGKILL: a crash), terminated (SIGTERM: must exit 0 within a
bound) and restarted; its log's tail goes into assertion messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiosmtpd.controller import Controller

from services.common.embedded import free_port
from services.common.signing import new_seed
from services.common.supervisor import SERVICES

REPO = Path(__file__).resolve().parents[2]
DUBAN = Path(sys.executable).parent / "duban"  # the venv's script, not whatever is on PATH
READY_TIMEOUT = 60.0
TERMINATE_TIMEOUT = 20.0


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file (for assertion messages)."""
    try:
        data = path.read_bytes()[-64 * 1024 :]
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class ServiceFailed(AssertionError):
    """A service process did not start, did not become ready, or did not stop cleanly."""


@dataclass
class ServiceProcess:
    """One service in its own OS process."""

    name: str
    env: dict[str, str]
    state_dir: Path
    log_path: Path
    ops_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        """The log's last lines, and before them its last warnings and errors (what matters)."""
        text = tail(self.log_path, 100_000)
        problems = [
            line[:600] for line in text.splitlines() if '"level": "warning"' in line or '"level": "error"' in line
        ][-8:]
        last = "\n".join(line[:600] for line in text.splitlines()[-lines:])
        return (
            f"--- {self.name} log ({self.log_path}): last warnings and errors ---\n"
            + "\n".join(problems)
            + f"\n--- {self.name}: last {lines} lines ---\n{last}"
        )

    def _command(self) -> list[str]:
        return [str(DUBAN), "up", "--services", self.name]

    async def start(self, ready_timeout: float = READY_TIMEOUT) -> None:
        """Spawn the process and wait (bounded) until its ``/readyz`` answers 200."""
        if self.running:
            raise ServiceFailed(f"{self.name} is already running")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **self.env,
            "DUBAN_STATE_DIR": str(self.state_dir),
            "DUBAN_OPS_ADDR": f"127.0.0.1:{self.ops_port}",
            "DUBAN_HTTP_ADDR": "",
            "DUBAN_LOG_FORMAT": "json",
        }
        self.proc = await asyncio.to_thread(self._spawn, env)
        self.starts += 1
        await self.wait_ready(ready_timeout)

    def _spawn(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            log.write(f"\n==== test harness: start #{self.starts + 1} of {self.name} at {time.ctime()} ====\n".encode())
            log.flush()
            return subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                start_new_session=True,  # our signals only, never the terminal's
            )

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    code = None if self.proc is None else self.proc.returncode
                    raise ServiceFailed(f"{self.name} exited (code {code}) before it was ready\n{self.tail()}")
                try:
                    answer = await client.get(f"{self.ops_url}/readyz")
                    if answer.status_code == 200:
                        return
                    last = f"{answer.status_code} {answer.text.strip()}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() > deadline:
                    raise ServiceFailed(f"{self.name} not ready after {timeout:g} s ({last})\n{self.tail()}")
                await asyncio.sleep(0.1)

    async def ready(self) -> bool:
        """Does ``/readyz`` answer 200 right now?"""
        try:
            async with httpx.AsyncClient(timeout=1.0) as client:
                return (await client.get(f"{self.ops_url}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def _wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.02)
        return self.proc.returncode

    async def kill(self) -> None:
        """SIGKILL: a crash, nothing finished, nothing committed that was not already."""
        if not self.running:
            raise ServiceFailed(f"{self.name} is not running; nothing to kill\n{self.tail()}")
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        if await self._wait_exit(10.0) is None:
            raise ServiceFailed(f"{self.name} (pid {self.proc.pid}) survived SIGKILL for 10 s")
        self.kills += 1

    async def terminate(self, timeout: float = TERMINATE_TIMEOUT) -> None:
        """SIGTERM; the process must exit 0 within ``timeout`` seconds (else it is killed and the
        test fails)."""
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ServiceFailed(f"{self.name} was not running when asked to stop (exit {code})\n{self.tail()}")
        self.proc.send_signal(signal.SIGTERM)
        code = await self._wait_exit(timeout)
        if code is None:
            self.proc.send_signal(signal.SIGKILL)
            await self._wait_exit(10.0)
            raise ServiceFailed(f"{self.name} did not exit within {timeout:g} s of SIGTERM\n{self.tail()}")
        if code != 0:
            raise ServiceFailed(f"{self.name} exited {code} after SIGTERM, not 0\n{self.tail()}")

    async def restart(self, ready_timeout: float = READY_TIMEOUT) -> None:
        if self.running:
            await self.terminate()
        await self.start(ready_timeout)

    def ensure_dead(self) -> None:
        """Clean-up: SIGKILL whatever is left of this process (never raises)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)


# ---------------------------------------------------------------------------------------------
# the SMTP server the notifier sends to
# ---------------------------------------------------------------------------------------------


class SmtpRecorder:
    """An SMTP server (aiosmtpd, security none) counting every message it receives by our message
    id (``X-Duban-Message-Id``, else ``Message-ID``)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        message_id = str(parsed.get("X-Duban-Message-Id") or parsed.get("Message-ID") or "")
        with self._lock:
            self.received[message_id] += 1
        return "250 OK"

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self.received)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()


def sms_file_counts(path: Path) -> Counter[str]:
    """How often each message id is in the file channel's ``sms.jsonl``."""
    counts: Counter[str] = Counter()
    if not path.exists():
        return counts
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("message_id"), str):
                counts[record["message_id"]] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# the four services
# ---------------------------------------------------------------------------------------------


class Services:
    """The four services, one process each, on the given NATS server(s) and database."""

    def __init__(
        self,
        root: Path,
        *,
        nats_urls: Sequence[str],
        database_url: str,
        smtp_port: int,
        extra_env: Mapping[str, str] | None = None,
        names: Sequence[str] = SERVICES,
    ) -> None:
        self.root = root
        # One signing key for every instance, as deployed (deploy/README.md): the record verifies
        # against it after the faults.
        self.signing_key_file = root / "signing.nk"
        if not self.signing_key_file.exists():
            self.signing_key_file.write_bytes(new_seed())
        common = {
            "NATS_URL": ",".join(nats_urls),
            "DATABASE_URL": database_url,
            "DUBAN_SIGNING_KEY_FILE": str(self.signing_key_file),
            **(extra_env or {}),
        }
        notifier_env = {
            "DUBAN_SMTP_HOST": "127.0.0.1",
            "DUBAN_SMTP_PORT": str(smtp_port),
            "DUBAN_SMTP_SECURITY": "none",
            "DUBAN_SMTP_SENDER": "duban@example.org",
            "DUBAN_NOTIFY_CHANNELS": "file,email",
        }
        self.by_name: dict[str, ServiceProcess] = {
            name: ServiceProcess(
                name,
                {**common, **(notifier_env if name == "notifier" else {})},
                state_dir=root / "state" / name,
                log_path=root / f"{name}.log",
            )
            for name in names
        }

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.by_name[name]

    def __iter__(self) -> Any:
        return iter(self.by_name.values())

    @property
    def sms_file(self) -> Path:
        return self.by_name["notifier"].state_dir / "sms.jsonl"

    async def start(self) -> None:
        # Submissions first: it declares the streams the others would otherwise race to declare.
        first = [p for p in self if p.name == "submissions"]
        for process in first:
            await process.start()
        await asyncio.gather(*(p.start() for p in self if p not in first))

    async def all_ready(self) -> bool:
        return all(await asyncio.gather(*(p.ready() for p in self)))

    async def wait_all_ready(self, timeout: float = READY_TIMEOUT) -> None:
        await asyncio.gather(*(p.wait_ready(timeout) for p in self))

    async def terminate(self) -> None:
        """SIGTERM every process; each must exit 0 in time (the first failure is raised)."""
        results = await asyncio.gather(*(p.terminate() for p in self if p.running), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def ensure_dead(self) -> None:
        for process in self:
            process.ensure_dead()

    def tails(self, lines: int = 8) -> str:
        return "\n".join(p.tail(lines) for p in self)
