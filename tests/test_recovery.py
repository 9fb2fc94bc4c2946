"""Connection-state recovery across gateways: resume, join since, gap fill."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import nats

from broker import subjects
from rtgate.natsserver import NatsServer
from tests.conftest import ClientFactory, GatewayFactory
from tests.wsclient import WsClient


def _chain(frames: list[dict[str, Any]]) -> list[int]:
    return [f["data"]["offset"] for f in frames]


async def test_resume_on_another_gateway_gets_exactly_what_was_missed(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw1 = await make_gateway("gw1")
    gw2 = await make_gateway("gw2", limits={"rate_per_second": 1000.0, "rate_burst": 1000})
    sender = await connect(gw2, "sender")
    await sender.ok("room:join", "lobby")
    client = await connect(gw1, "alice")
    joined = await client.ok("room:join", "lobby")
    first = (await sender.ok("chat:message", {"roomId": "lobby", "content": "seen"}))["message"]
    seen = await client.next("chat:message")
    assert seen["data"]["offset"] == first["offset"]
    await client.close()
    for i in range(50):
        await sender.ok("chat:message", {"roomId": "lobby", "content": f"missed {i}"})
    await gw1.server.close()  # the gateway the client was on is gone

    back = await connect(gw2, "alice")
    ack = await back.request(
        "resume", {"rooms": {"lobby": {"offset": first["offset"], "epoch": joined["epoch"]}}}
    )
    # Replayed messages arrive before the ack.
    replayed = [f for f in back.frames if f["type"] == "chat:message"]
    assert ack["ok"], ack
    result = ack["data"]["rooms"]["lobby"]
    assert result["recovered"] is True and result["missed"] == 50
    assert [f["data"]["content"] for f in replayed] == [f"missed {i}" for i in range(50)]
    chain = _chain(replayed)
    assert replayed[0]["data"]["prevOffset"] == first["offset"]
    assert all(
        b["data"]["prevOffset"] == a["data"]["offset"] for a, b in itertools.pairwise(replayed)
    )
    assert result["offset"] == chain[-1]
    back.take("chat:message")
    live = (await sender.ok("chat:message", {"roomId": "lobby", "content": "live"}))["message"]
    got = await back.next("chat:message")
    assert got["data"]["offset"] == live["offset"] and got["data"]["prevOffset"] == chain[-1]
    await back.ok("ping")
    assert back.take("chat:message") == []


async def test_resume_while_messages_keep_coming_has_no_gap_or_duplicate(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw = await make_gateway("gw1", limits={"rate_per_second": 5000.0, "rate_burst": 5000})
    sender = await connect(gw, "sender")
    await sender.ok("room:join", "busy")
    base = (await sender.ok("chat:message", {"roomId": "busy", "content": "0"}))["message"]
    for i in range(200):
        await sender.send("chat:message", {"roomId": "busy", "content": str(i)})

    async def flood() -> None:
        for i in range(200):
            await sender.ok("chat:message", {"roomId": "busy", "content": f"live {i}"})

    flooding = asyncio.create_task(flood())
    await asyncio.sleep(0.01)
    client = await connect(gw, "alice")
    ack = await client.ok(
        "resume", {"rooms": {"busy": {"offset": base["offset"], "epoch": base["epoch"]}}}
    )
    assert ack["rooms"]["busy"]["recovered"] is True
    await flooding
    last = (await sender.ok("chat:message", {"roomId": "busy", "content": "end"}))["message"]
    await client.next("chat:message", offset=last["offset"])
    frames = [f for f in client.frames if f["type"] == "chat:message"]
    frames.append(
        {
            "data": {
                "offset": last["offset"],
                "prevOffset": frames[-1]["data"]["offset"] if frames else base["offset"],
            }
        }
    )
    offsets = _chain(frames)
    assert len(offsets) == len(set(offsets)) == 401  # 200 + 200 + "end", each once
    prev = base["offset"]
    for frame in frames:
        assert frame["data"]["prevOffset"] == prev
        prev = frame["data"]["offset"]


async def test_resume_edge_cases(make_gateway: GatewayFactory, connect: ClientFactory) -> None:
    gw = await make_gateway(
        "gw1",
        limits={"resume_budget": 12, "max_rooms": 3, "rate_burst": 1000},
        streams={"recovery_max_messages": 10},
    )
    sender = await connect(gw, "sender")
    for room in ("a", "b", "c"):
        await sender.ok("room:join", room)
    epoch = gw.node.room_epoch()
    for i in range(8):
        await sender.ok("chat:message", {"roomId": "a", "content": str(i)})
        await sender.ok("chat:message", {"roomId": "b", "content": str(i)})
    for i in range(12):
        await sender.ok("chat:message", {"roomId": "c", "content": str(i)})
    client = await connect(gw, "alice")
    ack = await client.ok(
        "resume",
        {
            "rooms": {
                "a": {"offset": 1, "epoch": epoch},  # 7 missed: fits
                "b": {"offset": 2, "epoch": epoch},  # 7 more: over the budget of 12
            }
        },
    )
    assert ack["rooms"]["a"]["recovered"] is True and ack["rooms"]["a"]["missed"] == 7
    assert ack["rooms"]["b"]["recovered"] is False
    assert len(client.take("chat:message")) == 7
    # 11 missed in one room: over the per-room cap of 10, whatever the budget.
    ack = await client.ok("resume", {"rooms": {"c": {"offset": 17, "epoch": epoch}}})
    assert ack["rooms"]["c"]["recovered"] is False and client.take("chat:message") == []
    other = await connect(gw, "bob")
    ack = await other.ok(
        "resume", {"rooms": {"a": {"offset": 1, "epoch": "1"}, "b": {"offset": 0, "epoch": epoch}}}
    )
    assert ack["rooms"]["a"]["recovered"] is False  # another epoch
    # Offset 0 of the current epoch: "before anything", so everything is replayed.
    assert ack["rooms"]["b"] == {"recovered": True, "missed": 8, "offset": 16, "epoch": epoch}
    assert [f["data"]["content"] for f in other.take("chat:message")] == [str(i) for i in range(8)]
    # Joined all the same.
    assert any(c.user_id == "bob" for c in gw.node.hub.rooms["a"].members)
    # Bad input.
    assert (
        await other.error("resume", {"rooms": {"a": {"offset": -1, "epoch": epoch}}})
        == "bad_request"
    )
    assert await other.error("resume", {"rooms": {"a": 5}}) == "bad_request"
    assert (
        await other.error(
            "resume", {"rooms": {f"r{i}": {"offset": 0, "epoch": epoch} for i in range(4)}}
        )
        == "limit_exceeded"
    )
    assert (
        await other.error("room:join", {"roomId": "a", "since": {"offset": "x"}}) == "bad_request"
    )


async def test_join_since_fills_a_gap_while_connected(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw = await make_gateway("gw1")
    sender = await connect(gw, "sender")
    client = await connect(gw, "alice")
    for c in (sender, client):
        await c.ok("room:join", "r")
    first = (await sender.ok("chat:message", {"roomId": "r", "content": "1"}))["message"]
    for i in range(3):
        await sender.ok("chat:message", {"roomId": "r", "content": f"more {i}"})
    for _ in range(3 + 1):
        await client.next("chat:message")
    # The client believes it saw only the first: join again with since.
    ack = await client.ok(
        "room:join", {"roomId": "r", "since": {"offset": first["offset"], "epoch": first["epoch"]}}
    )
    assert ack["rooms"]["r"]["recovered"] is True and ack["rooms"]["r"]["missed"] == 3
    assert [f["data"]["content"] for f in client.take("chat:message")] == [
        f"more {i}" for i in range(3)
    ]


async def test_direct_and_global_resume(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw = await make_gateway("gw1")
    admin = await connect(gw, "root", admin=True)
    bob = await connect(gw, "bob")
    d0 = (await admin.ok("direct:message", {"toUserId": "bob", "content": "d0"}))["message"]
    g0 = (await admin.ok("broadcast:global", {"content": "g0"}))["message"]
    await bob.next("direct:message")
    await bob.next("global:message")
    await bob.close()
    await admin.ok("direct:message", {"toUserId": "bob", "content": "d1"})
    await admin.ok("broadcast:global", {"content": "g1"})
    back = await connect(gw, "bob")
    ack = await back.ok(
        "resume",
        {
            "direct": {"offset": d0["offset"], "epoch": d0["epoch"]},
            "global": {"offset": g0["offset"], "epoch": g0["epoch"]},
        },
    )
    assert ack["direct"]["recovered"] and ack["direct"]["missed"] == 1
    assert ack["global"]["recovered"] and ack["global"]["missed"] == 1
    assert (await back.next("direct:message"))["data"]["content"] == "d1"
    assert (await back.next("global:message"))["data"]["content"] == "g1"


async def test_gateway_fills_a_missed_live_copy_from_the_stream(
    make_gateway: GatewayFactory, connect: ClientFactory, nats_server: NatsServer
) -> None:
    gw = await make_gateway("gw1")
    client = await connect(gw, "alice")
    await client.ok("room:join", "r")
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()

    async def store(text: str) -> int:
        event = {
            "type": "chat:message",
            "data": {
                "roomId": "r",
                "userId": "svc",
                "username": "svc",
                "content": text,
                "timestamp": "2026-01-01T00:00:00.000Z",
            },
        }
        return (await js.publish(subjects.room_subject("r"), json.dumps(event).encode())).seq

    try:
        await store("one")
        await client.next("chat:message")
        # The gateway's live subscription misses two messages ...
        channel = gw.node.hub.rooms["r"]
        assert channel.sub is not None
        await channel.sub.unsubscribe()
        await store("two")
        await store("three")
        channel.sub = await gw.node.nc.subscribe(
            subjects.live_room_subject("r"), cb=gw.node.hub.callback(lambda _: channel)
        )
        await gw.node.nc.flush()
        # ... and notices when the next one's prevOffset skips them.
        await store("four")
        got = [(await client.next("chat:message"))["data"] for _ in range(3)]
        assert [m["content"] for m in got] == ["two", "three", "four"]
        assert got[1]["prevOffset"] == got[0]["offset"] and got[2]["prevOffset"] == got[1]["offset"]
    finally:
        await nc.close()


async def test_client_left_out_of_replay_sees_nothing_twice(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw = await make_gateway("gw1")
    a = await connect(gw, "alice")
    await a.ok("room:join", "r")
    m = (await a.ok("chat:message", {"roomId": "r", "content": "x"}))["message"]
    ws = await WsClient.connect(gw.url)
    try:
        assert (
            await ws.error("resume", {"rooms": {"r": {"offset": m["offset"], "epoch": m["epoch"]}}})
            == "unauthenticated"
        )
    finally:
        await ws.close()


async def test_position_of_an_empty_channel_recovers_what_came_after(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    """A room joined while empty hands out the stream's high-water mark, not 0: after
    a purge moved the stream's start, 0 could no longer be replayed whole."""
    gw = await make_gateway("gw1")
    bob = await connect(gw, "bob")
    await bob.ok("room:join", "busy")
    for i in range(3):
        await bob.ok("chat:message", {"roomId": "busy", "content": f"elsewhere {i}"})
    alice = await connect(gw, "alice")
    joined = await alice.ok("room:join", "quiet")
    assert joined["offset"] >= 3  # the stream's high-water mark, the room being empty
    await alice.close()
    await bob.ok("room:join", "quiet")
    await bob.ok("chat:message", {"roomId": "quiet", "content": "while you were away"})
    alice = await connect(gw, "alice")
    ack = await alice.ok(
        "resume", {"rooms": {"quiet": {"offset": joined["offset"], "epoch": joined["epoch"]}}}
    )
    assert ack["rooms"]["quiet"]["recovered"] is True and ack["rooms"]["quiet"]["missed"] == 1
    frame = await alice.next("chat:message")
    assert frame["data"]["content"] == "while you were away"
    assert frame["data"]["prevOffset"] == joined["offset"]  # a replay chains from the position
