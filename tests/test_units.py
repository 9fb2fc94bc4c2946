"""The sans-I/O core: pure functions and classes, no sockets."""

from __future__ import annotations

import json
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import settings, subjects
from broker.natsconn import NatsVersionError, check_server_version
from gateway import codec, protocol, wsframe
from gateway.config import GatewayConfig
from gateway.errors import ErrorCode, ProtocolError
from gateway.ratelimit import RefusalStreak, TokenBucket
from gateway.throttle import Coalescer


@given(st.text(min_size=1, max_size=64))
def test_subject_token_is_safe_and_reversible(value: str) -> None:
    token = subjects.encode_token(value)
    assert token and not any(ch in token for ch in ".*> \t\r\n")
    assert token.isascii()
    assert subjects.decode_token(token) == value


@given(st.text(min_size=1, max_size=16), st.text(min_size=1, max_size=16))
def test_subject_token_is_injective(a: str, b: str) -> None:
    if a != b:
        assert subjects.encode_token(a) != subjects.encode_token(b)


def test_subject_examples() -> None:
    assert subjects.room_subject("lobby") == "rt.room.lobby"
    assert subjects.room_subject("a.b") == "rt.room.a~2eb"
    assert subjects.room_subject("~2e") == "rt.room.~7e2e"
    assert subjects.live_room_subject("auth0|1") == "rt.live.room.auth0~7c1"
    assert (
        subjects.dedup_id("a@b", "chat:message", "room.1", "c1")
        == "a~40b:chat~3amessage:room~2e1:c1"
    )
    with pytest.raises(ValueError):
        subjects.encode_token("")


def test_wsframe_lengths() -> None:
    assert wsframe.build(wsframe.OP_TEXT, b"hi") == b"\x81\x02hi"
    mid = wsframe.build(wsframe.OP_BINARY, b"x" * 300)
    assert mid[:4] == b"\x82\x7e" + struct.pack("!H", 300) and len(mid) == 304
    big = wsframe.build(wsframe.OP_TEXT, b"x" * 70000)
    assert big[:2] == b"\x81\x7f" and struct.unpack("!Q", big[2:10])[0] == 70000
    assert wsframe.build(wsframe.OP_TEXT, b"x" * 125)[1] == 125
    assert wsframe.build(wsframe.OP_TEXT, b"x" * 126)[1] == 126
    assert wsframe.close_frame(1013, "slow")[:4] == b"\x88\x06\x03\xf5"


def test_codec_round_trips_and_errors() -> None:
    obj = {"type": "x", "data": {"é": [1, 2.5, None, True]}}
    frame = codec.encode_frame(codec.WireFormat.JSON, obj)
    assert frame[0] == 0x81 and json.loads(frame[2:]) == obj
    frame = codec.encode_frame(codec.WireFormat.MSGPACK, obj)
    assert frame[0] == 0x82 and msgpack.unpackb(frame[2:]) == obj
    assert codec.decode(codec.WireFormat.JSON, b'{"a":1}') == {"a": 1}
    for fmt, raw in (
        (codec.WireFormat.JSON, b"{"),
        (codec.WireFormat.MSGPACK, b"\xc1"),
        (codec.WireFormat.MSGPACK, "text"),
    ):
        with pytest.raises(ProtocolError) as exc:
            codec.decode(fmt, raw)
        assert exc.value.code is ErrorCode.BAD_FRAME
    assert codec.from_subprotocol(None) is codec.WireFormat.JSON
    assert codec.from_subprotocol("rtgate.v1.msgpack") is codec.WireFormat.MSGPACK


def test_protocol_validation() -> None:
    assert protocol.parse_frame({"type": "ping", "id": 3}).id == 3
    for bad in (
        {"type": "ping", "id": True},
        {"type": ""},
        {"id": 1},
        [],
        {"type": 1},
        {"type": "x", "id": 2**53},
    ):
        with pytest.raises(ProtocolError):
            protocol.parse_frame(bad)
    assert protocol.room_id("lobby") == protocol.room_id({"roomId": "lobby"}) == "lobby"
    msg = protocol.chat_message({"roomId": "r", "content": "hi", "clientId": "c-1"}, 10)
    assert (msg.room_id, msg.content, msg.client_id) == ("r", "hi", "c-1")
    with pytest.raises(ProtocolError) as exc:
        protocol.chat_message({"roomId": "r", "content": "x" * 11}, 10)
    assert exc.value.code is ErrorCode.TOO_LARGE
    assert protocol.timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert protocol.timestamp(1.2345) == "1970-01-01T00:00:01.234Z"


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2, burst=3, now=0)
    assert [bucket.take(0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) is True  # one token back after half a second at 2/s
    assert bucket.take(0.5) is False
    assert [bucket.take(100) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_refusal_streak_counts_duration_not_clock_seconds() -> None:
    # Starting just before a whole second must not shorten the streak: five
    # clock seconds touched can be barely more than four seconds of refusals.
    streak = RefusalStreak(5)
    times = [0.95 + 0.1 * i for i in range(60)]
    closed_at = next(t for t in times if streak.refused(t))
    assert closed_at - times[0] >= 5
    # A pause of a second or more starts over.
    streak = RefusalStreak(5)
    assert not any(streak.refused(t) for t in (0.0, 0.9, 1.8, 2.7, 3.6))
    assert not streak.refused(4.7)  # 1.1 s after the last: a new streak from 4.7
    assert not any(streak.refused(t) for t in (5.6, 6.5, 7.4, 8.3, 9.2))
    assert streak.refused(9.75)  # 5.05 s since 4.7


def test_coalescer_forwards_latest_at_interval_end() -> None:
    c: Coalescer[str, bool] = Coalescer(interval=0.5)
    assert c.offer("k", True, 0.0).send is True
    second = c.offer("k", False, 0.1)
    assert second.send is False and second.release_at == 0.5
    third = c.offer("k", True, 0.2)
    assert third.send is False and third.release_at is None  # already scheduled
    last = c.offer("k", False, 0.3)
    assert last.release_at is None
    assert c.release("k", 0.5) == (True, False)  # the latest state wins
    assert c.release("k", 0.6) == (False, None)
    assert c.offer("k", True, 0.7).send is False  # still inside the new interval
    assert c.release("k", 1.0) == (True, True)
    assert c.offer("k", False, 1.6).send is True
    c.forget_idle(5.0)
    assert len(c) == 0


def test_settings_env_overrides_and_errors() -> None:
    cfg = settings.load(
        GatewayConfig,
        None,
        {
            "RTGATE_SERVER__PORT": "9000",
            "RTGATE_NATS__URLS": "nats://a:1, nats://b:2",
            "RTGATE_SERVER__COMPRESSION": "true",
            "RTGATE_LIMITS__RATE_PER_SECOND": "5.5",
            "RTGATE_BROKER__PORT": "1",  # the broker's section: ignored by the gateway
        },
    )
    assert cfg.server.port == 9000 and cfg.server.compression is True
    assert cfg.nats.urls == ("nats://a:1", "nats://b:2")
    assert cfg.limits.rate_per_second == 5.5
    for env, needle in (
        ({"RTGATE_SERVER__PORTT": "1"}, "server.portt"),
        ({"RTGATE_SERVR__PORT": "1"}, "servr"),
        ({"RTGATE_SERVER__PORT": "eighty"}, "server.port"),
        ({"RTGATE_SERVER__PORT": "70000"}, "server.port"),
        ({"RTGATE_AUTH__ALGORITHMS": "none"}, "none"),
        ({"RTGATE_SERVER__COMPRESSION": "maybe"}, "server.compression"),
    ):
        with pytest.raises(settings.ConfigError, match=needle):
            settings.load(GatewayConfig, None, env)


def test_settings_file(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "c.toml"
    path.write_text("[server]\nport = 81\n[limits]\nmax_rooms = 7\n[broker]\nport = 5\n")
    cfg = settings.load(GatewayConfig, path, {"RTGATE_LIMITS__MAX_ROOMS": "8"})
    assert cfg.server.port == 81 and cfg.limits.max_rooms == 8  # env wins over file
    path.write_text('[server]\nport = "81"\n')
    with pytest.raises(settings.ConfigError, match=r"server\.port: expected int"):
        settings.load(GatewayConfig, path, {})
    path.write_text('[server]\nhost = "x"\nbogus = 1\n')
    with pytest.raises(settings.ConfigError, match=r"server\.bogus"):
        settings.load(GatewayConfig, path, {})
    with pytest.raises(settings.ConfigError, match="not found"):
        settings.load(GatewayConfig, Path(str(tmp_path)) / "missing.toml", {})


class _FakeVersion:
    def __init__(self, major: int, minor: int, patch: int) -> None:
        self.major, self.minor, self.patch = major, minor, patch

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


class _FakeNats:
    def __init__(self, version: _FakeVersion, jetstream: bool = True) -> None:
        self.connected_server_version = version
        self._server_info = {"jetstream": jetstream}
        self.connected_url = None


def test_server_version_check() -> None:
    check_server_version(_FakeNats(_FakeVersion(2, 12, 0)))  # type: ignore[arg-type]
    with pytest.raises(NatsVersionError, match="too old"):
        check_server_version(_FakeNats(_FakeVersion(2, 9, 10)))  # type: ignore[arg-type]
    with pytest.raises(NatsVersionError, match="JetStream"):
        check_server_version(_FakeNats(_FakeVersion(2, 15, 1), False))  # type: ignore[arg-type]
