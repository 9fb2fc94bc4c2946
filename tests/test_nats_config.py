"""config/nats-server.conf for real: a nats-server started with the shipped file
(only ports and the store directory changed), gateway and broker processes
logging in as their users, an anonymous client refused, and each user denied
what its role must not do."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from nats.aio.client import Client as Nats

from broker import subjects
from tests import certs
from tests.conftest import token
from tests.natsconf import (
    BACKEND_USER,
    BROKER_USER,
    CLUSTER,
    GATEWAY_USER,
    PASSWORDS,
    SINGLE,
    ConfiguredNats,
    single_node,
    user_env,
)
from tests.procs import Procs
from tests.wsclient import WsClient

API_KEY = "api-key-0123456789"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ConfiguredNats]:
    node = single_node(tmp_path)
    node.start()
    yield node
    node.stop()


class Watched:
    """A nats-py connection whose async errors (the server's permission
    violations arrive as -ERR, after the publish returned) can be awaited."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._new = asyncio.Event()
        self.nc: Nats | None = None

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc))
        self._new.set()

    async def denied(self, what: str, timeout: float = 5.0) -> str:
        """Wait for the server's "Permissions Violation for <what>" and return it."""
        async with asyncio.timeout(timeout):
            while True:
                for err in self.errors:
                    if "permissions violation" in err.lower() and what.lower() in err.lower():
                        self.errors.remove(err)
                        return err
                self._new.clear()
                await self._new.wait()


Connect = Callable[..., Awaitable[tuple[Nats, Watched]]]


@pytest.fixture
async def login(server: ConfiguredNats) -> AsyncIterator[Connect]:
    made: list[Nats] = []

    async def connect(user: str) -> tuple[Nats, Watched]:
        watched = Watched()
        nc = await nats.connect(
            server.url,
            user=user,
            password=PASSWORDS[user],
            error_cb=watched.on_error,
            allow_reconnect=False,
        )
        made.append(nc)
        watched.nc = nc
        return nc, watched

    yield connect
    for nc in made:
        await nc.close()


def _event(kind: str, **data: Any) -> bytes:
    return json.dumps({"type": kind, "data": data}).encode()


async def _api(port: int, path: str, body: Any) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{port}{path}",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as resp,
    ):
        return resp.status


async def test_gateways_and_broker_run_on_their_users_without_a_violation(
    server: ConfiguredNats, tmp_path: Path
) -> None:
    procs = Procs(server.url, tmp_path)
    clients: list[WsClient] = []
    try:
        procs.broker("b1", **user_env(BROKER_USER))
        gws = [
            procs.gateway(gw, **user_env(GATEWAY_USER), RTGATE_SERVER__API_KEY=API_KEY)[1]
            for gw in ("gw1", "gw2")
        ]

        async def online(port: int, user: str, **claims: Any) -> WsClient:
            c = await WsClient.connect(f"ws://127.0.0.1:{port}/ws", token=token(user, **claims))
            clients.append(c)
            await c.next("welcome")
            return c

        alice = await online(gws[0], "alice", admin=True)
        bob = await online(gws[1], "bob")
        for c in (alice, bob):
            await c.ok("room:join", "lobby")
        # Everything a gateway does on NATS: stored and ephemeral room events,
        # direct and global messages, history, presence, server API commands.
        sent = (await alice.ok("chat:message", {"roomId": "lobby", "content": "hi"}))["message"]
        assert (await bob.next("chat:message"))["data"]["id"] == sent["id"]
        await alice.ok("chat:typing", {"roomId": "lobby", "isTyping": True})
        await bob.next("chat:typing")
        await alice.ok("direct:message", {"toUserId": "bob", "content": "psst"})
        await bob.next("direct:message")
        await alice.ok("broadcast:global", {"content": "all"})
        await bob.next("global:message")
        page = await bob.ok("history", {"roomId": "lobby"})
        assert [i["data"]["content"] for i in page["items"]] == ["hi"]
        await bob.ok("presence:subscribe", {"userIds": ["alice"]})
        assert (await bob.ok("presence", {"roomId": "lobby"}))["count"] == 2
        # Kick with a ban (a denylist entry every gateway watches), then a
        # disconnect: control commands on rt.ctl.user.*.
        assert (
            await _api(gws[0], "/api/rooms/lobby/kick", {"userId": "bob", "banSeconds": 30}) == 200
        )
        await bob.next("room:removed")
        assert await bob.error("room:join", "lobby") == "forbidden"  # gw2 saw the entry
        assert await _api(gws[1], "/api/users/alice/disconnect", {"reconnect": True}) == 200
        await alice.wait_closed()
        await bob.next("user:offline", userId="alice", timeout=10)
        # A second broker takes over presence from the saved state (object
        # store, journal) and the SQLite lease once the first stops cleanly.
        first = procs.started[0]
        first.send_signal(signal.SIGTERM)
        assert first.wait(15) == 0
        procs.broker(
            "b2",
            **user_env(BROKER_USER),
            RTGATE_STORE__SQLITE_PATH=str(tmp_path / "b1" / "rtgate.sqlite3"),
        )
        await _until_available(bob, "presence:users", {"userIds": ["bob"]})
        inbox = await bob.ok("history", {"direct": True})
        assert [i["data"]["content"] for i in inbox["items"]] == ["psst"]
        b2_log = (tmp_path / "b2.log").read_text()
        assert '"restored": true' in b2_log, b2_log
        assert "could not save presence state" not in (tmp_path / "b1.log").read_text()
        assert server.violations() == []
        for name in ("b1", "gw1", "gw2"):
            log = (tmp_path / f"{name}.log").read_text()
            assert "Permissions Violation" not in log, name
    finally:
        for c in clients:
            await c.close()
        procs.stop()
    assert server.violations() == []


async def _until_available(client: WsClient, kind: str, data: Any) -> Any:
    """A presence service that just took over answers after it settles; until
    then queries are ``unavailable``, and nothing announces the moment."""
    async with asyncio.timeout(15):
        while True:
            ack = await client.request(kind, data)
            if ack["ok"]:
                return ack["data"]
            assert ack["error"]["code"] == "unavailable", ack
            await asyncio.sleep(0.1)


async def _quiet(exc: Exception) -> None:
    """The refusal is asserted on the exception; nats-py would also log it."""


async def test_anonymous_and_wrong_password_are_refused(server: ConfiguredNats) -> None:
    for options in (
        {},
        {"user": GATEWAY_USER, "password": "wrong"},
        {"user": "rtgate", "password": PASSWORDS[BROKER_USER]},
    ):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(
                server.url,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                connect_timeout=2,
                error_cb=_quiet,
                **options,
            )
    assert server.log.read_text().count("authentication error") == 3


async def test_backend_publishes_and_asks_but_cannot_listen_or_manage(
    server: ConfiguredNats, tmp_path: Path, login: Connect
) -> None:
    procs = Procs(server.url, tmp_path)
    try:
        procs.broker("b1", **user_env(BROKER_USER))
        port = procs.gateway("gw1", **user_env(GATEWAY_USER))[1]
        bob = await WsClient.connect(f"ws://127.0.0.1:{port}/ws", token=token("bob"))
        try:
            await bob.next("welcome")
            await bob.ok("room:join", "lobby")
            nc, backend = await login(BACKEND_USER)
            js = nc.jetstream()
            # Allowed: the documented publish subjects ...
            ack = await js.publish(
                subjects.room_subject("lobby"),
                _event(
                    "chat:message",
                    roomId="lobby",
                    userId="bot",
                    username="Bot",
                    content="hello",
                    timestamp="2025-11-28T12:00:00.000Z",
                ),
                headers={subjects.HDR_MSG_ID: "svc/1"},
            )
            assert ack.stream == subjects.ROOMS_STREAM and not ack.duplicate
            got = await bob.next("chat:message")
            assert got["data"]["content"] == "hello" and got["data"]["offset"] == ack.seq
            await js.publish(
                subjects.direct_subject("bob"),
                _event(
                    "direct:message",
                    fromUserId="bot",
                    fromUsername="Bot",
                    toUserId="bob",
                    content="dm",
                    timestamp="2025-11-28T12:00:00.000Z",
                ),
            )
            assert (await bob.next("direct:message"))["data"]["content"] == "dm"
            await nc.publish(
                subjects.live_room_subject("lobby"),
                _event("chat:typing", roomId="lobby", userId="bot", username="Bot", isTyping=True),
            )
            await bob.next("chat:typing")
            # ... and the documented request APIs.
            reply = await nc.request(
                subjects.HISTORY_SUBJECT,
                json.dumps({"channel": {"kind": "room", "id": "lobby"}}).encode(),
                timeout=5,
            )
            assert [i["data"]["content"] for i in json.loads(reply.data)["items"]] == ["hello"]
            await _presence_answers(nc)
            # A control command reaches the user's connection.
            await nc.publish(
                subjects.control_user_subject("bob"),
                json.dumps({"type": "kick", "roomId": "lobby", "reason": "test"}).encode(),
            )
            assert (await bob.next("room:removed"))["data"]["reason"] == "test"

            # Denied: listening to live traffic or presence, ...
            for subject in (
                "rt.live.>",
                subjects.live_room_subject("lobby"),
                "rt.presence.>",
                subjects.HISTORY_SUBJECT,
            ):
                await nc.subscribe(subject)
                await backend.denied(f'Subscription to "{subject}"')
            # ... presence reports and sync requests, the presence journal, ...
            for subject in (
                subjects.presence_subject("events", "gw1"),
                subjects.PRESENCE_SYNC_SUBJECT,
                subjects.live_presence_user_subject("bob"),
                "rt.presence-journal",
                subjects.LIVE_GLOBAL_SUBJECT,
            ):
                await nc.publish(subject, b"{}")
                await backend.denied(f'Publish to "{subject}"')
            # ... and every JetStream API: no deletes, purges, reads or buckets.
            for subject in (
                "$JS.API.STREAM.DELETE.RT_ROOMS",
                "$JS.API.STREAM.PURGE.RT_ROOMS",
                "$JS.API.STREAM.INFO.RT_ROOMS",
                "$JS.API.DIRECT.GET.RT_ROOMS",
                "$JS.API.CONSUMER.CREATE.RT_ROOMS",
                "$KV.rtgate_leases.presence",
            ):
                with pytest.raises(nats.errors.TimeoutError):
                    await nc.request(subject, b"{}", timeout=0.5)
                await backend.denied(f'Publish to "{subject}"')
            assert nc.is_connected  # a violation is refused, not a disconnect
            # The stream is still there: the gateway's client can still post.
            await bob.ok("room:join", "lobby")
            await bob.ok("chat:message", {"roomId": "lobby", "content": "still here"})
        finally:
            await bob.close()
    finally:
        procs.stop()


async def _presence_answers(nc: Nats) -> None:
    """The presence service answers once it has taken over and settled; until
    then a request finds no responders (nothing announces the moment)."""
    async with asyncio.timeout(10):
        while True:
            try:
                reply = await nc.request(
                    subjects.PRESENCE_API_SUBJECT,
                    json.dumps({"op": "user", "userId": "bob"}).encode(),
                    timeout=2,
                )
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.1)
                continue
            assert json.loads(reply.data)["online"] is True
            return


async def test_gateway_and_broker_are_denied_what_their_roles_do_not_need(
    server: ConfiguredNats, login: Connect
) -> None:
    gw, gateway = await login(GATEWAY_USER)
    br, broker = await login(BROKER_USER)
    await gw.jetstream().add_stream(name="RT_ROOMS", subjects=["rt.room.*"])
    # A gateway: no deletes or purges, no presence events, no broker requests.
    for subject in (
        "$JS.API.STREAM.DELETE.RT_ROOMS",
        "$JS.API.STREAM.PURGE.RT_ROOMS",
        "$JS.API.CONSUMER.CREATE.RT_ROOMS",
    ):
        with pytest.raises(nats.errors.TimeoutError):
            await gw.request(subject, b"{}", timeout=0.5)
        await gateway.denied(f'Publish to "{subject}"')
    for subject in (
        subjects.live_presence_user_subject("bob"),
        "rt.presence-journal",
        "$KV.rtgate_leases.presence",
    ):
        await gw.publish(subject, b"{}")
        await gateway.denied(f'Publish to "{subject}"')
    for subject in ("rt.api.history", "rt.presence.>"):
        await gw.subscribe(subject)
        await gateway.denied(f'Subscription to "{subject}"')
    # A broker: purges (it persisted the messages) but deletes no stream,
    # answers history only in the shared queue group, publishes no messages.
    purged = await br.request("$JS.API.STREAM.PURGE.RT_ROOMS", b'{"seq": 1}', timeout=5)
    assert json.loads(purged.data)["success"] is True
    with pytest.raises(nats.errors.TimeoutError):
        await br.request("$JS.API.STREAM.DELETE.RT_ROOMS", b"", timeout=0.5)
    await broker.denied('Publish to "$JS.API.STREAM.DELETE.RT_ROOMS"')
    await br.subscribe(subjects.HISTORY_SUBJECT)
    await broker.denied(f'Subscription to "{subjects.HISTORY_SUBJECT}"')
    await br.subscribe(subjects.HISTORY_SUBJECT, queue=subjects.HISTORY_QUEUE)
    for subject in (subjects.room_subject("lobby"), subjects.GLOBAL_SUBJECT, "rt.ctl.user.bob"):
        await br.publish(subject, b"{}")
        await broker.denied(f'Publish to "{subject}"')
    assert (await gw.jetstream().stream_info("RT_ROOMS")).config.name == "RT_ROOMS"
    assert gw.is_connected and br.is_connected


def _self_signed(tmp_path: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1, its own CA."""
    key = certs.key()
    return certs.write(tmp_path, "self-signed", certs.cert("rtgate-nats-test", key, ca=True), key)


async def test_the_tls_block_shown_works_once_uncommented(tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    node = single_node(tmp_path)
    text = node.conf.read_text()
    block = re.search(r"^# tls \{\n(?:#.*\n)*?# \}\n", text, flags=re.MULTILINE)
    assert block is not None
    tls = re.sub(r"^# ?", "", block.group(0), flags=re.MULTILINE)
    tls = re.sub(r'cert_file: ".*"', f'cert_file: "{cert_file}"', tls)
    tls = re.sub(r'key_file: +".*"', f'key_file: "{key_file}"', tls)
    tls = re.sub(r'ca_file: +".*"', f'ca_file: "{cert_file}"', tls)
    node.conf.write_text(text.replace(block.group(0), tls))
    node.start()
    try:
        ctx = ssl.create_default_context(cafile=str(cert_file))
        nc = await nats.connect(
            f"tls://127.0.0.1:{node.port}",
            tls=ctx,
            user=GATEWAY_USER,
            password=PASSWORDS[GATEWAY_USER],
            allow_reconnect=False,
        )
        try:
            assert nc.connected_url is not None and nc._server_info.get("tls_required")
            await nc.flush()
        finally:
            await nc.close()
    finally:
        node.stop()


def _permissions(path: Path) -> str:
    text = path.read_text()
    found = re.search(
        r"^# --- permissions: begin.*?^# --- permissions: end ---$",
        text,
        flags=re.MULTILINE | re.DOTALL,
    )
    assert found is not None, path
    return found.group(0)


def test_the_cluster_example_has_the_same_users_and_permissions() -> None:
    assert _permissions(CLUSTER) == _permissions(SINGLE)
