"""Two instances of every service at once, as deployed: nothing done twice, nothing stalls when one dies.

A three-node NATS cluster on loopback (streams and the ``duban_leaders`` bucket at R3), one fresh
database, and two processes each of submissions, ledger, escalation and notifier, every one with
its own state directory and ops port, under county load:

1. both submissions instances answer submissions (a queue group): each one's ``/metrics`` counts
   some ``duban_submissions_total``;
2. ledger, escalation and notifier each have exactly one active instance: the lease in
   ``duban_leaders`` names it, the other logged "standing by" and has done none of the work
   (no events applied, no action recorded, no notification sent);
3. the active instance of each of the three, and one submissions instance, are killed (-9) at
   once; under the load that goes on, each standby holds the lease within 2 × the TTL and the
   work carries on; the killed instances come back and stand by;
4. the suite's invariants (tests/faults/checks.py): every accepted submission stored once, the
   ledger equal to its rebuild, each action recorded once, each e-mail received at most
   1 + (notifier kills) times, each SMS once; nobody stepped down from a lease it still held.

The SMS "phone" (the file channel's ``sms.jsonl``) is one, shared by both notifier instances
(notifier-2's is a symlink to notifier-1's), as an SMS provider is shared by both in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import pytest_asyncio
from nats.errors import Error as NatsError
from nats.js.errors import Error as JsError
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from prometheus_client.parser import text_string_to_metric_families

from contracts.subjects import EVENTS_STREAM
from services.common.embedded import EmbeddedNats
from services.common.leader import DEFAULT_TTL, LEADERS_BUCKET
from services.common.supervisor import SERVICES
from tests.faults.cluster import NODES, loopback_cluster, on_cluster
from tests.faults.load import CountyClient
from tests.faults.procs import DUBAN, ServiceProcess, Services
from tests.faults.report import FaultReport, Profile
from tests.faults.scenario import Scenario, time_bound

pytestmark = [pytest.mark.integration, pytest.mark.timeout(time_bound(240))]

SINGLE_ACTIVE = ("ledger", "escalation", "notifier")  # one active instance each, the other on standby
TAKEOVER_BOUND = 2 * DEFAULT_TTL  # the lease expires within a TTL; the standby asks every TTL / 3
ELECTED = "elected: this instance is active"
STANDING_BY = "standing by: another instance is active"
LEASE_LOST = "lease lost: standing by"
START_MARK = b"==== test harness: start"
# The work only an active instance does, by its metric (family name, labels that must match).
WORK_METRICS: dict[str, tuple[str, dict[str, str]]] = {
    "ledger": ("duban_events_applied", {"consumer": "ledger"}),
    "escalation": ("duban_actions", {}),
    "notifier": ("duban_notifications", {}),
}


# ---------------------------------------------------------------------------------------------
# the cluster
# ---------------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[list[EmbeddedNats]]:
    async with loopback_cluster(tmp_path_factory.mktemp("faults-twins-cluster"), "duban-twins") as nodes:
        yield nodes


# ---------------------------------------------------------------------------------------------
# two processes per service
# ---------------------------------------------------------------------------------------------


@dataclass
class Instance(ServiceProcess):
    """One of the two processes of ``service``; ``name`` tells them apart (``ledger-2``)."""

    service: str = ""

    def _command(self) -> list[str]:
        return [str(DUBAN), "up", "--services", self.service]

    def records(self, event: str, *, all_starts: bool = False) -> list[dict[str, Any]]:
        """This process's JSON log records whose event is ``event`` (since its last start, unless
        ``all_starts``)."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return []
        if not all_starts and START_MARK in data:
            data = data[data.rindex(START_MARK) :]
        found = []
        for line in data.splitlines():
            if event.encode() not in line:
                continue
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    found.append(record)
        return found

    def lease_id(self) -> str | None:
        """The id its Leadership goes by (logged when elected or standing by), since its last start."""
        for event in (ELECTED, STANDING_BY):
            for record in self.records(event):
                if record.get("role") == self.service and isinstance(record.get("instance"), str):
                    return str(record["instance"])
        return None

    async def metric(self, family: str, labels: dict[str, str] | None = None) -> float:
        """The sum of a metric's samples (matching ``labels``) on this process's ``/metrics``."""
        async with httpx.AsyncClient(timeout=5.0) as client:
            answer = await client.get(f"{self.ops_url}/metrics")
        answer.raise_for_status()
        total = 0.0
        for metric in text_string_to_metric_families(answer.text):
            if metric.name != family:
                continue
            for sample in metric.samples:
                if sample.name.endswith("_created"):
                    continue
                if all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += sample.value
        return total


class TwinServices(Services):
    """Two processes of each service, ``<service>-1`` and ``<service>-2``."""

    def __init__(self, root: Path, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        one_each = self.by_name
        self.by_name = {
            f"{service}-{i}": Instance(
                f"{service}-{i}",
                dict(one_each[service].env),
                state_dir=root / "state" / f"{service}-{i}",
                log_path=root / f"{service}-{i}.log",
                service=service,
            )
            for service in SERVICES
            for i in (1, 2)
        }
        # One phone for both notifiers: the file channel deduplicates on message id in its file.
        for process in self.instances("notifier"):
            process.state_dir.mkdir(parents=True, exist_ok=True)
        (self["notifier-2"].state_dir / "sms.jsonl").symlink_to(self.sms_file)

    def __getitem__(self, name: str) -> Instance:
        process = self.by_name[name]
        assert isinstance(process, Instance)
        return process

    def instances(self, service: str) -> list[Instance]:
        return [self[f"{service}-{i}"] for i in (1, 2)]

    @property
    def sms_file(self) -> Path:
        return self["notifier-1"].state_dir / "sms.jsonl"

    async def start(self) -> None:
        # One submissions instance first: it declares the streams the others would race to declare.
        await self["submissions-1"].start()
        await asyncio.gather(*(p.start() for p in self if p.name != "submissions-1"))


class TwinScenario(Scenario):
    def __init__(self, root: Path, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.extra_clients: list[CountyClient] = []  # probes through each node, if they were needed
        self.services: TwinServices = TwinServices(
            root,
            nats_urls=self.nats_urls,
            database_url=self.database_url,
            smtp_port=self.smtp.port,
            extra_env=kwargs.get("extra_env"),
        )


# ---------------------------------------------------------------------------------------------
# leases
# ---------------------------------------------------------------------------------------------


async def _holder(kv: KeyValue, role: str) -> str | None:
    """The instance id in ``role``'s lease, or None while nobody holds it."""
    try:
        entry = await kv.get(role)
    except KeyNotFoundError:
        return None
    return entry.value.decode() if entry.value else None


async def _active_and_standby(sc: TwinScenario, kv: KeyValue, service: str, timeout: float = 20.0) -> Instance:
    """The active instance of ``service`` (the lease names it; the other stands by)."""
    deadline = time.monotonic() + timeout
    state = "nothing yet"
    while True:
        first, second = sc.services.instances(service)
        ids = {p.name: p.lease_id() for p in (first, second)}
        try:
            holder = await _holder(kv, service)
        except (NatsError, JsError, TimeoutError) as exc:
            holder, state = None, f"{type(exc).__name__}: {exc}"
        else:
            state = f"lease holder {holder!r}, instance ids {ids}"
        active = [p for p in (first, second) if holder is not None and p.lease_id() == holder]
        if len(active) == 1 and all(ids.values()):
            standby = second if active[0] is first else first
            if standby.records(STANDING_BY) and not standby.records(ELECTED):
                return active[0]
            state += f"; {standby.name} has not logged {STANDING_BY!r} (or was elected)"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{service}: not exactly one active instance and one standing by after {timeout:g} s "
                f"({state})\n{sc.describe()}"
            )
        await asyncio.sleep(0.2)


async def _takeover(sc: TwinScenario, kv: KeyValue, service: str, killed: str, standby: Instance) -> float:
    """Seconds until the standby holds the lease the killed instance held (bounded)."""
    began = time.monotonic()
    expected = standby.lease_id()
    while True:
        with contextlib.suppress(NatsError, JsError, TimeoutError):
            holder = await _holder(kv, service)
            if holder == expected:
                return time.monotonic() - began
            assert holder in (killed, None), f"{service}: the lease went to {holder!r}, neither instance"
        if time.monotonic() - began > TAKEOVER_BOUND:
            raise AssertionError(
                f"{service}: the standby {standby.name} did not take the lease over within {TAKEOVER_BOUND:g} s "
                f"of the active instance's kill\n{sc.describe()}"
            )
        await asyncio.sleep(0.05)


async def _working(sc: TwinScenario, process: Instance, timeout: float = 10.0) -> None:
    """Until ``process`` has done some of its service's work (by its metric; bounded)."""
    family, labels = WORK_METRICS[process.service]
    deadline = time.monotonic() + timeout
    while not await process.metric(family, labels):
        if time.monotonic() > deadline:
            raise AssertionError(f"{process.name} did no work ({family}) within {timeout:g} s\n{sc.describe()}")
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# submissions: both instances serve
# ---------------------------------------------------------------------------------------------


async def _served(instances: Sequence[Instance]) -> list[float]:
    return list(await asyncio.gather(*(p.metric("duban_submissions") for p in instances)))


async def _post_through_each_node(sc: TwinScenario, cluster: list[EmbeddedNats], timeout: float = 20.0) -> None:
    """A county client on each node, until both submissions instances have served some.

    NATS gives a queue group's message to a member on the publisher's own node when there is
    one: with the two instances on different nodes and every county client (randomly) on one of
    them, the other instance would get nothing. Its accepted ids join the load's (checked too)."""
    programme = sc.programme
    milestones = [m.id for m in programme.milestones]
    code = programme.counties[0].code
    stop = asyncio.Event()
    clients, connections, tasks = [], [], []
    try:
        for node in cluster:
            client = CountyClient(programme.id, code, f"probe-{node.server_name}-{time.time_ns()}", milestones)
            nc = await nats.connect([node.url], connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
            clients.append(client)
            connections.append(nc)
            tasks.append(asyncio.create_task(client.run(nc, stop, 0.05)))
        deadline = time.monotonic() + timeout
        while not all(await _served(sc.services.instances("submissions"))):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30.0)
        for nc in connections:
            with contextlib.suppress(Exception):
                await nc.close()
    sc.extra_clients.extend(clients)


# ---------------------------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------------------------


async def test_two_instances_of_every_service(
    cluster: list[EmbeddedNats], fresh_database: str, tmp_path: Path, profile: Profile, fault_report: FaultReport
) -> None:
    async with TwinScenario(
        tmp_path, database_url=fresh_database, profile=profile, report=fault_report, **on_cluster(cluster)
    ) as sc:
        timings: dict[str, float] = {}
        began = time.monotonic()
        await sc.start()
        timings["start"] = time.monotonic() - began
        info = await sc.js.stream_info(EVENTS_STREAM)
        assert info.config.num_replicas == NODES, f"DUBAN_EVENTS has {info.config.num_replicas} replicas"
        kv = await sc.js.key_value(LEADERS_BUCKET)
        leases = await sc.js.stream_info(f"KV_{LEADERS_BUCKET}")
        assert leases.config.num_replicas == NODES, f"{LEADERS_BUCKET} has {leases.config.num_replicas} replicas"
        await sc.phase()

        # (1) the queue group: both submissions instances answer
        submissions = sc.services.instances("submissions")
        if not all(await _served(submissions)):
            await _post_through_each_node(sc, cluster)
        served = await _served(submissions)
        assert all(served), f"a submissions instance answered nothing: {served}\n{sc.describe()}"

        # (2) one active instance of each of the others, the standby idle
        active = {service: await _active_and_standby(sc, kv, service) for service in SINGLE_ACTIVE}
        for service, process in active.items():
            family, labels = WORK_METRICS[service]
            standby = next(p for p in sc.services.instances(service) if p is not process)
            done = await standby.metric(family, labels)
            assert done == 0, f"{service}: the standby {standby.name} did work ({family} {done})\n{sc.describe()}"
        assert await active["ledger"].metric(*WORK_METRICS["ledger"]) > 0, "the active ledger applied nothing"

        # (3) kill -9 every active instance and one submissions instance, the load going on
        killed = {service: process.lease_id() or "" for service, process in active.items()}
        standbys = {s: next(p for p in sc.services.instances(s) if p is not active[s]) for s in SINGLE_ACTIVE}
        victims = [*active.values(), submissions[0]]
        await asyncio.gather(*(p.kill() for p in victims))
        for service in SINGLE_ACTIVE:
            sc.injected(f"kill -9 active {service}")
        sc.injected("kill -9 submissions")
        takeovers = await asyncio.gather(*(_takeover(sc, kv, s, killed[s], standbys[s]) for s in SINGLE_ACTIVE))
        timings |= {f"{s} takeover": t for s, t in zip(SINGLE_ACTIVE, takeovers, strict=True)}
        began = time.monotonic()
        await sc.phase()  # the load carries on with one instance of each
        timings["phase after the kills"] = time.monotonic() - began
        await _working(sc, standbys["ledger"])  # the new active ledger follows the stream already

        # the killed instances come back and stand by; the lease stays where it is
        await asyncio.gather(*(p.start() for p in victims))
        sc.injected("start the killed instances again")
        for service in SINGLE_ACTIVE:
            assert await _active_and_standby(sc, kv, service) is standbys[service], (
                f"{service}: the lease moved back to the restarted instance\n{sc.describe()}"
            )
        await sc.phase()

        # nobody stepped down from a lease it still held (two active at once); two elections each
        for service in SINGLE_ACTIVE:
            lost = [r for p in sc.services.instances(service) for r in p.records(LEASE_LOST, all_starts=True)]
            assert not lost, f"{service}: an instance lost its lease while running: {lost}\n{sc.describe()}"
            elections = [p.name for p in sc.services.instances(service) for _ in p.records(ELECTED, all_starts=True)]
            assert sorted(elections) == sorted([active[service].name, standbys[service].name]), (
                f"{service}: elections {elections}\n{sc.describe()}"
            )

        # (4) the invariants: nothing lost, nothing twice, nothing stalled
        sc.load.clients.extend(sc.extra_clients)
        began = time.monotonic()
        await sc.finish(notifier_kills=1)
        timings["finish"] = time.monotonic() - began
        per_instance = ", ".join(f"{p.name} {n:g}" for p, n in zip(submissions, served, strict=True))
        print(f"submissions answered before the kill: {per_instance}; ")
        print(", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
