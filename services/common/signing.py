"""Ed25519 signing with NATS nkeys: the one key duban signs its record with.

The key is an nkey seed (``SU…``, as ``nk -gen user`` or ``nsc`` make), read from
``DUBAN_SIGNING_KEY_FILE`` (or the seed itself in ``DUBAN_SIGNING_KEY``); without either, one is
generated at first use in ``<state dir>/secrets/signing.nk`` (mode 0600). Its public key
(``U…``) is what a verifier trusts: ``DUBAN_TRUSTED_KEYS`` (comma-separated public keys), and
always this installation's own key when its seed is at hand. The seed is never logged.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nacl.exceptions
import nacl.signing
import nkeys

from contracts.audit import FileSignature, file_signature_statement
from services.common.settings import Settings

SEED_FILE_NAME = "signing.nk"


@dataclass(frozen=True)
class Signer:
    public_key: str
    _keys: nkeys.KeyPair

    def sign(self, message: bytes) -> str:
        """The hex Ed25519 signature of ``message``."""
        return bytes(self._keys.sign(message)).hex()


def signer_from_seed(seed: bytes) -> Signer:
    keys = nkeys.from_seed(seed.strip())
    return Signer(keys.public_key.decode(), keys)


def new_seed() -> bytes:
    return bytes(nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER))


def load_signer(settings: Settings, environ: dict[str, str] | None = None) -> Signer:
    """This installation's signing key (see the module's docstring); generated when absent."""
    env = os.environ if environ is None else environ
    if env.get("DUBAN_SIGNING_KEY"):
        return signer_from_seed(env["DUBAN_SIGNING_KEY"].encode())
    path = Path(env["DUBAN_SIGNING_KEY_FILE"]) if env.get("DUBAN_SIGNING_KEY_FILE") else default_seed_path(settings)
    if not path.exists():
        if env.get("DUBAN_SIGNING_KEY_FILE"):
            raise FileNotFoundError(f"DUBAN_SIGNING_KEY_FILE: no such file {path}")
        _create_seed_file(path)
    return signer_from_seed(path.read_bytes())


def _create_seed_file(path: Path) -> None:
    """Write a new seed, whole or not at all: services starting together (one unit each) may
    race to create it, and the first one's key is everyone's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(new_seed() + b"\n")
        with contextlib.suppress(FileExistsError):  # another process was first: its key it is
            os.link(draft, path)
    finally:
        draft.unlink(missing_ok=True)


def default_seed_path(settings: Settings) -> Path:
    return settings.secrets_dir / SEED_FILE_NAME


def trusted_keys(
    settings: Settings, extra: tuple[str, ...] = (), environ: dict[str, str] | None = None
) -> frozenset[str]:
    """Public keys a verifier accepts: ``extra``, ``DUBAN_TRUSTED_KEYS``, and this installation's
    own signing key when its seed is here (never generating one)."""
    env = os.environ if environ is None else environ
    keys = {k.strip() for k in env.get("DUBAN_TRUSTED_KEYS", "").split(",") if k.strip()} | set(extra)
    own_seed = env.get("DUBAN_SIGNING_KEY") or ""
    own_file = Path(env["DUBAN_SIGNING_KEY_FILE"]) if env.get("DUBAN_SIGNING_KEY_FILE") else default_seed_path(settings)
    if own_seed:
        keys.add(signer_from_seed(own_seed.encode()).public_key)
    elif own_file.exists():
        keys.add(signer_from_seed(own_file.read_bytes()).public_key)
    return frozenset(keys)


def verify_signature(public_key: str, message: bytes, signature: bytes) -> bool:
    """Is ``signature`` ``public_key``'s Ed25519 signature of ``message``? False for a malformed key."""
    raw = _public_key_bytes(public_key)
    if raw is None:
        return False
    try:
        nacl.signing.VerifyKey(raw).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


def _public_key_bytes(public_key: str) -> bytes | None:
    """The 32 key bytes of a public nkey (base32: prefix byte, key, CRC-16), None if malformed."""
    text = public_key.strip()
    try:
        decoded = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        return None
    if len(decoded) != 35 or not nkeys.valid_public_prefix_byte(decoded[0]):
        return None
    body, checksum = decoded[:-2], decoded[-2:]
    if bytes(nkeys.crc16_checksum(body)) != checksum:
        return None
    return body[1:]


def sign_file(signer: Signer, what: str, file_name: str, data: bytes, signed_at: dt.datetime) -> FileSignature:
    """A detached signature of ``data`` (contracts.audit.FileSignature)."""
    unsigned = file_signature_statement(what, file_name, data, signed_at, signer.public_key)
    return msgspec.structs.replace(unsigned, signature=signer.sign(unsigned.statement()))


def file_signature_header(signature: FileSignature) -> str:
    return base64.b64encode(msgspec.json.encode(signature)).decode("ascii")


def file_signature_from_header(value: str) -> FileSignature:
    return msgspec.json.decode(base64.b64decode(value), type=FileSignature)
