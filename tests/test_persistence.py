"""The broker: persistence into the store, history, purge, one SQLite replica."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from broker import subjects
from broker.config import BrokerSettings, StoreSettings
from broker.persist import ACK_WAIT_SECONDS
from broker.service import Broker
from broker.store import Channel, SqliteStore, StoreError
from rtgate.natsserver import NatsServer, env_without_rtgate
from tests.conftest import (
    BrokerFactory,
    ClientFactory,
    GatewayFactory,
    broker_config,
    wait_until,
)


async def _persisted(broker: Broker, channel: Channel, count: int, timeout: float = 15) -> None:
    assert broker.store is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await broker.store.count(channel) < count:
        assert loop.time() < deadline, f"store has {await broker.store.count(channel)}"
        await asyncio.sleep(0.05)


async def test_history_pages_newest_first_with_prev_offsets(
    make_gateway: GatewayFactory, connect: ClientFactory, make_broker: BrokerFactory
) -> None:
    broker = await make_broker()
    gw = await make_gateway(limits={"rate_burst": 1000})
    a = await connect(gw, "alice")
    await a.ok("room:join", "lobby")
    sent = [
        (await a.ok("chat:message", {"roomId": "lobby", "content": f"m{i}"}))["message"]
        for i in range(25)
    ]
    await _persisted(broker, Channel.room("lobby"), 25)
    page = await a.ok("history", {"roomId": "lobby", "limit": 10})
    assert [i["data"]["content"] for i in page["items"]] == [f"m{i}" for i in range(24, 14, -1)]
    assert all(i["type"] == "chat:message" for i in page["items"])
    first = page["items"][0]["data"]
    assert first["offset"] == sent[24]["offset"] and first["prevOffset"] == sent[23]["offset"]
    seen = [i["data"]["offset"] for i in page["items"]]
    cursor = page["nextCursor"]
    while cursor:
        page = await a.ok("history", {"roomId": "lobby", "limit": 10, "cursor": cursor})
        seen += [i["data"]["offset"] for i in page["items"]]
        cursor = page.get("nextCursor")
    assert seen == sorted((m["offset"] for m in sent), reverse=True)
    assert page["items"][-1]["data"]["prevOffset"] == 0
    # Bad input.
    assert await a.error("history", {"roomId": "lobby", "limit": 101}) == "bad_request"
    assert await a.error("history", {"roomId": "lobby", "limit": 0}) == "bad_request"
    assert await a.error("history", {"roomId": "lobby", "cursor": "garbage!"}) == "bad_request"
    other = (await a.ok("history", {"roomId": "lobby", "limit": 1}))["nextCursor"]
    await a.ok("room:join", "other")
    assert await a.error("history", {"roomId": "other", "cursor": other}) == "bad_request"
    b = await connect(gw, "bob", rooms=["public-*"])
    assert await b.error("history", {"roomId": "lobby"}) == "forbidden"


async def test_history_includes_what_is_not_persisted_yet(
    make_gateway: GatewayFactory, connect: ClientFactory, make_broker: BrokerFactory
) -> None:
    await make_broker(persist=False)  # serves history, persists nothing
    gw = await make_gateway()
    a = await connect(gw, "alice")
    await a.ok("room:join", "lobby")
    for i in range(3):
        await a.ok("chat:message", {"roomId": "lobby", "content": f"m{i}"})
    page = await a.ok("history", {"roomId": "lobby"})
    assert [i["data"]["content"] for i in page["items"]] == ["m2", "m1", "m0"]
    assert page["items"][0]["data"]["prevOffset"] == page["items"][1]["data"]["offset"]
    assert "nextCursor" not in page
    # A page cut inside the unstored tail: its oldest item's prevOffset is still exact.
    page = await a.ok("history", {"roomId": "lobby", "limit": 2})
    assert page["items"][1]["data"]["prevOffset"] == 1 and page["nextCursor"]


async def test_direct_history_has_received_and_sent(
    make_gateway: GatewayFactory, connect: ClientFactory, make_broker: BrokerFactory
) -> None:
    broker = await make_broker()
    gw = await make_gateway()
    a = await connect(gw, "alice")
    b = await connect(gw, "bob")
    await a.ok("direct:message", {"toUserId": "bob", "content": "hi bob"})
    await b.ok("direct:message", {"toUserId": "alice", "content": "hi alice"})
    await _persisted(broker, Channel.direct("alice"), 2)
    page = await a.ok("history", {"direct": True})
    assert [i["data"]["content"] for i in page["items"]] == ["hi alice", "hi bob"]


async def test_history_without_a_broker_is_unavailable(
    gateway: Any, connect: ClientFactory
) -> None:
    a = await connect(gateway, "alice")
    assert await a.error("history", {"roomId": "lobby"}) == "unavailable"


async def test_broker_down_then_up_persists_everything_and_purges_only_stored(
    make_gateway: GatewayFactory, connect: ClientFactory, nats_server: NatsServer, tmp_path: Path
) -> None:
    gw = await make_gateway(limits={"rate_burst": 1000})
    a = await connect(gw, "alice")
    await a.ok("room:join", "lobby")
    for i in range(40):
        await a.ok("chat:message", {"roomId": "lobby", "content": f"m{i}"})
    config = broker_config(nats_server.url, tmp_path / "broker")
    config = dataclasses.replace(
        config, streams=dataclasses.replace(config.streams, recovery_window_seconds=0.0)
    )
    broker = Broker(config)
    # Nothing persisted yet: a purge must not drop anything.
    await broker.start()
    try:
        await _persisted(broker, Channel.room("lobby"), 40)
        assert broker.persister is not None
        # Wait until the consumer's floor covers everything, then purge.
        for _ in range(200):
            if await broker.persister.floor(subjects.ROOMS_STREAM) >= 40:
                break
            await asyncio.sleep(0.05)
        keep_from = await broker.persister.purge(subjects.ROOMS_STREAM)
        assert keep_from == 41
        nc = await nats.connect(nats_server.url)
        try:
            info = await nc.jetstream().stream_info(subjects.ROOMS_STREAM)
            assert info.state.messages == 0 and info.state.first_seq == 41
        finally:
            await nc.close()
        # History still has everything, now from the store alone.
        page = await a.ok("history", {"roomId": "lobby", "limit": 100})
        assert len(page["items"]) == 40
    finally:
        await broker.stop()


async def test_a_delivery_lost_in_flight_is_stored_after_ack_wait(
    make_gateway: GatewayFactory,
    connect: ClientFactory,
    make_broker: BrokerFactory,
    nats_server: NatsServer,
) -> None:
    """A message JetStream delivered to a broker that never got it (its NATS node
    died with the delivery on the wire) is only "unacked" to JetStream: it is
    stored once ack_wait has passed. The consumer here was made by an older
    release with ack_wait 30 s; the broker updates it."""
    gw = await make_gateway()
    a = await connect(gw, "alice")
    await a.ok("room:join", "lobby")
    await a.ok("chat:message", {"roomId": "lobby", "content": "lost on the wire"})
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        old = ConsumerConfig(
            name=subjects.PERSIST_CONSUMER,
            durable_name=subjects.PERSIST_CONSUMER,
            filter_subject=f"{subjects.ROOM_PREFIX}*",
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_ack_pending=10000,
        )
        await js.add_consumer(subjects.ROOMS_STREAM, config=old)
        psub = await js.pull_subscribe_bind(
            durable=subjects.PERSIST_CONSUMER, stream=subjects.ROOMS_STREAM
        )
        (lost,) = await psub.fetch(1, timeout=5)  # delivered, never acked
        assert lost.metadata.sequence.stream == 1
        await psub.unsubscribe()

        broker = await make_broker()
        started = asyncio.get_running_loop().time()

        async def updated() -> bool:
            info = await js.consumer_info(subjects.ROOMS_STREAM, subjects.PERSIST_CONSUMER)
            return bool(info.config.ack_wait == ACK_WAIT_SECONDS)

        await wait_until(updated, 5)
        await _persisted(broker, Channel.room("lobby"), 1, timeout=ACK_WAIT_SECONDS + 5)
        waited = asyncio.get_running_loop().time() - started
        assert broker.persister is not None
        assert broker.persister.metrics.redeliveries.labels(subjects.ROOMS_STREAM)._value.get() == 1
        print(f"stored {waited:.1f} s after the broker started")
    finally:
        await nc.close()


async def test_second_sqlite_broker_refuses_to_start(
    make_broker: BrokerFactory, nats_server: NatsServer, tmp_path: Path
) -> None:
    await make_broker()
    other = Broker(
        dataclasses.replace(
            broker_config(nats_server.url, tmp_path / "other"),
            broker=BrokerSettings(id="b2", state_dir=str(tmp_path / "o")),
        )
    )
    with pytest.raises(StoreError, match="postgres"):
        await other.start()
    await other.stop()


def test_kill_9_broker_mid_stream_store_has_every_acked_message_once(
    nats_server: NatsServer, tmp_path: Path, make_gateway: GatewayFactory
) -> None:
    asyncio.run(_kill_test(nats_server, tmp_path))


async def _kill_test(nats_server: NatsServer, tmp_path: Path) -> None:
    from aiohttp.test_utils import TestServer

    from gateway.app import create_app
    from tests.conftest import gateway_config, token
    from tests.wsclient import WsClient

    state = tmp_path / "killed"
    env = env_without_rtgate(
        {
            "RTGATE_NATS__URLS": nats_server.url,
            "RTGATE_BROKER__STATE_DIR": str(state),
            "RTGATE_BROKER__PORT": "0",
            "RTGATE_LOG__LEVEL": "warning",
        }
    )

    def start_broker() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "broker"], env=env)

    servers = []
    for name in ("gw1", "gw2"):
        server = TestServer(
            create_app(
                gateway_config(
                    nats_server.url, name, limits={"rate_per_second": 5000.0, "rate_burst": 5000}
                )
            ),
            host="127.0.0.1",
        )
        await server.start_server()
        servers.append(server)
    broker = start_broker()
    clients = [
        await WsClient.connect(str(s.make_url("/ws")), token=token(f"u{i}"))
        for i, s in enumerate(servers)
    ]
    try:
        for c in clients:
            await c.next("welcome")
            await c.ok("room:join", "load")
        acked: list[int] = []
        midway = asyncio.Event()

        async def publish(client: WsClient, n: int) -> None:
            for i in range(n):
                ack = await client.request(
                    "chat:message", {"roomId": "load", "content": f"{id(client)}-{i}"}
                )
                if ack["ok"]:
                    acked.append(ack["data"]["message"]["offset"])
                if len(acked) >= 400:
                    midway.set()

        load = asyncio.gather(*(publish(c, 500) for c in clients))
        await midway.wait()
        broker.send_signal(signal.SIGKILL)
        broker.wait()
        await load
        assert len(acked) == 1000  # the gateways never needed the broker to ack
        broker = start_broker()
        store = SqliteStore(state / "rtgate.sqlite3")
        await store.open()
        try:
            for _ in range(400):
                if await store.count(Channel.room("load")) >= 1000:
                    break
                await asyncio.sleep(0.05)
            assert await store.count(Channel.room("load")) == 1000
            page = await store.page(Channel.room("load"), None, 1000)
            assert sorted(m.seq for m in page.items) == sorted(acked)
        finally:
            await store.close()
    finally:
        broker.terminate()
        broker.wait(20)
        for c in clients:
            await c.close()
        for s in servers:
            await s.close()


async def test_history_walks_a_room_across_a_stream_epoch_change(
    make_gateway: GatewayFactory,
    connect: ClientFactory,
    make_broker: BrokerFactory,
    nats_server: NatsServer,
) -> None:
    broker = await make_broker()
    gw = await make_gateway(streams={"stats_interval_seconds": 0.1})
    a = await connect(gw, "alice")
    await a.ok("room:join", "lobby")
    old = [
        (await a.ok("chat:message", {"roomId": "lobby", "content": f"old {i}"}))["message"]
        for i in range(3)
    ]
    await _persisted(broker, Channel.room("lobby"), 3)
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().delete_stream(subjects.ROOMS_STREAM)
    finally:
        await nc.close()
    # The gateway re-provisions the stream on the first refused publish.
    new = [
        (await a.ok_once_available("chat:message", {"roomId": "lobby", "content": f"new {i}"}))[
            "message"
        ]
        for i in range(3)
    ]
    assert new[0]["epoch"] != old[0]["epoch"] and new[0]["offset"] == 1
    await _persisted(broker, Channel.room("lobby"), 6)
    seen: list[tuple[str, int, str]] = []
    cursor = None
    while True:
        page = await a.ok(
            "history", {"roomId": "lobby", "limit": 2, **({"cursor": cursor} if cursor else {})}
        )
        seen += [
            (i["data"]["epoch"], i["data"]["offset"], i["data"]["content"]) for i in page["items"]
        ]
        cursor = page.get("nextCursor")
        if not cursor:
            break
    assert [c for _, _, c in seen] == ["new 2", "new 1", "new 0", "old 2", "old 1", "old 0"]
    assert seen[0][0] == new[0]["epoch"] and seen[-1][0] == old[0]["epoch"]


async def test_postgres_backend_persists_and_serves_history(
    make_gateway: GatewayFactory, connect: ClientFactory, nats_server: NatsServer, tmp_path: Path
) -> None:
    import os
    import uuid

    import asyncpg

    dsn = os.environ.get("RTGATE_TEST_POSTGRES_DSN")
    if not dsn:
        pytest.skip("PostgreSQL tests need a server: set RTGATE_TEST_POSTGRES_DSN")
    schema = f"rt_broker_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        # asyncpg passes unknown DSN parameters on as server settings.
        scoped = f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"
        config = broker_config(nats_server.url, tmp_path / "pg")
        config = dataclasses.replace(
            config, store=StoreSettings(backend="postgres", postgres_dsn=scoped)
        )
        broker = Broker(config)
        await broker.start()
        try:
            gw = await make_gateway()
            a = await connect(gw, "alice")
            await a.ok("room:join", "lobby")
            for i in range(5):
                await a.ok("chat:message", {"roomId": "lobby", "content": f"m{i}"})
            await _persisted(broker, Channel.room("lobby"), 5)
            rows = await admin.fetchval(f"SELECT count(*) FROM {schema}.messages")
            assert rows == 5
            page = await a.ok("history", {"roomId": "lobby"})
            assert [i["data"]["content"] for i in page["items"]] == [
                f"m{i}" for i in range(4, -1, -1)
            ]
        finally:
            await broker.stop()
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
