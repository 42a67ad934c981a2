"""The gateway's HTTP application (FastAPI): bearer tokens, per-token rate limits, a body size
cap, and request-reply to the same NATS subjects a NATS client uses, through a FastStream
:class:`~faststream.nats.NatsBroker` (``broker.request``; the broker's connection is made and
closed by :func:`services.gateway.main.run`).

Submissions are forwarded as the raw body bytes (FastStream sends ``bytes`` as they are; it adds
only its ``content-type`` and ``correlation_id`` headers, which the services do not read; the
submissions service decodes strictly itself) and the service's reply is answered unchanged; only
the HTTP status is derived from it (:data:`REFUSAL_STATUS`). Errors raised by the gateway itself
have the body of :class:`GatewayError` (``code``, ``message_zh``, ``message_en``, ``detail``,
``retryable``).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
import structlog
from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from faststream.exceptions import IncorrectState
from faststream.nats import NatsBroker
from faststream.nats.message import NatsMessage
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts.commands import MAX_SUBMISSION_BYTES, Role, Submission
from contracts.errors import ERROR_TEXT, RETRYABLE, ErrorCode
from contracts.identifiers import COUNTY_CODE_PATTERN
from contracts.ledger import COUNTY_SUBJECT, HISTORY_SUBJECT, CountyDetail, CountyHistory, QueryError
from contracts.replies import Accepted, Refused
from contracts.subjects import submit_subject
from services.gateway.tokens import TokenRecord, TokenStore, token_id_of

__all__ = [
    "DEFAULT_RATE",
    "REFUSAL_STATUS",
    "Gateway",
    "GatewayError",
    "create_app",
    "render_openapi",
]

log = structlog.get_logger(__name__)

DEFAULT_RATE = "20/second;600/minute"
REQUEST_TIMEOUT = 10.0  # seconds the gateway waits for a NATS reply
API_VERSION = "1"
RETRY_AFTER_UNAVAILABLE = "2"  # seconds, on a 503
SERVICE_ERROR_HEADER = "Nats-Service-Error-Code"
GATEWAY_TOKEN_HEADER = "Duban-Gateway-Token-Id"  # on forwarded requests: which token (its id) sent it
_COUNTY_CODE = re.compile(COUNTY_CODE_PATTERN)

# A refused submission's code -> HTTP status. Every ErrorCode is mapped (a unit test checks it).
# 400: the body is not a submission; 422: it is one, and names something unknown or invalid.
REFUSAL_STATUS: dict[ErrorCode, int] = {
    ErrorCode.MALFORMED: 400,
    ErrorCode.OVERSIZED: 413,
    ErrorCode.UNKNOWN_PROGRAMME: 422,
    ErrorCode.UNKNOWN_COUNTY: 422,
    ErrorCode.UNKNOWN_MILESTONE: 422,
    ErrorCode.UNKNOWN_REVIEW_KIND: 422,
    ErrorCode.UNKNOWN_STEP: 422,
    ErrorCode.UNKNOWN_SUBMISSION: 422,
    ErrorCode.COUNTY_MISMATCH: 422,
    ErrorCode.NOT_AUTHORISED: 403,
    ErrorCode.DATE_IN_FUTURE: 422,
    ErrorCode.INVALID_VALUE: 422,
    ErrorCode.SUBMISSION_ID_CONFLICT: 409,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INCONSISTENT_TOTALS: 422,
    ErrorCode.DUPLICATE_PERIOD: 409,
}
UNMAPPED_REFUSAL_STATUS = 422  # a code added to the contract after this table (never expected)


class GatewayError(msgspec.Struct, kw_only=True, frozen=True):
    """An error answered by the gateway itself (the request was not forwarded, or got no answer)."""

    code: str  # an ErrorCode where one fits; else unauthenticated | rate_limited | not_found | ...
    message_zh: str
    message_en: str
    detail: str = ""
    retryable: bool = False


class _ReplyHead(msgspec.Struct):
    """What the gateway reads of a reply to choose the status; the body is answered unchanged."""

    status: str
    code: str | None = None
    submission_id: str | None = None
    duplicate: bool = False


_head_decoder = msgspec.json.Decoder(_ReplyHead)


class Problem(Exception):
    """Answer ``status`` with a :class:`GatewayError` body (and headers) instead of forwarding."""

    def __init__(self, status: int, error: GatewayError, headers: dict[str, str] | None = None) -> None:
        super().__init__(error.message_en)
        self.status, self.error, self.headers = status, error, headers or {}


def _problem(
    status: int, code: str, zh: str, en: str, detail: str = "", headers: dict[str, str] | None = None
) -> Problem:
    retryable = status in (429, 503)
    return Problem(
        status, GatewayError(code=code, message_zh=zh, message_en=en, detail=detail, retryable=retryable), headers
    )


def _coded(status: int, code: ErrorCode, detail: str = "", headers: dict[str, str] | None = None) -> Problem:
    zh, en = ERROR_TEXT[code]
    error = GatewayError(code=code.value, message_zh=zh, message_en=en, detail=detail, retryable=code in RETRYABLE)
    return Problem(status, error, headers)


def _unavailable(detail: str) -> Problem:
    return _coded(503, ErrorCode.UNAVAILABLE, detail, {"Retry-After": RETRY_AFTER_UNAVAILABLE})


def _json(value: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(value), status_code=status, media_type="application/json", headers=headers)


class Gateway:
    """What the routes share: the FastStream NATS broker, the token store, the rate limiter."""

    def __init__(
        self,
        broker: NatsBroker | None,
        tokens: TokenStore | None,
        *,
        rate: str = DEFAULT_RATE,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.broker = broker
        self.tokens = tokens
        self.timeout = timeout
        try:
            self.limits: list[RateLimitItem] = parse_many(rate)
        except ValueError as exc:
            raise ValueError(f"gateway rate {rate!r} is not a limit like '20/second;600/minute': {exc}") from None
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def authenticate(self, request: Request, credentials: HTTPAuthorizationCredentials | None) -> TokenRecord:
        """The caller's token record; 401 when missing, unknown, wrong or revoked; 429 over its rate."""
        if credentials is None:
            raise _problem(
                401,
                "unauthenticated",
                "缺少访问令牌",
                "a bearer token is required",
                "send Authorization: Bearer <token>",
                {"WWW-Authenticate": 'Bearer realm="duban"'},
            )
        record = self.tokens.verify(credentials.credentials) if self.tokens is not None else None
        if record is None:
            request.state.key_id = token_id_of(credentials.credentials)  # claimed, not verified; never the token
            raise _problem(
                401,
                "unauthenticated",
                "访问令牌无效或已被吊销",
                "the bearer token is invalid or revoked",
                headers={"WWW-Authenticate": 'Bearer realm="duban", error="invalid_token"'},
            )
        request.state.key_id = record.token_id
        self._check_rate(record.token_id)
        return record

    def _check_rate(self, key: str) -> None:
        if all(self.limiter.test(item, key) for item in self.limits):
            for item in self.limits:
                self.limiter.hit(item, key)
            return
        now = time.time()
        wait = max(
            self.limiter.get_window_stats(item, key).reset_time - now
            for item in self.limits
            if not self.limiter.test(item, key)
        )
        retry_after = str(max(1, math.ceil(wait)))
        raise _problem(
            429,
            "rate_limited",
            "请求过于频繁，请稍后重试",
            "too many requests, retry later",
            f"limits per token: {'; '.join(str(i) for i in self.limits)}",
            {"Retry-After": retry_after},
        )

    @property
    def connected(self) -> bool:
        """Whether the broker's NATS connection is up (not yet connected, reconnecting or stopped: no)."""
        if self.broker is None:
            return False
        try:
            return self.broker.connection.is_connected
        except IncorrectState:  # FastStream's answer before connect() and after stop()
            return False

    async def request(self, subject: str, body: bytes, caller: TokenRecord) -> NatsMessage:
        """Request-reply on NATS; no answer (no service, timeout, no connection) is a 503.

        ``body`` is sent as it is (FastStream encodes only what is not ``bytes``); the answer's
        ``body`` is the reply's bytes, its ``headers`` the reply's headers."""
        if self.broker is None or not self.connected:
            raise _unavailable("the gateway is not connected to NATS")
        try:
            return await self.broker.request(
                body, subject, headers={GATEWAY_TOKEN_HEADER: caller.token_id}, timeout=self.timeout
            )
        except NoRespondersError:
            log.warning("no service answering on nats", subject=subject)
            raise _unavailable(f"no service is answering on {subject}") from None
        except (NatsError, IncorrectState) as exc:  # a timeout, or the connection went while waiting
            log.warning("no answer on nats", subject=subject, error=type(exc).__name__)
            raise _unavailable(f"no answer on {subject} within {self.timeout:g} s") from None


async def _read_capped(request: Request) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed the limit (before reading it
    all: by Content-Length, and while streaming a chunked one)."""
    limit = MAX_SUBMISSION_BYTES
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _coded(400, ErrorCode.MALFORMED, "Content-Length is not a number")
        if int(declared) > limit:
            raise _coded(413, ErrorCode.OVERSIZED, f"{declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _coded(413, ErrorCode.OVERSIZED, f"more than {limit} bytes; the limit is {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def _refusal_status(code: str | None) -> int:
    try:
        return REFUSAL_STATUS[ErrorCode(code or "")]
    except (ValueError, KeyError):
        log.warning("refusal code without an HTTP status", code=code)
        return UNMAPPED_REFUSAL_STATUS


def _forbidden(zh: str, en: str, detail: str) -> Problem:
    """403 ``not_authorised``: the token may not act here; nothing was forwarded."""
    return _problem(403, ErrorCode.NOT_AUTHORISED.value, zh, en, detail)


def _check_county_code(county_code: str) -> None:
    if not _COUNTY_CODE.match(county_code):
        raise _problem(
            404, "unknown_county", "没有这个县", "no such county", f"{county_code!r} is not a six-digit county code"
        )


# -- the OpenAPI document -----------------------------------------------------------------------
REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": REF.format(name=name)}


def _content(*names: str) -> dict[str, Any]:
    # anyOf, not oneOf: the error shapes overlap (a ledger's QueryError body is a valid
    # GatewayError too, whose extra fields are optional), so "exactly one" would refuse them.
    schema = _ref(names[0]) if len(names) == 1 else {"anyOf": [_ref(n) for n in names]}
    return {"content": {"application/json": {"schema": schema}}}


def _responses(spec: dict[int, tuple[str, tuple[str, ...]]]) -> dict[int | str, dict[str, Any]]:
    return {status: {"description": text, **_content(*names)} for status, (text, names) in spec.items()}


_AUTH_ERRORS: dict[int, tuple[str, tuple[str, ...]]] = {
    401: ("missing, unknown or revoked token (`WWW-Authenticate: Bearer`)", ("GatewayError",)),
    429: ("over the token's rate limit (`Retry-After` says when to retry)", ("GatewayError",)),
}
SUBMIT_RESPONSES = _responses(
    {
        200: ('accepted; a resend of a stored submission id answers `"duplicate": true`', ("Accepted",)),
        400: ("refused: malformed (not JSON, or not a submission)", ("Refused", "GatewayError")),
        **_AUTH_ERRORS,
        403: ("not this token's role or county, or refused `not_authorised`", ("Refused", "GatewayError")),
        404: ("the path names no county (not a six-digit code)", ("GatewayError",)),
        409: ("refused: `submission_id_conflict`", ("Refused",)),
        413: ("over 64 KiB: refused before it is read or forwarded", ("Refused", "GatewayError")),
        422: (
            "refused: unknown programme, county, milestone, step, review kind or submission; "
            "county mismatch; invalid value; date in the future",
            ("Refused",),
        ),
        502: ("the service answered something that is not a reply", ("GatewayError",)),
        503: (
            "no answer from NATS or the service, or refused `unavailable` (`Retry-After`)",
            ("Refused", "GatewayError"),
        ),
    }
)
SUBMIT_REQUEST = {
    "requestBody": {
        "required": True,
        "description": "One submission, exactly as `duban submit` sends it; forwarded byte for byte.",
        "content": {"application/json": {"schema": _ref("Submission")}},
    }
}


def _query_responses(answer: str) -> dict[int | str, dict[str, Any]]:
    return _responses(
        {
            200: ("the ledger's answer", (answer,)),
            400: ("the ledger refused the query (e.g. a bad `as_of`)", ("QueryError",)),
            **_AUTH_ERRORS,
            403: ("a county token may read only its own county", ("GatewayError",)),
            404: ("no such county or programme", ("QueryError", "GatewayError")),
            503: ("no answer from NATS or the ledger", ("QueryError", "GatewayError")),
        }
    )


SCHEMA_TYPES: tuple[Any, ...] = (Submission, Accepted, Refused, GatewayError, CountyDetail, CountyHistory, QueryError)


def _any_object(type_: type) -> dict[str, Any]:
    """``object`` (a history entry's payload values) is any JSON value."""
    if type_ is object:
        return {"description": "any JSON value"}
    raise NotImplementedError


class _GatewayApp(FastAPI):
    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, with the msgspec JSON Schema of our messages as components."""
        if self.openapi_schema:
            return self.openapi_schema
        doc = get_openapi(
            title=self.title,
            version=self.version,
            description=self.description,
            routes=self.routes,
        )
        components = doc.setdefault("components", {})
        schemas: dict[str, Any] = components.setdefault("schemas", {})
        # Handlers read the raw body and plain strings: FastAPI's own 422 never happens.
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for item in doc["paths"].values():
            for operation in item.values():
                auto = operation.get("responses", {}).get("422", {})
                if "HTTPValidationError" in json.dumps(auto):
                    del operation["responses"]["422"]
        _, ours = msgspec.json.schema_components(SCHEMA_TYPES, schema_hook=_any_object, ref_template=REF)
        schemas.update(ours)
        self.openapi_schema = doc
        return doc


DESCRIPTION = """\
duban's HTTP gateway for county systems (and operators) that cannot speak NATS.

Every request but `/healthz` and `/readyz` carries `Authorization: Bearer <token>` (issued with
`duban gateway token issue`). A submission is forwarded unchanged to the submissions service on
`duban.submit.<role>.<county_code>` and its reply answered unchanged; the HTTP status follows the
reply (see each response). Bodies over 64 KiB are refused with 413 before they are read. Each
token has a rate limit (429 with `Retry-After`).
"""


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="A token from `duban gateway token issue`: `dbn_<id>_<secret>`.",
)


async def _authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> TokenRecord:
    gateway: Gateway = request.app.state.gateway
    return gateway.authenticate(request, credentials)


# Module level: FastAPI resolves the endpoints' (string) annotations in this module's globals.
Caller = Annotated[TokenRecord, Depends(_authenticate)]
CountyCodePath = Annotated[str, Path(description="GB/T 2260 county code, e.g. 410928")]


def create_app(gateway: Gateway | None = None) -> FastAPI:
    """The gateway's application. Without a connected broker every forward answers 503, without
    a token store every token is refused; the OpenAPI document is the same either way
    (``render_openapi`` builds it from ``create_app()``)."""
    gateway = gateway or Gateway(None, None)
    app = _GatewayApp(
        title="duban gateway",
        version=API_VERSION,
        description=DESCRIPTION,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.gateway = gateway

    def submit_endpoint(role: Role) -> Callable[..., Awaitable[Response]]:
        async def submit(county_code: CountyCodePath, request: Request, caller: Caller) -> Response:
            request.state.county = county_code
            if caller.role is not role:
                raise _forbidden(
                    "该令牌无权使用此报送通道",
                    "this token may not submit on this route",
                    f"a {caller.role.value} token; this route is for {role.value} submissions",
                )
            if role is Role.COUNTY and caller.county_code != county_code:
                raise _forbidden(
                    "该令牌无权为此县报送",
                    "this token may not submit for this county",
                    f"this token may submit only for county {caller.county_code}",
                )
            _check_county_code(county_code)
            body = await _read_capped(request)
            msg = await gateway.request(submit_subject(role, county_code), body, caller)
            if msg.headers.get(SERVICE_ERROR_HEADER):
                raise _unavailable(f"the submissions service failed: {msg.headers.get('Nats-Service-Error', '')}")
            try:
                head = _head_decoder.decode(msg.body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise _problem(502, "bad_gateway", "服务应答无法识别", "the service's answer is not a reply") from None
            request.state.submission_id = head.submission_id
            request.state.code = head.code
            if head.status == "accepted":
                return Response(msg.body, status_code=200, media_type="application/json")
            status = _refusal_status(head.code)
            headers = {"Retry-After": RETRY_AFTER_UNAVAILABLE} if status == 503 else None
            return Response(msg.body, status_code=status, media_type="application/json", headers=headers)

        return submit

    routes = (
        (Role.COUNTY, "/v1/counties/{county_code}/submissions", "a county system posts a submission"),
        (Role.CITY, "/v1/city/counties/{county_code}/submissions", "a city operator posts a decision"),
        (Role.PROVINCE, "/v1/province/counties/{county_code}/submissions", "a province operator posts a decision"),
    )
    for role, path, summary in routes:
        app.add_api_route(
            path,
            submit_endpoint(role),
            methods=["POST"],
            summary=summary,
            operation_id=f"submit_{role.value}",
            tags=["submissions"],
            responses=SUBMIT_RESPONSES,
            openapi_extra=SUBMIT_REQUEST,
            response_class=Response,
        )

    def query_endpoint(subject: str) -> Callable[..., Awaitable[Response]]:
        async def query(
            county_code: CountyCodePath,
            request: Request,
            caller: Caller,
            as_of: Annotated[str | None, Query(description="An instant with its offset (default: now)")] = None,
            programme_id: Annotated[str | None, Query(description="Default: the first programme")] = None,
        ) -> Response:
            request.state.county = county_code
            if caller.role is Role.COUNTY and caller.county_code != county_code:
                raise _forbidden(
                    "该令牌无权查看此县",
                    "this token may not read this county",
                    f"this token may read only county {caller.county_code}",
                )
            _check_county_code(county_code)
            query = {"county_code": county_code, "as_of": as_of, "programme_id": programme_id}
            body = msgspec.json.encode({k: v for k, v in query.items() if v is not None})
            msg = await gateway.request(subject, body, caller)
            failed: str | None = msg.headers.get(SERVICE_ERROR_HEADER)
            if failed:
                if not msg.body:  # the service failed before writing its error: say so in our own shape
                    log.warning("ledger query failed without an answer", subject=subject, error=failed)
                    raise _unavailable(f"the ledger failed: {msg.headers.get('Nats-Service-Error', failed)}")
                status = int(failed) if failed.isdigit() and 400 <= int(failed) < 500 else 503
                return Response(msg.body, status_code=status, media_type="application/json")
            return Response(msg.body, status_code=200, media_type="application/json")

        return query

    for subject, path, answer, summary in (
        (COUNTY_SUBJECT, "/v1/counties/{county_code}", "CountyDetail", "a county's milestones, reviews, findings"),
        (HISTORY_SUBJECT, "/v1/counties/{county_code}/history", "CountyHistory", "every event of a county"),
    ):
        app.add_api_route(
            path,
            query_endpoint(subject),
            methods=["GET"],
            summary=summary,
            operation_id=f"read_{subject.rsplit('.', 1)[-1]}",
            tags=["ledger"],
            responses=_query_responses(answer),
            response_class=Response,
        )

    @app.get("/healthz", tags=["health"], summary="the process is alive", operation_id="healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="connected to NATS",
        operation_id="readyz",
        response_class=Response,
        responses={
            200: {"description": 'connected to NATS: `{"ready": true, "nats": "connected"}`'},
            503: {"description": 'not connected to NATS: `{"ready": false, "nats": "disconnected"}`'},
        },
    )
    async def readyz() -> Response:
        connected = gateway.connected
        return _json(
            {"ready": connected, "nats": "connected" if connected else "disconnected"}, 200 if connected else 503
        )

    async def on_problem(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return _json(exc.error, exc.status, exc.headers)

    async def on_http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        codes = {
            404: ("not_found", "没有这个地址", "no such path"),
            405: ("method_not_allowed", "不支持该方法", "method not allowed"),
        }
        code, zh, en = codes.get(exc.status_code, ("http_error", "请求错误", str(exc.detail)))
        return _json(GatewayError(code=code, message_zh=zh, message_en=en), exc.status_code, dict(exc.headers or {}))

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_middleware(AccessLog)
    return app


class AccessLog:
    """One log line per request: method, path, status, the token's id, county, submission id,
    refusal code, milliseconds. Never a token (only its id, as ``key_id``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = str(scope.get("path", ""))
            emit = log.debug if path in ("/healthz", "/readyz") else log.info
            emit(
                "http request",
                method=scope.get("method"),
                path=path,
                status=status,
                key_id=state.get("key_id"),
                county=state.get("county"),
                submission_id=state.get("submission_id"),
                code=state.get("code"),
                ms=round((time.perf_counter() - began) * 1000, 1),
            )


def render_openapi() -> str:
    """The OpenAPI document as committed in contracts/openapi.json: pretty, sorted, newline-ended."""
    return json.dumps(create_app().openapi(), ensure_ascii=False, indent=2, sort_keys=True) + "\n"
