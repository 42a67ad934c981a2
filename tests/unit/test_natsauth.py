"""The NATS permission table, the generated server configuration and the password files."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import msgspec
import pytest

from contracts.programme import County, Person, Programme, load_default_programme
from services.common import natsauth
from services.common.natsauth import (
    NatsUser,
    PasswordError,
    ensure_generated_passwords,
    load_password,
    password_env_var,
    render_server_auth,
    users_for,
    write_deploy_files,
)

DEPLOY_NATS = Path(__file__).resolve().parents[2] / "deploy" / "nats"
REGENERATE = "regenerate with: duban deploy nats-config --out deploy/nats"


@pytest.fixture(scope="module")
def programme() -> Programme:
    return load_default_programme()


@pytest.fixture(scope="module")
def users(programme: Programme) -> dict[str, NatsUser]:
    return {u.name: u for u in users_for([programme])}


def _subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard semantics: ``*`` one token, ``>`` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def _may_publish(user: NatsUser, subject: str) -> bool:
    return any(_subject_matches(p, subject) for p in user.publish)


def _may_subscribe(user: NatsUser, subject: str) -> bool:
    return any(_subject_matches(p, subject) for p in user.subscribe)


# -- the table ---------------------------------------------------------------------------------
def test_one_user_per_county_plus_operators_and_services(users: dict[str, NatsUser], programme: Programme) -> None:
    counties = {f"county-{c.code}" for c in programme.counties}
    assert counties <= set(users)
    assert set(users) - counties == {
        "ops",
        "city",
        "province",
        "svc-submissions",
        "svc-ledger",
        "svc-escalation",
        "svc-notifier",
        "svc-gateway",
    }


def test_county_publishes_only_on_its_own_submission_subject(users: dict[str, NatsUser]) -> None:
    county = users["county-410928"]
    assert county.role == "county"
    assert county.publish == ("duban.submit.county.410928",)
    assert county.subscribe == ("_INBOX_county_410928.>",)
    assert county.inbox_prefix == "_INBOX_county_410928"
    assert not county.allow_responses
    assert _may_publish(county, "duban.submit.county.410928")
    for other in ("duban.submit.county.410922", "duban.submit.city.410928", "duban.submit.county.410928.x"):
        assert not _may_publish(county, other)


def test_liu_bing_and_liu_bing_are_separate_users(users: dict[str, NatsUser], programme: Programme) -> None:
    qingfeng, nanle = programme.county("410922"), programme.county("410923")
    assert qingfeng is not None and nanle is not None
    assert qingfeng.responsible_person.name != nanle.responsible_person.name  # 刘兵 / 刘冰
    a, b = users["county-410922"], users["county-410923"]
    assert a.name != b.name and a.password_env != b.password_env
    assert not _may_publish(a, "duban.submit.county.410923")
    assert not _may_publish(b, "duban.submit.county.410922")
    assert not _may_subscribe(a, "_INBOX_county_410923.abc.1")


def test_only_services_and_ops_touch_jetstream_and_events(users: dict[str, NatsUser]) -> None:
    for user in users.values():
        js = _may_publish(user, "$JS.API.STREAM.INFO.DUBAN_EVENTS")
        events = _may_subscribe(user, "duban.events.puyang-2017-13.410928")
        if user.role in ("service", "ops"):
            assert js, user.name
        elif user.role == "gateway":
            assert not js and not events, user.name
        else:
            assert not js, user.name
            assert not events, user.name
            assert not any(s.startswith(("$JS", "duban.events", ">")) for s in user.publish + user.subscribe)


def test_operators_cannot_impersonate_counties(users: dict[str, NatsUser]) -> None:
    city, province = users["city"], users["province"]
    assert _may_publish(city, "duban.submit.city.410928")
    assert _may_publish(city, "duban.query.milestones") and _may_publish(city, "duban.ops.replay")
    assert _may_publish(province, "duban.submit.province.410928")
    assert not _may_publish(province, "duban.ops.replay")
    for op in (city, province):
        assert not _may_publish(op, "duban.submit.county.410928")
    assert not _may_publish(province, "duban.submit.city.410928")
    assert city.inbox_prefix == "_INBOX_city" and city.subscribe == ("_INBOX_city.>",)


def test_services(users: dict[str, NatsUser]) -> None:
    sub = users["svc-submissions"]
    assert sub.allow_responses
    assert _may_subscribe(sub, "duban.submit.county.410928")
    assert _may_publish(sub, "duban.events.puyang-2017-13.410928")
    assert _may_publish(sub, "duban.refusals.county.410928")
    assert not _may_publish(sub, "duban.submit.county.410928")
    for name in ("svc-ledger", "svc-escalation", "svc-notifier"):
        svc = users[name]
        assert svc.allow_responses and _may_publish(svc, "$JS.ACK.DUBAN_EVENTS.x.1.1.1.1.0")
        assert _may_subscribe(svc, "duban.events.puyang-2017-13.410928")
    assert users["ops"].publish == (">",) and users["ops"].subscribe == (">",)


def test_gateway_forwards_submissions_and_county_reads_only(users: dict[str, NatsUser]) -> None:
    gateway = users["svc-gateway"]
    assert gateway.role == "gateway" and not gateway.allow_responses
    assert gateway.inbox_prefix == "_INBOX_gateway" and gateway.subscribe == ("_INBOX_gateway.>",)
    for role in ("county", "city", "province"):
        assert _may_publish(gateway, f"duban.submit.{role}.410928")
    assert not _may_publish(gateway, "duban.submit.county.410928.x")
    assert _may_publish(gateway, "duban.query.ledger.county") and _may_publish(gateway, "duban.query.ledger.history")
    assert _may_publish(gateway, "$SRV.PING.duban-submissions")
    for subject in (
        "duban.query.ledger.table",
        "duban.ops.escalation.confirm",
        "duban.events.puyang-2017-13.410928",
        "duban.refusals.county.410928",
        "$JS.API.STREAM.INFO.DUBAN_EVENTS",
        "_INBOX.abc",
    ):
        assert not _may_publish(gateway, subject), subject
    for subject in ("duban.submit.county.410928", "_INBOX_county_410928.x", "_INBOX_city.x", "_INBOX.x", "duban.>"):
        assert not _may_subscribe(gateway, subject), subject


def test_counties_across_programmes_are_merged(programme: Programme) -> None:
    extra = msgspec.structs.replace(
        programme,
        programme=msgspec.structs.replace(programme.programme, id="other-2018"),
        counties=(
            *programme.counties[:1],
            County(
                code="410901", name="华龙区", responsible_unit="x", responsible_person=Person(id="p-1", name="某某")
            ),
        ),
    )
    names = [u.name for u in users_for([extra, programme])]
    assert names.count(f"county-{programme.counties[0].code}") == 1
    assert "county-410901" in names
    assert names == [u.name for u in users_for([programme, extra])]  # order does not depend on input order


# -- the rendered configuration ----------------------------------------------------------------
def test_password_env_var() -> None:
    assert password_env_var("county-410928") == "DUBAN_NATS_PASSWORD_COUNTY_410928"
    assert password_env_var("svc-submissions") == "DUBAN_NATS_PASSWORD_SVC_SUBMISSIONS"


def test_rendered_fragment_references_passwords_only_as_variables(users: dict[str, NatsUser]) -> None:
    text = render_server_auth(users.values())
    password_lines = [line.strip() for line in text.splitlines() if re.match(r"\s*password\s*:", line)]
    assert len(password_lines) == len(users)
    for line in password_lines:
        assert re.fullmatch(r"password: \$DUBAN_NATS_PASSWORD_[A-Z0-9_]+", line), line
    for user in users.values():
        assert f'user: "{user.name}"' in text
        assert f"password: ${user.password_env}\n" in text
    assert "pass:" not in text and "token" not in text
    assert text.count("allow_responses: true") == 4
    assert text == render_server_auth(users.values())  # deterministic


def test_rendered_fragment_refuses_duplicates() -> None:
    u = NatsUser(name="county-1", role="county", publish=("a",), subscribe=("b",))
    with pytest.raises(ValueError, match="twice"):
        render_server_auth([u, u])


def test_committed_deploy_files_match_the_generator(tmp_path: Path, programme: Programme) -> None:
    written = write_deploy_files(tmp_path, [programme])
    assert [p.name for p in written] == [natsauth.AUTH_CONF, natsauth.SERVER_CONF]
    for path in written:
        committed = DEPLOY_NATS / path.name
        assert committed.exists(), f"{committed} is missing; {REGENERATE}"
        assert committed.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
            f"{committed} is out of date with the programme or services/common/natsauth.py; {REGENERATE}"
        )


def test_server_conf_includes_auth_and_syncs_always() -> None:
    text = natsauth.render_server_conf()
    assert 'include "auth.conf"' in text
    assert "sync_interval: always" in text
    assert 'store_dir: "/var/lib/duban/nats"' in text
    assert 'http: "127.0.0.1:8222"' in text


# -- passwords -----------------------------------------------------------------------------------
def test_generated_passwords_are_private_files_and_stable(tmp_path: Path, users: dict[str, NatsUser]) -> None:
    secrets_dir = tmp_path / "secrets"
    env = ensure_generated_passwords(users.values(), secrets_dir, environ={})
    assert set(env) == {u.password_env for u in users.values()}
    assert len(set(env.values())) == len(env)
    assert stat.S_IMODE((secrets_dir / "nats").stat().st_mode) == 0o700
    for user in users.values():
        path = secrets_dir / "nats" / user.name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert natsauth.PASSWORD_PATTERN.match(env[user.password_env])
        assert load_password(user.name, secrets_dir, environ={}) == env[user.password_env]
    assert ensure_generated_passwords(users.values(), secrets_dir, environ={}) == env  # not regenerated


def test_environment_wins_over_file(tmp_path: Path) -> None:
    ensure_generated_passwords(["city"], tmp_path, environ={})
    env = {"DUBAN_NATS_PASSWORD_CITY": "FromTheEnvironment-123"}
    assert load_password("city", tmp_path, environ=env) == "FromTheEnvironment-123"
    assert ensure_generated_passwords(["city"], tmp_path, environ=env) == env
    assert load_password("city", None, environ={}) is None
    assert load_password("ops", tmp_path, environ={}) is None


def test_loose_file_permissions_are_tightened(tmp_path: Path) -> None:
    ensure_generated_passwords(["ops"], tmp_path, environ={})
    path = tmp_path / "nats" / "ops"
    path.chmod(0o644)
    (tmp_path / "nats").chmod(0o755)
    ensure_generated_passwords(["ops"], tmp_path, environ={})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "nats").stat().st_mode) == 0o700


@pytest.mark.parametrize("bad", ["-starts-with-dash-123456", "1234567890123456789", "short", "has space in it 12345"])
def test_passwords_nats_server_cannot_read_back_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(PasswordError) as refused:
        ensure_generated_passwords(["ops"], tmp_path, environ={"DUBAN_NATS_PASSWORD_OPS": bad})
    assert bad not in str(refused.value)  # never show a password
    assert "DUBAN_NATS_PASSWORD_OPS" in str(refused.value)


def test_generated_passwords_start_with_a_letter() -> None:
    for _ in range(500):
        assert natsauth.PASSWORD_PATTERN.match(natsauth.new_password())
