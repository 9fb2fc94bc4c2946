"""The wire format as the `websockets` package sees it, not only our own client."""

from __future__ import annotations

import json

import msgpack
import websockets

from tests.conftest import Gateway, token


async def test_plain_websocket_without_subprotocol_speaks_json(gateway: Gateway) -> None:
    url = gateway.url.replace("http://", "ws://")
    async with websockets.connect(url) as ws:
        assert ws.subprotocol is None
        await ws.send(json.dumps({"type": "auth", "id": 1, "data": {"token": token("alice")}}))
        ack = json.loads(await ws.recv())
        assert ack == {
            "type": "ack",
            "id": 1,
            "ok": True,
            "data": {"userId": "alice", "username": "alice", "expiresAt": ack["data"]["expiresAt"]},
        }
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome" and welcome["data"]["userId"] == "alice"
        await ws.send(json.dumps({"type": "room:join", "id": 2, "data": "lobby"}))
        joined = json.loads(await ws.recv())
        assert joined["ok"] and joined["data"]["roomId"] == "lobby"
        await ws.send(
            json.dumps(
                {"type": "chat:message", "id": 3, "data": {"roomId": "lobby", "content": "héllo"}}
            )
        )
        frames = [json.loads(await ws.recv()) for _ in range(2)]
        kinds = sorted(f["type"] for f in frames)
        assert kinds == ["ack", "chat:message:sent"]
        sent = next(f for f in frames if f["type"] == "chat:message:sent")
        assert sent["data"]["content"] == "héllo" and sent["data"]["offset"] == 1


async def test_msgpack_subprotocol_binary_frames(gateway: Gateway) -> None:
    url = gateway.url.replace("http://", "ws://") + "?token=" + token("bob")
    async with websockets.connect(url, subprotocols=["rtgate.v1.msgpack"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "rtgate.v1.msgpack"
        raw = await ws.recv()
        assert isinstance(raw, bytes)
        assert msgpack.unpackb(raw)["type"] == "welcome"
        await ws.send(msgpack.packb({"type": "ping", "id": 7, "data": [1, "two"]}))
        pong = msgpack.unpackb(await ws.recv())
        ack = msgpack.unpackb(await ws.recv())
        assert pong == {"type": "pong", "data": [1, "two"]}
        assert ack == {"type": "ack", "id": 7, "ok": True, "data": [1, "two"]}
