"""Every limit of the core protocol: a clear error, never a crash or a silent drop."""

from __future__ import annotations

import asyncio
import json

import msgpack

from tests.conftest import ClientFactory, Gateway, GatewayFactory


async def test_frame_over_max_closes_1009(gateway: Gateway, connect: ClientFactory) -> None:
    client = await connect(gateway)
    big = json.dumps({"type": "ping", "data": "x" * (64 * 1024)})
    await client.send_raw(big)
    assert await client.wait_closed() == 1009


async def test_rate_limit_refuses_with_ack_and_error(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw = await make_gateway(limits={"rate_per_second": 1.0, "rate_burst": 5})
    client = await connect(gw)
    for i in range(5):
        await client.send("ping", i, id=100 + i)
    await client.send("ping", "no-id")  # refused, reported as an error frame
    ack = await client.request("ping", "with-id")
    assert ack["ok"] is False and ack["error"]["code"] == "rate_limited"
    err = await client.next("error")
    assert err["data"]["code"] == "rate_limited"
    # The five within the burst were served.
    pongs = [(await client.next("pong"))["data"] for _ in range(5)]
    assert pongs == [0, 1, 2, 3, 4]


async def test_max_rooms_per_connection(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw = await make_gateway(limits={"max_rooms": 3})
    client = await connect(gw)
    for room in ("r1", "r2", "r3"):
        await client.ok("room:join", room)
    assert await client.error("room:join", "r4") == "limit_exceeded"
    await client.ok("room:join", "r3")  # rejoining a room it has is not a new room
    await client.ok("room:leave", "r1")
    await client.ok("room:join", "r4")


async def test_content_too_large(make_gateway: GatewayFactory, connect: ClientFactory) -> None:
    gw = await make_gateway(limits={"max_content_bytes": 10})
    client = await connect(gw)
    await client.ok("room:join", "lobby")
    await client.ok("chat:message", {"roomId": "lobby", "content": "0123456789"})
    assert (
        await client.error("chat:message", {"roomId": "lobby", "content": "0123456789a"})
        == "too_large"
    )
    # Ten bytes means bytes: five two-byte letters fit, six do not.
    await client.ok("chat:message", {"roomId": "lobby", "content": "ééééé"})
    assert (
        await client.error("chat:message", {"roomId": "lobby", "content": "éééééé"}) == "too_large"
    )


async def test_bad_frames_get_bad_frame_then_1007(gateway: Gateway, connect: ClientFactory) -> None:
    client = await connect(gateway)
    bad: list[str] = [
        "{not json",
        "[1,2]",
        '{"type": 5}',
        '"just a string"',
        '{"data": 1}',
        '{"type": "ping", "id": -1}',
        '{"type": "ping", "id": "7"}',
        "null",
    ]
    for raw in bad:
        await client.send_raw(raw)
        err = await client.next("error")
        assert err["data"]["code"] == "bad_frame", raw
    # A good frame resets the count.
    await client.ok("ping")
    for _ in range(9):
        await client.send_raw("{oops")
    await client.ok("ping")
    client.take("error")
    for _ in range(10):
        await client.send_raw("{oops")
    assert await client.wait_closed() == 1007
    # The error that explains the close is written before the close frame.
    assert len(client.take("error")) == 10


async def test_bad_msgpack_and_text_on_msgpack(gateway: Gateway, connect: ClientFactory) -> None:
    client = await connect(gateway, msgpack_=True)
    await client.send_raw(b"\xc1\xc1\xc1")
    assert (await client.next("error"))["data"]["code"] == "bad_frame"
    await client.send_raw(msgpack.packb([1, 2, 3]))
    assert (await client.next("error"))["data"]["code"] == "bad_frame"
    await client.send_raw('{"type":"ping"}')
    assert (await client.next("error"))["data"]["code"] == "bad_frame"
    assert (await client.ok("ping", {"b": b"bytes ok"})) == {"b": b"bytes ok"}


async def test_unknown_type_and_bad_data(gateway: Gateway, connect: ClientFactory) -> None:
    client = await connect(gateway)
    assert await client.error("room:explode", {}) == "bad_request"
    await client.send("room:explode")
    assert (await client.next("error"))["data"]["code"] == "bad_request"
    assert await client.error("room:join", {"room": "x"}) == "bad_request"
    assert await client.error("room:join", 42) == "bad_request"
    await client.ok("room:join", "lobby")
    assert await client.error("chat:message", {"roomId": "lobby"}) == "bad_request"
    assert await client.error("chat:message", {"roomId": "lobby", "content": 5}) == "bad_request"
    assert await client.error("chat:message", "lobby") == "bad_request"
    assert (
        await client.error(
            "chat:message", {"roomId": "lobby", "content": "x", "clientId": "has space"}
        )
        == "bad_request"
    )
    assert (
        await client.error("chat:typing", {"roomId": "lobby", "isTyping": "yes"}) == "bad_request"
    )
    assert await client.error("auth", {"token": ""}) == "bad_request"


async def test_slow_consumer_is_closed_and_others_keep_receiving(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw = await make_gateway(
        limits={
            "outbox_frames": 64,
            "outbox_bytes": 256 * 1024,
            "rate_per_second": 10000.0,
            "rate_burst": 10000,
        }
    )
    sender = await connect(gw, "sender")
    healthy = await connect(gw, "healthy")
    slow = await connect(gw, "slow")
    for c in (sender, healthy, slow):
        await c.ok("room:join", "firehose")
    # The slow peer stops reading: its kernel buffers fill, then the gateway's
    # bound is passed and it is cut with 1013.
    slow.ws._response.connection.transport.pause_reading()  # type: ignore[union-attr]
    total = 2000
    payload = "y" * 3000
    acks = [
        asyncio.ensure_future(sender.ok("chat:message", {"roomId": "firehose", "content": payload}))
        for _ in range(total)
    ]
    await asyncio.gather(*acks)
    received = 0
    while received < total:
        await healthy.next("chat:message", timeout=10)
        received += 1
    assert received == total
    assert gw.node.metrics.slow_consumers._value.get() == 1
    slow.ws._response.connection.transport.resume_reading()  # type: ignore[union-attr]
    assert await slow.wait_closed(timeout=10) == 1013
    assert sum(1 for f in slow.frames if f["type"] == "chat:message") < total


async def test_malformed_frames_spend_rate_tokens(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw = await make_gateway(limits={"rate_per_second": 0.5, "rate_burst": 4, "max_bad_frames": 100})
    client = await connect(gw)
    for _ in range(4):
        await client.send_raw("{bad")
    assert await client.error("ping") == "rate_limited"
