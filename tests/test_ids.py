"""Room and user ids with awkward characters, end to end; unsafe ids refused."""

from __future__ import annotations

import pytest

from tests.conftest import ClientFactory, Gateway

AWKWARD = [
    "auth0|123",
    "alice@example.com",
    "a.b.c",
    "Zoë-Ünïcødé",
    "房间",
    "*",
    ">",
    "~7e",
    "$sys",
    "x" * 128,
]


@pytest.mark.parametrize("room", AWKWARD)
async def test_awkward_room_ids_work_end_to_end(
    gateway: Gateway, connect: ClientFactory, room: str
) -> None:
    user = "auth0|" + room[:50]
    a = await connect(gateway, user, name="Zoë")
    b = await connect(gateway, "bob@example.com")
    for c in (a, b):
        assert (await c.ok("room:join", {"roomId": room}))["roomId"] == room
    await a.ok("chat:message", {"roomId": room, "content": "hi"})
    got = (await b.next("chat:message"))["data"]
    assert got["roomId"] == room and got["userId"] == user and got["username"] == "Zoë"
    # Rooms whose ids differ only in escaped characters never share a subject.
    assert len(gateway.node.hub.rooms) == 1


@pytest.mark.parametrize(
    "room", ["", "has space", "tab\there", "new\nline", "nul\x00", "bell\x07", "x" * 129, "\u2028"]
)
async def test_bad_room_ids_are_refused(
    gateway: Gateway, connect: ClientFactory, room: str
) -> None:
    client = await connect(gateway)
    assert await client.error("room:join", {"roomId": room}) == "bad_request"
    assert gateway.node.hub.rooms == {}


@pytest.mark.parametrize("user", ["has space", "ctl\x01", "x" * 257])
async def test_bad_user_ids_are_refused(
    gateway: Gateway, connect: ClientFactory, user: str
) -> None:
    from tests.conftest import token
    from tests.wsclient import WsClient

    client = await WsClient.connect(gateway.url)
    try:
        await client.send("auth", {"token": token(user)}, id=1)
        assert await client.wait_closed() == 4401
    finally:
        await client.close()
