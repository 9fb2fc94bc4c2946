"""Edge limits before and after the upgrade, /stats, and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from gateway import admission
from rtgate.natsserver import NatsServer, env_without_rtgate, free_port
from tests.conftest import SECRET, ClientFactory, Gateway, GatewayFactory, refused_handshake, token
from tests.wsclient import WsClient


async def _handshake(
    gw: Gateway, headers: dict[str, str] | None = None, tok: str | None = None
) -> tuple[int, dict[str, object]]:
    """Status of a WebSocket handshake; 101 when it upgraded (closed right away)."""
    async with aiohttp.ClientSession() as session:
        try:
            params = {"token": tok} if tok else None
            async with session.ws_connect(gw.url, headers=headers, params=params):
                return 101, {}
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status is not None
            return exc.status, (await refused_handshake(gw, params, headers))[1]


def test_client_address_and_origin_rules() -> None:
    trusted = admission.parse_networks(["10.0.0.0/8", "::1"])
    assert admission.client_address("10.1.1.1", "203.0.113.9, 10.2.2.2", trusted) == "203.0.113.9"
    # A client's own forged entries sit left of the real one and are skipped.
    assert admission.client_address("10.1.1.1", "1.1.1.1, 198.51.100.7", trusted) == "198.51.100.7"
    # Untrusted peers' headers are ignored.
    assert admission.client_address("192.0.2.1", "1.1.1.1", trusted) == "192.0.2.1"
    assert admission.origin_allowed(None, ("https://app.example",))
    assert admission.origin_allowed("https://x.example.com", ("https://*.example.com",))
    assert not admission.origin_allowed("https://evil.test", ("https://*.example.com",))
    with pytest.raises(ValueError):
        admission.parse_networks(["not-a-net"])


async def test_origin_allowlist(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(edge={"allowed_origins": ("https://app.example.com",)})
    status, body = await _handshake(gw, {"Origin": "https://evil.test"}, token("a"))
    assert status == 403 and body["error"]["code"] == "forbidden"  # type: ignore[index]
    assert (await _handshake(gw, {"Origin": "https://app.example.com"}, token("a")))[0] == 101
    assert (await _handshake(gw, None, token("a")))[0] == 101  # non-browser: no Origin


async def test_per_address_connections_with_and_without_trusted_proxy(
    make_gateway: GatewayFactory,
) -> None:
    direct = await make_gateway("direct", edge={"max_connections_per_address": 2})
    clients = [await WsClient.connect(direct.url, token=token("a")) for _ in range(2)]
    try:
        # A forged X-Forwarded-For from an untrusted peer does not buy a new address.
        status, body = await _handshake(direct, {"X-Forwarded-For": "198.51.100.1"}, token("a"))
        assert status == 429 and body["error"]["code"] == "rate_limited"  # type: ignore[index]
    finally:
        for c in clients:
            await c.close()
    proxied = await make_gateway(
        "proxied", edge={"max_connections_per_address": 1, "trusted_proxies": ("127.0.0.1",)}
    )
    first = await WsClient.connect(
        proxied.url, token=token("a"), headers={"X-Forwarded-For": "198.51.100.1"}
    )
    try:
        await first.next("welcome")
        # Same real client behind the proxy: refused; another client: fine.
        assert (await _handshake(proxied, {"X-Forwarded-For": "198.51.100.1"}, token("a")))[
            0
        ] == 429
        assert (await _handshake(proxied, {"X-Forwarded-For": "198.51.100.2"}, token("a")))[
            0
        ] == 101
    finally:
        await first.close()


async def test_handshake_rate_per_address(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(
        edge={"handshakes_per_second_per_address": 0.5, "handshake_burst_per_address": 3}
    )
    statuses = [(await _handshake(gw, None, token("a")))[0] for _ in range(4)]
    assert statuses[:3] == [101, 101, 101] and statuses[3] == 429


async def test_unauthenticated_cap(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(edge={"max_unauthenticated": 2})
    waiting = [await WsClient.connect(gw.url) for _ in range(2)]
    try:
        status, body = await _handshake(gw)
        assert status == 503 and body["error"]["code"] == "limit_exceeded"  # type: ignore[index]
        assert (await _handshake(gw, None, token("a")))[0] == 101  # with a token: fine
        await waiting[0].ok("auth", {"token": token("b")})
        await waiting[0].next("welcome")
        assert (await _handshake(gw))[0] == 101  # a place freed up
    finally:
        for c in waiting:
            await c.close()


async def test_connections_per_user_4429(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw = await make_gateway(edge={"max_connections_per_user": 2})
    await connect(gw, "alice")
    await connect(gw, "alice")
    third = await connect(gw, "alice", welcome=False)
    assert await third.wait_closed() == 4429
    await connect(gw, "bob")  # others are unaffected


async def test_stats(gateway: Gateway, connect: ClientFactory) -> None:
    a = await connect(gateway, "alice")
    await a.ok("room:join", "lobby")
    assert await a.error("room:join", "bad room") == "bad_request"
    async with aiohttp.ClientSession() as s, s.get(gateway.http("/stats")) as resp:
        stats = await resp.json()
    assert stats["connections"] == 1 and stats["authenticated"] == 1 and stats["rooms"] == 1
    assert stats["healthy"] is True and stats["draining"] is False
    assert stats["messagesPerMinuteIn"] > 0 and stats["errorRate"] > 0


def test_sigterm_drains_a_real_gateway(tmp_path: Path, nats_server: NatsServer) -> None:
    port = free_port()
    window = 3.0
    env = env_without_rtgate(
        {
            "RTGATE_NATS__URLS": nats_server.url,
            "RTGATE_SERVER__PORT": str(port),
            "RTGATE_SERVER__ID": "drain-gw",
            "RTGATE_AUTH__SECRET": SECRET,
            "RTGATE_EDGE__DRAIN_SECONDS": str(window),
            "RTGATE_LOG__LEVEL": "warning",
            "RTGATE_EDGE__HANDSHAKES_PER_SECOND_PER_ADDRESS": "0",
        }
    )
    proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env)
    try:
        asyncio.run(_drain_session(proc, port, window, 200))
        assert proc.wait(window + 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _drain_session(
    proc: subprocess.Popen[bytes], port: int, window: float, count: int
) -> None:
    url = f"http://127.0.0.1:{port}"
    # limit=0: the default pool stops at 100 connections.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _ in range(200):
            try:
                async with session.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        sockets = [
            await session.ws_connect(f"{url}/ws", params={"token": token(f"u{i}")})
            for i in range(count)
        ]
        for ws in sockets:
            assert json.loads((await ws.receive()).data)["type"] == "welcome"
        sent_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        async def watch(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[str], int | None, float]:
            kinds = []
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    frame = json.loads(msg.data)
                    kinds.append(frame["type"])
                    assert 0 <= frame["data"]["afterMs"] <= 1000
            return kinds, ws.close_code, time.monotonic() - sent_at

        watchers = asyncio.gather(*(watch(ws) for ws in sockets))
        # While draining the gateway is not ready and takes no new sockets.
        await asyncio.sleep(0.2)
        async with session.get(url + "/readyz") as resp:
            assert resp.status == 503 and (await resp.json())["status"] == "draining"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{url}/ws", params={"token": token("late")})
        assert refused.value.status == 503
        results = await watchers
    assert all(kinds == ["reconnect"] for kinds, _, _ in results)
    assert all(code == 1012 for _, code, _ in results)
    times = sorted(t for _, _, t in results)
    assert times[-1] < window + 2
    # Spread over the window, not all at once.
    assert times[len(times) // 4] < window * 0.5 < times[3 * len(times) // 4]
