"""Bearer tokens of the HTTP gateway: issued by the CLI, shown once, stored hashed.

A token is ``dbn_<id>_<secret>``: 16 hex digits of id (the lookup key, safe to log and show)
and 256 random bits of secret (base64url). The token file keeps, per token, its id, role
(``county``/``city``/``province``), county (county tokens only), label, creation time, the
revoked flag and the SHA-256 of the secret — never the secret. SHA-256 without salt or
stretching is right here: the secret is random and long, there is nothing to guess.

The file (default ``<DUBAN_STATE_DIR>/gateway/tokens.json``, ``$DUBAN_GATEWAY_TOKENS`` overrides)
is written atomically with mode 0600 under a lock, so the CLI may issue or revoke while the
gateway runs; the gateway re-reads it when it changes, so a revocation takes effect on the next
request, without a restart. A file that cannot be read or parsed fails closed: no token is valid.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
import structlog

from contracts.commands import Role
from contracts.identifiers import COUNTY_CODE_PATTERN
from contracts.payloads import decode_json

__all__ = [
    "TOKENS_ENV",
    "TOKEN_PREFIX",
    "TokenError",
    "TokenRecord",
    "TokenStore",
    "tokens_path",
]

log = structlog.get_logger(__name__)

TOKENS_ENV = "DUBAN_GATEWAY_TOKENS"
TOKEN_PREFIX = "dbn"
FILE_VERSION = 1
_TOKEN = re.compile(rf"^{TOKEN_PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_-]{{43}})$")
_TOKEN_ID = re.compile(r"^[0-9a-f]{16}$")
_COUNTY_CODE = re.compile(COUNTY_CODE_PATTERN)
# Compared against when the id is unknown, so an unknown id costs the same as a wrong secret.
_NO_DIGEST = hashlib.sha256(b"no such token").hexdigest()


class TokenError(ValueError):
    """A token that cannot be issued or revoked as asked (the message says why)."""


class TokenRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One issued token as kept on disk (and listed): everything but the secret."""

    token_id: str
    role: Role
    county_code: str | None  # county tokens: the only county they may post for and read
    label: str  # who holds it, e.g. "濮阳县数字城管"
    created_at: dt.datetime
    revoked: bool = False
    revoked_at: dt.datetime | None = None
    secret_sha256: str


class _TokenFile(msgspec.Struct, kw_only=True):
    version: int = FILE_VERSION
    tokens: list[TokenRecord] = msgspec.field(default_factory=list)


_decoder = msgspec.json.Decoder(_TokenFile)


def tokens_path(state_dir: Path, environ: Mapping[str, str] | None = None) -> Path:
    """``$DUBAN_GATEWAY_TOKENS``, else ``<state_dir>/gateway/tokens.json``."""
    env = os.environ if environ is None else environ
    override = env.get(TOKENS_ENV)
    return Path(override) if override else Path(state_dir) / "gateway" / "tokens.json"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def token_id_of(token: str) -> str | None:
    """The id part of a well-formed token (safe to log), else None."""
    match = _TOKEN.match(token)
    return match.group(1) if match else None


@dataclass(frozen=True)
class _Seen:
    """What identifies one version of the file: a replace gives a new inode."""

    inode: int
    mtime_ns: int
    size: int


class TokenStore:
    """The token file: issue, list and revoke (the CLI); verify, re-reading on change (the gateway)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._seen: _Seen | None = None
        self._tokens: dict[str, TokenRecord] = {}

    # -- reading -------------------------------------------------------------------------------
    def verify(self, token: str) -> TokenRecord | None:
        """The token's record if the token is well formed, known, matches and is not revoked."""
        self._reload_if_changed()
        match = _TOKEN.match(token)
        if match is None:
            return None
        token_id, secret = match.groups()
        record = self._tokens.get(token_id)
        # As bytes: compare_digest refuses str with non-ASCII characters (a hand-edited file).
        expected = (record.secret_sha256 if record else _NO_DIGEST).encode()
        matches = hmac.compare_digest(expected, _digest(secret).encode())
        if record is None or not matches or record.revoked:
            return None
        return record

    def records(self) -> list[TokenRecord]:
        """Every token on record (revoked ones too), oldest first."""
        self._reload_if_changed()
        return sorted(self._tokens.values(), key=lambda r: (r.created_at, r.token_id))

    def _reload_if_changed(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen, self._tokens = None, {}
            return
        seen = _Seen(st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return
        if stat.S_IMODE(st.st_mode) & 0o077:
            log.warning("gateway token file is readable by others; it should be 0600", key_file=str(self.path))
        try:
            parsed = decode_json(_decoder, self.path.read_bytes())
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            # Fail closed: a token file we cannot read authorises nobody.
            log.error("gateway token file unreadable; no token is valid until it is fixed", error=str(exc))
            self._seen, self._tokens = seen, {}
            return
        self._seen = seen
        self._tokens = {r.token_id: r for r in parsed.tokens}
        log.info("gateway tokens loaded", key_file=str(self.path), count=len(self._tokens))

    # -- writing (the CLI) ---------------------------------------------------------------------
    def issue(self, role: Role, county_code: str | None, label: str, now: dt.datetime) -> tuple[TokenRecord, str]:
        """A new token: its record (stored) and the token itself (shown once, never stored)."""
        role = Role(role)
        if role is Role.COUNTY:
            if county_code is None or not _COUNTY_CODE.match(county_code):
                raise TokenError("a county token needs --county with the county's six-digit code (e.g. 410928)")
        elif county_code is not None:
            raise TokenError(f"a {role.value} token is not bound to a county: leave out --county")
        if not label.strip():
            raise TokenError("a token needs a --label saying who holds it")
        if now.tzinfo is None:
            raise TokenError("the creation time must be timezone-aware")
        with self._locked() as tokens:
            token_id = secrets.token_hex(8)
            while token_id in tokens:  # pragma: no cover - 64 random bits
                token_id = secrets.token_hex(8)
            secret = secrets.token_urlsafe(32)
            record = TokenRecord(
                token_id=token_id,
                role=role,
                county_code=county_code,
                label=label.strip(),
                created_at=now,
                secret_sha256=_digest(secret),
            )
            tokens[token_id] = record
        return record, f"{TOKEN_PREFIX}_{token_id}_{secret}"

    def revoke(self, token_id: str, now: dt.datetime) -> TokenRecord:
        """Mark a token revoked (kept on record); revoking it again changes nothing."""
        if not _TOKEN_ID.match(token_id):
            found = token_id_of(token_id)  # someone pasted the whole token: use its id
            if found is None:
                raise TokenError(f"{token_id!r} is not a token id (16 hex digits, see `duban gateway token list`)")
            token_id = found
        with self._locked() as tokens:
            record = tokens.get(token_id)
            if record is None:
                raise TokenError(f"no token with id {token_id}")
            if not record.revoked:
                record = msgspec.structs.replace(record, revoked=True, revoked_at=now)
                tokens[token_id] = record
        return record

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, TokenRecord]]:
        """Read-modify-write under an exclusive lock; the new file replaces the old atomically."""
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_path = directory / f".{self.path.name}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = _decoder.decode(self.path.read_bytes()).tokens
            except FileNotFoundError:
                current = []
            tokens = {r.token_id: r for r in current}
            yield tokens
            self._write(sorted(tokens.values(), key=lambda r: (r.created_at, r.token_id)))
        finally:
            os.close(fd)  # releases the lock

    def _write(self, tokens: list[TokenRecord]) -> None:
        data = msgspec.json.format(msgspec.json.encode(_TokenFile(tokens=tokens)), indent=2) + b"\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._seen = None  # our own view re-reads it on next use
