"""The `duban` command: run the system, post submissions, inspect what is stored.

Everything here goes through the same NATS subjects an operator reaches with the `nats` CLI.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich.console import Console

from contracts.commands import Role
from contracts.programme import ProgrammeFileError, load_programme
from contracts.replies import Accepted, RefusalRecord, decode_reply
from contracts.schema import SCHEMA_DIR, render_schemas, write_schemas
from contracts.subjects import REFUSALS_ALL, submit_subject
from services.common.clock import SystemClock
from services.common.logging import configure_logging
from services.common.runtime import client_runtime, infrastructure
from services.common.settings import Settings

app = typer.Typer(no_args_is_help=True, help="duban 督办: supervise a programme's milestones across counties.")
deploy_app = typer.Typer(no_args_is_help=True, help="Files an operator deploys.")
app.add_typer(deploy_app, name="deploy")
console = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    return settings


@app.command()
def up() -> None:
    """Run duban: the configured NATS and PostgreSQL, or embedded ones, and the services.

    Stops cleanly on Ctrl-C / SIGTERM.
    """
    settings = _settings()
    asyncio.run(_up(settings))


async def _up(settings: Settings) -> None:
    from services.submissions import main as submissions

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with infrastructure(settings) as runtime:
        ready = asyncio.Event()
        task = asyncio.create_task(submissions.run(runtime, SystemClock(), stop, ready))
        await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        err.print(
            f"[bold green]duban is running[/] — NATS {runtime.nats_url}; "
            f"programmes: {', '.join(runtime.programmes)}. Ctrl-C stops it."
        )
        await task


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
    reply = asyncio.run(_submit(settings, body, role, county, user, timeout))
    console.print_json(msgspec.json.encode(reply).decode())
    raise typer.Exit(0 if isinstance(reply, Accepted) else 1)


async def _submit(settings: Settings, body: bytes, role: Role, county: str, user: str | None, timeout: float) -> object:
    runtime = client_runtime(settings)
    name = user or (f"county-{county}" if role is Role.COUNTY else role.value)
    nc = await runtime.connect_as(name, role=role, county_code=county if role is Role.COUNTY else None)
    try:
        msg = await nc.request(submit_subject(role, county), body, timeout=timeout)
        return decode_reply(msg.data)
    finally:
        await nc.close()


@app.command()
def refusals(
    county: Annotated[str | None, typer.Option(help="Only this county token.")] = None,
    limit: int = 50,
) -> None:
    """List refused submissions (newest last), as kept in the refusals stream."""
    settings = _settings()
    records = asyncio.run(_refusals(settings, county, limit))
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
    from nats.js.api import DeliverPolicy

    runtime = client_runtime(settings)
    nc = await runtime.connect_as("ops")
    js = nc.jetstream()
    subject = REFUSALS_ALL if county is None else f"duban.refusals.*.{county}"
    out: list[tuple[int, RefusalRecord]] = []
    try:
        sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except TimeoutError:
                    break
                out.append((msg.metadata.sequence.stream, msgspec.json.decode(msg.data, type=RefusalRecord)))
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()
    return out[-limit:]


@app.command()
def schema(
    out: Annotated[Path, typer.Option(help="Directory to write to.")] = SCHEMA_DIR,
    check: Annotated[bool, typer.Option(help="Only check the files are current.")] = False,
) -> None:
    """Write JSON Schema for every message (or check the committed ones are current)."""
    if check:
        stale = [
            n for n, text in render_schemas().items() if not (out / n).exists() or (out / n).read_text("utf-8") != text
        ]
        if stale:
            err.print(f"[red]stale schema files[/]: {', '.join(stale)} — run `duban schema`")
            raise typer.Exit(1)
        console.print("schema files are current")
        return
    for path in write_schemas(out):
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


@deploy_app.command("nats-config")
def nats_config(
    out: Annotated[Path, typer.Option(help="Directory for the generated files.")] = Path("deploy/nats"),
) -> None:
    """Generate the NATS server configuration (users and permissions) from the programmes."""
    from services.common import natsauth
    from services.common.runtime import load_programmes

    for path in natsauth.write_deploy_files(out, load_programmes(_settings()).values()):
        console.print(f"wrote {path}")


def _print_json(data: object) -> None:
    console.print_json(json.dumps(data, ensure_ascii=False))


if __name__ == "__main__":
    app()
