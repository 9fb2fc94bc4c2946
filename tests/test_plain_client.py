"""A client with no SDK: the `websockets` package and JSON frames, as in the tutorial
and the README. The SDKs must never become the only way to talk to rtgate."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import Gateway, GatewayFactory, token


def ws_url(gw: Gateway) -> str:
    return gw.url.replace("http://", "ws://", 1)


async def recv_until(ws: ClientConnection, kind: str, **match: Any) -> dict[str, Any]:
    """The next frame of type ``kind`` (and, for an ack, ``id``); others are skipped, as a
    plain client that only cares about one answer would."""
    async with asyncio.timeout(5):
        while True:
            frame: dict[str, Any] = json.loads(await ws.recv())
            if frame["type"] == kind and all(frame.get(k) == v for k, v in match.items()):
                return frame


async def test_plain_websocket_client_joins_chats_gets_acks_and_errors(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway()
    async with (
        connect(f"{ws_url(gw)}?token={token('alice')}") as alice,
        connect(f"{ws_url(gw)}?token={token('bob')}") as bob,
    ):
        # A token in the handshake: welcome is the first frame.
        welcome = json.loads(await alice.recv())
        assert welcome["type"] == "welcome" and welcome["data"]["userId"] == "alice"
        assert json.loads(await bob.recv())["type"] == "welcome"

        for i, ws in enumerate((alice, bob), start=1):
            await ws.send(json.dumps({"type": "room:join", "id": i, "data": {"roomId": "lobby"}}))
            ack = await recv_until(ws, "ack", id=i)
            assert ack["ok"] is True and ack["data"]["roomId"] == "lobby"

        await alice.send(
            json.dumps(
                {
                    "type": "chat:message",
                    "id": 10,
                    "data": {"roomId": "lobby", "content": "hello", "clientId": "m-1"},
                }
            )
        )
        # The ack and the sender's own copy travel separate paths: either may come first.
        frames: dict[str, dict[str, Any]] = {}
        async with asyncio.timeout(5):
            while len(frames) < 2:
                frame = json.loads(await alice.recv())
                if frame["type"] == "chat:message:sent" or frame.get("id") == 10:
                    frames[frame["type"]] = frame
        assert frames["ack"]["ok"] is True
        stored = frames["ack"]["data"]["message"]
        assert stored["content"] == "hello" and stored["userId"] == "alice"
        assert frames["chat:message:sent"]["data"]["id"] == stored["id"]
        got = (await recv_until(bob, "chat:message"))["data"]
        assert (got["content"], got["userId"], got["id"]) == ("hello", "alice", stored["id"])

        # A refused frame with an id gets an error ack with a code to program against.
        await bob.send(
            json.dumps(
                {"type": "chat:message", "id": 11, "data": {"roomId": "elsewhere", "content": "hi"}}
            )
        )
        ack = await recv_until(bob, "ack", id=11)
        assert ack["ok"] is False and "data" not in ack
        assert ack["error"]["code"] == "forbidden"
        # One without a readable id gets an error frame.
        await bob.send("{not json")
        error = await recv_until(bob, "error")
        assert error["data"]["code"] == "bad_frame"
        # The connection is still fine after both.
        await bob.send(json.dumps({"type": "ping", "id": 12, "data": "still here"}))
        assert (await recv_until(bob, "ack", id=12))["data"] == "still here"


async def test_plain_browser_style_client_authenticates_with_an_auth_frame(
    make_gateway: GatewayFactory,
) -> None:
    """What a browser does (README snippet): no token in the URL, an auth frame after
    open, frames sent back to back without waiting for each ack."""
    gw = await make_gateway()
    async with connect(ws_url(gw)) as ws:
        for frame in (
            {"type": "auth", "id": 1, "data": {"token": token("carol")}},
            {"type": "room:join", "id": 2, "data": {"roomId": "lobby"}},
            {
                "type": "chat:message",
                "id": 3,
                "data": {"roomId": "lobby", "content": "hello", "clientId": "m-1"},
            },
        ):
            await ws.send(json.dumps(frame))
        assert (await recv_until(ws, "ack", id=1))["data"]["userId"] == "carol"
        await recv_until(ws, "welcome")
        assert (await recv_until(ws, "ack", id=2))["ok"] is True
        ack = await recv_until(ws, "ack", id=3)
        assert ack["ok"] is True and ack["data"]["message"]["content"] == "hello"
