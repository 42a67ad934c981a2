"""`duban audit …`: verify the record and signed files, record a checkpoint, show the signing key."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from nats.errors import NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from rich.console import Console

from contracts.audit import FILE_SIGNATURE_SUFFIX, AuditReport, FileSignature, FileVerdict, check_file
from contracts.escalation import AUDIT_CHECKPOINT_SUBJECT, CheckpointList
from services.audit.verify import verify_record
from services.common.runtime import client_runtime, client_settings
from services.common.settings import Settings
from services.common.signing import load_signer, trusted_keys, verify_signature

audit_app = typer.Typer(no_args_is_help=True, help="Prove the record was not altered: chains, checkpoints, signatures.")
console = Console()
err = Console(stderr=True)

Trust = Annotated[
    list[str] | None,
    typer.Option("--trust", help="A public key (U…) to accept signatures from; besides $DUBAN_TRUSTED_KEYS and ours."),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]
SHOWN_BREAKS = 20


def _settings() -> Settings:
    return client_settings()


@audit_app.command()
def verify(
    trust: Trust = None,
    read_models: Annotated[
        bool, typer.Option("--read-models/--no-read-models", help="Also compare the ledger's read model.")
    ] = True,
    json_out: JsonOut = False,
) -> None:
    """Re-read the event stream and the read models; report the first break (exit 1) or that all holds."""
    settings = _settings()
    trusted = trusted_keys(settings, tuple(trust or ()))

    async def run() -> AuditReport:
        nc = await client_runtime(settings).connect_as(settings.nats_user or "ops")
        try:
            return await verify_record(nc, trusted, read_models=read_models)
        finally:
            await nc.close()

    try:
        report = asyncio.run(run())
    except (NoServersError, OSError) as exc:
        err.print(f"[red]cannot reach NATS[/] ({exc}): is `duban up` running, and is NATS_URL right?")
        raise typer.Exit(2) from None
    if json_out:
        console.print_json(msgspec.json.encode(report).decode())
    else:
        _show_report(report, read_models)
    if not report.ok:
        raise typer.Exit(1)


def _show_report(report: AuditReport, read_models: bool) -> None:
    console.print(
        f"{report.events} events in {report.chains} chains (stream to sequence {report.stream_last_sequence}),"
        f" {report.signed_events} signed; {report.checkpoints} checkpoints"
        + (f", the last at {report.last_checkpoint_at.isoformat()}" if report.last_checkpoint_at else "")
    )
    if report.unchained_before_chain:
        console.print(f"{report.unchained_before_chain} events were stored before chains began (not verifiable)")
    if report.read_models_checked:
        console.print("read models compared: " + "; ".join(report.read_models_checked))
    elif read_models:
        console.print("[yellow]read models not compared: no ledger answered[/]")
    if report.ok:
        console.print("[green]OK[/]: the record is as it was written")
        return
    first = report.first_break
    assert first is not None
    console.print(f"[red]BROKEN[/]: {len(report.breaks)} finding(s); the first:")
    console.print(f"  {first.kind} at {first.where}" + (f" (event {first.event_id})" if first.event_id else ""))
    console.print(f"  {first.detail}")
    for found in report.breaks[:SHOWN_BREAKS]:
        if found is not first:
            console.print(f"  - {found.kind} at {found.where}: {found.detail}")
    if len(report.breaks) > SHOWN_BREAKS:
        console.print(f"  … and {len(report.breaks) - SHOWN_BREAKS} more (--json lists them all)")


@audit_app.command("verify-file")
def verify_file(
    file: Path,
    signature: Annotated[
        Path | None, typer.Option("--signature", help=f"The signature file (default: FILE{FILE_SIGNATURE_SUFFIX}).")
    ] = None,
    trust: Trust = None,
    json_out: JsonOut = False,
) -> None:
    """Check a signed export (the 一览表 .xlsx) against its detached signature: exit 0 if it holds."""
    settings = _settings()
    signature_path = signature or file.with_name(file.name + FILE_SIGNATURE_SUFFIX)
    try:
        data = file.read_bytes()
        signed = msgspec.json.decode(signature_path.read_bytes(), type=FileSignature)
    except FileNotFoundError as exc:
        err.print(f"[red]{exc.filename}: no such file[/]")
        raise typer.Exit(2) from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        err.print(f"[red]{signature_path} is not a duban signature[/]: {exc}")
        raise typer.Exit(1) from None
    verdict = check_file(data, signed, trusted_keys(settings, tuple(trust or ())), verify_signature)
    if json_out:
        console.print_json(msgspec.json.encode(verdict).decode())
    else:
        _show_verdict(file, verdict)
    if not verdict.ok:
        raise typer.Exit(1)


def _show_verdict(file: Path, verdict: FileVerdict) -> None:
    signed_at = verdict.signed_at.isoformat() if verdict.signed_at else "?"
    if verdict.ok:
        console.print(f"[green]OK[/]: {file} is {verdict.what!r}, signed by {verdict.signer} at {signed_at}")
        return
    console.print(f"[red]NOT VERIFIED[/]: {file} (signed as {verdict.what!r} by {verdict.signer} at {signed_at})")
    for problem in verdict.problems:
        console.print(f"  - {problem}")


@audit_app.command()
def checkpoint() -> None:
    """Ask escalation to record a checkpoint of every chain's head now."""
    settings = _settings()

    async def run() -> bytes:
        nc = await client_runtime(settings).connect_as(settings.nats_user or "ops")
        try:
            return (await nc.request(AUDIT_CHECKPOINT_SUBJECT, b"{}", timeout=30)).data
        finally:
            await nc.close()

    try:
        answer = msgspec.json.decode(asyncio.run(run()), type=CheckpointList)
    except (NoServersError, NoRespondersError, NatsTimeoutError, OSError) as exc:
        err.print(f"[red]no checkpoint[/] ({type(exc).__name__}): is `duban up` running with escalation?")
        raise typer.Exit(2) from None
    if not answer.items:
        console.print("nothing new since the last checkpoint")
    for item in answer.items:
        console.print(
            f"checkpoint {item.number}: {len(item.heads)} chain heads at stream sequence {item.stream_sequence}"
        )


@audit_app.command()
def key() -> None:
    """Print this installation's public signing key (give it to whoever verifies our files)."""
    console.print(load_signer(_settings()).public_key)
