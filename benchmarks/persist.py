"""Broker persistence rate and client recovery time.

1. Persist: N messages are stored in the rooms stream first (a backlog, as
   after a broker outage), then a broker starts and drains them into the
   store; prints messages per second for SQLite and, when
   RTGATE_TEST_POSTGRES_DSN is set, PostgreSQL.
2. Recovery: a client that missed M messages of one room resumes on a
   gateway; prints the time from sending `resume` to its ack (every missed
   message arrives before the ack).

Usage: .venv/bin/python benchmarks/persist.py [--messages 50000] [--missed 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import streams, subjects
from broker.config import BrokerConfig, BrokerSettings, StoreSettings
from broker.service import Broker
from broker.settings import NatsSettings, StreamSettings
from gateway.app import create_app
from gateway.auth import mint
from gateway.config import AuthSettings, GatewayConfig, LimitSettings, ServerSettings
from rtgate.natsserver import NatsServer
from tests.wsclient import WsClient

SECRET = "bench-secret-0123456789abcdef0123456789"


async def backlog(url: str, count: int, rooms: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await streams.ensure_streams(js, StreamSettings())
    body = "x" * 200
    pending = []
    for i in range(count):
        room = f"room-{i % rooms}"
        event = {
            "type": "chat:message",
            "data": {
                "roomId": room,
                "userId": "bench",
                "username": "bench",
                "content": body,
                "timestamp": "2026-11-28T00:00:00.000Z",
            },
        }
        pending.append(
            await js.publish_async(subjects.room_subject(room), json.dumps(event).encode())
        )
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    await nc.close()


async def persist_rate(url: str, state: Path, store: StoreSettings, count: int) -> float:
    config = BrokerConfig(
        broker=BrokerSettings(id="bench", state_dir=str(state)),
        nats=NatsSettings(urls=(url,)),
        store=store,
    )
    broker = Broker(config)
    started = time.perf_counter()
    await broker.start()
    assert broker.store is not None
    try:
        # Polling the store is the measurement itself: nothing else signals it.
        while await broker.store.count(None) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return count / (time.perf_counter() - started)
    finally:
        await broker.stop()


async def recovery_time(url: str, missed: int) -> tuple[float, int]:
    config = GatewayConfig(
        server=ServerSettings(id="bench-gw"),
        auth=AuthSettings(secret=SECRET),
        nats=NatsSettings(urls=(url,)),
        limits=LimitSettings(rate_per_second=100000.0, rate_burst=100000, resume_budget=100000),
        streams=StreamSettings(recovery_max_messages=max(1000, missed)),
    )
    server = TestServer(create_app(config), host="127.0.0.1")
    await server.start_server()
    try:
        url_ws = str(server.make_url("/ws"))
        sender = await WsClient.connect(url_ws, token=mint(AuthSettings(secret=SECRET), "s"))
        await sender.next("welcome")
        joined = await sender.ok("room:join", "recover")
        # The client's last seen message: offset 0 would mean "no position".
        base = (await sender.ok("chat:message", {"roomId": "recover", "content": "seen"}))[
            "message"
        ]["offset"]
        acks = [
            sender.ok("chat:message", {"roomId": "recover", "content": "y" * 200})
            for _ in range(missed)
        ]
        await asyncio.gather(*acks)
        client = await WsClient.connect(url_ws, token=mint(AuthSettings(secret=SECRET), "c"))
        await client.next("welcome")
        started = time.perf_counter()
        ack = await client.ok(
            "resume", {"rooms": {"recover": {"offset": base, "epoch": joined["epoch"]}}}, timeout=60
        )
        elapsed = time.perf_counter() - started
        got = len([f for f in client.frames if f["type"] == "chat:message"])
        assert ack["rooms"]["recover"]["recovered"], ack
        await sender.close()
        await client.close()
        return elapsed, got
    finally:
        await server.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=50000)
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--missed", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dsn = os.environ.get("RTGATE_TEST_POSTGRES_DSN", "")
        backends: list[tuple[str, StoreSettings]] = [("sqlite", StoreSettings())]
        if dsn:
            schema = f"rt_bench_{uuid.uuid4().hex[:8]}"
            import asyncpg

            admin = await asyncpg.connect(dsn)
            await admin.execute(f"CREATE SCHEMA {schema}")
            scoped = f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"
            backends.append(("postgres", StoreSettings(backend="postgres", postgres_dsn=scoped)))
        try:
            for name, store in backends:
                with NatsServer(root / f"nats-{name}") as nats_server:
                    await backlog(nats_server.url, args.messages, args.rooms)
                    rate = await persist_rate(nats_server.url, root / name, store, args.messages)
                    print(
                        f"persist {name}: {args.messages} messages in {args.rooms} rooms, "
                        f"{rate:,.0f} msgs/s"
                    )
        finally:
            if dsn:
                await admin.execute(f"DROP SCHEMA {schema} CASCADE")
                await admin.close()
        with NatsServer(root / "nats-recovery") as nats_server:
            elapsed, got = await recovery_time(nats_server.url, args.missed)
            print(
                f"recovery: {got} missed messages replayed, resume to ack {elapsed * 1000:.0f} ms"
            )


if __name__ == "__main__":
    asyncio.run(main())
