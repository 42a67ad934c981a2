"""The tamper-evident record: hash chains over the stored events, signed checkpoints of their
heads, and signed files. Pure: no I/O; the writers and ``duban audit verify`` share it.

**Chains.** Every stored event carries, in its headers, the hash of the previous event on the
same subject (``Duban-Chain-Prev``) and its own (``Duban-Chain-Hash``) =
sha256("duban-chain/1" | subject | previous hash | the stored bytes). A county's record is three
chains, one per subject and writer: its facts (submissions), its actions (escalation) and its
notifications (notifier). One writer per subject, each appending with
``Nats-Expected-Last-Subject-Sequence``, so a chain never forks; a single chain across the three
writers would make them contend for every append. Altering a stored event changes its hash;
removing or reordering one breaks the next event's link.

**Checkpoints.** The last event of a chain has no successor to betray it, so escalation
periodically records every chain's head (subject, sequence, hash) in a checkpoint, signed
(Ed25519) and chained to the previous checkpoint, in the ``DUBAN_AUDIT`` stream
(contracts.subjects). A head that no longer matches, or a stream shorter than a checkpoint saw,
is a break.

**Signatures.** Ed25519 with NATS nkeys. Escalation signs its action events (the chain hash,
``Duban-Signature`` by ``Duban-Signer``) and the checkpoints; the ledger signs each 一览表 export
in a detached ``.sig`` file (:class:`FileSignature`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Mapping

import msgspec

from contracts.identifiers import Instant

CHAIN_VERSION = b"duban-chain/1"
CHAIN_HASH_HEADER = "Duban-Chain-Hash"
CHAIN_PREV_HEADER = "Duban-Chain-Prev"
SIGNATURE_HEADER = "Duban-Signature"
SIGNER_HEADER = "Duban-Signer"
GENESIS = "0" * 64  # the "previous hash" of a chain's first event

FILE_SIGNATURE_FORMAT = "duban-signature/1"
FILE_SIGNATURE_SUFFIX = ".sig"
# A signed file's answer carries its FileSignature (JSON, base64: header values are ASCII).
FILE_SIGNATURE_HEADER = "Duban-File-Signature"

# Verifies an Ed25519 signature: (public nkey, message, signature) -> valid?
SignatureCheck = Callable[[str, bytes, bytes], bool]


def chain_hash(subject: str, previous: str, data: bytes) -> str:
    digest = hashlib.sha256(CHAIN_VERSION)
    digest.update(b"\n" + subject.encode() + b"\n" + previous.encode() + b"\n")
    digest.update(data)
    return digest.hexdigest()


def chain_headers(subject: str, previous: str, data: bytes) -> dict[str, str]:
    """The chain headers of an event appended after ``previous`` (``GENESIS`` for the first)."""
    return {CHAIN_PREV_HEADER: previous, CHAIN_HASH_HEADER: chain_hash(subject, previous, data)}


class ChainHead(msgspec.Struct, frozen=True):
    subject: str
    sequence: int  # stream sequence of the chain's last event
    hash: str


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Every chain's head as escalation had read the stream up to ``stream_sequence``."""

    number: int  # 1, 2, ... in the audit stream
    taken_at: Instant
    stream_sequence: int
    heads: tuple[ChainHead, ...]
    previous: str  # ``digest`` of the previous checkpoint, GENESIS for the first
    signer: str = ""  # public nkey
    signature: str = ""  # hex Ed25519 signature of ``statement()``

    def statement(self) -> bytes:
        """What is signed and chained: everything but the signature."""
        unsigned = msgspec.structs.replace(self, signature="")
        return b"duban-checkpoint/1\n" + msgspec.json.encode(unsigned)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.statement()).hexdigest()


class FileSignature(msgspec.Struct, frozen=True, kw_only=True):
    """A detached signature (``<file>.sig``) over a file's bytes and what it says it is."""

    format: str = FILE_SIGNATURE_FORMAT
    algorithm: str = "ed25519"
    what: str  # e.g. "督查进度一览表 puyang-2017-13 as of 2018-03-01"
    file_name: str
    size: int
    sha256: str
    signed_at: Instant
    signer: str  # public nkey
    signature: str = ""  # hex

    def statement(self) -> bytes:
        unsigned = msgspec.structs.replace(self, signature="")
        return b"duban-file-signature/1\n" + msgspec.json.encode(unsigned)


def file_signature_statement(
    what: str, file_name: str, data: bytes, signed_at: dt.datetime, signer: str
) -> FileSignature:
    """The unsigned signature document for ``data``; the signer fills in ``signature``."""
    return FileSignature(
        what=what,
        file_name=file_name,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        signed_at=signed_at,
        signer=signer,
    )


class Break(msgspec.Struct, frozen=True, kw_only=True):
    """One place the record is not what was written: where, and what differs."""

    kind: str  # altered | relinked | unchained | bad_signature | untrusted_signer | checkpoint_* | read_model_*
    where: str  # "stream sequence 123 (duban.events.p.410922)", "ledger.milestones 410922 1.2", ...
    detail: str
    stream_sequence: int | None = None
    subject: str | None = None
    event_id: str | None = None


class FileVerdict(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    file_name: str
    what: str = ""
    signer: str = ""
    signed_at: dt.datetime | None = None
    problems: tuple[str, ...] = ()


def check_file(data: bytes, signature: FileSignature, trusted: frozenset[str], verify: SignatureCheck) -> FileVerdict:
    """Does ``data`` match its detached signature, made by a trusted key?"""
    problems = []
    if signature.format != FILE_SIGNATURE_FORMAT or signature.algorithm != "ed25519":
        problems.append(f"unknown signature format {signature.format!r} / {signature.algorithm!r}")
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != signature.size or digest != signature.sha256:
        problems.append(
            f"the file is not the one signed: {len(data)} bytes with sha256 {digest},"
            f" signed were {signature.size} bytes with sha256 {signature.sha256}"
        )
    try:
        valid = verify(signature.signer, signature.statement(), bytes.fromhex(signature.signature))
    except ValueError:
        valid = False
    if not valid:
        problems.append(f"the signature is not {signature.signer}'s signature of this statement")
    if signature.signer not in trusted:
        problems.append(f"signed by {signature.signer}, which is not a trusted key")
    return FileVerdict(
        ok=not problems,
        file_name=signature.file_name,
        what=signature.what,
        signer=signature.signer,
        signed_at=signature.signed_at,
        problems=tuple(problems),
    )


class ChainVerifier:
    """Follows the stream in order and finds where a chain or a checkpoint does not hold.

    ``observe`` every stored event (subject, sequence, headers, bytes), then ``check_checkpoints``.
    Keeps one head per chain, and the hashes at the sequences the checkpoints name: a stream of
    millions of events is verified in constant memory per chain.
    """

    def __init__(self, checkpoints: list[Checkpoint], trusted: frozenset[str], verify: SignatureCheck) -> None:
        self._trusted = trusted
        self._verify = verify
        self.checkpoints = checkpoints
        self.heads: dict[str, ChainHead] = {}
        self.breaks: list[Break] = []
        self.events = 0
        self.unchained_before_chain = 0  # events stored before chains began (no headers, at a chain's start)
        self.signed = 0
        self.last_sequence = 0
        self._wanted = {(h.subject, h.sequence) for c in checkpoints for h in c.heads}
        self._seen: dict[tuple[str, int], str] = {}

    def observe(
        self, subject: str, sequence: int, headers: Mapping[str, str] | None, data: bytes, event_id: str | None = None
    ) -> None:
        self.events += 1
        self.last_sequence = max(self.last_sequence, sequence)
        headers = headers or {}
        where = f"stream sequence {sequence} ({subject})"
        stored_hash = headers.get(CHAIN_HASH_HEADER)
        previous = headers.get(CHAIN_PREV_HEADER)
        head = self.heads.get(subject)
        actual = chain_hash(subject, previous, data) if previous is not None else None
        if stored_hash is None or previous is None:
            if head is None:
                self.unchained_before_chain += 1
            else:
                self._break(
                    "unchained",
                    where,
                    "the event carries no chain hash, yet its chain began earlier",
                    sequence,
                    subject,
                    event_id,
                )
            return
        expected_previous = head.hash if head is not None else GENESIS
        if previous != expected_previous:
            before = f"stream sequence {head.sequence}" if head is not None else "the start of the chain"
            self._break(
                "relinked",
                where,
                f"chained to {previous[:16]}…, but the chain's previous event ({before}) hashes to"
                f" {expected_previous[:16]}…: an event before it was removed, reordered or altered",
                sequence,
                subject,
                event_id,
            )
        if actual != stored_hash:
            self._break(
                "altered",
                where,
                f"the stored bytes hash to {str(actual)[:16]}…, the event was recorded with {stored_hash[:16]}…:"
                " its content changed after it was written",
                sequence,
                subject,
                event_id,
            )
        signer = headers.get(SIGNER_HEADER)
        signature = headers.get(SIGNATURE_HEADER)
        if signer is not None or signature is not None:
            self.signed += 1
            self._check_signature(
                signer or "", signature or "", stored_hash.encode(), where, sequence, subject, event_id
            )
        # The chain goes on from the hash as recorded, so one altered event is one break.
        self.heads[subject] = ChainHead(subject, sequence, stored_hash)
        if (subject, sequence) in self._wanted:
            self._seen[(subject, sequence)] = stored_hash

    def check_checkpoints(self) -> None:
        previous = GENESIS
        for checkpoint in self.checkpoints:
            where = f"checkpoint {checkpoint.number} (stream sequence {checkpoint.stream_sequence})"
            if checkpoint.previous != previous:
                self._break(
                    "checkpoint_relinked", where, "does not follow the previous checkpoint: one was removed or altered"
                )
            previous = checkpoint.digest
            self._check_signature(checkpoint.signer, checkpoint.signature, checkpoint.statement(), where)
            if checkpoint.stream_sequence > self.last_sequence:
                self._break(
                    "checkpoint_truncated",
                    where,
                    f"the checkpoint saw the stream up to sequence {checkpoint.stream_sequence};"
                    f" it now ends at {self.last_sequence}: events were removed",
                )
            for head in checkpoint.heads:
                seen = self._seen.get((head.subject, head.sequence))
                if seen is None:
                    detail = "that event is no longer on its subject"
                elif seen != head.hash:
                    detail = f"it now hashes to {seen[:16]}…, the checkpoint recorded {head.hash[:16]}…"
                else:
                    continue
                self._break(
                    "checkpoint_mismatch",
                    f"stream sequence {head.sequence} ({head.subject})",
                    f"{where} recorded this event as the head of its chain; {detail}",
                    head.sequence,
                    head.subject,
                )

    def _check_signature(
        self,
        signer: str,
        signature: str,
        message: bytes,
        where: str,
        sequence: int | None = None,
        subject: str | None = None,
        event_id: str | None = None,
    ) -> None:
        try:
            valid = self._verify(signer, message, bytes.fromhex(signature))
        except ValueError:
            valid = False
        if not valid:
            self._break(
                "bad_signature", where, f"the signature is not {signer or 'anyone'}'s", sequence, subject, event_id
            )
        elif signer not in self._trusted:
            self._break(
                "untrusted_signer",
                where,
                f"signed by {signer}, which is not a trusted key",
                sequence,
                subject,
                event_id,
            )

    def _break(
        self,
        kind: str,
        where: str,
        detail: str,
        sequence: int | None = None,
        subject: str | None = None,
        event_id: str | None = None,
    ) -> None:
        self.breaks.append(
            Break(kind=kind, where=where, detail=detail, stream_sequence=sequence, subject=subject, event_id=event_id)
        )


def first_break(breaks: list[Break]) -> Break | None:
    """The earliest break in the stream (checkpoint and read-model findings after stream ones)."""
    if not breaks:
        return None
    return min(breaks, key=lambda b: (b.stream_sequence is None, b.stream_sequence or 0))


class ReadModelAudit(msgspec.Struct, frozen=True, kw_only=True):
    """A read model compared with the stream up to its checkpoint."""

    read_model: str  # "ledger"
    checked_to: int  # the read model's checkpoint: events up to it were compared
    rows: dict[str, int]  # rows compared, per table
    breaks: tuple[Break, ...]


class AuditReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``duban audit verify`` found: ``ok`` when nothing differs."""

    ok: bool
    events: int
    chains: int
    signed_events: int
    unchained_before_chain: int
    checkpoints: int
    last_checkpoint_at: dt.datetime | None
    stream_last_sequence: int
    read_models_checked: tuple[str, ...]
    first_break: Break | None
    breaks: tuple[Break, ...]
