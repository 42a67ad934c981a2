"""The `duban` command: run the system, post submissions, inspect what is stored.

Everything here goes through the same NATS subjects an operator reaches with the `nats` CLI.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer
from nats.errors import NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from rich.console import Console

from contracts import escalation as escalation_contract
from contracts import ledger as ledger_contract
from contracts import notifier as notifier_contract
from contracts.commands import Role
from contracts.programme import ProgrammeFileError, load_programme
from contracts.replies import Accepted, RefusalRecord, decode_reply
from contracts.schema import SCHEMA_DIR, render_schemas, write_schemas
from contracts.subjects import EVENTS_ALL, EVENTS_STREAM, REFUSALS_ALL, REFUSALS_STREAM, submit_subject
from services.audit.cli import audit_app
from services.common.clock import SystemClock
from services.common.logging import configure_logging
from services.common.opshttp import Readiness
from services.common.runtime import client_runtime, client_settings, infrastructure
from services.common.settings import Settings
from services.common.supervisor import GATEWAY, SERVICES, ServiceRun, run_services, service_runners
from services.gateway.cli import gateway_app

app = typer.Typer(no_args_is_help=True, help="duban 督办: supervise a programme's milestones across counties.")
deploy_app = typer.Typer(no_args_is_help=True, help="Files an operator deploys.")
app.add_typer(deploy_app, name="deploy")
ledger_app = typer.Typer(no_args_is_help=True, help="The ledger's read model.")
app.add_typer(ledger_app, name="ledger")
app.add_typer(gateway_app, name="gateway")
app.add_typer(audit_app, name="audit")
T = TypeVar("T")
console = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    return client_settings()


@app.command()
def up(
    services: Annotated[
        str | None,
        typer.Option(
            help="Which services this process runs, comma-separated (default: the four and, unless "
            "DUBAN_HTTP_ADDR is empty, the HTTP gateway); several processes may share the work."
        ),
    ] = None,
) -> None:
    """Run duban: the configured NATS and PostgreSQL, or embedded ones, and the services.

    Each service is a NATS micro service (`nats micro ls`). The ops HTTP port (DUBAN_OPS_ADDR,
    default 127.0.0.1:9464) serves /metrics, /readyz and /livez. Stops cleanly on Ctrl-C /
    SIGTERM: no new requests are taken, those in flight are finished, consumers commit and stop.
    """
    settings = _settings()
    default = (*SERVICES, *([GATEWAY] if settings.http_address else []))
    names = tuple(n.strip() for n in services.split(",") if n.strip()) if services else default
    try:
        runners = service_runners(names)
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    asyncio.run(_up(settings, runners))


async def _up(settings: Settings, runners: dict[str, ServiceRun]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Only the ledger and the notifier keep state in PostgreSQL: start it only for them.
    async with infrastructure(settings, with_database=bool({"ledger", "notifier"} & set(runners))) as runtime:
        readiness = Readiness(list(runners))
        running = asyncio.create_task(
            run_services(
                runtime, SystemClock(), stop, runners, readiness=readiness, ops_address=settings.ops_address or None
            )
        )
        ready = asyncio.create_task(readiness.wait())
        await asyncio.wait([running, ready], return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            ops = f"; metrics and readiness on http://{settings.ops_address}" if settings.ops_address else ""
            if GATEWAY in runners:
                ops += f"; HTTP gateway on http://{settings.http_address}"
            err.print(
                f"[bold green]duban is running[/] — NATS {runtime.nats_url}; services: {', '.join(runners)}; "
                f"programmes: {', '.join(runtime.programmes)}{ops}. Ctrl-C stops it."
            )
        else:
            ready.cancel()
        await running


@app.command()
def demo(
    speed: Annotated[
        float, typer.Option(help="Simulated days per second (0: as fast as the services go).", min=0)
    ] = 15.0,
    until: Annotated[str | None, typer.Option(help="Stop after this day (YYYY-MM-DD).")] = None,
    out: Annotated[Path, typer.Option(help="Where the 一览表, mailbox, SMS file and summary go.")] = Path("duban-demo"),
    live: Annotated[bool | None, typer.Option(help="The live view (default: on a terminal).")] = None,
) -> None:
    """Watch duban supervise the notice's whole 2017–2018 programme, in simulated time.

    Starts its own NATS, PostgreSQL and SMTP server (whatever is configured), the four
    services, and plays the story of the five counties; leaves nothing running.
    """
    import datetime as dt

    from services.demo.runner import DemoFailed, DemoOptions, new_view, prepare_out_dir, run_demo

    try:
        last = dt.date.fromisoformat(until) if until else None
    except ValueError:
        err.print(f"[red]--until takes a date like 2017-06-30, not {until!r}[/]")
        raise typer.Exit(2) from None
    prepare_out_dir(out)
    settings = Settings.from_env()
    options = DemoOptions(out_dir=out, speed=speed, until=last)
    view = new_view(options)
    show_live = console.is_terminal if live is None else live
    with (out / "duban.log").open("w", encoding="utf-8") as log_file:
        configure_logging("json", settings.log_level, stream=log_file)  # the terminal is the view's
        try:
            if show_live:
                from rich.live import Live

                with Live(console=console, get_renderable=view.render, refresh_per_second=6):
                    summary = asyncio.run(run_demo(options, view))
            else:
                console.print(f"playing {view.start} … {view.end} (no terminal: no live view)")
                summary = asyncio.run(run_demo(options, view))
        except DemoFailed as exc:
            err.print(f"[red]the demo stopped: {exc}[/] (details in {out / 'duban.log'})")
            raise typer.Exit(1) from None
    console.print(view.summary())
    console.print(
        f"[bold]{summary.days}[/] simulated days in {summary.seconds:g} s: {summary.submissions} submissions, "
        f"{summary.operator_decisions} operator decisions, {summary.events} events.\n"
        f"一览表: [bold]{summary.xlsx}[/]   e-mails: [bold]{summary.emails_received}[/] in {summary.mailbox} "
        f"(Maildir)   SMS: [bold]{summary.sms_written}[/] in {summary.sms_file}   summary: {out / 'summary.json'}\n"
        + (
            "the record verified: every event on its chain, the checkpoints signed, the read models as the events say"
            if summary.record_verified
            else "[red]the record did NOT verify[/] (see duban.log)"
        )
        + (f"; the 一览表 and the actions signed by {summary.signer}" if summary.signer else "")
    )
    if not summary.record_verified:
        raise typer.Exit(1)


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="The submission as JSON ('-' reads standard input).")],
    county: Annotated[str, typer.Option(help="County code: the subject's county token.")],
    role: Annotated[
        Role, typer.Option(help="county for a county system; city or province for operators.")
    ] = Role.COUNTY,
    user: Annotated[str | None, typer.Option(help="NATS user (default: county-<code>, city, province).")] = None,
    timeout: float = 10.0,
) -> None:
    """Post a submission as a county system (or operator) would, and print the reply."""
    settings = _settings()
    body = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    reply = _run(_submit(settings, body, role, county, user, timeout))
    console.print_json(msgspec.json.encode(reply).decode())
    raise typer.Exit(0 if isinstance(reply, Accepted) else 1)


async def _submit(settings: Settings, body: bytes, role: Role, county: str, user: str | None, timeout: float) -> object:
    runtime = client_runtime(settings)
    name = user or (f"county-{county}" if role is Role.COUNTY else role.value)
    nc = await runtime.connect_as(name, role=role, county_code=county if role is Role.COUNTY else None)
    subject = submit_subject(role, county)
    try:
        msg = await nc.request(subject, body, timeout=timeout)
        return decode_reply(msg.data)
    except (NatsTimeoutError, NoRespondersError):
        err.print(
            f"[red]no answer on {subject}[/] within {timeout:g} s: either the NATS server refused user "
            f"{name!r} to publish there (each county may post only on its own subject), or the "
            "submissions service is not running."
        )
        raise typer.Exit(2) from None
    finally:
        await nc.close()


@app.command()
def refusals(
    county: Annotated[str | None, typer.Option(help="Only this county token.")] = None,
    limit: int = 50,
) -> None:
    """List refused submissions (newest last), as kept in the refusals stream."""
    settings = _settings()
    records = _run(_refusals(settings, county, limit))
    for seq, record in records:
        r = record.refusal
        console.print(
            f"[dim]#{seq} {record.received_at.isoformat()}[/] {record.subject} "
            f"[red]{r.code}[/] {r.field or ''} {r.message_zh} / {r.message_en} {r.detail} "
            f"[dim]({record.size} bytes, sha256 {record.sha256[:12]}…)[/]"
        )
    if not records:
        console.print("no refusals on record")


async def _refusals(settings: Settings, county: str | None, limit: int) -> list[tuple[int, RefusalRecord]]:
    from services.common.jetstream import read_all

    runtime = client_runtime(settings)
    nc = await runtime.connect_as("ops")
    subject = REFUSALS_ALL if county is None else f"duban.refusals.*.{county}"
    out: list[tuple[int, RefusalRecord]] = []
    try:
        async for batch in read_all(nc.jetstream(), REFUSALS_STREAM, subject):
            out.extend((seq, msgspec.json.decode(data, type=RefusalRecord)) for seq, data in batch)
    finally:
        await nc.close()
    return out[-limit:]


def _as_of(value: str | None) -> str | None:
    """A date means the end of that day in Asia/Shanghai; a time without offset is Shanghai time."""
    if value is None:
        return None
    import datetime as dt
    from zoneinfo import ZoneInfo

    zone = ZoneInfo("Asia/Shanghai")
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            return dt.datetime.combine(day, dt.time(23, 59, 59), zone).isoformat()
        instant = dt.datetime.fromisoformat(value)
    except ValueError:
        err.print(f"[red]--as-of {value!r}: expected a date (2017-09-01) or a date and time[/]")
        raise typer.Exit(2) from None
    return (instant if instant.tzinfo else instant.replace(tzinfo=zone)).isoformat()


async def _ask(
    settings: Settings, subject: str, query: dict[str, object], user: str | None
) -> tuple[bytes, bool, dict[str, str]]:
    """Request-reply to a query subject; (body, is_error, headers)."""
    runtime = client_runtime(settings)
    nc = await runtime.connect_as(user or settings.nats_user or "ops")
    try:
        msg = await nc.request(
            subject, msgspec.json.encode({k: v for k, v in query.items() if v is not None}), timeout=30
        )
    except (NatsTimeoutError, NoRespondersError):
        err.print(f"[red]no answer on {subject}[/]: is `duban up` running, and is NATS_URL right ({runtime.nats_url})?")
        raise typer.Exit(2) from None
    finally:
        await nc.close()
    headers = dict(msg.headers or {})
    return msg.data, bool(headers.get("Nats-Service-Error-Code")), headers


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a client coroutine; a NATS server that cannot be reached is a clear error."""
    try:
        return asyncio.run(coro)
    except (NoServersError, OSError) as exc:
        err.print(f"[red]cannot reach NATS[/] ({exc}): is `duban up` running, and is NATS_URL right?")
        raise typer.Exit(2) from None


def _query_answer(subject: str, query: dict[str, object], user: str | None = None) -> tuple[bytes, dict[str, str]]:
    """Ask a query subject; a QueryError answer is printed and ends the command."""
    from contracts.ledger import QueryError

    data, failed, headers = _run(_ask(_settings(), subject, query, user))
    if failed:
        error = msgspec.json.decode(data, type=QueryError)
        err.print(f"[red]{error.code}[/]: {error.message_zh} / {error.message_en} {error.detail}")
        raise typer.Exit(1)
    return data, headers


def _query_bytes(subject: str, query: dict[str, object], user: str | None = None) -> bytes:
    return _query_answer(subject, query, user)[0]


def _query(subject: str, answer_type: type[T], query: dict[str, object], user: str | None = None) -> T:
    return msgspec.json.decode(_query_bytes(subject, query, user), type=answer_type)


AsOf = Annotated[str | None, typer.Option("--as-of", help="A date (end of that day) or date-time, Asia/Shanghai.")]
Programme = Annotated[str | None, typer.Option("--programme", help="Programme id (default: the first).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")]


def _show(answer: msgspec.Struct, view: object, as_json: bool) -> None:
    if as_json:
        console.print_json(msgspec.json.encode(answer).decode())
    else:
        # The table has a column per county: give it room even on a narrow terminal or a pipe.
        Console(width=max(console.width, 160)).print(view)


@app.command()
def status(as_of: AsOf = None, programme: Programme = None, json_out: JsonOut = False) -> None:
    """The progress table (督查进度一览表) with its traffic lights, now or as of a date."""
    from contracts.ledger import TABLE_SUBJECT, ProgressTable
    from services.cli.render import table_view

    table = _query(TABLE_SUBJECT, ProgressTable, {"as_of": _as_of(as_of), "programme_id": programme})
    _show(table, table_view(table), json_out)


@app.command()
def county(code: str, as_of: AsOf = None, programme: Programme = None, json_out: JsonOut = False) -> None:
    """One county's detail: milestones, evidence, reviews, findings."""
    from contracts.ledger import COUNTY_SUBJECT, CountyDetail
    from services.cli.render import county_view

    detail = _query(
        COUNTY_SUBJECT, CountyDetail, {"county_code": code, "as_of": _as_of(as_of), "programme_id": programme}
    )
    _show(detail, county_view(detail), json_out)


@app.command()
def history(code: str, as_of: AsOf = None, programme: Programme = None, json_out: JsonOut = False) -> None:
    """Every event of a county, with its actor, occurred-at and recorded-at."""
    from contracts.ledger import HISTORY_SUBJECT, CountyHistory
    from services.cli.render import history_view

    answer = _query(
        HISTORY_SUBJECT, CountyHistory, {"county_code": code, "as_of": _as_of(as_of), "programme_id": programme}
    )
    _show(answer, history_view(answer), json_out)


@app.command()
def overdue(as_of: AsOf = None, programme: Programme = None, json_out: JsonOut = False) -> None:
    """Milestones past their effective deadline and not done."""
    from contracts.ledger import OVERDUE_SUBJECT, OverdueList
    from services.cli.render import overdue_view

    answer = _query(OVERDUE_SUBJECT, OverdueList, {"as_of": _as_of(as_of), "programme_id": programme})
    _show(answer, overdue_view(answer), json_out)


@app.command()
def report(
    xlsx: Annotated[Path, typer.Option("--xlsx", help="Write the 督查进度一览表 to this .xlsx file.")],
    as_of: AsOf = None,
    programme: Programme = None,
) -> None:
    """Export the 督查进度一览表 as an Excel file, with its signature beside it (FILE.sig)."""
    from contracts.audit import FILE_SIGNATURE_HEADER, FILE_SIGNATURE_SUFFIX
    from contracts.ledger import REPORT_SUBJECT
    from services.common.signing import file_signature_from_header

    data, headers = _query_answer(REPORT_SUBJECT, {"as_of": _as_of(as_of), "programme_id": programme})
    xlsx.write_bytes(data)
    console.print(f"wrote {xlsx} ({len(data)} bytes)")
    signed = headers.get(FILE_SIGNATURE_HEADER)
    if signed:
        signature = file_signature_from_header(signed)
        path = xlsx.with_name(xlsx.name + FILE_SIGNATURE_SUFFIX)
        path.write_bytes(msgspec.json.format(msgspec.json.encode(signature), indent=2) + b"\n")
        console.print(f"wrote {path} (signed by {signature.signer}; check with `duban audit verify-file {xlsx}`)")


@ledger_app.command("rebuild")
def ledger_rebuild() -> None:
    """Drop the ledger's read model and rebuild it from the event stream."""
    from contracts.ledger import REBUILD_SUBJECT, RebuildReport

    answer = _query(REBUILD_SUBJECT, RebuildReport, {})
    console.print(
        f"rebuilt from {answer.events} events (to sequence {answer.last_sequence}) in {answer.seconds:.2f} s "
        f"— {answer.events_per_second:,.0f} events/s"
    )


@ledger_app.command("status")
def ledger_status() -> None:
    """How far the ledger's read model has applied the event stream."""
    from contracts.ledger import PROJECTION_STATUS_SUBJECT, ProjectionStatus

    answer = _query(PROJECTION_STATUS_SUBJECT, ProjectionStatus, {})
    console.print(f"checkpoint {answer.checkpoint} of {answer.stream_last_sequence} (lag {answer.lag})")


# projection -> (its parked subject, its replay subject; None: it refolds everything at start)
PARKED_SUBJECTS: dict[str, tuple[str, str | None]] = {
    "ledger": (ledger_contract.PARKED_SUBJECT, ledger_contract.REPLAY_PARKED_SUBJECT),
    "notifier": (notifier_contract.PARKED_SUBJECT, notifier_contract.REPLAY_PARKED_SUBJECT),
    "escalation": (escalation_contract.PARKED_SUBJECT, None),
}


@app.command()
def parked(json_out: JsonOut = False) -> None:
    """Stored events a projection could not apply (parked after bounded retries), per projection."""
    from contracts.replies import ParkedList

    items = [
        item for projection in PARKED_SUBJECTS for item in _query(PARKED_SUBJECTS[projection][0], ParkedList, {}).items
    ]
    if json_out:
        console.print_json(msgspec.json.encode(items).decode())
        return
    if not items:
        console.print("nothing parked")
    for item in items:
        what = f"{item.event_type} {item.event_id} ({item.county_code})" if item.event_id else f"{item.size} bytes"
        console.print(f"[bold]{item.projection}[/] #{item.stream_sequence} {what}: [red]{item.reason}[/]")


@app.command("replay-parked")
def replay_parked(
    projection: Annotated[str | None, typer.Option(help="ledger or notifier (default: both).")] = None,
) -> None:
    """Apply the parked events again (after the fix shipped); what still fails stays parked.

    Escalation folds everything again at each start: restart it to retry its parked events.
    """
    from contracts.replies import ReplayParkedReport

    names = [projection] if projection else ["ledger", "notifier"]
    for name in names:
        subject = PARKED_SUBJECTS[name][1] if name in PARKED_SUBJECTS else None
        if subject is None:
            err.print(f"[red]{name}[/]: only ledger and notifier replay parked events (escalation: restart it)")
            raise typer.Exit(2)
        report = _query(subject, ReplayParkedReport, {})
        console.print(
            f"{name}: replayed {len(report.replayed)} {list(report.replayed)}; still parked {report.still_parked}"
        )


@app.command()
def actions(
    county: Annotated[str | None, typer.Option(help="Only this county.")] = None,
    state: Annotated[str | None, typer.Option(help="proposed, issued or waived.")] = None,
    json_out: JsonOut = False,
) -> None:
    """Accountability actions: reminders, notices, and proposals awaiting a city operator."""
    from contracts.escalation import ACTIONS_SUBJECT, ActionList
    from services.cli.render import actions_view

    answer = _query(ACTIONS_SUBJECT, ActionList, {"county_code": county, "state": state})
    _show(answer, actions_view(answer), json_out)


Operator = Annotated[str, typer.Option(help="Who decides (name and office), for the record.")]


@app.command()
def confirm(action_id: str, operator: Operator, note: str = "") -> None:
    """Confirm a proposed 通报批评 / 约谈 / provincial measure: it is issued."""
    from contracts.escalation import CONFIRM_SUBJECT, ActionView

    view = _query(CONFIRM_SUBJECT, ActionView, {"action_id": action_id, "operator": operator, "note": note})
    console.print(f"confirmed: {view.action_id} ({view.level_name}) — it will be issued")


@app.command()
def waive(action_id: str, reason: Annotated[str, typer.Option(help="Why it is waived.")], operator: Operator) -> None:
    """Waive a proposed action, with a reason on record."""
    from contracts.escalation import WAIVE_SUBJECT, ActionView

    view = _query(WAIVE_SUBJECT, ActionView, {"action_id": action_id, "operator": operator, "reason": reason})
    console.print(f"waived: {view.action_id} ({view.level_name})")


@app.command()
def why(action_id: str) -> None:
    """Why an action was taken: the rule, the deadline used, the working days counted."""
    from contracts.escalation import WHY_SUBJECT, ActionView

    view = _query(WHY_SUBJECT, ActionView, {"action_id": action_id})
    console.print(f"[bold]{view.level_name}[/] {view.action_id} — {view.state}, due {view.due_on}")
    console.print(view.explanation_zh)
    if view.decided_by:
        console.print(f"decided by {view.decided_by} {view.waive_reason}")


@app.command()
def whatif(
    policy: Annotated[Path, typer.Option(help="The other policy file.")],
    calendar: Annotated[list[Path] | None, typer.Option(help="Working-day year files for the other run.")] = None,
    until: Annotated[str | None, typer.Option(help="Last day to judge (default: today).")] = None,
) -> None:
    """Replay the recorded history under another policy (or calendar), offline, and list the
    actions it would add, remove or move. The live system is not touched."""
    import datetime as dt

    from contracts.events import decode_event
    from contracts.policy import load_policy
    from contracts.workdays import WorkdayCalendar
    from services.cli.render import whatif_view
    from services.common.jetstream import read_all
    from services.common.runtime import load_policy_and_calendar
    from services.escalation.ladder import Judge
    from services.escalation.replay import compare, replay

    settings = _settings()
    runtime = client_runtime(settings)
    current, current_calendar = load_policy_and_calendar(settings)
    other = load_policy(policy)
    other_calendar = WorkdayCalendar.official([*settings.calendar_files, *(calendar or [])])

    async def history() -> list[tuple[int, bytes]]:
        nc = await runtime.connect_as("ops")
        try:
            return [item async for batch in read_all(nc.jetstream(), EVENTS_STREAM, EVENTS_ALL) for item in batch]
        finally:
            await nc.close()

    stored = _run(history())
    end = dt.date.fromisoformat(until) if until else dt.date.today()
    for programme in runtime.programmes.values():
        histories: dict[str, list[tuple[int, object]]] = {}
        for seq, data in stored:
            envelope = decode_event(data)
            if envelope.programme_id == programme.id:
                histories.setdefault(envelope.county_code, []).append((seq, envelope))
        start = min(m.deadline for m in programme.milestones) - dt.timedelta(days=60)
        base = Judge(programme, {current.version: current}, current, current_calendar)
        alt = Judge(programme, {other.version: other}, other, other_calendar)
        diff = compare(replay(base, histories, start, end), replay(alt, histories, start, end))  # type: ignore[arg-type]
        console.print(whatif_view(programme, current.version, other.version, diff))


@app.command()
def preflight() -> None:
    """Check that every role the policy can address reaches someone, in every county, on a
    working channel with an approved SMS template; list every gap."""
    from services.common.runtime import load_policy_and_calendar
    from services.notifier.main import channels_from_env, directory_from_env, settings_from_env
    from services.notifier.planning import preflight as check

    settings = _settings()
    runtime = client_runtime(settings)
    policy, _ = load_policy_and_calendar(settings)
    notifier_settings = settings_from_env(channels_from_env(settings.state_dir))
    gaps = check(list(runtime.programmes.values()), policy, directory_from_env(runtime), notifier_settings)
    for gap in gaps:
        style = "red" if gap.severity == "error" else "yellow"
        console.print(f"[{style}]{gap.severity}[/] {gap.what}: {gap.detail}")
    console.print(f"{len(gaps)} gap(s) — channels {', '.join(notifier_settings.channels)}")
    raise typer.Exit(1 if any(g.severity == "error" for g in gaps) else 0)


@app.command()
def schema(
    out: Annotated[Path, typer.Option(help="Directory to write to.")] = SCHEMA_DIR,
    check: Annotated[bool, typer.Option(help="Only check the files are current.")] = False,
    asyncapi: Annotated[
        Path | None, typer.Option(help="The AsyncAPI document's file (default: contracts/asyncapi.json).")
    ] = None,
) -> None:
    """Write JSON Schema for every message and the AsyncAPI document of every subject (or check
    the committed ones are current)."""
    from contracts.asyncapi import ASYNCAPI_PATH, render_asyncapi, write_asyncapi

    asyncapi_path = asyncapi or ASYNCAPI_PATH
    if check:
        stale = [
            n for n, text in render_schemas().items() if not (out / n).exists() or (out / n).read_text("utf-8") != text
        ]
        if not asyncapi_path.exists() or asyncapi_path.read_text("utf-8") != render_asyncapi():
            stale.append(str(asyncapi_path))
        if stale:
            err.print(f"[red]stale schema files[/]: {', '.join(stale)} — run `duban schema`")
            raise typer.Exit(1)
        console.print("schema files and the AsyncAPI document are current")
        return
    for path in [*write_schemas(out), write_asyncapi(asyncapi_path)]:
        console.print(f"wrote {path}")


@app.command("check-programme")
def check_programme(file: Path) -> None:
    """Validate a programme file; on error say file, line, key and what is wrong."""
    try:
        programme = load_programme(file)
    except ProgrammeFileError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    console.print(
        f"{programme.id}: {len(programme.milestones)} milestones, {len(programme.counties)} counties, "
        f"{len(programme.rules)} procedure rules — ok"
    )


def _port_list(value: str, option: str) -> list[int]:
    try:
        return [int(p) for p in value.split(",") if p.strip()]
    except ValueError:
        err.print(f"[red]--{option}: a port, or one port per node, comma-separated (got {value!r})[/]")
        raise typer.Exit(2) from None


@deploy_app.command("nats-config")
def nats_config(
    out: Annotated[
        Path | None,
        typer.Option(
            help="Directory for the generated files (default: deploy/nats, with --cluster deploy/nats-cluster)."
        ),
    ] = None,
    cluster: Annotated[
        int,
        typer.Option(
            help="Nodes of a JetStream cluster (3 or more): one <node>.conf per node, auth.conf and "
            "nats.env.example. 0: one server (nats-server.conf and auth.conf)."
        ),
    ] = 0,
    name_prefix: Annotated[str, typer.Option(help="Cluster node names: <prefix>1, <prefix>2, ...")] = "nats-",
    hosts: Annotated[
        str | None,
        typer.Option(help="Where the nodes are reached, one per node, comma-separated (default: their names)."),
    ] = None,
    client_port: Annotated[str, typer.Option(help="Client port: one for every node, or one per node.")] = "4222",
    cluster_port: Annotated[str, typer.Option(help="Route port: one for every node, or one per node.")] = "6222",
    monitor_port: Annotated[str, typer.Option(help="Monitoring port: one for every node, or one per node.")] = "8222",
    cluster_name: Annotated[str, typer.Option(help="The cluster's name.")] = "duban",
    listen_host: Annotated[str, typer.Option(help="Address the client and route ports listen on.")] = "0.0.0.0",
    monitor_host: Annotated[str, typer.Option(help="Address the monitoring port listens on.")] = "127.0.0.1",
    store_dir: Annotated[
        str, typer.Option(help="JetStream directory of each node; {name} is replaced by the node's name.")
    ] = "/var/lib/duban-nats",
    passwords_file: Annotated[
        str | None,
        typer.Option(
            help='auth.conf includes this file (next to it) of DUBAN_NATS_PASSWORD_<USER>: "..." lines, which '
            "nats-server reads again on --signal reload (the environment it does not)."
        ),
    ] = None,
) -> None:
    """Generate the NATS server configuration (users and permissions) from the programmes."""
    from services.common import natsauth
    from services.common.runtime import load_programmes

    programmes = load_programmes(_settings()).values()
    try:
        if not cluster:
            paths = natsauth.write_deploy_files(out or Path("deploy/nats"), programmes, passwords_file=passwords_file)
        else:
            layout = natsauth.cluster_layout(
                cluster,
                name_prefix=name_prefix,
                hosts=[h.strip() for h in hosts.split(",") if h.strip()] if hosts else None,
                client_port=_port_list(client_port, "client-port"),
                cluster_port=_port_list(cluster_port, "cluster-port"),
                monitor_port=_port_list(monitor_port, "monitor-port"),
                cluster_name=cluster_name,
                listen_host=listen_host,
                monitor_host=monitor_host,
                store_dir=store_dir,
            )
            paths = natsauth.write_cluster_files(
                out or Path("deploy/nats-cluster"), programmes, layout, passwords_file=passwords_file
            )
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    for path in paths:
        console.print(f"wrote {path}")


if __name__ == "__main__":
    app()
