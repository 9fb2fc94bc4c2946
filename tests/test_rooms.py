"""Rooms and durable chat across two gateways on one real NATS."""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.request

from rtgate.natsserver import NatsServer
from tests.conftest import ClientFactory, Gateway, GatewayFactory, pair_in_room


def _subscriptions(nats: NatsServer, name_part: str) -> list[str]:
    url = f"http://127.0.0.1:{nats.monitor_port}/connz?subs=1"
    with urllib.request.urlopen(url, timeout=2) as resp:
        data = json.load(resp)
    subs: list[str] = []
    for conn in data["connections"]:
        if name_part in conn.get("name", ""):
            subs.extend(conn.get("subscriptions_list") or [])
    return subs


async def test_message_reaches_every_member_on_both_gateways_once(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw1 = await make_gateway("gw1")
    gw2 = await make_gateway("gw2")
    sender = await connect(gw1, "alice")
    same_gw = await connect(gw1, "bob")
    other_gw = [await connect(gw2, "carol"), await connect(gw2, "dave", msgpack_=True)]
    outsider = await connect(gw2, "erin")
    for c in (sender, same_gw, *other_gw):
        joined = await c.ok("room:join", {"roomId": "lobby"})
        assert joined["roomId"] == "lobby" and joined["offset"] == 0
        assert joined["epoch"] == gw1.node.room_epoch() == gw2.node.room_epoch()
    await outsider.ok("room:join", "elsewhere")

    ack = await sender.ok("chat:message", {"roomId": "lobby", "content": "hello"})
    message = ack["message"]
    assert message["content"] == "hello" and message["userId"] == "alice"
    assert message["offset"] == 1 and message["id"] == f"{message['epoch']}-1"
    assert message["timestamp"].endswith("Z") and len(message["timestamp"]) == 24

    sent = await sender.next("chat:message:sent")
    assert sent["data"]["id"] == message["id"] and sent["data"]["prevOffset"] == 0
    for c in (same_gw, *other_gw):
        got = await c.next("chat:message")
        assert got["data"] == sent["data"]
    # Exactly once: a later message arrives next, with nothing in between.
    await sender.ok("chat:message", {"roomId": "lobby", "content": "second"})
    for c in (same_gw, *other_gw):
        got = await c.next("chat:message")
        assert got["data"]["content"] == "second"
        assert c.take("chat:message") == []
    assert sender.take("chat:message") == []
    assert outsider.take("chat:message") == []


async def test_offsets_increase_and_prev_offset_chains_per_room(
    gateway: Gateway, make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw2 = await make_gateway("gw2")
    a = await connect(gateway, "alice")
    b = await connect(gw2, "bob")
    for c in (a, b):
        await c.ok("room:join", "red")
        await c.ok("room:join", "blue")
    # Interleave rooms so stream sequences and per-room chains differ.
    for i in range(6):
        await a.ok("chat:message", {"roomId": "red" if i % 2 == 0 else "blue", "content": str(i)})
    for room in ("red", "blue"):
        chain = [(await b.next("chat:message", roomId=room))["data"] for _ in range(3)]
        offsets = [m["offset"] for m in chain]
        assert offsets == sorted(offsets)
        assert chain[0]["prevOffset"] == 0
        for prev, cur in itertools.pairwise(chain):
            assert cur["prevOffset"] == prev["offset"]
    own = [f["data"] for f in a.take("chat:message:sent")]
    assert sorted(m["offset"] for m in own) == list(range(1, 7))


async def test_client_id_retry_returns_the_original_message(
    gateway: Gateway, connect: ClientFactory
) -> None:
    a = await connect(gateway, "alice")
    b = await connect(gateway, "bob")
    for c in (a, b):
        await c.ok("room:join", "lobby")
    first = (await a.ok("chat:message", {"roomId": "lobby", "content": "x", "clientId": "m-1"}))[
        "message"
    ]
    retry = (await a.ok("chat:message", {"roomId": "lobby", "content": "x", "clientId": "m-1"}))[
        "message"
    ]
    assert retry["id"] == first["id"] and retry["offset"] == first["offset"]
    assert retry["timestamp"] == first["timestamp"]
    # The same clientId from another user is another message.
    other = (await b.ok("chat:message", {"roomId": "lobby", "content": "x", "clientId": "m-1"}))[
        "message"
    ]
    assert other["offset"] != first["offset"] and other["userId"] == "bob"
    # The retry was not delivered again.
    got = [(await b.next("chat:message:sent"))["data"]["offset"]]
    await a.next("chat:message", offset=other["offset"])
    assert a.take("chat:message:sent")[0]["data"]["offset"] == first["offset"]
    assert a.take("chat:message:sent") == [] and got == [other["offset"]]


async def test_last_leave_drops_the_gateway_subscription(
    gateway: Gateway, connect: ClientFactory, nats_server: NatsServer
) -> None:
    a = await connect(gateway, "alice")
    b = await connect(gateway, "bob")
    await a.ok("room:join", "quiet")
    await b.ok("room:join", "quiet")
    live = "rt.live.room.quiet"
    assert _subscriptions(nats_server, "gw1").count(live) == 1  # one for two members
    await a.ok("room:leave", "quiet")
    assert live in _subscriptions(nats_server, "gw1")
    assert (await b.ok("room:leave", {"roomId": "quiet"})) == {"roomId": "quiet"}
    for _ in range(100):
        if live not in _subscriptions(nats_server, "gw1"):
            break
        await asyncio.sleep(0.02)
    assert live not in _subscriptions(nats_server, "gw1")
    assert "quiet" not in gateway.node.hub.rooms
    # A disconnect is a leave too.
    await a.ok("room:join", "quiet")
    assert live in _subscriptions(nats_server, "gw1")
    await a.close()
    for _ in range(100):
        if live not in _subscriptions(nats_server, "gw1"):
            break
        await asyncio.sleep(0.02)
    assert live not in _subscriptions(nats_server, "gw1")


async def test_typing_skips_sender_and_coalesces(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    _, _, a, b = await pair_in_room(make_gateway, connect)
    # Ten toggles in a burst: at most a couple go out now, and the final state
    # (False) always arrives at the end of the interval.
    for i in range(10):
        await a.send("chat:typing", {"roomId": "lobby", "isTyping": i % 2 == 0})
    await a.send("chat:typing", {"roomId": "lobby", "isTyping": False})
    first = await b.next("chat:typing")
    assert first["data"] == {
        "roomId": "lobby",
        "userId": "alice",
        "username": "alice",
        "isTyping": True,
    }
    last = await b.next("chat:typing")
    assert last["data"]["isTyping"] is False
    await a.ok("ping")  # a round trip, so anything else would have arrived
    await asyncio.sleep(0.7)  # past the coalescing interval: nothing more may come
    assert b.take("chat:typing") == []
    assert a.take("chat:typing") == []


async def test_client_id_reused_in_another_room_is_a_new_message(
    gateway: Gateway, connect: ClientFactory
) -> None:
    a = await connect(gateway, "alice")
    await a.ok("room:join", "one")
    await a.ok("room:join", "two")
    first = (await a.ok("chat:message", {"roomId": "one", "content": "x", "clientId": "same"}))[
        "message"
    ]
    second = (await a.ok("chat:message", {"roomId": "two", "content": "y", "clientId": "same"}))[
        "message"
    ]
    assert second["roomId"] == "two" and second["content"] == "y"
    assert second["offset"] != first["offset"]


async def test_control_disconnects_one_connection_or_a_user(
    gateway: Gateway, connect: ClientFactory, nats_server: NatsServer
) -> None:
    import nats

    from broker import subjects

    a1 = await connect(gateway, "alice")
    a2 = await connect(gateway, "alice")
    b = await connect(gateway, "bob")
    c = await connect(gateway, "carol")
    session_b = gateway.node.hub.by_user("bob")[0].conn_id
    nc = await nats.connect(nats_server.url)
    try:
        # A stray subject under the gateway's prefix is not a gateway-wide kick.
        await nc.publish(
            subjects.control_gateway_subject("gw1") + ".whatever", b'{"type":"disconnect"}'
        )
        await nc.publish(
            subjects.control_connection_subject("gw1", session_b),
            json.dumps({"type": "disconnect", "code": 4403, "reason": "é" * 100}).encode(),
        )
        await nc.publish(
            subjects.control_user_subject("alice"),
            b'{"type":"disconnect","code":4403,"reason":"banned"}',
        )
        await nc.flush()
        assert await b.wait_closed() == 4403
        assert await a1.wait_closed() == 4403 and await a2.wait_closed() == 4403
        await c.ok("ping")
        assert not c.closed.is_set()
    finally:
        await nc.close()


async def test_stream_recreated_while_connected_gets_a_new_epoch(
    make_gateway: GatewayFactory, connect: ClientFactory, nats_server: NatsServer
) -> None:
    import nats

    from broker import subjects

    gw = await make_gateway(streams={"stats_interval_seconds": 0.1})
    a = await connect(gw, "alice")
    await a.ok("room:join", "lobby")
    old = (await a.ok("chat:message", {"roomId": "lobby", "content": "x"}))["message"]
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().delete_stream(subjects.ROOMS_STREAM)
    finally:
        await nc.close()
    new = (await a.ok_once_available("chat:message", {"roomId": "lobby", "content": "y"}))[
        "message"
    ]
    assert new["offset"] == 1
    assert new["epoch"] != old["epoch"] and new["id"] != old["id"]
