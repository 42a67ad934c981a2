"""The replay's frame splitter (services.common.replay.FrameSplitter): NATS protocol bytes in,
(stream sequence, data) and the answers the server is owed out; no I/O."""

from __future__ import annotations

import itertools
from typing import cast

from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient

from services.common.replay import FrameSplitter, lean_endpoint


def ack(stream_sequence: int, consumer_sequence: int, *, long_form: bool = False) -> bytes:
    if long_form:  # with a JetStream domain and account hash, and a token at the end
        return b"$JS.ACK.hub.ACCHASH.S.c.1.%d.%d.1700000000000000000.0.tok" % (stream_sequence, consumer_sequence)
    return b"$JS.ACK.S.c.1.%d.%d.1700000000000000000.0" % (stream_sequence, consumer_sequence)


def hmsg(reply: bytes, payload: bytes, headers: bytes = b"Nats-Msg-Id: x\r\n", subject: bytes = b"e.1") -> bytes:
    block = b"NATS/1.0\r\n" + headers + b"\r\n"
    return b"HMSG %b 1 %b %d %d\r\n%b%b\r\n" % (subject, reply, len(block), len(block) + len(payload), block, payload)


def msg(reply: bytes, payload: bytes) -> bytes:
    return b"MSG e.1 1 %b %d\r\n%b\r\n" % (reply, len(payload), payload)


def status(line: bytes, headers: bytes = b"", reply: bytes = b"") -> bytes:
    block = b"NATS/1.0 " + line + b"\r\n" + headers + b"\r\n"
    head = b"HMSG _INBOX.x 1 %b %d %d\r\n" % (reply, len(block), len(block)) if reply else None
    if head is None:
        head = b"HMSG _INBOX.x 1 %d %d\r\n" % (len(block), len(block))
    return head + block + b"\r\n"


def feed_all(splitter: FrameSplitter, data: bytes, cuts: list[int] | None = None) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    edges = [0, *sorted(set(cuts or [])), len(data)]
    for start, end in itertools.pairwise(edges):
        if start < end:
            splitter.feed(data[start:end], out)
    return out


# Payloads that look like protocol: the sizes, not the content, delimit a frame.
PAYLOADS = [b'{"a":1}', b"", b"MSG e.1 1 5\r\nhello\r\n", b"\r\n\r\n", bytes(range(256)), b"PING\r\n", b"x" * 5000]


def test_every_message_comes_out_whole_and_in_order() -> None:
    data = b"".join(hmsg(ack(i + 1, i + 1), p) for i, p in enumerate(PAYLOADS))
    assert feed_all(FrameSplitter(last=100), data) == [(i + 1, p) for i, p in enumerate(PAYLOADS)]


@given(st.lists(st.integers(min_value=0, max_value=20_000), max_size=40))
def test_any_cut_of_the_bytes_gives_the_same_messages(cuts: list[int]) -> None:
    frames = [hmsg(ack(i + 1, i + 1), p) if i % 2 else msg(ack(i + 1, i + 1), p) for i, p in enumerate(PAYLOADS)]
    data = b"PING\r\n".join(frames) + status(b"100 FlowControl Request", reply=b"$JS.FC.S.x.1")
    splitter = FrameSplitter(last=100)
    assert feed_all(splitter, data, cuts) == [(i + 1, p) for i, p in enumerate(PAYLOADS)]
    assert splitter.pings == len(PAYLOADS) - 1
    assert splitter.replies == [b"$JS.FC.S.x.1"]
    assert splitter.gap is None and splitter.error is None and not splitter.done


def test_the_long_ack_form_with_a_domain_is_read() -> None:
    data = hmsg(ack(41, 1, long_form=True), b"a") + hmsg(ack(57, 2, long_form=True), b"b")
    assert feed_all(FrameSplitter(last=100), data) == [(41, b"a"), (57, b"b")]


def test_it_stops_at_the_last_sequence_asked_for() -> None:
    splitter = FrameSplitter(last=2)
    data = b"".join(hmsg(ack(i, i), b"%d" % i) for i in range(1, 5))
    assert feed_all(splitter, data) == [(1, b"1"), (2, b"2")]
    assert splitter.done and splitter.taken == 2


def test_a_message_appended_after_the_call_ends_the_reading_without_being_taken() -> None:
    # Filtered: the subject's last is 3, the next delivered is 9 (another subject's 4..8 skipped).
    splitter = FrameSplitter(last=3)
    assert feed_all(splitter, hmsg(ack(1, 1), b"a") + hmsg(ack(9, 2), b"later")) == [(1, b"a")]
    assert splitter.done and splitter.taken == 1


def test_a_jump_in_the_consumer_sequence_is_a_gap_and_nothing_after_it_is_taken() -> None:
    splitter = FrameSplitter(last=100)
    data = hmsg(ack(1, 1), b"a") + hmsg(ack(2, 2), b"b") + hmsg(ack(4, 4), b"d") + hmsg(ack(5, 5), b"e")
    assert feed_all(splitter, data) == [(1, b"a"), (2, b"b")]
    assert splitter.gap is not None and "consumer sequence 4 after 2" in splitter.gap
    assert splitter.taken == 2  # the restart begins at 3


def test_after_a_restart_the_new_consumer_counts_from_one_and_nothing_is_given_twice() -> None:
    splitter = FrameSplitter(last=100)
    feed_all(splitter, hmsg(ack(1, 1), b"a") + hmsg(ack(2, 2), b"b") + hmsg(ack(4, 4), b"d"))
    splitter.new_consumer()
    assert feed_all(splitter, hmsg(ack(3, 1), b"c") + hmsg(ack(4, 2), b"d")) == [(3, b"c"), (4, b"d")]
    assert splitter.gap is None
    # A stream sequence already taken, even with the right consumer sequence, is a gap too.
    splitter.new_consumer()
    feed_all(splitter, hmsg(ack(4, 1), b"d again"))
    assert splitter.gap is not None


def test_a_heartbeat_naming_a_later_consumer_sequence_is_a_gap_at_the_tail() -> None:
    splitter = FrameSplitter(last=100)
    heartbeat = status(b"100 Idle Heartbeat", b"Nats-Last-Consumer: 3\r\nNats-Last-Stream: 3\r\n")
    feed_all(splitter, hmsg(ack(1, 1), b"a") + hmsg(ack(2, 2), b"b") + heartbeat)
    assert splitter.gap is not None and "heartbeat" in splitter.gap

    in_step = FrameSplitter(last=100)
    heartbeat = status(b"100 Idle Heartbeat", b"Nats-Last-Consumer: 2\r\nNats-Last-Stream: 2\r\n")
    feed_all(in_step, hmsg(ack(1, 1), b"a") + hmsg(ack(2, 2), b"b") + heartbeat)
    assert in_step.gap is None


def test_a_stalled_consumer_heartbeat_is_answered() -> None:
    splitter = FrameSplitter(last=100)
    feed_all(splitter, status(b"100 Idle Heartbeat", b"Nats-Consumer-Stalled: $JS.FC.S.x.9\r\n"))
    assert splitter.replies == [b"$JS.FC.S.x.9"]


def test_a_consumer_gone_status_and_a_server_error_are_reported() -> None:
    splitter = FrameSplitter(last=100)
    feed_all(splitter, status(b"409 Consumer Deleted"))
    assert splitter.gap == "NATS/1.0 409 Consumer Deleted"

    erring = FrameSplitter(last=100)
    feed_all(erring, b"-ERR 'Permissions Violation for Subscription to \"x\"'\r\n" + hmsg(ack(1, 1), b"a"))
    assert erring.error == 'Permissions Violation for Subscription to "x"'


def test_other_server_lines_are_ignored() -> None:
    data = b'+OK\r\nPONG\r\nINFO {"server_id":"x"}\r\n' + hmsg(ack(1, 1), b"a")
    splitter = FrameSplitter(last=100)
    assert feed_all(splitter, data, cuts=[2, 9]) == [(1, b"a")]
    assert splitter.pings == 0 and splitter.replies == []


class _Url:
    def __init__(self, scheme: str, username: str | None = None, password: str | None = None) -> None:
        self.scheme, self.username, self.password = scheme, username, password
        self.hostname, self.port = "127.0.0.1", 4333


class _Client:
    def __init__(self, url: _Url | None, **options: object) -> None:
        self.connected_url = url
        self.options: dict[str, object] = {"user": None, "password": None, "token": None, "name": "svc", **options}


def endpoint_of(client: _Client) -> object:
    return lean_endpoint(cast(NatsClient, client))


def test_the_replay_speaks_user_and_password_tokens_and_no_auth() -> None:
    with_password = lean_endpoint(cast(NatsClient, _Client(_Url("nats"), user="svc-ledger", password="pw")))
    assert with_password is not None and with_password.auth == {"user": "svc-ledger", "pass": "pw"}
    assert (with_password.host, with_password.port, with_password.name) == ("127.0.0.1", 4333, "svc-replay")
    in_url = lean_endpoint(cast(NatsClient, _Client(_Url("nats", "u", "p"))))
    assert in_url is not None and in_url.auth == {"user": "u", "pass": "p"}
    token = lean_endpoint(cast(NatsClient, _Client(_Url("nats"), token="t0k")))
    assert token is not None and token.auth == {"auth_token": "t0k"}
    none = lean_endpoint(cast(NatsClient, _Client(_Url("nats"))))
    assert none is not None and none.auth == {}


def test_what_the_replay_does_not_speak_falls_back_to_nats_py() -> None:
    assert endpoint_of(_Client(None)) is None  # not connected
    assert endpoint_of(_Client(_Url("tls"))) is None
    assert endpoint_of(_Client(_Url("nats"), tls=object())) is None
    assert endpoint_of(_Client(_Url("nats"), user=lambda: "u", password="p")) is None
    nkeys = _Client(_Url("nats"))
    nkeys._nkeys_seed = "SU…"  # type: ignore[attr-defined]
    assert endpoint_of(nkeys) is None


def test_only_the_kept_subjects_are_handed_out_and_the_others_still_count() -> None:
    splitter = FrameSplitter(last=4, keep={b"e.2"})
    data = b"".join(hmsg(ack(i, i), b"%d" % i, subject=b"e.%d" % (1 + i % 2)) for i in range(1, 5))
    assert feed_all(splitter, data) == [(1, b"1"), (3, b"3")]
    assert splitter.done and splitter.taken == 4 and splitter.gap is None


def test_only_messages_with_the_selected_bytes_are_handed_out_and_the_others_still_count() -> None:
    splitter = FrameSplitter(last=5, select=b"needle")
    data = (
        hmsg(ack(1, 1), b'{"t":"needle"}')
        + hmsg(ack(2, 2), b"hay", headers=b"X-Note: needle\r\n")  # in its headers only
        + hmsg(ack(3, 3), b"hay", subject=b"needle.1")  # in its subject only
        + msg(ack(4, 4), b"a needle")
        + hmsg(ack(5, 5), b"needl")
    )
    assert feed_all(splitter, data, cuts=[40, 41, 200]) == [(1, b'{"t":"needle"}'), (4, b"a needle")]
    assert splitter.done and splitter.taken == 5 and splitter.gap is None
