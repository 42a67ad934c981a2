"""One active instance per consumer, the others on hot standby (services/common/leader.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import nats

from services.common.leader import Leadership

TEST_BUCKET = "duban_leaders_test"  # a short TTL of its own: not the services' bucket
TEST_BUCKET_SHORT = "duban_leaders_test_short"


class Instance:
    def __init__(self, js: nats.js.JetStreamContext, role: str, log: list[tuple[str, str]]) -> None:
        self.leadership = Leadership(js, role, ttl=1.5, bucket=TEST_BUCKET)
        self.stop = asyncio.Event()
        self.name = self.leadership.instance
        self._log = log
        self.task = asyncio.create_task(self.leadership.run(self.stop, self.lead))

    async def lead(self, until: asyncio.Event) -> None:
        self._log.append(("start", self.name))
        await until.wait()
        self._log.append(("end", self.name))


def never_two_active(log: list[tuple[str, str]]) -> bool:
    active: set[str] = set()
    for what, name in log:
        if what == "start":
            active.add(name)
            if len(active) > 1:
                return False
        else:
            active.discard(name)
    return True


async def wait_for(condition: object, timeout: float) -> float:
    began = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - began > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
    return time.monotonic() - began


async def test_one_active_a_clean_stop_hands_over_at_once(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    role = f"t{uuid.uuid4().hex[:8]}"
    log: list[tuple[str, str]] = []
    first = Instance(nc.jetstream(), role, log)
    await wait_for(lambda: first.leadership.active.is_set(), 5)
    second = Instance(nc.jetstream(), role, log)
    await asyncio.sleep(1.0)
    assert not second.leadership.active.is_set()  # standing by
    first.stop.set()
    await first.task
    took = await wait_for(lambda: second.leadership.active.is_set(), 5)
    assert took < 1.0  # the lease was released, not left to expire
    second.stop.set()
    await second.task
    assert never_two_active(log) and [w for w, _ in log] == ["start", "end", "start", "end"]
    await nc.close()


async def test_a_dead_instance_is_replaced_within_the_ttl(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    role = f"t{uuid.uuid4().hex[:8]}"
    log: list[tuple[str, str]] = []
    first = Instance(nc.jetstream(), role, log)
    await wait_for(lambda: first.leadership.active.is_set(), 5)
    second = Instance(nc.jetstream(), role, log)
    first.task.cancel()  # as kill -9: no release, no more renewals
    with contextlib.suppress(asyncio.CancelledError):
        await first.task
    log.append(("end", first.name))
    took = await wait_for(lambda: second.leadership.active.is_set(), 10)
    assert took <= 1.5 * 2  # within the TTL (plus a standby's polling interval)
    second.stop.set()
    await second.task
    assert never_two_active(log)
    await nc.close()


async def test_work_that_fails_hands_over_and_is_tried_again(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    leadership = Leadership(nc.jetstream(), f"t{uuid.uuid4().hex[:8]}", ttl=1.0, bucket=TEST_BUCKET_SHORT)
    attempts = 0
    stop = asyncio.Event()

    async def lead(until: asyncio.Event) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("the consumer broke")
        stop.set()  # the second election: stop here

    await asyncio.wait_for(leadership.run(stop, lead), 15)
    assert attempts == 2  # not left elected and idle, nor given up
    await nc.close()
