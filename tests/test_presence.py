"""Presence across gateways, with a real NATS, real gateways and the broker's
presence service in this process (tests/test_presence_processes.py kills real
processes). Timing is shortened (conftest.FAST_PRESENCE): heartbeats every
0.5 s, grace 1 s.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import nats
from prometheus_client import CollectorRegistry

from broker import presence_journal, subjects
from broker import presence_wire as wire
from broker.presence import PresenceService
from broker.presence_journal import Journal
from broker.service import Broker
from tests.conftest import (
    FAST_PRESENCE,
    BrokerFactory,
    ClientFactory,
    Gateway,
    GatewayFactory,
    wait_until,
)
from tests.tcpcut import CuttableLink
from tests.wsclient import WsClient

GRACE = FAST_PRESENCE["grace_seconds"]
API_KEY = "k" * 32


async def _setup(
    make_broker: BrokerFactory, make_gateway: GatewayFactory, *gateway_ids: str, **presence: Any
) -> tuple[Broker, list[Gateway]]:
    settings = dict(FAST_PRESENCE, **presence)
    broker = await make_broker(presence=settings)
    gateways = [
        await make_gateway(gid, presence=settings, server={"api_key": API_KEY})
        for gid in gateway_ids
    ]
    await answering(broker)
    return broker, gateways


async def answering(broker: Broker) -> None:
    """Until the presence service took the lease and answers queries."""
    presence = broker.presence
    assert presence is not None
    await wait_until(lambda: presence.answering)


async def quiet(client: WsClient, kinds: tuple[str, ...], seconds: float) -> None:
    """Assert that none of ``kinds`` arrives within ``seconds`` (an absence can only be
    observed by waiting; the wait is the grace period plus a margin)."""
    await asyncio.sleep(seconds)
    unexpected = [f for f in client.frames if f.get("type") in kinds]
    assert not unexpected, unexpected


async def test_two_tabs_on_two_gateways_watched_by_a_third_user(
    make_broker: BrokerFactory, make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    broker, (gw1, gw2) = await _setup(make_broker, make_gateway, "gw1", "gw2", visibility="all")
    carol = await connect(gw1, "carol")
    await carol.ok("room:join", "lobby")
    ack = await carol.ok("presence:subscribe", {"userIds": ["alice"]})
    assert ack == {"online": {"alice": False}, "watching": 1}

    tab1 = await connect(gw1, "alice", name="Alice")
    online = await carol.next("user:online")
    assert online["data"] == {"userId": "alice", "username": "Alice", "socketCount": 1}
    await tab1.ok("room:join", "lobby")
    joined = await carol.next("room:user_joined")
    assert joined["data"] == {"roomId": "lobby", "userId": "alice", "username": "Alice"}

    tab2 = await connect(gw2, "alice", name="Alice")
    await tab2.ok("room:join", "lobby")
    state = broker.presence.state if broker.presence else None
    assert state is not None
    await wait_until(
        lambda: (
            state.socket_count("alice") == 2 and state.room_members("lobby")[0].socket_count == 2
        )
    )
    members = await carol.ok("presence", {"roomId": "lobby"})
    assert members == {
        "roomId": "lobby",
        "count": 2,
        "members": [
            {"userId": "alice", "username": "Alice", "socketCount": 2},
            {"userId": "carol", "username": "carol", "socketCount": 1},
        ],
    }

    await tab1.close()
    await wait_until(lambda: state.socket_count("alice") == 1)
    await quiet(
        carol, ("user:online", "user:offline", "room:user_joined", "room:user_left"), GRACE + 0.5
    )

    loop = asyncio.get_running_loop()
    await tab2.close()
    closed_at = loop.time()
    left = await carol.next("room:user_left")
    assert left["data"] == {"roomId": "lobby", "userId": "alice", "username": "Alice"}
    offline = await carol.next("user:offline")
    assert offline["data"] == {"userId": "alice", "username": "Alice"}
    assert loop.time() - closed_at >= GRACE
    await quiet(carol, ("room:user_left", "user:offline"), 0.5)  # once, not per tab
    assert carol.take("room:user_joined") == [] and carol.take("user:online") == []


async def test_reconnect_within_grace_is_silent_and_after_it_is_not(
    make_broker: BrokerFactory, make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    _, (gw1, gw2) = await _setup(
        make_broker, make_gateway, "gw1", "gw2", visibility="all", grace_seconds=2.0
    )
    carol = await connect(gw1, "carol")
    await carol.ok("room:join", "lobby")
    alice = await connect(gw1, "alice")
    await alice.ok("room:join", "lobby")
    await carol.next("room:user_joined", userId="alice")
    ack = await carol.ok("presence:subscribe", {"userIds": ["alice"]})
    assert ack["online"] == {"alice": True}

    # A network switch: the socket drops, the app reconnects to the other gateway.
    await alice.close()
    alice = await connect(gw2, "alice")
    await alice.ok("room:join", "lobby")
    kinds = ("user:online", "user:offline", "room:user_joined", "room:user_left")
    await quiet(carol, kinds, 2.0 + 0.7)

    loop = asyncio.get_running_loop()
    await alice.close()
    closed_at = loop.time()
    await carol.next("room:user_left", userId="alice")
    await carol.next("user:offline", userId="alice")
    assert loop.time() - closed_at >= 2.0
    alice = await connect(gw2, "alice")
    await carol.next("user:online", userId="alice")
    await alice.ok("room:join", "lobby")
    await carol.next("room:user_joined", userId="alice")


async def test_shared_rooms_visibility(
    make_broker: BrokerFactory, make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    broker, (gw1, gw2) = await _setup(
        make_broker, make_gateway, "gw1", "gw2", direct_messages="shared-rooms"
    )
    alice = await connect(gw1, "alice")
    bob = await connect(gw2, "bob")
    mallory = await connect(gw2, "mallory")
    await alice.ok("room:join", "team")
    await bob.ok("room:join", "team")
    await mallory.ok("room:join", "elsewhere")
    state = broker.presence.state if broker.presence else None
    assert state is not None
    await wait_until(
        lambda: (
            state.shares_room("alice", "bob")
            and state.is_online("mallory")
            and state.room_count("elsewhere") == 1
        )
    )

    # A roommate may ask and watch; a stranger may not, whether or not they are online.
    assert await bob.ok("presence:users", {"userIds": ["alice"]}) == {"online": {"alice": True}}
    assert (await bob.ok("presence:subscribe", {"userIds": ["alice"]}))["online"] == {"alice": True}
    assert await mallory.error("presence:users", {"userIds": ["alice"]}) == "forbidden"
    assert await mallory.error("presence:users", {"userIds": ["nobody"]}) == "forbidden"
    assert await mallory.error("presence:subscribe", {"userIds": ["alice"]}) == "forbidden"
    # The refusal names every hidden user of the request (not yourself).
    ack = await mallory.request("presence:users", {"userIds": ["mallory", "alice", "nobody"]})
    assert ack["error"]["code"] == "forbidden"
    assert sorted(ack["error"]["userIds"]) == ["alice", "nobody"]
    assert await mallory.ok("presence:users", {"userIds": ["mallory"]}) == {
        "online": {"mallory": True}
    }
    # The room list itself follows the join rule (the token allows every room here).
    assert (await mallory.ok("presence", {"roomId": "team"}))["count"] == 2

    # Direct messages under shared-rooms: roommates yes, strangers no.
    await bob.ok("direct:message", {"toUserId": "alice", "content": "hi"})
    await alice.next("direct:message")
    assert (
        await mallory.error("direct:message", {"toUserId": "alice", "content": "hi"}) == "forbidden"
    )
    assert (
        await mallory.error("direct:message", {"toUserId": "ghost", "content": "hi"}) == "forbidden"
    )
    # A stranger's presence never reached mallory.
    await alice.close()
    await bob.next("user:offline", userId="alice")
    assert mallory.take("user:offline") == [] and mallory.take("user:online") == []


async def test_query_limits_and_bad_input(
    make_broker: BrokerFactory, make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    broker, (gw1,) = await _setup(make_broker, make_gateway, "gw1", visibility="all", max_watched=3)
    alice = await connect(gw1, "alice")
    too_many = [f"u{i}" for i in range(101)]
    assert await alice.error("presence:users", {"userIds": too_many}) == "limit_exceeded"
    assert await alice.error("presence:users", {"userIds": []}) == "bad_request"
    assert await alice.error("presence:users", {"userIds": ["a b"]}) == "bad_request"
    assert await alice.error("presence:users", ["x"]) == "bad_request"
    assert await alice.error("presence", {"roomId": "lobby", "limit": 0}) == "bad_request"
    assert await alice.error("presence", {"roomId": ""}) == "bad_request"
    await alice.ok("presence:subscribe", {"userIds": ["a", "b"]})
    await alice.ok("presence:subscribe", {"userIds": ["b", "c"]})  # b again: still 3
    assert await alice.error("presence:subscribe", {"userIds": ["d"]}) == "limit_exceeded"
    assert await alice.ok("presence:unsubscribe", {"userIds": ["a"]}) == {"watching": 2}
    assert (await alice.ok("presence:subscribe", {"userIds": ["d"]}))["watching"] == 3

    # Paging a room: limit 2 over 5 members.
    users = [await connect(gw1, f"m{i}") for i in range(5)]
    for u in users:
        await u.ok("room:join", "big")
    state = broker.presence.state if broker.presence else None
    assert state is not None
    await wait_until(lambda: state.room_count("big") == 5)
    seen: list[str] = []
    page = await alice.ok("presence", {"roomId": "big", "limit": 2})
    while True:
        assert page["count"] == 5
        seen += [m["userId"] for m in page["members"]]
        if "cursor" not in page:
            break
        page = await alice.ok("presence", {"roomId": "big", "limit": 2, "cursor": page["cursor"]})
    assert seen == ["m0", "m1", "m2", "m3", "m4"]


async def test_server_api_presence(
    make_broker: BrokerFactory, make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    broker, (gw1,) = await _setup(make_broker, make_gateway, "gw1")
    alice = await connect(gw1, "alice", name="Alice")
    await alice.ok("room:join", "lobby")
    state = broker.presence.state if broker.presence else None
    assert state is not None
    await wait_until(lambda: state.room_count("lobby") == 1)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(gw1.http("/api/rooms/lobby/presence")) as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "roomId": "lobby",
                "count": 1,
                "members": [{"userId": "alice", "username": "Alice", "socketCount": 1}],
            }
        async with http.get(gw1.http("/api/users/alice/presence")) as resp:
            assert await resp.json() == {
                "userId": "alice",
                "online": True,
                "username": "Alice",
                "socketCount": 1,
                "rooms": ["lobby"],
            }
        async with http.get(gw1.http("/api/users/nobody/presence")) as resp:
            assert (await resp.json())["online"] is False
        async with http.get(gw1.http("/api/rooms/lobby/presence?limit=abc")) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "bad_request"
        # No presence service: 503 with a JSON body, promptly, not an empty list.
        await broker.stop()
        async with http.get(gw1.http("/api/rooms/lobby/presence")) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "unavailable"


async def test_no_presence_service_is_unavailable_not_empty(
    make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    gw = await make_gateway("gw1", presence=dict(FAST_PRESENCE, visibility="all"))
    alice = await connect(gw, "alice")
    assert await alice.error("presence:users", {"userIds": ["bob"]}) == "unavailable"
    assert await alice.error("presence", {"roomId": "lobby"}) == "unavailable"
    assert await alice.error("presence:subscribe", {"userIds": ["bob"]}) == "unavailable"
    # A failed subscribe leaves nothing watched.
    assert await alice.ok("presence:unsubscribe", {"userIds": ["bob"]}) == {"watching": 0}


async def test_events_from_a_replaced_service_are_dropped(
    make_broker: BrokerFactory,
    make_gateway: GatewayFactory,
    connect: ClientFactory,
    nats_server: Any,
) -> None:
    broker, (gw1,) = await _setup(make_broker, make_gateway, "gw1", visibility="all")
    assert broker.presence is not None
    revision = broker.presence.revision
    alice = await connect(gw1, "alice")
    await alice.ok("room:join", "lobby")
    await alice.ok("presence:subscribe", {"userIds": ["zed"]})
    nc = await nats.connect(nats_server.url)

    async def publish(user: str, username: str, rev: int, room: str | None = None) -> None:
        """A user:online, or a room:user_joined when ``room`` is given, fenced ``rev``."""
        headers = {subjects.HDR_PRESENCE_REVISION: str(rev)}
        data: dict[str, Any] = {"userId": user, "username": username}
        if room is None:
            subject, kind = subjects.live_presence_user_subject(user), "user:online"
            data["socketCount"] = 1
        else:
            subject, kind = subjects.live_room_subject(room), "room:user_joined"
            data["roomId"] = room
            headers[subjects.HDR_PRESENCE_USER] = user
        await nc.publish(
            subject, json.dumps({"type": kind, "data": data}).encode(), headers=headers
        )

    try:
        await publish("zed", "old", revision - 1)
        await publish("zed", "old", revision - 1, room="lobby")
        await publish("zed", "new", revision)
        await publish("zoe", "zoe", revision, room="lobby")
        await nc.flush()
    finally:
        await nc.close()
    online = await alice.next("user:online")
    assert online["data"]["username"] == "new"
    await alice.next("room:user_joined", userId="zoe")
    assert alice.take("room:user_joined") == [] and alice.take("user:online") == []
    fenced = gw1.node.metrics.presence_fenced._value.get()
    assert fenced == 2


async def test_reports_that_arrive_during_an_append_share_the_next_one(
    make_broker: BrokerFactory, nats_server: Any
) -> None:
    """Group commit: a quiet gateway's reports (one change each), back to back,
    are journaled in fewer entries than reports, and the journal replays to the
    same state."""
    broker = await make_broker(
        presence=dict(FAST_PRESENCE, snapshot_interval_seconds=3600, missed_heartbeats=100)
    )
    await answering(broker)
    presence = broker.presence
    assert presence is not None and presence.state is not None
    state = presence.state
    users = [f"u{i}" for i in range(300)]
    nc = await nats.connect(nats_server.url)
    try:
        for i, user in enumerate(users):
            await nc.publish(
                subjects.presence_subject("events", "sim"),
                wire.encode_changes("sim", [wire.Change("connect", f"c{i}", user, user)]),
            )
        await nc.flush()
        await wait_until(lambda: all(state.is_online(u) for u in users))
        log = Journal(nc, 1, 2.0)
        entries = await log.after(0)
        reports = [r for e in entries for r in presence_journal.unbatch(e) if r[0] == "events"]
        assert len(reports) == len(users)
        carrying = [e for e in entries if e.kind in ("events", presence_journal.BATCH)]
        assert len(carrying) < len(users), "every report had its own append"
        assert any(e.kind == presence_journal.BATCH for e in carrying)
        metrics = presence.metrics
        assert metrics.journaled._value.get() >= len(users)
        assert metrics.appends._value.get() < metrics.journaled._value.get()
        assert metrics.waiting._value.get() == 0

        replayed, exact = await PresenceService(
            nc, presence._settings, "other", CollectorRegistry()
        )._rebuild(None, log, 0.0)
        assert exact and replayed is not None
        assert all(replayed.socket_count(u) == 1 for u in users)
    finally:
        await nc.close()


async def test_a_watcher_whose_gateway_missed_the_event_is_told_after_the_reconnect(
    make_broker: BrokerFactory,
    make_gateway: GatewayFactory,
    connect: ClientFactory,
    nats_server: Any,
) -> None:
    """gw1's link to NATS is cut while alice leaves: the service announces her
    offline, gw1 never hears it. Back on NATS, gw1 checks what its watchers saw
    and tells carol. (Periodic checks are off: the reconnect does it.)"""
    settings = dict(FAST_PRESENCE, visibility="all", grace_seconds=0.2, recheck_seconds=0)
    broker = await make_broker(presence=settings)
    link = CuttableLink("127.0.0.1", nats_server.port)
    await link.start()
    nc = await nats.connect(nats_server.url)
    try:
        gw1 = await make_gateway("gw1", nats_url=link.url, presence=settings)
        gw2 = await make_gateway("gw2", presence=settings)
        await answering(broker)
        carol = await connect(gw1, "carol")
        alice = await connect(gw2, "alice")

        async def alice_online() -> bool:
            reply = await carol.ok("presence:users", {"userIds": ["alice"]})
            return bool(reply["online"]["alice"])

        await wait_until(alice_online)
        ack = await carol.ok("presence:subscribe", {"userIds": ["alice"]})
        assert ack["online"] == {"alice": True}
        announced = asyncio.Event()

        async def on_event(msg: Any) -> None:
            if json.loads(msg.data)["type"] == "user:offline":
                announced.set()

        await nc.subscribe(subjects.live_presence_user_subject("alice"), cb=on_event)
        await nc.flush()
        link.sever()
        await alice.close()
        await asyncio.wait_for(announced.wait(), 10)  # announced while gw1 was cut off
        assert carol.take("user:offline") == []
        link.mend()
        offline = await carol.next("user:offline", userId="alice", timeout=10)
        assert offline["data"]["username"] == "alice"
        assert gw1.node.metrics.presence_corrected._value.get() == 1
        # The check agrees from now on: alice coming back is announced once, as usual.
        await connect(gw2, "alice")
        await carol.next("user:online", userId="alice")
        assert carol.take("user:online") == [] and carol.take("user:offline") == []
    finally:
        await nc.close()
        await link.close()
