"""The server API: publish, disconnect, kick and room history over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.conftest import BrokerFactory, ClientFactory, Gateway, GatewayFactory, token
from tests.wsclient import WsClient

KEY = "api-key-0123456789"


async def _call(
    gw: Gateway, method: str, path: str, body: Any = None, key: str | None = KEY
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, gw.http(path), json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_api_key_is_required(make_gateway: GatewayFactory) -> None:
    off = await make_gateway("off")
    status, body = await _call(off, "POST", "/api/publish", {"roomId": "r", "content": "x"})
    assert status == 403 and "api_key" in body["error"]["message"]
    on = await make_gateway("on", server={"api_key": KEY, "id": "on"})
    assert (await _call(on, "POST", "/api/publish", {}, key="wrong"))[0] == 401
    assert (await _call(on, "POST", "/api/publish", {}, key=None))[0] == 401


async def test_publish_takes_the_durable_path(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw = await make_gateway(server={"api_key": KEY, "id": "gw1"})
    alice = await connect(gw, "alice")
    await alice.ok("room:join", "lobby")
    status, body = await _call(
        gw,
        "POST",
        "/api/publish",
        {
            "roomId": "lobby",
            "content": "from the backend",
            "userId": "bot",
            "username": "Bot",
            "clientId": "b-1",
        },
    )
    assert status == 200
    message = body["message"]
    assert message["offset"] == 1 and message["userId"] == "bot"
    got = (await alice.next("chat:message"))["data"]
    assert got["content"] == "from the backend" and got["id"] == message["id"]
    # Same clientId: the original, not a copy.
    again = (
        await _call(
            gw,
            "POST",
            "/api/publish",
            {"roomId": "lobby", "content": "x", "userId": "bot", "clientId": "b-1"},
        )
    )[1]
    assert again["message"]["offset"] == 1
    status, body = await _call(gw, "POST", "/api/publish", {"toUserId": "alice", "content": "dm"})
    assert status == 200 and (await alice.next("direct:message"))["data"]["content"] == "dm"
    status, body = await _call(gw, "POST", "/api/publish", {"global": True, "content": "all"})
    assert status == 200 and (await alice.next("global:message"))["data"]["content"] == "all"
    status, body = await _call(
        gw, "POST", "/api/publish", {"roomId": "lobby", "event": "score", "data": {"n": 3}}
    )
    assert status == 200 and body["offset"] == 2
    assert (await alice.next("room:event"))["data"]["data"] == {"n": 3}
    status, body = await _call(
        gw,
        "POST",
        "/api/publish",
        {"roomId": "lobby", "event": "blip", "data": 1, "durable": False},
    )
    assert status == 200 and body == {}
    assert "offset" not in (await alice.next("room:event"))["data"]
    status, body = await _call(gw, "GET", "/api/nothing-here")
    assert status == 404 and body["error"]["code"] == "bad_request"
    status, body = await _call(gw, "GET", "/api/publish")
    assert status == 405 and body["error"]["message"] == "method not allowed"
    # Bad input: a clear status and JSON body.
    for bad, want in (
        ({"roomId": "bad room", "content": "x"}, 400),
        ({"roomId": "r", "content": "x" * 5000}, 413),
        ([1, 2], 400),
    ):
        status, body = await _call(gw, "POST", "/api/publish", bad)
        assert status == want and body["error"]["message"]


async def test_disconnect_and_deny_across_gateways(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw1 = await make_gateway("gw1", server={"api_key": KEY, "id": "gw1"})
    gw2 = await make_gateway("gw2", server={"api_key": KEY, "id": "gw2"})
    mallory_token = token("mallory")
    mallory = await connect(gw2, "mallory", token_=mallory_token)
    bob = await connect(gw2, "bob")
    carol = await connect(gw2, "carol")
    status, _ = await _call(
        gw1, "POST", "/api/users/bob/disconnect", {"reason": "maintenance", "reconnect": True}
    )
    assert status == 200
    assert (await bob.next("reconnect"))["data"]["afterMs"] >= 0
    assert await bob.wait_closed() == 1012
    status, body = await _call(gw1, "POST", "/api/users/mallory/disconnect", {})
    assert status == 400  # reconnect is required: no accidental day-long denial
    status, body = await _call(
        gw1,
        "POST",
        "/api/users/mallory/disconnect",
        {"reason": "abuse", "reconnect": False, "banSeconds": 60},
    )
    assert status == 200 and body["deniedSeconds"] == 60
    assert await mallory.wait_closed() == 4403
    # The same token cannot come back, on either gateway, by handshake or by frame.
    for gw in (gw1, gw2):
        async with aiohttp.ClientSession() as s:
            try:
                await s.ws_connect(gw.url, params={"token": mallory_token})
                raise AssertionError("denied user reconnected")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 403
    late = await WsClient.connect(gw2.url)
    try:
        await late.send("auth", {"token": mallory_token}, id=1)
        assert await late.wait_closed() == 4403
    finally:
        await late.close()
    await carol.ok("ping")  # others are untouched


async def test_kick_and_room_ban(make_gateway: GatewayFactory, connect: ClientFactory) -> None:
    gw1 = await make_gateway("gw1", server={"api_key": KEY, "id": "gw1"})
    gw2 = await make_gateway("gw2", server={"api_key": KEY, "id": "gw2"})
    dave = await connect(gw2, "dave")
    await dave.ok("room:join", "lobby")
    await dave.ok("room:join", "other")
    status, _ = await _call(
        gw1, "POST", "/api/rooms/lobby/kick", {"userId": "dave", "banSeconds": 1.5}
    )
    assert status == 200
    removed = await dave.next("room:removed")
    assert removed["data"]["roomId"] == "lobby"
    assert await dave.error("room:join", "lobby") == "forbidden"
    resumed = await dave.ok("resume", {"rooms": {"lobby": {"offset": 0, "epoch": "0"}}})
    assert resumed["rooms"]["lobby"]["error"]["code"] == "forbidden"  # no way back by resume
    assert await dave.error("history", {"roomId": "lobby"}) == "forbidden"
    await dave.ok("chat:message", {"roomId": "other", "content": "still here"})
    await asyncio.sleep(1.6)  # the ban's own length: nothing to await instead
    await dave.ok("room:join", "lobby")
    status, _ = await _call(gw1, "POST", "/api/rooms/lobby/kick", {"userId": "bad id"})
    assert status == 400


async def test_room_messages_endpoint(
    make_gateway: GatewayFactory, connect: ClientFactory, make_broker: BrokerFactory
) -> None:
    await make_broker()
    gw = await make_gateway(server={"api_key": KEY, "id": "gw1"})
    a = await connect(gw, "alice")
    await a.ok("room:join", "lobby")
    for i in range(3):
        await a.ok("chat:message", {"roomId": "lobby", "content": f"m{i}"})
    status, body = await _call(gw, "GET", "/api/rooms/lobby/messages?limit=2")
    assert status == 200 and [i["data"]["content"] for i in body["items"]] == ["m2", "m1"]
    status, body = await _call(gw, "GET", f"/api/rooms/lobby/messages?cursor={body['nextCursor']}")
    assert [i["data"]["content"] for i in body["items"]] == ["m0"]
    assert (await _call(gw, "GET", "/api/rooms/lobby/messages?limit=500"))[0] == 400
