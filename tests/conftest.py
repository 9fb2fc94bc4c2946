"""Fixtures: real nats-server processes on free ports, real gateways, real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.config import BrokerConfig, BrokerSettings, StoreSettings
from broker.service import Broker
from broker.settings import NatsSettings, PresenceSettings, StreamSettings
from gateway.app import NODE, create_app
from gateway.auth import mint
from gateway.config import AuthSettings, GatewayConfig, LimitSettings, ServerSettings
from gateway.node import Node
from rtgate.natsserver import NatsServer
from tests.wsclient import WsClient

SECRET = "test-secret-0123456789abcdef0123456789"


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 10, pause: float = 0.02
) -> None:
    """Poll ``check`` until it holds. Only for state that announces nothing: another
    process's view (a presence service, a metric) or a service's internal table.
    Where an event exists (a frame, a close), wait for the event instead."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(pause)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start(monitor=True)
    yield server
    server.stop()


def gateway_config(
    nats_url: str, gateway_id: str = "gw1", **sections: dict[str, Any]
) -> GatewayConfig:
    """A test gateway config; ``sections`` override fields, e.g. limits={"max_rooms": 2}."""
    base = GatewayConfig(
        server=ServerSettings(id=gateway_id, heartbeat_seconds=30),
        auth=AuthSettings(secret=SECRET, timeout_seconds=5),
        nats=NatsSettings(
            urls=(nats_url,), reconnect_time_wait=0.2, ack_timeout=3, request_timeout=2
        ),
        streams=StreamSettings(stats_interval_seconds=0.5),
        limits=LimitSettings(),
    )
    changes = {
        name: dataclasses.replace(getattr(base, name), **fields)
        for name, fields in sections.items()
    }
    return dataclasses.replace(base, **changes)


class Gateway:
    def __init__(self, server: TestServer, app: web.Application) -> None:
        self.server = server
        self.app = app

    @property
    def node(self) -> Node:
        return self.app[NODE]

    @property
    def url(self) -> str:
        return str(self.server.make_url("/ws"))

    def http(self, path: str) -> str:
        return str(self.server.make_url(path))


async def refused_handshake(
    gw: Gateway, params: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a WebSocket handshake the gateway refuses: an upgrade
    GET, whose refusal is an HTTP status with an error body."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            gw.url,
            params=params,
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                **(headers or {}),
            },
        ) as resp,
    ):
        return resp.status, await resp.json()


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(nats_server: NatsServer) -> AsyncIterator[GatewayFactory]:
    servers: list[TestServer] = []

    async def make(
        gateway_id: str = "gw1", nats_url: str | None = None, **sections: dict[str, Any]
    ) -> Gateway:
        config = gateway_config(nats_url or nats_server.url, gateway_id, **sections)
        app = create_app(config)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Gateway(server, app)

    yield make
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()


def token(user: str = "alice", **kwargs: Any) -> str:
    return mint(AuthSettings(secret=SECRET), user, **kwargs)


ClientFactory = Callable[..., Awaitable[WsClient]]


@pytest.fixture
async def connect() -> AsyncIterator[ClientFactory]:
    """Open authenticated clients (welcome consumed) and close them all at the end."""
    clients: list[WsClient] = []

    async def open_client(
        gw: Gateway,
        user: str = "alice",
        *,
        welcome: bool = True,
        msgpack_: bool = False,
        token_: str | None = None,
        **kwargs: Any,
    ) -> WsClient:
        tok = token_ if token_ is not None else token(user, **kwargs)
        client = await WsClient.connect(gw.url, token=tok, msgpack_=msgpack_)
        clients.append(client)
        if welcome:
            await client.next("welcome")
        return client

    yield open_client
    for client in clients:
        await client.close()


@pytest.fixture
def procs(nats_server: NatsServer, tmp_path: Path) -> Iterator[Any]:
    """Real rtgate processes (tests/procs.py), killed at the end."""
    from tests.procs import Procs

    p = Procs(nats_server.url, tmp_path)
    yield p
    p.stop()


async def pair_in_room(
    make_gateway: GatewayFactory,
    connect: ClientFactory,
    room: str = "lobby",
    **sections: dict[str, Any],
) -> tuple[Gateway, Gateway, WsClient, WsClient]:
    """Two gateways; alice on the first and bob on the second, both joined to ``room``."""
    gw1 = await make_gateway("gw1", **sections)
    gw2 = await make_gateway("gw2", **sections)
    a = await connect(gw1, "alice")
    b = await connect(gw2, "bob")
    for c in (a, b):
        await c.ok("room:join", room)
    return gw1, gw2, a, b


BrokerFactory = Callable[..., Awaitable[Broker]]


# Presence timing for tests: deaths, grace and takeovers in about a second.
FAST_PRESENCE: dict[str, Any] = {
    "heartbeat_seconds": 0.5,
    "missed_heartbeats": 3,
    "grace_seconds": 1.0,
    "settle_seconds": 0.2,
    "lease_ttl_seconds": 2,
    "snapshot_interval_seconds": 0.2,
}


def broker_config(
    nats_url: str, state: Path, presence: dict[str, Any] | None = None, **broker: Any
) -> BrokerConfig:
    return BrokerConfig(
        broker=dataclasses.replace(BrokerSettings(id="b1", state_dir=str(state)), **broker),
        nats=NatsSettings(urls=(nats_url,), reconnect_time_wait=0.2, request_timeout=2),
        streams=StreamSettings(stats_interval_seconds=0.5),
        store=StoreSettings(),
        presence=PresenceSettings(**(presence or {})),
    )


@pytest.fixture
async def make_broker(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[BrokerFactory]:
    brokers: list[Broker] = []

    async def make(presence: dict[str, Any] | None = None, **broker: Any) -> Broker:
        instance = Broker(broker_config(nats_server.url, tmp_path / "broker", presence, **broker))
        await instance.start()
        brokers.append(instance)
        return instance

    yield make
    for instance in brokers:
        await instance.stop()
