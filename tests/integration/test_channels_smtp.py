"""The SMTP channel against a real SMTP server (aiosmtpd) running in the test.

Plain with AUTH, STARTTLS with AUTH and implicit TLS, with a self-signed certificate made here.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
import socket
import ssl
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.notifier.channels.base import OutboundMessage, Outcome, Secret
from services.notifier.channels.smtp import SmtpChannel, message_id_header

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning"),
]

USER = "duban-notifier"
PASSWORD = "correct horse 电池 staple"
SENDER = "duban@notify.example.org"
REFUSED = "nobody@example.org"

BODY = (
    "刘冰同志：\n\n"
    "南乐县“数字化城市管理系统建设”第1.3项（完成方案编制）已逾期3个工作日，"
    "请于2017年7月20日前报送。\n\n"
    "濮阳市委市政府督查局"
)
SUBJECT = "【督办】南乐县数字城管建设第1.3项已逾期"


@dataclass
class Recorder:
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]) -> str:
        if address == REFUSED:
            return "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 Ok: queued"

    def authenticator(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        ok = auth_data.login.decode() == USER and auth_data.password.decode() == PASSWORD
        if ok:
            self.logins.append(mechanism)
        return AuthResult(success=ok, handled=False)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


def _client_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    recorder: Recorder
    port: int


def _start(mode: str, certificate: tuple[Path, Path]) -> Generator[Server, None, None]:
    recorder = Recorder()
    port = _free_port()
    kwargs: dict[str, Any] = {"authenticator": recorder.authenticator, "auth_required": True}
    if mode == "plain":
        kwargs["auth_require_tls"] = False
    elif mode == "starttls":
        kwargs |= {"tls_context": _server_tls(certificate), "require_starttls": True}
    elif mode == "tls":
        # aiosmtpd only counts STARTTLS as TLS for AUTH; with implicit TLS the whole session is TLS.
        kwargs |= {"ssl_context": _server_tls(certificate), "server_hostname": "localhost", "auth_require_tls": False}
    controller = Controller(recorder, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    try:
        yield Server(recorder, port)
    finally:
        controller.stop()


@pytest.fixture
def plain_server(certificate: tuple[Path, Path]) -> Iterator[Server]:
    yield from _start("plain", certificate)


@pytest.fixture
def starttls_server(certificate: tuple[Path, Path]) -> Iterator[Server]:
    yield from _start("starttls", certificate)


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[Server]:
    yield from _start("tls", certificate)


def _message(
    address: str = "liu-bing.410923@example.org", message_id: str = "act-410923-1.3-overdue:email"
) -> OutboundMessage:
    return OutboundMessage(
        message_id=message_id,
        channel="email",
        recipient_id="410923-liu-bing",
        address=address,
        subject=SUBJECT,
        body=BODY,
        sms_template_code=None,
        sms_template_params={},
        urgent=False,
    )


def _assert_delivered(server: Server, message: OutboundMessage) -> None:
    assert len(server.recorder.messages) == 1
    mail_from, rcpt_tos, raw = server.recorder.messages[0]
    assert mail_from == SENDER
    assert rcpt_tos == [message.address]
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == SUBJECT
    assert parsed["To"] == message.address
    assert parsed["Message-ID"] == message_id_header(message.message_id, "notify.example.org")
    assert parsed["X-Duban-Message-Id"] == message.message_id
    assert parsed.get_content_type() == "multipart/alternative"
    plain = parsed.get_body(preferencelist=("plain",))
    assert plain is not None
    assert plain.get_content_charset() == "utf-8"
    assert plain.get_content().rstrip("\n") == BODY
    # The subject went over the wire RFC 2047-encoded, not as raw UTF-8.
    raw_subject = next(line for line in raw.split(b"\r\n") if line.startswith(b"Subject:"))
    assert raw_subject.isascii() and b"=?utf-8?" in raw_subject.lower()


async def test_plain_with_auth_delivers_the_chinese_message(plain_server: Server) -> None:
    channel = SmtpChannel(
        "127.0.0.1",
        plain_server.port,
        username=USER,
        password=Secret(PASSWORD),
        security="none",
        sender=SENDER,
        timeout=5,
    )
    message = _message()
    try:
        result = await channel.send(message)
    finally:
        await channel.aclose()
    assert result.outcome is Outcome.SENT, result.detail
    assert result.provider_message_id == message_id_header(message.message_id, "notify.example.org")
    assert plain_server.recorder.logins  # it did authenticate
    _assert_delivered(plain_server, message)


async def test_starttls_with_auth(starttls_server: Server, certificate: tuple[Path, Path]) -> None:
    channel = SmtpChannel(
        "127.0.0.1",
        starttls_server.port,
        username=USER,
        password=Secret(PASSWORD),
        security="starttls",
        sender=SENDER,
        timeout=5,
        tls_context=_client_tls(certificate),
    )
    message = _message()
    try:
        result = await channel.send(message)
    finally:
        await channel.aclose()
    assert result.outcome is Outcome.SENT, result.detail
    _assert_delivered(starttls_server, message)


async def test_implicit_tls_with_auth(tls_server: Server, certificate: tuple[Path, Path]) -> None:
    channel = SmtpChannel(
        "127.0.0.1",
        tls_server.port,
        username=USER,
        password=Secret(PASSWORD),
        security="tls",
        sender=SENDER,
        timeout=5,
        tls_context=_client_tls(certificate),
    )
    message = _message()
    try:
        result = await channel.send(message)
    finally:
        await channel.aclose()
    assert result.outcome is Outcome.SENT, result.detail
    _assert_delivered(tls_server, message)


async def test_untrusted_certificate_is_not_accepted(starttls_server: Server) -> None:
    channel = SmtpChannel(
        "127.0.0.1",
        starttls_server.port,
        username=USER,
        password=Secret(PASSWORD),
        security="starttls",
        sender=SENDER,
        timeout=5,
    )
    try:
        result = await channel.send(_message())
    finally:
        await channel.aclose()
    assert result.outcome is not Outcome.SENT
    assert starttls_server.recorder.messages == []


async def test_connection_is_reused_and_refused_recipient_is_invalid(plain_server: Server) -> None:
    channel = SmtpChannel(
        "127.0.0.1", plain_server.port, username=USER, password=Secret(PASSWORD), security="none", sender=SENDER
    )
    try:
        refused = await channel.send(_message(address=REFUSED, message_id="m-refused"))
        first = await channel.send(_message(message_id="m-1"))
        second = await channel.send(_message(message_id="m-2"))
    finally:
        await channel.aclose()
    assert refused.outcome is Outcome.INVALID_RECIPIENT
    assert not refused.retryable
    assert "550" in refused.detail
    assert first.outcome is Outcome.SENT and second.outcome is Outcome.SENT
    assert len(plain_server.recorder.logins) == 1  # one connection, one login, three messages
    assert [rcpt for _, rcpt, _ in plain_server.recorder.messages] == [[_message().address]] * 2


async def test_wrong_password_is_rejected_and_not_echoed(plain_server: Server) -> None:
    wrong = "not-the-password-1234"
    channel = SmtpChannel(
        "127.0.0.1", plain_server.port, username=USER, password=Secret(wrong), security="none", sender=SENDER
    )
    try:
        result = await channel.send(_message())
    finally:
        await channel.aclose()
    assert result.outcome is Outcome.REJECTED
    assert not result.retryable
    assert wrong not in result.detail
    assert plain_server.recorder.messages == []


async def test_server_down_is_transient() -> None:
    channel = SmtpChannel(
        "127.0.0.1", _free_port(), username=USER, password=Secret(PASSWORD), security="none", sender=SENDER, timeout=2
    )
    try:
        result = await channel.send(_message())
    finally:
        await channel.aclose()
    assert result.outcome is Outcome.TRANSIENT_ERROR
    assert result.retryable


async def test_reconnects_after_the_server_restarts(certificate: tuple[Path, Path]) -> None:
    servers = _start("plain", certificate)
    server = next(servers)
    channel = SmtpChannel(
        "127.0.0.1", server.port, username=USER, password=Secret(PASSWORD), security="none", sender=SENDER, timeout=5
    )
    try:
        assert (await channel.send(_message(message_id="before"))).outcome is Outcome.SENT
        servers.close()  # stops the server: the kept connection is now dead
        again = _start("plain", certificate)
        # same port is not guaranteed free; point the channel at the new server
        new_server = next(again)
        channel.port = new_server.port
        result = await channel.send(_message(message_id="after"))
        again.close()
    finally:
        await channel.aclose()
    assert result.outcome is Outcome.SENT, result.detail
    assert len(new_server.recorder.messages) == 1
