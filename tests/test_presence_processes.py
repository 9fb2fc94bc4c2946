"""Presence when processes die: a gateway killed with users on it, the presence
service restarted, the active broker replica killed. Brokers (and the killed
gateway) are real ``rtgate`` processes; the surviving gateways run in this
process so that the tests can watch their clients."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from tests.conftest import (
    FAST_PRESENCE,
    ClientFactory,
    GatewayFactory,
    token,
    wait_until,
)
from tests.procs import Procs
from tests.test_processes import _get
from tests.wsclient import WsClient

HEARTBEAT = FAST_PRESENCE["heartbeat_seconds"]
MISSED = FAST_PRESENCE["missed_heartbeats"]
GRACE = FAST_PRESENCE["grace_seconds"]
LEASE_TTL = FAST_PRESENCE["lease_ttl_seconds"]
# Scheduling slack on a busy 2-core CI machine, on top of every stated bound.
SLACK = 2.0
PRESENCE_KINDS = ("user:online", "user:offline", "room:user_joined", "room:user_left")


def _active(port: int) -> bool:
    status, body = _get(f"http://127.0.0.1:{port}/metrics")
    return status == 200 and "rtgate_presence_active 1.0" in body


async def _answered(client: WsClient, kind: str, data: Any) -> Any:
    """The first answer that is not ``unavailable``: the service is (back) up."""
    return await client.ok_once_available(kind, data, attempts=400, pause=0.05)


async def _count_is(client: WsClient, room: str, count: int) -> None:
    async def check() -> bool:
        page = await _answered(client, "presence", {"roomId": room})
        return bool(page["count"] == count)

    await wait_until(check, timeout=20, pause=0.05)


async def test_kill_9_gateway_with_50_users(
    procs: Procs, make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    procs.broker("b1")
    victim, victim_port = procs.gateway("doomed")
    survivor = await make_gateway("survivor", presence=FAST_PRESENCE)
    carol = await connect(survivor, "carol")
    bob = await connect(survivor, "bob")
    for c in (carol, bob):
        await c.ok("room:join", "lobby")

    url = f"ws://127.0.0.1:{victim_port}/ws"
    users = [f"user{i:02d}" for i in range(50)]
    doomed: list[WsClient] = []
    try:
        for user in users:
            client = await WsClient.connect(url, token=token(user))
            doomed.append(client)
            await client.next("welcome")
            await client.ok("room:join", "lobby")
            await client.ok("room:join", f"own-{user}")
        await _count_is(carol, "lobby", 52)
        # They share "lobby", so carol may watch them under shared-rooms.
        ack = await carol.ok("presence:subscribe", {"userIds": [*users, "bob"]})
        assert all(ack["online"].values()) and len(ack["online"]) == 51

        carol.frames.clear()  # the joins so far
        loop = asyncio.get_running_loop()
        victim.send_signal(signal.SIGKILL)
        killed_at = loop.time()
        offline: set[str] = set()
        left: set[str] = set()
        async with asyncio.timeout(30):
            while len(offline) < 50 or len(left) < 50:
                frame = await carol.next("user:offline") if len(offline) < 50 else None
                if frame is not None:
                    offline.add(frame["data"]["userId"])
                for f in carol.take("room:user_left"):
                    assert f["data"]["roomId"] == "lobby"
                    left.add(f["data"]["userId"])
        took = loop.time() - killed_at
        assert offline == set(users) and left == set(users)
        bound = MISSED * HEARTBEAT + GRACE + SLACK
        assert took <= bound, f"{took:.2f}s > {bound}s"
        # Nothing about bob, who is on the surviving gateway.
        assert not [f for f in carol.frames if f.get("data", {}).get("userId") == "bob"]
        assert await bob.ok("presence:users", {"userIds": ["carol"]}) == {"online": {"carol": True}}
        page = await carol.ok("presence", {"roomId": "lobby"})
        assert [m["userId"] for m in page["members"]] == ["bob", "carol"]
        assert (await carol.ok("presence", {"roomId": "own-user00"}))["count"] == 0
        for client in doomed:
            await client.wait_closed()
    finally:
        for client in doomed:
            await client.close()


async def _presence_view(client: WsClient, users: list[str], rooms: list[str]) -> dict[str, Any]:
    return {
        "users": await _answered(client, "presence:users", {"userIds": users}),
        "rooms": [await _answered(client, "presence", {"roomId": r}) for r in rooms],
    }


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_restarted_presence_service_answers_the_same_and_stays_quiet(
    how: str, procs: Procs, make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    broker, _ = procs.broker("b1")
    presence = dict(FAST_PRESENCE, visibility="all")  # dave, in no room, is asked about
    gw1 = await make_gateway("gw1", presence=presence)
    gw2 = await make_gateway("gw2", presence=presence)
    carol = await connect(gw1, "carol")
    alice = await connect(gw1, "alice")
    bob = await connect(gw2, "bob")
    for c, rooms in ((carol, ["lobby", "a"]), (alice, ["lobby", "b"]), (bob, ["lobby"])):
        for room in rooms:
            await c.ok("room:join", room)
    await _count_is(carol, "lobby", 3)
    await carol.ok("presence:subscribe", {"userIds": ["alice", "bob", "carol"]})
    users = ["alice", "bob", "carol", "dave"]
    rooms = ["lobby", "a", "b", "c"]
    before = await _presence_view(carol, users, rooms)
    assert before["users"] == {"online": {"alice": True, "bob": True, "carol": True, "dave": False}}
    for c in (carol, alice, bob):
        c.frames.clear()  # the joins so far

    broker.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    assert broker.wait(15) == (0 if how == "sigterm" else -signal.SIGKILL)
    procs.broker("b1")
    after = await _presence_view(carol, users, rooms)
    assert after == before
    # Several heartbeats and a grace period later: still nothing was announced.
    await asyncio.sleep(3 * HEARTBEAT + GRACE)
    assert not [
        f for f in (carol.frames + alice.frames + bob.frames) if f.get("type") in PRESENCE_KINDS
    ]
    # And the new service reports what happens next.
    dave = await connect(gw2, "dave")
    await dave.ok("room:join", "lobby")
    await carol.next("room:user_joined", userId="dave")


async def test_standby_broker_takes_over_when_the_active_one_is_killed(
    procs: Procs, make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    first, first_port = procs.broker("b1")
    await wait_until(lambda: _active(first_port), timeout=20)
    _, second_port = procs.broker("b2", persist=False)
    assert not _active(second_port)
    gw = await make_gateway("gw1", presence=dict(FAST_PRESENCE, visibility="all"))
    carol = await connect(gw, "carol")
    alice = await connect(gw, "alice")
    for c in (carol, alice):
        await c.ok("room:join", "lobby")
    await _count_is(carol, "lobby", 2)
    await carol.ok("presence:subscribe", {"userIds": ["alice", "eve"]})
    fence_before = gw.node.presence.revision
    carol.frames.clear()  # the joins so far

    loop = asyncio.get_running_loop()
    first.send_signal(signal.SIGKILL)
    killed_at = loop.time()
    page = await _answered(carol, "presence", {"roomId": "lobby"})
    took = loop.time() - killed_at
    assert _active(second_port)
    assert [m["userId"] for m in page["members"]] == ["alice", "carol"]
    # The lease expires within its TTL; the standby checks twice a second,
    # then waits the settle period before answering.
    bound = LEASE_TTL + 0.5 + FAST_PRESENCE["settle_seconds"] + SLACK
    assert took <= bound, f"{took:.2f}s > {bound}s"
    assert gw.node.presence.revision > fence_before
    assert await carol.ok("presence:users", {"userIds": ["alice"]}) == {"online": {"alice": True}}
    assert not [f for f in carol.frames if f.get("type") in PRESENCE_KINDS]
    # The new service reports changes: eve arrives, alice leaves.
    eve = await connect(gw, "eve")
    await carol.next("user:online", userId="eve")
    await eve.ok("room:join", "lobby")
    await carol.next("room:user_joined", userId="eve")
    await alice.close()
    await carol.next("room:user_left", userId="alice")
    await carol.next("user:offline", userId="alice")
    # No spurious events from the takeover itself.
    assert not [f for f in carol.frames if f.get("type") in PRESENCE_KINDS]


async def test_gateway_declared_dead_then_back_resyncs(
    procs: Procs, make_gateway: GatewayFactory, connect: ClientFactory
) -> None:
    """A gateway paused (a partition, a long GC, SIGSTOP) past the deadline is declared
    dead; when it comes back it sends its full state and its users are back."""
    _, broker_port = procs.broker("b1")
    paused, paused_port = procs.gateway("paused")
    watcher_gw = await make_gateway("watcher", presence=FAST_PRESENCE)
    carol = await connect(watcher_gw, "carol")
    await carol.ok("room:join", "lobby")
    alice = await WsClient.connect(f"ws://127.0.0.1:{paused_port}/ws", token=token("alice"))
    try:
        await alice.next("welcome")
        await alice.ok("room:join", "lobby")
        await carol.next("room:user_joined", userId="alice")
        await carol.ok("presence:subscribe", {"userIds": ["alice"]})

        paused.send_signal(signal.SIGSTOP)
        await carol.next("room:user_left", userId="alice", timeout=15)
        await carol.next("user:offline", userId="alice")
        paused.send_signal(signal.SIGCONT)
        # Alice's socket survived the pause: the resync brings her back.
        await carol.next("user:online", userId="alice", timeout=15)
        await carol.next("room:user_joined", userId="alice")
        assert (await carol.ok("presence", {"roomId": "lobby"}))["count"] == 2
        # Gauges follow within a tick.
        await wait_until(
            lambda: (
                "rtgate_presence_gateways_alive 2.0"
                in _get(f"http://127.0.0.1:{broker_port}/metrics")[1]
            )
        )
        _, metrics = _get(f"http://127.0.0.1:{broker_port}/metrics")
        assert 'rtgate_presence_events_total{type="user:offline"} 1.0' in metrics
        assert "rtgate_presence_users_online 2.0" in metrics
    finally:
        if paused.poll() is None:
            paused.send_signal(signal.SIGCONT)
        await alice.close()
