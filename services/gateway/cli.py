"""`duban gateway …`: serve the HTTP gateway, manage its bearer tokens, print its OpenAPI document."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import signal
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from contracts.commands import Role
from services.common.clock import SystemClock
from services.common.runtime import client_runtime, client_settings
from services.common.settings import Settings
from services.gateway.tokens import TokenError, TokenStore, tokens_path

OPENAPI_FILE = Path("contracts/openapi.json")

gateway_app = typer.Typer(no_args_is_help=True, help="The HTTP gateway for county systems that cannot speak NATS.")
token_app = typer.Typer(no_args_is_help=True, help="The gateway's bearer tokens (stored hashed; shown once).")
gateway_app.add_typer(token_app, name="token")
console = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    return client_settings()


def _store(settings: Settings) -> TokenStore:
    return TokenStore(tokens_path(settings.state_dir))


@gateway_app.command()
def serve(
    address: Annotated[
        str | None, typer.Option("--addr", help="host:port to listen on (default: $DUBAN_HTTP_ADDR or 127.0.0.1:8321).")
    ] = None,
) -> None:
    """Run only the gateway, against a running duban (NATS_URL, or `duban up`'s embedded server)."""
    from services.common.httpserver import parse_address
    from services.gateway.main import run

    settings = _settings()
    try:
        host, port = parse_address(address) if address else (None, None)
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    # A server keeps reconnecting to NATS; the CLI's default is to give up after one try.
    runtime = dataclasses.replace(client_runtime(settings), reconnect_attempts=-1)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ready = asyncio.Event()
        serving = asyncio.create_task(run(runtime, SystemClock(), stop, ready, host, port))
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait([serving, waiting], return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            err.print(f"[bold green]duban gateway is running[/] — NATS {runtime.nats_url}. Ctrl-C stops it.")
        waiting.cancel()
        await serving

    try:
        asyncio.run(main())
    except (OSError, ValueError) as exc:  # a taken port, a bad DUBAN_GATEWAY_RATE or address
        err.print(f"[red]the gateway cannot start[/]: {exc}")
        raise typer.Exit(2) from None


@token_app.command("issue")
def token_issue(
    role: Annotated[Role, typer.Option(help="county for a county system; city or province for operators.")],
    label: Annotated[str, typer.Option(help="Who holds it, e.g. '濮阳县数字城管'.")],
    county: Annotated[str | None, typer.Option(help="The county code (county tokens only).")] = None,
) -> None:
    """Issue a token and print it once: it is stored only as a hash and cannot be shown again."""
    store = _store(_settings())
    try:
        record, token = store.issue(role, county, label, dt.datetime.now(dt.UTC))
    except TokenError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    scope = f"county {record.county_code}" if record.county_code else f"{record.role.value} operator"
    err.print(
        f"issued token [bold]{record.token_id}[/] ({scope}, {record.label}) in {store.path}.\n"
        "[yellow]Copy it now: it is shown only this once.[/] Send it as `Authorization: Bearer <token>`."
    )
    print(token)  # alone on standard output, for scripts


@token_app.command("list")
def token_list(json_out: Annotated[bool, typer.Option("--json", help="Print the records as JSON.")] = False) -> None:
    """Every token on record: id, role, county, label, created, revoked (never a secret)."""
    records = _store(_settings()).records()
    if json_out:
        console.print_json(
            msgspec.json.encode(
                [{k: v for k, v in msgspec.structs.asdict(r).items() if k != "secret_sha256"} for r in records]
            ).decode()
        )
        return
    table = Table()
    table.add_column("id", no_wrap=True, min_width=16)  # what `token revoke` takes: never cut short
    for name in ("role", "county", "label", "created", "revoked"):
        table.add_column(name)
    for r in records:
        revoked = r.revoked_at.isoformat(timespec="seconds") if r.revoked_at else ("yes" if r.revoked else "")
        created = r.created_at.isoformat(timespec="seconds")
        table.add_row(r.token_id, r.role.value, r.county_code or "", r.label, created, revoked)
    Console(width=max(console.width, 120)).print(table if records else "no tokens on record")


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (see `duban gateway token list`).")],
) -> None:
    """Revoke a token; a running gateway refuses it from its next request on."""
    try:
        record = _store(_settings()).revoke(token_id, dt.datetime.now(dt.UTC))
    except TokenError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    console.print(f"revoked {record.token_id} ({record.label})")


@gateway_app.command()
def openapi(
    out: Annotated[
        Path | None, typer.Option(help=f"Write it to this file (the committed one: {OPENAPI_FILE}).")
    ] = None,
) -> None:
    """Print the gateway's OpenAPI document (or write it with --out)."""
    # Imported here: the app (FastAPI, FastStream) is ~20 MB of every `duban` process's memory.
    from services.gateway.app import render_openapi

    text = render_openapi()
    if out is None:
        print(text, end="")
        return
    out.write_text(text, encoding="utf-8")
    err.print(f"wrote {out}")
