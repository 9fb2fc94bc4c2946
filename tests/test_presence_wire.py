"""Presence messages and the gateway's report mirror, without NATS."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker import presence_journal, presence_wire
from broker.background import Background
from broker.presence_state import (
    RoomUserJoined,
    UserOffline,
    UserOnline,
    digest_of,
)
from broker.settings import PresenceSettings
from gateway.auth import Identity
from gateway.presence import PresenceLink


def test_changes_round_trip_and_carry_user_and_name() -> None:
    changes = [
        presence_wire.Change("connect", "c1", "auth0|7", "Ann"),
        presence_wire.Change("join", "c1", "auth0|7", "Ann", "room.1"),
        presence_wire.Change("leave", "c1", "auth0|7", "Ann", "room.1"),
        presence_wire.Change("disconnect", "c1", "auth0|7", "Ann"),
    ]
    raw = presence_wire.encode_changes("gw-1", changes)
    obj = presence_wire.parse(raw)
    assert obj["gateway"] == "gw-1"
    assert obj["events"][1] == {
        "type": "join",
        "conn": "c1",
        "userId": "auth0|7",
        "username": "Ann",
        "roomId": "room.1",
    }
    assert presence_wire.decode("events", obj) == changes


def test_a_large_sync_is_cut_into_parts_below_the_payload_limit() -> None:
    rooms = [f"room-{i:03d}-" + "x" * 100 for i in range(100)]
    state = {f"conn{i:05d}": (f"user{i}", f"User {i}", rooms[: i % 100]) for i in range(3000)}
    parts = list(presence_wire.encode_sync("gw", state))
    assert len(parts) > 1
    assert all(len(p) < presence_wire.SYNC_PART_BYTES + 20_000 for p in parts)
    decoded = [presence_wire.decode_sync(presence_wire.parse(p)) for p in parts]
    assert len({d.sync_id for d in decoded}) == 1
    merged: dict[str, Any] = {}
    for i, d in enumerate(decoded):
        assert (d.part, d.parts) == (i, len(parts))
        merged.update(d.connections)
    assert merged == {c: (u, n, sorted(r)) for c, (u, n, r) in state.items()}
    # An empty gateway is one message with no connections.
    (empty,) = presence_wire.encode_sync("gw", {})
    part = presence_wire.decode("sync", presence_wire.parse(empty))
    assert isinstance(part, presence_wire.SyncPart) and part.connections == {}


@pytest.mark.parametrize(
    "kind, obj",
    [
        ("events", {"events": [{"type": "explode", "conn": "c", "userId": "u", "username": ""}]}),
        ("events", {"events": [{"type": "join", "conn": "c", "userId": "u", "username": "n"}]}),
        ("events", {"events": "nope"}),
        ("heartbeat", {"digest": 5}),
        ("sync", {"syncId": "s", "part": 2, "parts": 2, "connections": []}),
        ("sync", {"syncId": "s", "part": 0, "parts": 1, "connections": [["c", "u", "n"]]}),
        ("teleport", {}),
        ("events", ["not", "an", "object"]),
    ],
)
def test_malformed_reports_are_refused(kind: str, obj: Any) -> None:
    with pytest.raises(presence_wire.WireError):
        presence_wire.decode(kind, obj)
    with pytest.raises(presence_wire.WireError):
        presence_wire.parse(b"{not json")


def test_event_frames_are_what_clients_receive() -> None:
    assert presence_wire.event_frame(UserOnline("u", "U", 2)) == {
        "type": "user:online",
        "data": {"userId": "u", "username": "U", "socketCount": 2},
    }
    assert presence_wire.event_frame(UserOffline("u", "U")) == {
        "type": "user:offline",
        "data": {"userId": "u", "username": "U"},
    }
    assert presence_wire.event_frame(RoomUserJoined("r", "u", "U")) == {
        "type": "room:user_joined",
        "data": {"roomId": "r", "userId": "u", "username": "U"},
    }


def test_journal_entries_embed_the_report_as_received() -> None:
    report = presence_wire.encode_heartbeat("gw", "d" * 10, 3, 5.0)
    entry = json.loads(presence_journal.encode(12.5, "heartbeat", "gw", report))
    assert entry == {
        "now": 12.5,
        "kind": "heartbeat",
        "gateway": "gw",
        "report": json.loads(report),
    }
    assert json.loads(presence_journal.encode(1.0, "tick", ""))["report"] is None


class _FakeClient:
    """What the link reads of a connection."""

    def __init__(self, conn: str, user: str, name: str) -> None:
        self.conn_id = conn
        self.identity = Identity(user, name, ("*",), ("*",), False, None)
        self.rooms: set[str] = set()


async def test_gateway_digest_matches_the_state_it_would_sync() -> None:
    clients: dict[str, _FakeClient] = {}
    link = PresenceLink(
        "gw", PresenceSettings(), 1.0, Background(), lambda *_: None, lambda: clients.values()
    )  # type: ignore[arg-type, return-value]

    def connect(conn: str, user: str, name: str) -> _FakeClient:
        c = clients[conn] = _FakeClient(conn, user, name)
        link.connected(c)  # type: ignore[arg-type]
        return c

    def join(c: _FakeClient, room: str) -> None:
        c.rooms.add(room)
        link.joined(c, room)  # type: ignore[arg-type]

    a, b = connect("c1", "alice", "Alice"), connect("c2", "bob", "Bob")
    join(a, "lobby")
    join(b, "lobby")
    a.identity = Identity("alice", "Alice A.", ("*",), ("*",), False, None)  # refreshed
    link.renamed(a, "Alice")  # type: ignore[arg-type]
    link.renamed(a, "Alice A.")  # type: ignore[arg-type]  (no change: nothing)
    b.rooms.discard("lobby")
    link.left(b, "lobby")  # type: ignore[arg-type]
    c = connect("c3", "carol", "Carol")
    join(c, "x")
    link.disconnected(c)  # type: ignore[arg-type]
    del clients["c3"]
    state = {k: (v.identity.user_id, v.identity.username, v.rooms) for k, v in clients.items()}
    assert link._digest.value == digest_of(state)
    assert [ch.kind for ch in link._queue] == [
        "connect",
        "connect",
        "join",
        "join",
        "connect",
        "leave",
        "connect",
        "join",
        "disconnect",
    ]
    assert link._queue[-1] == presence_wire.Change("disconnect", "c3", "carol", "Carol")
