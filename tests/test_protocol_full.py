"""The full protocol: direct and global messages, custom events, batches, refresh."""

from __future__ import annotations

import asyncio
import datetime
import time

import msgpack

from tests.conftest import ClientFactory, Gateway, GatewayFactory, token


async def test_direct_messages_reach_every_connection_of_the_user_once(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw1 = await make_gateway("gw1")
    gw2 = await make_gateway("gw2")
    alice = await connect(gw1, "alice", name="Alice")
    bob_tabs = [
        await connect(gw1, "bob"),
        await connect(gw2, "bob"),
        await connect(gw2, "bob", msgpack_=True),
    ]
    carol = await connect(gw2, "carol")
    ack = await alice.ok(
        "direct:message", {"toUserId": "bob", "content": "psst", "clientId": "d-1"}
    )
    message = ack["message"]
    assert message["fromUserId"] == "alice" and message["toUserId"] == "bob"
    assert message["offset"] == 1 and message["fromUsername"] == "Alice"
    for tab in bob_tabs:
        got = (await tab.next("direct:message"))["data"]
        assert got["id"] == message["id"] and got["content"] == "psst"
        assert got["prevOffset"] == 0 and got["epoch"] == message["epoch"]
    # Retried with the same clientId: the original, not a copy.
    again = (
        await alice.ok("direct:message", {"toUserId": "bob", "content": "psst", "clientId": "d-1"})
    )["message"]
    assert again["id"] == message["id"]
    second = await alice.ok("direct:message", {"toUserId": "bob", "content": "two"})
    for tab in bob_tabs:
        got = (await tab.next("direct:message"))["data"]
        assert got["content"] == "two" and got["prevOffset"] == message["offset"]
        assert tab.take("direct:message") == []
    assert second["message"]["offset"] == 2
    await carol.ok("ping")
    assert carol.take("direct:message") == [] and alice.take("direct:message") == []


async def test_global_broadcast_admin_only_reaches_everyone(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw1 = await make_gateway("gw1")
    gw2 = await make_gateway("gw2")
    admin = await connect(gw1, "root", admin=True)
    others = [
        await connect(gw1, "a"),
        await connect(gw2, "b"),
        await connect(gw2, "c", msgpack_=True),
    ]
    assert await others[0].error("broadcast:global", {"content": "hi"}) == "forbidden"
    ack = await admin.ok("broadcast:global", {"content": "maintenance at 5", "clientId": "g1"})
    message = ack["message"]
    for client in (admin, *others):
        got = (await client.next("global:message"))["data"]
        assert got["content"] == "maintenance at 5" and got["fromUserId"] == "root"
        assert got["offset"] == message["offset"] and got["id"] == message["id"]
    dup = await admin.ok("broadcast:global", {"content": "maintenance at 5", "clientId": "g1"})
    assert dup["message"]["offset"] == message["offset"]
    await others[1].ok("ping")
    assert others[1].take("global:message") == []


async def test_room_events_durable_and_ephemeral(gateway: Gateway, connect: ClientFactory) -> None:
    a = await connect(gateway, "alice")
    b = await connect(gateway, "bob")
    for c in (a, b):
        await c.ok("room:join", "doc-1")
    chat = (await a.ok("chat:message", {"roomId": "doc-1", "content": "x"}))["message"]
    durable = await a.ok(
        "room:event",
        {
            "roomId": "doc-1",
            "event": "cursor:move",
            "data": {"x": 1, "y": [2]},
            "durable": True,
            "clientId": "e-1",
        },
    )
    assert durable["offset"] == chat["offset"] + 1 and durable["epoch"] == chat["epoch"]
    for c in (a, b):  # durable events reach the sender too, in the room's chain
        got = (await c.next("room:event"))["data"]
        assert got["event"] == "cursor:move" and got["data"] == {"x": 1, "y": [2]}
        assert got["prevOffset"] == chat["offset"] and got["userId"] == "alice"
    dup = await a.ok(
        "room:event",
        {"roomId": "doc-1", "event": "cursor:move", "data": 1, "durable": True, "clientId": "e-1"},
    )
    assert dup["offset"] == durable["offset"]
    assert (await a.ok("room:event", {"roomId": "doc-1", "event": "ping_1", "data": None})) is None
    got = (await b.next("room:event"))["data"]
    assert got["event"] == "ping_1" and "offset" not in got
    await a.ok("ping")
    assert a.take("room:event") == []  # ephemeral skips the sender
    assert (
        await a.error("room:event", {"roomId": "doc-1", "event": "Bad Name", "data": 1})
        == "bad_request"
    )
    assert await a.error("room:event", {"roomId": "nope", "event": "x", "data": 1}) == "forbidden"


async def test_binary_event_data_from_msgpack_is_refused(
    gateway: Gateway, connect: ClientFactory
) -> None:
    a = await connect(gateway, "alice", msgpack_=True)
    await a.ok("room:join", "r")
    assert (
        await a.error(
            "room:event", {"roomId": "r", "event": "blob", "data": b"\x00\x01", "durable": True}
        )
        == "bad_request"
    )
    assert (
        await a.error("room:event", {"roomId": "r", "event": "blob", "data": b"\x00"})
        == "bad_request"
    )  # ephemeral events are checked the same way
    await a.ok("room:event", {"roomId": "r", "event": "ok", "data": {"n": 1}, "durable": True})
    assert msgpack.packb(1)  # msgpack clients still send everything JSON can carry


async def test_batches_both_shapes_cap_nesting_and_rate(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw = await make_gateway(limits={"rate_per_second": 0.1, "rate_burst": 6})
    a = await connect(gw, "alice")
    ack = await a.ok(
        "batch",
        [
            {"type": "room:join", "id": 101, "data": "lobby"},
            {"type": "chat:message", "id": 102, "data": {"roomId": "lobby", "content": "1"}},
            {"type": "batch", "id": 103, "data": []},
        ],
    )
    assert ack == {"count": 3}
    acks = {f["id"]: f for f in [await a.next("ack") for _ in range(3)]}
    assert acks[101]["ok"] and acks[102]["ok"]
    assert acks[103]["error"]["code"] == "bad_request"  # no nesting
    # The tutorial's shape: {messages: [{event, data}]}.
    await a.ok(
        "batch",
        {
            "messages": [
                {"event": "chat:typing", "data": {"roomId": "lobby", "isTyping": True}},
                {"event": "ping", "data": "p", "id": 104},
            ]
        },
    )
    assert (await a.next("ack"))["id"] == 104
    # Six tokens: the three and two inner frames above spent five, so one more
    # inner frame passes and the next is refused as if sent alone.
    await a.send("batch", [{"type": "ping", "id": 105}, {"type": "ping", "id": 106}], id=900)
    refused = [await a.next("ack") for _ in range(2)]
    codes = {f["id"]: f.get("error", {}).get("code") for f in refused}
    assert codes == {105: None, 106: "rate_limited"}
    b = await connect(gw, "bob")
    assert await b.error("batch", [{"type": "ping"}] * 51) == "limit_exceeded"


async def test_token_refresh_extends_and_narrows(gateway: Gateway, connect: ClientFactory) -> None:
    a = await connect(gateway, "alice", ttl_seconds=2, rooms=["a-*", "b-*"])
    await a.ok("room:join", "a-1")
    await a.ok("room:join", "b-1")
    data = await a.ok("auth", {"token": token("alice", ttl_seconds=60, rooms=["a-*"])})
    assert data["userId"] == "alice"
    removed = await a.next("room:removed")
    assert removed["data"]["roomId"] == "b-1" and removed["data"]["reason"]
    assert "b-1" not in gateway.node.hub.rooms and "a-1" in gateway.node.hub.rooms
    assert await a.error("room:join", "b-2") == "forbidden"
    await asyncio.sleep(2.5)  # past the first token's expiry
    await a.ok("ping")
    assert not a.closed.is_set()
    assert a.take("welcome") == []


async def test_auth_expiring_arrives_before_expiry(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw = await make_gateway(auth={"expiring_notice_seconds": 1.0})
    a = await connect(gw, "alice", ttl_seconds=2)
    notice = await a.next("auth:expiring", timeout=3)
    arrived = time.time()
    expires = datetime.datetime.fromisoformat(notice["data"]["expiresAt"]).timestamp()
    assert 0.7 < expires - arrived < 1.3  # the configured notice, one second
    assert await a.wait_closed(timeout=3) == 4401


async def test_sustained_excess_closes_1008(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw = await make_gateway(limits={"rate_per_second": 1.0, "rate_burst": 1})
    a = await connect(gw, "alice")
    started = time.monotonic()
    while not a.closed.is_set() and time.monotonic() - started < 10:
        await a.send("ping")
        await asyncio.sleep(0.1)
    assert a.close_code == 1008
    assert 4 <= time.monotonic() - started < 7
