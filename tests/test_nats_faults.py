"""The gateway when NATS goes away and comes back, and when a stream is full."""

from __future__ import annotations

import asyncio

import aiohttp
import nats

from broker import subjects
from rtgate.natsserver import NatsServer
from tests.conftest import ClientFactory, Gateway, GatewayFactory, pair_in_room


async def _status(gw: Gateway, path: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(gw.http(path)) as resp:
        return resp.status


async def _wait_status(gw: Gateway, path: str, want: int, timeout: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await _status(gw, path) != want:
        assert loop.time() < deadline, f"{path} never became {want}"
        await asyncio.sleep(0.05)


async def test_nats_restart_mid_session(
    make_gateway: GatewayFactory, connect: ClientFactory, nats_server: NatsServer
) -> None:
    gw1, gw2, a, b = await pair_in_room(make_gateway, connect)
    before = (await a.ok("chat:message", {"roomId": "lobby", "content": "before"}))["message"]
    await b.next("chat:message")
    assert await _status(gw1, "/readyz") == 200

    nats_server.stop()
    await _wait_status(gw1, "/readyz", 503)
    assert await _status(gw1, "/healthz") == 200  # alive, just not ready
    # Sockets stay open; durable sends are refused, never falsely acked.
    assert await a.error("chat:message", {"roomId": "lobby", "content": "lost?"}) == "unavailable"
    assert await a.error("room:join", "other") == "unavailable"
    assert not a.closed.is_set() and not b.closed.is_set()

    nats_server.start()
    await _wait_status(gw1, "/readyz", 200)
    await _wait_status(gw2, "/readyz", 200)
    # Subscriptions are back: a message through gw1 reaches bob on gw2 again.
    after = (await a.ok_once_available("chat:message", {"roomId": "lobby", "content": "after"}))[
        "message"
    ]
    assert after["offset"] == before["offset"] + 1
    got = await b.next("chat:message", timeout=10)
    assert got["data"]["content"] == "after" and got["data"]["prevOffset"] == before["offset"]
    assert after["epoch"] == before["epoch"]  # same stream, same epoch


async def test_full_stream_refuses_and_deletes_nothing(
    make_gateway: GatewayFactory, connect: ClientFactory, nats_server: NatsServer
) -> None:
    gw = await make_gateway(streams={"rooms_max_bytes": 4096, "stats_interval_seconds": 0.2})
    client = await connect(gw)
    await client.ok("room:join", "lobby")
    stored = 0
    code = None
    for i in range(200):
        ack = await client.request("chat:message", {"roomId": "lobby", "content": f"m{i:03d}"})
        if not ack["ok"]:
            code = ack["error"]["code"]
            break
        stored += 1
    assert code == "unavailable" and 0 < stored < 200
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().stream_info(subjects.ROOMS_STREAM)
        # Discard "new": nothing was deleted to make room.
        assert info.state.messages == stored and info.state.first_seq == 1
    finally:
        await nc.close()
    # The fill level is exported.
    for _ in range(50):
        async with aiohttp.ClientSession() as s, s.get(gw.http("/metrics")) as resp:
            text = await resp.text()
        line = [
            ln
            for ln in text.splitlines()
            if ln.startswith('rtgate_stream_fill_ratio{stream="RT_ROOMS"}')
        ]
        if line and float(line[0].split()[-1]) > 0.5:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("stream fill level never exported")
