"""Authentication and authorization against a real gateway."""

from __future__ import annotations

import time

import jwt
import pytest

from tests.conftest import SECRET, ClientFactory, Gateway, GatewayFactory, refused_handshake, token
from tests.wsclient import WsClient


@pytest.mark.parametrize(
    "bad_token, reason",
    [
        (jwt.encode({"sub": "alice", "exp": int(time.time()) - 5}, SECRET, "HS256"), "expired"),
        (jwt.encode({"sub": "alice"}, "another-secret-0123456789abcdef0123", "HS256"), "signature"),
        (jwt.encode({"sub": "alice"}, None, "none"), "algorithm"),
        (jwt.encode({"name": "no sub"}, SECRET, "HS256"), "sub"),
        ("not-a-jwt", "invalid"),
    ],
    ids=["expired", "wrong-key", "alg-none", "no-sub", "garbage"],
)
async def test_bad_handshake_token_gets_401_json(
    gateway: Gateway, bad_token: str, reason: str
) -> None:
    for where in ("query", "header"):
        if where == "query":
            status, body = await refused_handshake(gateway, params={"token": bad_token})
        else:
            status, body = await refused_handshake(
                gateway, headers={"Authorization": f"Bearer {bad_token}"}
            )
        assert status == 401
        error = body["error"]
        assert isinstance(error, dict) and error["code"] == "unauthenticated"
        assert reason in str(error["message"])


async def test_bad_token_in_auth_frame_closes_4401(gateway: Gateway) -> None:
    client = await WsClient.connect(gateway.url)
    try:
        wrong = jwt.encode({"sub": "x"}, "wrong-secret-xxxxxxxxxxxxxxxxxxxx", "HS256")
        await client.send("auth", {"token": wrong}, id=1)
        assert await client.wait_closed() == 4401
    finally:
        await client.close()


async def test_auth_frame_then_welcome_and_frames_before_auth_refused(gateway: Gateway) -> None:
    client = await WsClient.connect(gateway.url)
    try:
        assert await client.error("room:join", "lobby") == "unauthenticated"
        assert (await client.ok("ping", {"n": 1})) == {"n": 1}  # ping needs no auth
        data = await client.ok("auth", {"token": token("alice", name="Alice")})
        assert data["userId"] == "alice" and data["username"] == "Alice"
        assert data["expiresAt"].endswith("Z")
        welcome = (await client.next("welcome"))["data"]
        assert welcome["userId"] == "alice" and welcome["gatewayId"] == "gw1"
        assert welcome["limits"]["ratePerSecond"] == 20
        assert (await client.ok("room:join", "lobby"))["roomId"] == "lobby"
        # A second auth with the same sub refreshes; no second welcome.
        await client.ok("auth", {"token": token("alice", name="Alice")})
        await client.ok("ping")
        assert client.take("welcome") == []
        # Another sub closes the connection.
        await client.send("auth", {"token": token("mallory")}, id=99)
        assert await client.wait_closed() == 4401
    finally:
        await client.close()


async def test_no_auth_in_time_closes_4408(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(auth={"timeout_seconds": 0.3})
    client = await WsClient.connect(gw.url)
    try:
        assert await client.wait_closed() == 4408
    finally:
        await client.close()


async def test_token_expiry_while_connected_closes_4401(
    gateway: Gateway, connect: ClientFactory
) -> None:
    client = await connect(gateway, "alice", ttl_seconds=1.5)
    await client.ok("room:join", "lobby")
    started = time.monotonic()
    assert await client.wait_closed(timeout=5) == 4401
    assert time.monotonic() - started < 3


async def test_wrong_audience_and_issuer(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(auth={"audience": "rtgate", "issuer": "https://auth.example"})
    good = jwt.encode({"sub": "a", "aud": "rtgate", "iss": "https://auth.example"}, SECRET, "HS256")
    wrong_aud = jwt.encode(
        {"sub": "a", "aud": "other", "iss": "https://auth.example"}, SECRET, "HS256"
    )
    wrong_iss = jwt.encode({"sub": "a", "aud": "rtgate", "iss": "https://evil"}, SECRET, "HS256")
    assert (await refused_handshake(gw, params={"token": wrong_aud}))[0] == 401
    assert (await refused_handshake(gw, params={"token": wrong_iss}))[0] == 401
    client = await WsClient.connect(gw.url, token=good)
    try:
        assert (await client.next("welcome"))["data"]["userId"] == "a"
    finally:
        await client.close()


async def test_room_and_publish_rights(gateway: Gateway, connect: ClientFactory) -> None:
    viewer = await connect(gateway, "viewer", rooms=["dash-*"], publish=[])
    poster = await connect(gateway, "poster", rooms=["dash-*", "team-*"])
    # Forbidden room.
    assert await viewer.error("room:join", "team-a") == "forbidden"
    # Receive-only: join ok, posting forbidden, but it still receives.
    await viewer.ok("room:join", "dash-1")
    assert await viewer.error("chat:message", {"roomId": "dash-1", "content": "x"}) == "forbidden"
    assert await viewer.error("chat:typing", {"roomId": "dash-1", "isTyping": True}) == "forbidden"
    await poster.ok("room:join", "dash-1")
    await poster.ok("chat:message", {"roomId": "dash-1", "content": "numbers"})
    assert (await viewer.next("chat:message"))["data"]["content"] == "numbers"
    # Allowed room, not joined: forbidden.
    assert await poster.error("chat:message", {"roomId": "team-b", "content": "x"}) == "forbidden"


async def test_identity_comes_from_the_token(gateway: Gateway, connect: ClientFactory) -> None:
    a = await connect(gateway, "alice", name="Alice")
    b = await connect(gateway, "bob")
    for c in (a, b):
        await c.ok("room:join", "lobby")
    await a.ok(
        "chat:message", {"roomId": "lobby", "content": "hi", "userId": "bob", "username": "Bob"}
    )
    got = (await b.next("chat:message"))["data"]
    assert got["userId"] == "alice" and got["username"] == "Alice"


async def test_dev_user_param_only_when_enabled(make_gateway: GatewayFactory) -> None:
    off = await make_gateway("gw-off")
    on = await make_gateway("gw-on", server={"dev_allow_user_param": True, "id": "gw-on"})
    client = await WsClient.connect(off.url, query={"user": "dev"})
    try:
        # No token: the connection must authenticate by frame, else 4408.
        assert await client.error("room:join", "lobby") == "unauthenticated"
    finally:
        await client.close()
    client = await WsClient.connect(on.url, query={"user": "dev"})
    try:
        assert (await client.next("welcome"))["data"]["userId"] == "dev"
    finally:
        await client.close()
