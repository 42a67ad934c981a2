"""The gateway's token store: issue, verify, revoke, reload on change; hashes on disk, never secrets."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from contracts.commands import Role
from services.gateway.tokens import TokenError, TokenStore, token_id_of, tokens_path

NOW = dt.datetime(2017, 6, 15, 10, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))


@pytest.fixture
def store(tmp_path: Path) -> TokenStore:
    return TokenStore(tmp_path / "gateway" / "tokens.json")


def _bump(path: Path) -> None:
    """Make sure a rewrite is seen even on a file system with coarse timestamps."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_issue_and_verify(store: TokenStore) -> None:
    record, token = store.issue(Role.COUNTY, "410928", "濮阳县数字城管", NOW)
    assert token.startswith(f"dbn_{record.token_id}_") and len(token) == 4 + 16 + 1 + 43
    assert token_id_of(token) == record.token_id
    assert (record.role, record.county_code, record.label, record.created_at) == (
        Role.COUNTY,
        "410928",
        "濮阳县数字城管",
        NOW,
    )
    assert store.verify(token) == record
    city, city_token = store.issue(Role.CITY, None, "市督查局", NOW)
    assert store.verify(city_token) == city and city.county_code is None
    assert {r.token_id for r in store.records()} == {record.token_id, city.token_id}


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "dbn_",
        "Bearer dbn_x",
        "dbn_0123456789abcdef_" + "A" * 43,  # well formed, unknown id
    ],
)
def test_unknown_and_malformed_tokens_are_refused(store: TokenStore, bad: str) -> None:
    store.issue(Role.COUNTY, "410928", "x", NOW)
    assert store.verify(bad) is None


def test_a_wrong_secret_is_refused(store: TokenStore) -> None:
    record, token = store.issue(Role.COUNTY, "410928", "x", NOW)
    last = "A" if token[-1] != "A" else "B"
    assert store.verify(token[:-1] + last) is None
    other_record, other = store.issue(Role.COUNTY, "410922", "y", NOW)
    # The other token's secret under this token's id.
    assert store.verify(f"dbn_{record.token_id}_{other.rsplit('_', 1)[-1]}") is None
    assert store.verify(other) == other_record


def test_the_file_holds_the_hash_never_the_secret(store: TokenStore) -> None:
    record, token = store.issue(Role.COUNTY, "410928", "濮阳县数字城管", NOW)
    secret = token.split("_", 2)[2]
    text = store.path.read_text("utf-8")
    assert secret not in text and token not in text
    stored = json.loads(text)["tokens"][0]
    assert stored["secret_sha256"] == hashlib.sha256(secret.encode()).hexdigest() == record.secret_sha256
    assert set(stored) == {
        "token_id",
        "role",
        "county_code",
        "label",
        "created_at",
        "revoked",
        "revoked_at",
        "secret_sha256",
    }
    assert stored["label"] == "濮阳县数字城管" and stored["revoked"] is False


def test_file_and_directory_are_private(store: TokenStore) -> None:
    store.issue(Role.PROVINCE, None, "省住建厅", NOW)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    store.issue(Role.CITY, None, "市督查局", NOW)  # a rewrite keeps it private
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert not [
        p.name for p in store.path.parent.iterdir() if p.name.startswith(".tokens.json.") and "lock" not in p.name
    ]


def test_revoke_takes_effect_in_a_running_reader(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    cli, gateway = TokenStore(path), TokenStore(path)  # two processes: the CLI and the gateway
    record, token = cli.issue(Role.COUNTY, "410928", "x", NOW)
    assert gateway.verify(token) == record
    revoked = cli.revoke(record.token_id, NOW + dt.timedelta(days=1))
    assert revoked.revoked and revoked.revoked_at == NOW + dt.timedelta(days=1)
    _bump(path)
    assert gateway.verify(token) is None
    assert [r.revoked for r in gateway.records()] == [True]  # kept on record
    assert cli.revoke(record.token_id, NOW + dt.timedelta(days=2)).revoked_at == revoked.revoked_at  # idempotent


def test_tokens_issued_elsewhere_are_seen_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    gateway = TokenStore(path)
    assert gateway.records() == []  # no file yet: nobody is authorised
    _, token = TokenStore(path).issue(Role.CITY, None, "市督查局", NOW)
    assert gateway.verify(token) is not None


def test_the_file_is_reread_only_when_it_changes(store: TokenStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _, token = store.issue(Role.CITY, None, "市督查局", NOW)
    reads: list[Path] = []
    original = Path.read_bytes

    def counting(self: Path) -> bytes:
        reads.append(self)
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    for _ in range(5):
        assert store.verify(token) is not None
    assert len(reads) == 1
    _bump(store.path)
    assert store.verify(token) is not None
    assert len(reads) == 2


def test_a_corrupt_file_fails_closed(store: TokenStore) -> None:
    _, token = store.issue(Role.CITY, None, "市督查局", NOW)
    assert store.verify(token) is not None
    store.path.write_text("{not json", "utf-8")
    _bump(store.path)
    assert store.verify(token) is None


def test_revoke_accepts_a_pasted_token_and_refuses_unknown_ids(store: TokenStore) -> None:
    record, token = store.issue(Role.COUNTY, "410928", "x", NOW)
    assert store.revoke(token, NOW).token_id == record.token_id
    with pytest.raises(TokenError, match="no token with id"):
        store.revoke("0123456789abcdef", NOW)
    with pytest.raises(TokenError, match="not a token id"):
        store.revoke("nonsense", NOW)


@pytest.mark.parametrize(
    ("role", "county", "label", "message"),
    [
        (Role.COUNTY, None, "x", "needs --county"),
        (Role.COUNTY, "4109", "x", "needs --county"),
        (Role.COUNTY, "410928.x", "x", "needs --county"),
        (Role.CITY, "410928", "x", "not bound to a county"),
        (Role.PROVINCE, None, "  ", "needs a --label"),
    ],
)
def test_issue_refuses_what_does_not_fit(
    store: TokenStore, role: Role, county: str | None, label: str, message: str
) -> None:
    with pytest.raises(TokenError, match=message):
        store.issue(role, county, label, NOW)
    assert not store.path.exists()


def test_tokens_path(tmp_path: Path) -> None:
    assert tokens_path(tmp_path, {}) == tmp_path / "gateway" / "tokens.json"
    assert tokens_path(tmp_path, {"DUBAN_GATEWAY_TOKENS": "/etc/duban/tokens.json"}) == Path("/etc/duban/tokens.json")
