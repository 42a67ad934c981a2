"""The submissions service on NATS: a micro service (``duban-submissions``) whose ``submit``
endpoint answers ``duban.submit.<role>.<county_code>``; the work is in SubmissionsService.

Micro endpoints share a queue group, so several instances share the load. Requests run
concurrently (appends wait on the server's disk), one at a time per county in this process.
The body is handed over undecoded: the service decodes it strictly itself.
"""

from __future__ import annotations

from importlib.metadata import version

from nats.aio.client import Client as NatsClient
from nats.micro.request import Request

from contracts.escalation import OpsError
from contracts.replies import Accepted, StatusQuery, SubmissionsStatus
from contracts.subjects import SUBMISSIONS_SERVICE, SUBMISSIONS_STATUS_SUBJECT, SUBMIT_ALL
from services.common import metrics
from services.common.micro import Endpoint, MicroService, json_endpoint, readable_json, start_micro
from services.submissions.service import SubmissionsService

MAX_IN_FLIGHT = 64


async def start(nc: NatsClient, service: SubmissionsService, max_in_flight: int = MAX_IN_FLIGHT) -> MicroService:
    """Start serving; returns once the server has registered the subscriptions."""

    async def submit(request: Request) -> None:
        reply = await service.handle(request.subject, request.data)
        if isinstance(reply, Accepted):
            metrics.SUBMISSIONS.labels(outcome="duplicate" if reply.duplicate else "accepted", code="").inc()
        else:
            metrics.SUBMISSIONS.labels(outcome="refused", code=reply.code.value).inc()
        await request.respond(readable_json(reply))

    micro: MicroService | None = None

    async def status(_: StatusQuery) -> SubmissionsStatus:
        return SubmissionsStatus(
            programmes=tuple(sorted(service.programmes)),
            records_cached=service.records_cached,
            in_flight=len(micro.in_flight) if micro else 0,
            instance=micro.service.id if micro else "",
        )

    micro = await start_micro(
        nc,
        name=SUBMISSIONS_SERVICE,
        version=version("duban"),
        description="duban submissions: validates, authorises and decides each submission; appends the facts",
        endpoints=[
            Endpoint("submit", SUBMIT_ALL, submit, concurrency=max_in_flight),
            json_endpoint("status", SUBMISSIONS_STATUS_SUBJECT, StatusQuery, status, OpsError),
        ],
    )
    return micro
