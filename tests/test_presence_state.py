"""The presence state machine (broker/presence_state.py): unit tests for each rule,
then property tests over random interleavings checked against a simple model."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.presence_state import (
    ConnectionInfo,
    GatewayDigest,
    PresenceConfig,
    PresenceCounters,
    PresenceEvent,
    PresenceState,
    RoomMember,
    RoomUserJoined,
    RoomUserLeft,
    UserOffline,
    UserOnline,
    digest_of,
)

T0 = 1000.0


def state(**config: float) -> PresenceState:
    return PresenceState(PresenceConfig(**config))  # type: ignore[arg-type]


def online(user: str, count: int = 1) -> UserOnline:
    return UserOnline(user, user.title(), count)


def offline(user: str) -> UserOffline:
    return UserOffline(user, user.title())


def joined(room: str, user: str) -> RoomUserJoined:
    return RoomUserJoined(room, user, user.title())


def left(room: str, user: str) -> RoomUserLeft:
    return RoomUserLeft(room, user, user.title())


def connect(
    p: PresenceState, gw: str, conn: str, user: str, now: float, *rooms: str
) -> list[PresenceEvent]:
    events = p.connect(gw, conn, user, user.title(), now)
    for room in rooms:
        events += p.join(gw, conn, room, now)
    return events


# ---------------------------------------------------------------------------
# Aggregation


def test_two_tabs_on_two_gateways_are_one_user() -> None:
    p = state()
    assert connect(p, "g1", "c1", "alice", T0, "lobby") == [
        online("alice"),
        joined("lobby", "alice"),
    ]
    assert connect(p, "g2", "c9", "alice", T0 + 1, "lobby") == []
    assert p.socket_count("alice") == 2
    assert p.room_members("lobby") == [RoomMember("alice", "Alice", 2)]
    assert p.disconnect("g1", "c1", T0 + 2) == []  # closing one tab: nothing
    assert p.tick(T0 + 10) == []
    assert p.room_members("lobby") == [RoomMember("alice", "Alice", 1)]
    assert p.disconnect("g2", "c9", T0 + 11) == []  # the last: only after grace
    assert p.tick(T0 + 15.9) == []
    assert p.is_online("alice") and p.rooms_of("alice") == {"lobby"}
    assert p.room_members("lobby") == [RoomMember("alice", "Alice", 0)]
    assert p.tick(T0 + 16) == [left("lobby", "alice"), offline("alice")]
    assert not p.is_online("alice") and p.room_members("lobby") == []
    assert p.counters() == PresenceCounters(0, 0, 0, 2)


def test_second_tab_joining_is_not_a_join_and_last_tab_leaving_is_the_leave() -> None:
    p = state()
    connect(p, "g1", "a", "bob", T0)
    connect(p, "g1", "b", "bob", T0)
    assert p.join("g1", "a", "r", T0) == [joined("r", "bob")]
    assert p.join("g1", "b", "r", T0) == []
    assert p.leave("g1", "a", "r", T0) == []
    # An explicit leave is a decision, not flapping: no grace.
    assert p.leave("g1", "b", "r", T0) == [left("r", "bob")]
    assert p.rooms_of("bob") == frozenset() and p.is_online("bob")


def test_online_carries_the_sockets_known_at_once() -> None:
    p = state()
    events = p.sync("g1", {"a": ("carol", "Carol", ["x"]), "b": ("carol", "Carol", ["x"])}, T0)
    assert events == [online("carol", 2), joined("x", "carol")]


# ---------------------------------------------------------------------------
# Grace


def test_reconnect_within_grace_is_silent() -> None:
    p = state(grace_seconds=5)
    connect(p, "g1", "c1", "dave", T0, "r1", "r2")
    assert p.disconnect("g1", "c1", T0) == []
    # Back on another gateway within grace, in one of the two rooms.
    assert connect(p, "g2", "c2", "dave", T0 + 4, "r1") == []
    assert p.tick(T0 + 4.99) == []
    # The room not rejoined is left when its own grace ends; no offline.
    assert p.tick(T0 + 5) == [left("r2", "dave")]
    assert p.tick(T0 + 60) == []
    assert p.is_online("dave") and p.rooms_of("dave") == {"r1"}


def test_reconnect_after_grace_is_offline_then_online() -> None:
    p = state(grace_seconds=5)
    connect(p, "g1", "c1", "erin", T0, "r")
    p.disconnect("g1", "c1", T0)
    assert p.tick(T0 + 6) == [left("r", "erin"), offline("erin")]
    assert connect(p, "g1", "c2", "erin", T0 + 7, "r") == [online("erin"), joined("r", "erin")]


def test_grace_restarts_from_the_last_drop() -> None:
    p = state(grace_seconds=5)
    connect(p, "g1", "c1", "fay", T0)
    p.disconnect("g1", "c1", T0)
    connect(p, "g1", "c2", "fay", T0 + 3)
    p.disconnect("g1", "c2", T0 + 4)
    assert p.tick(T0 + 5) == []  # the first deadline no longer counts
    assert p.tick(T0 + 9) == [offline("fay")]


def test_room_left_by_disconnect_keeps_grace_while_user_stays_online() -> None:
    p = state(grace_seconds=5)
    connect(p, "g1", "phone", "gus", T0, "r")
    connect(p, "g1", "laptop", "gus", T0)
    assert p.disconnect("g1", "phone", T0) == []
    assert p.room_members("r") == [RoomMember("gus", "Gus", 0)]
    assert p.shares_room("gus", "gus")
    assert p.tick(T0 + 5) == [left("r", "gus")]


def test_zero_grace_is_immediate() -> None:
    p = state(grace_seconds=0)
    connect(p, "g1", "c1", "hal", T0, "r")
    assert p.disconnect("g1", "c1", T0) == [left("r", "hal"), offline("hal")]


# ---------------------------------------------------------------------------
# Gateway death


def test_dead_gateway_reported_within_three_heartbeats_plus_grace() -> None:
    p = state(grace_seconds=5, heartbeat_seconds=5, missed_heartbeats=3)
    for i in range(50):
        connect(p, "doomed", f"c{i}", f"u{i}", T0, "lobby", f"room{i % 7}")
    connect(p, "survivor", "s1", "sam", T0, "lobby")
    connect(p, "survivor", "s2", "u0", T0, "room0")  # u0 also has a tab elsewhere
    last_beat = T0
    for g in ("doomed", "survivor"):
        assert p.heartbeat(g, digest_of(p.gateway_connections(g)), last_beat) == ([], False)
    now, events = last_beat, list[PresenceEvent]()
    while not any(isinstance(e, UserOffline) for e in events):
        now += 0.5
        p.heartbeat("survivor", digest_of(p.gateway_connections("survivor")), now)
        events += p.tick(now)
    assert now <= last_beat + 3 * 5 + 5 + 0.5  # 3 heartbeats + grace (+ one tick)
    events += p.tick(now + 1)
    offline_users = {e.user for e in events if isinstance(e, UserOffline)}
    assert offline_users == {f"u{i}" for i in range(1, 50)}
    gone = {(e.room, e.user) for e in events if isinstance(e, RoomUserLeft)}
    assert ("lobby", "u0") in gone and ("room0", "u0") not in gone
    assert ("lobby", "sam") not in gone
    assert {m.user for m in p.room_members("lobby")} == {"sam"}
    assert p.is_online("u0") and p.socket_count("u0") == 1
    assert p.counters() == PresenceCounters(2, 2, 2, 1)
    assert not p.gateway_alive("doomed") and p.gateway_connections("doomed") == {}


def test_death_is_strictly_after_the_missed_heartbeats() -> None:
    p = state(heartbeat_seconds=5, missed_heartbeats=3)
    connect(p, "g", "c", "ida", T0)
    assert p.tick(T0 + 15) == [] and p.gateway_alive("g")
    p.tick(T0 + 15.01)
    assert not p.gateway_alive("g")


def test_any_input_is_a_sign_of_life() -> None:
    p = state(heartbeat_seconds=5, missed_heartbeats=3)
    connect(p, "g", "c", "ida", T0)
    p.join("g", "c", "r", T0 + 10)
    p.tick(T0 + 20)
    assert p.gateway_alive("g")


def test_gateway_back_from_the_dead_must_resync_and_is_silent_within_grace() -> None:
    p = state(grace_seconds=5, heartbeat_seconds=1, missed_heartbeats=3)
    connect(p, "g", "c1", "jo", T0, "r")
    connect(p, "g", "c2", "kim", T0, "r")
    assert p.tick(T0 + 3.5) == []  # declared dead; grace starts now
    assert not p.gateway_alive("g")
    full = {"c1": ("jo", "Jo", ["r"]), "c2": ("kim", "Kim", ["r"])}
    # Even a matching digest must not spare the sync: our table is empty.
    assert p.heartbeat("g", digest_of(full), T0 + 4) == ([], True)
    # Until then its incremental inputs are ignored ...
    assert connect(p, "g", "c3", "lee", T0 + 4) == []
    assert p.heartbeat("g", digest_of(full), T0 + 4.5) == ([], True)
    # ... and the sync within grace changes nothing anyone saw.
    full["c3"] = ("lee", "Lee", [])
    assert p.sync("g", full, T0 + 5) == [online("lee")]
    assert p.heartbeat("g", digest_of(full), T0 + 9) == ([], False)
    assert p.tick(T0 + 10) == []  # past the grace that began at death
    assert p.gateway_alive("g") and p.socket_count("jo") == 1


def test_gateway_restarted_under_the_same_id_is_caught_by_the_digest() -> None:
    p = state(grace_seconds=5)
    connect(p, "g", "c1", "max", T0, "r")
    _, needs_sync = p.heartbeat("g", digest_of({}), T0 + 1)  # a fresh, empty process
    assert needs_sync
    assert p.sync("g", {}, T0 + 1) == []
    assert p.tick(T0 + 6) == [left("r", "max"), offline("max")]


def test_tombstones_are_forgotten_after_a_long_silence() -> None:
    p = state(heartbeat_seconds=1, missed_heartbeats=1, tombstone_seconds=100)
    connect(p, "old-pod", "c", "ned", T0)
    p.tick(T0 + 2)
    assert p.counters().gateways_alive == 0
    p.tick(T0 + 50)
    assert p.heartbeat("old-pod", digest_of({}), T0 + 50) == ([], True)  # still remembered
    p.tick(T0 + 200)
    # Forgotten: an empty gateway coming back is simply new and in sync.
    assert p.heartbeat("old-pod", digest_of({}), T0 + 201) == ([], False)


# ---------------------------------------------------------------------------
# Sync


def test_sync_emits_only_real_changes() -> None:
    p = state(grace_seconds=5)
    connect(p, "g", "c1", "ann", T0, "r1", "r2")
    connect(p, "g", "c2", "ann", T0, "r3")
    connect(p, "g", "c3", "ben", T0, "r1")
    same = {
        "c1": ("ann", "Ann", ["r1", "r2"]),
        "c2": ("ann", "Ann", ["r3"]),
        "c3": ("ben", "Ben", ["r1"]),
    }
    assert p.sync("g", same, T0 + 1) == []
    # ann moved c1 -> c4 and r3 moved from c2 to c4: nothing changed for anyone,
    # even though a naive removal-first pass would see ann leave r3 (no grace).
    moved = {
        "c4": ("ann", "Ann", ["r1", "r2", "r3"]),
        "c2": ("ann", "Ann", []),
        "c3": ("ben", "Ben", ["r1"]),
    }
    assert p.sync("g", moved, T0 + 2) == []
    assert p.tick(T0 + 10) == []
    # A new user; a room dropped by a surviving connection (a missed leave: at
    # once); a connection gone (a missed disconnect: with grace).
    changed = {"c4": ("ann", "Ann", ["r1", "r2"]), "c5": ("cy", "Cy", ["r9"])}
    assert p.sync("g", changed, T0 + 11) == [online("cy"), joined("r9", "cy"), left("r3", "ann")]
    assert p.tick(T0 + 16) == [left("r1", "ben"), offline("ben")]
    assert p.gateway_connections("g") == {
        "c4": ConnectionInfo("ann", "Ann", frozenset({"r1", "r2"})),
        "c5": ConnectionInfo("cy", "Cy", frozenset({"r9"})),
    }


def test_sync_with_zero_grace_does_not_flap_a_move() -> None:
    p = state(grace_seconds=0)
    connect(p, "g", "c1", "dee", T0, "r")
    assert p.sync("g", {"c2": ("dee", "Dee", ["r"])}, T0) == []


def test_sync_replacing_a_reused_conn_id() -> None:
    p = state(grace_seconds=0)
    connect(p, "g", "c1", "eve", T0, "r")
    assert p.sync("g", {"c1": ("fox", "Fox", ["r"])}, T0) == [
        online("fox"),
        joined("r", "fox"),
        left("r", "eve"),
        offline("eve"),
    ]


def test_sync_rejects_a_string_for_rooms() -> None:
    with pytest.raises(TypeError):
        state().sync("g", {"c": ("u", "U", "lobby")}, T0)


# ---------------------------------------------------------------------------
# Idempotence


def test_repeated_and_unknown_inputs_emit_nothing() -> None:
    p = state()
    connect(p, "g", "c1", "gil", T0, "r")
    before = p.snapshot(T0)
    assert connect(p, "g", "c1", "gil", T0) == []  # duplicate connect
    assert p.join("g", "c1", "r", T0) == []  # already joined
    assert p.leave("g", "c1", "other", T0) == []  # not joined
    assert p.disconnect("g", "nope", T0) == []  # unknown conn
    assert p.join("g", "nope", "r", T0) == []
    assert p.leave("g", "nope", "r", T0) == []
    assert p.snapshot(T0) == before
    assert p.disconnect("g", "c1", T0) == []
    assert p.disconnect("g", "c1", T0) == []  # twice


def test_repeated_connect_renames() -> None:
    p = state()
    connect(p, "g", "c1", "hue", T0, "r")
    assert p.connect("g", "c1", "hue", "Hue II", T0) == []
    assert p.room_members("r") == [RoomMember("hue", "Hue II", 1)]
    expected = digest_of({"c1": ("hue", "Hue II", ["r"])})
    assert p.heartbeat("g", expected, T0) == ([], False)


def test_reused_conn_id_for_another_user_replaces_it() -> None:
    p = state(grace_seconds=0)
    connect(p, "g", "c1", "ivy", T0, "r")
    assert p.connect("g", "c1", "jay", "Jay", T0) == [
        left("r", "ivy"),
        offline("ivy"),
        online("jay"),
    ]


# ---------------------------------------------------------------------------
# Digest, queries, snapshot, config


def test_digest_is_order_independent_and_sensitive() -> None:
    a = {"c1": ("u", "U", ["x", "y"]), "c2": ("v", "V", [])}
    b = {"c2": ("v", "V", ()), "c1": ("u", "U", {"y", "x"})}
    assert digest_of(a) == digest_of(b)
    running = GatewayDigest()
    running.add_connection("c2", "v", "V")
    running.add_connection("c1", "u", "U")
    running.add_room("c1", "y")
    running.add_room("c1", "z")
    running.add_room("c1", "x")
    running.remove_room("c1", "z")
    assert running.value == digest_of(a)
    for other in (
        {"c1": ("u", "U", ["x"]), "c2": ("v", "V", [])},
        {"c1": ("u", "U2", ["x", "y"]), "c2": ("v", "V", [])},
        {"c1": ("u", "U", ["x", "y"])},
        {"c1": ("u", "U", ["xy"]), "c2": ("v", "V", [])},
        {"c1": ("u", "U", ["x", "y"]), "c2": ("v", "V", ["\ud800"])},
    ):
        assert digest_of(other) != digest_of(a)
    assert digest_of({}).startswith("0.")


def test_lost_event_is_noticed_at_the_next_heartbeat() -> None:
    p = state()
    connect(p, "g", "c1", "kai", T0)
    truth = {"c1": ("kai", "Kai", ["r"])}  # the join never arrived
    assert p.heartbeat("g", digest_of(truth), T0) == ([], True)
    assert p.sync("g", truth, T0) == [joined("r", "kai")]
    assert p.heartbeat("g", digest_of(truth), T0) == ([], False)


def test_first_heartbeat_from_an_unknown_gateway() -> None:
    p = state()
    assert p.heartbeat("new", digest_of({}), T0) == ([], False)
    assert p.heartbeat("full", digest_of({"c": ("u", "U", [])}), T0) == ([], True)
    assert p.counters().gateways_alive == 2


def test_queries() -> None:
    p = state()
    for user in ("zed", "amy", "lou", "bo"):
        connect(p, "g", f"c-{user}", user, T0, "big")
    connect(p, "g", "c-amy2", "amy", T0, "big", "side")
    connect(p, "g", "c-lou2", "lou", T0, "other")
    assert [m.user for m in p.room_members("big")] == ["amy", "bo", "lou", "zed"]
    assert p.room_members("big", limit=2) == [
        RoomMember("amy", "Amy", 2),
        RoomMember("bo", "Bo", 1),
    ]
    assert [m.user for m in p.room_members("big", after="bo", limit=10)] == ["lou", "zed"]
    assert p.room_members("nowhere") == [] and p.room_count("big") == 4
    assert p.shares_room("amy", "zed") and not p.shares_room("amy", "nobody")
    p.leave("g", "c-lou", "big", T0)
    assert not p.shares_room("amy", "lou") and p.rooms_of("lou") == {"other"}
    assert p.username("amy") == "Amy" and p.username("nobody") is None
    assert p.socket_count("amy") == 2 and p.socket_count("nobody") == 0
    assert p.counters() == PresenceCounters(4, 6, 3, 1)


def test_snapshot_restore_continues_seamlessly() -> None:
    p = state(grace_seconds=5)
    connect(p, "g1", "c1", "mia", T0, "r1", "r2")
    connect(p, "g1", "c2", "ned", T0, "r1")
    connect(p, "g2", "c3", "oli", T0, "r2")
    p.disconnect("g1", "c2", T0 + 1)  # ned in grace until T0+6
    p.leave("g1", "c1", "r2", T0 + 1)
    p.tick(T0 + 2)
    data = json.loads(json.dumps(p.snapshot(T0 + 2)))
    # The new owner's clock has another origin entirely.
    q = PresenceState.restore(data, T0 + 2, PresenceConfig(grace_seconds=5))
    q.rebase(50.0, T0 + 2)
    for user in ("mia", "ned", "oli"):
        assert q.is_online(user) == p.is_online(user)
        assert q.rooms_of(user) == p.rooms_of(user)
    assert q.room_members("r1") == p.room_members("r1")
    assert q.counters() == p.counters()
    # Restore alone is exact (a journal replay continues on the old clock) ...
    assert PresenceState.restore(data, T0 + 2).snapshot(T0 + 2) == data
    # ... and the rebase gives every gateway a fresh liveness period.
    fresh = {**data, "gateways": {g: {**e, "silent": 0.0} for g, e in data["gateways"].items()}}
    assert q.snapshot(50.0) == fresh
    assert q.tick(53.99) == []
    assert q.tick(54) == [left("r1", "ned"), offline("ned")]
    for g in ("g1", "g2"):
        assert q.heartbeat(g, digest_of(q.gateway_connections(g)), 54) == ([], False)
    with pytest.raises(ValueError):
        PresenceState.restore({**data, "version": 99}, 0.0)


def test_rebase_moves_deadlines_to_another_clock() -> None:
    p = state(grace_seconds=5)
    connect(p, "g1", "c1", "pia", T0, "r1")
    connect(p, "g1", "c2", "quin", T0, "r1")
    p.disconnect("g1", "c2", T0 + 1)  # quin in grace until T0+6
    assert not p.tick_due(T0 + 5.9) and p.tick_due(T0 + 6)
    p.rebase(1000.0, T0 + 2)  # T0+2 on the old clock is 1000 on the new
    assert not p.tick_due(1003.9)
    assert p.tick(1003.9) == []
    assert p.tick(1004) == [left("r1", "quin"), offline("quin")]
    # Liveness restarts at the rebase: 3 heartbeats of 5 s from 1000.
    assert p.tick(1015) == [] and p.gateway_alive("g1")
    assert p.tick_due(1015.01)


def test_config_validation() -> None:
    assert PresenceConfig().dead_after == 15
    for bad in (
        {"grace_seconds": -1},
        {"heartbeat_seconds": 0},
        {"missed_heartbeats": 0},
        {"grace_seconds": float("nan")},
    ):
        with pytest.raises(ValueError):
            PresenceConfig(**bad)


# ---------------------------------------------------------------------------
# Property tests: random interleavings against a model
#
# A simulated world of gateways holds the true connections. Gateways may crash
# (lose everything, say nothing), be cut off (their events are lost) and heal,
# restart empty, heartbeat (and sync when told), and time advances with or
# without heartbeats; the broker may fail over through snapshot/restore.
#
# The model is what the broker can know: each gateway's table as delivered to
# it, cleared when the gateway is declared dead. From it alone, recomputed
# from scratch after every step: who is live, and since when who is not. The
# observer applies the emitted events in order. Checked after every step:
#   - event sanity: no online twice without an offline, no joined twice
#     without a left, no member who is offline;
#   - live (per the model) => announced; announced but not live => lost less
#     than grace ago as of the last tick; offline/left never before grace
#     (except an explicit leave, which must be immediate);
#   - the queries agree with the observer, socket counts with the model;
#   - heartbeat's needs_sync is exactly "declared dead or the digests differ".
# And at every settle point (heal, heartbeat, let time pass beyond death and
# grace), the observer's view equals the world's truth.

GATEWAYS = ("g1", "g2", "g3")
USERS = ("u1", "u2", "u3", "u4")
ROOMS = ("r1", "r2", "r3")
# Multiples of 0.5: the clock's arithmetic stays exact, so a deadline computed
# by the state machine and one computed by the model compare equal.
STEPS = (0.5, 1.0, 2.5, 4.0, 5.0, 6.0, 16.0, 30.0)
# Kinds of step, the everyday ones listed several times: interleavings are only
# interesting with connections and rooms about. Shrinking goes towards the left.
KINDS = (
    ("connect",) * 4
    + ("join",) * 6
    + ("leave",) * 3
    + ("disconnect",) * 3
    + ("advance",) * 4
    + (
        "redeliver",
        "ghost",
        "crash",
        "restart",
        "cut",
        "heal",
        "heartbeat",
        "sync",
        "failover",
        "settle",
    )
)


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str
    gateway: str = "g1"
    user: str = "u1"
    pick: int = 0  # which of the gateway's connections, modulo their number
    room: str = "r1"
    dt: float = 0.0
    beat: bool = False  # advance: do the gateways heartbeat meanwhile?


@st.composite
def step_op(draw: st.DrawFn) -> Op:
    # Only the fields a kind uses are drawn: fewer choices, faster runs and
    # shorter counterexamples.
    kind = draw(st.sampled_from(KINDS))
    if kind == "advance":
        return Op(kind, dt=draw(st.sampled_from(STEPS)), beat=draw(st.booleans()))
    if kind in ("failover", "settle"):
        return Op(kind)
    g = draw(st.sampled_from(GATEWAYS))
    if kind == "connect":
        return Op(kind, g, user=draw(st.sampled_from(USERS)))
    if kind in ("join", "leave"):
        return Op(kind, g, pick=draw(st.integers(0, 7)), room=draw(st.sampled_from(ROOMS)))
    if kind in ("disconnect", "redeliver"):
        return Op(kind, g, pick=draw(st.integers(0, 7)))
    return Op(kind, g)


OPS = step_op()

Table = dict[str, tuple[str, frozenset[str]]]  # conn -> (user, rooms)


def full(table: Table) -> dict[str, tuple[str, str, frozenset[str]]]:
    return {conn: (user, user.upper(), rooms) for conn, (user, rooms) in table.items()}


@dataclasses.dataclass
class Harness:
    config: PresenceConfig
    sm: PresenceState
    now: float = T0
    # The world: each gateway's true connections.
    world: dict[str, Table] = dataclasses.field(default_factory=lambda: {g: {} for g in GATEWAYS})
    up: set[str] = dataclasses.field(default_factory=lambda: set(GATEWAYS))
    cut_off: set[str] = dataclasses.field(default_factory=set)
    next_id: int = 0
    # The model of the broker's knowledge.
    known: dict[str, Table] = dataclasses.field(default_factory=dict)
    dead: set[str] = dataclasses.field(default_factory=set)
    last_seen: dict[str, float] = dataclasses.field(default_factory=dict)
    gone_user: dict[str, float] = dataclasses.field(default_factory=dict)
    gone_room: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    last_tick: float = float("-inf")
    # The observer: what the events said.
    online: dict[str, str] = dataclasses.field(default_factory=dict)
    rooms: set[tuple[str, str]] = dataclasses.field(default_factory=set)

    # -- the model -----------------------------------------------------------

    def live(self) -> tuple[set[str], set[tuple[str, str]]]:
        users: set[str] = set()
        rooms: set[tuple[str, str]] = set()
        for table in self.known.values():
            for user, conn_rooms in table.values():
                users.add(user)
                rooms.update((room, user) for room in conn_rooms)
        return users, rooms

    def heard(self, g: str, incremental: bool = True) -> bool:
        """Something came from g; an incremental input is ignored if g was declared dead."""
        if incremental and g in self.dead:
            return False
        self.known.setdefault(g, {})
        self.last_seen[g] = max(self.last_seen.get(g, self.now), self.now)
        return True

    def step(
        self,
        cause: str,
        call: Callable[[], list[PresenceEvent]],
        update_model: Callable[[], object],
    ) -> list[PresenceEvent]:
        before_users, before_rooms = self.live()
        events = call()
        update_model()
        users, rooms = self.live()
        for u in before_users - users:
            self.gone_user[u] = self.now
        for r in before_rooms - rooms:
            self.gone_room[r] = self.now
        for u in users:
            self.gone_user.pop(u, None)
        for r in rooms:
            self.gone_room.pop(r, None)
        self.observe(cause, events, users, rooms)
        self.check(users, rooms)
        return events

    def observe(
        self, cause: str, events: list[PresenceEvent], users: set[str], rooms: set[tuple[str, str]]
    ) -> None:
        grace = self.config.grace_seconds
        for e in events:
            if isinstance(e, UserOnline):
                assert e.user not in self.online, f"online twice: {e}"
                assert e.user in users and e.socket_count >= 1
                self.online[e.user] = e.username
            elif isinstance(e, UserOffline):
                assert e.user in self.online, f"offline twice: {e}"
                assert not any(u == e.user for _, u in self.rooms), f"offline member: {e}"
                assert e.user not in users
                assert self.gone_user[e.user] + grace <= self.now, f"before grace: {e}"
                del self.online[e.user]
            elif isinstance(e, RoomUserJoined):
                assert e.user in self.online, f"joined while offline: {e}"
                assert (e.room, e.user) not in self.rooms, f"joined twice: {e}"
                assert (e.room, e.user) in rooms
                self.rooms.add((e.room, e.user))
            else:
                assert (e.room, e.user) in self.rooms, f"left twice: {e}"
                assert (e.room, e.user) not in rooms
                if cause not in ("leave", "sync"):  # the two that may skip grace
                    assert self.gone_room[(e.room, e.user)] + grace <= self.now, (
                        f"before grace: {e}"
                    )
                self.rooms.discard((e.room, e.user))

    def check(self, users: set[str], rooms: set[tuple[str, str]]) -> None:
        grace = self.config.grace_seconds
        assert users <= self.online.keys()
        assert rooms <= self.rooms
        for u in self.online.keys() - users:
            assert self.gone_user[u] + grace > self.last_tick, f"{u} kept past grace"
        for r in self.rooms - rooms:
            assert self.gone_room[r] + grace > self.last_tick, f"{r} kept past grace"
        sockets: dict[str, int] = {}
        in_room: dict[tuple[str, str], int] = {}
        for table in self.known.values():
            for user, conn_rooms in table.values():
                sockets[user] = sockets.get(user, 0) + 1
                for room in conn_rooms:
                    in_room[(room, user)] = in_room.get((room, user), 0) + 1
        sm = self.sm
        rooms_of = {u: sm.rooms_of(u) for u in USERS}
        for u in USERS:
            assert sm.is_online(u) == (u in self.online)
            assert sm.socket_count(u) == sockets.get(u, 0)
            assert rooms_of[u] == {room for room, user in self.rooms if user == u}
            for v in USERS:
                assert sm.shares_room(u, v) == bool(rooms_of[u] & rooms_of[v])
        for room in ROOMS:
            assert sm.room_members(room) == [
                RoomMember(u, u.upper(), in_room.get((room, u), 0))
                for u in sorted(u for r, u in self.rooms if r == room)
            ]
        assert sm.counters() == PresenceCounters(
            len(self.online),
            sum(sockets.values()),
            len({r for r, _ in self.rooms}),
            len(self.known.keys() - self.dead),
        )

    # -- the world -----------------------------------------------------------

    def reachable(self, g: str) -> bool:
        return g in self.up and g not in self.cut_off

    def heartbeat(self, g: str) -> None:
        if not self.reachable(g):
            return
        truth = full(self.world[g])
        expected = g in self.dead or digest_of(full(self.known.get(g, {}))) != digest_of(truth)

        def beat() -> list[PresenceEvent]:
            events, needs_sync = self.sm.heartbeat(g, digest_of(truth), self.now)
            assert needs_sync == expected
            return events

        assert self.step("heartbeat", beat, lambda: self.heard(g, incremental=False)) == []
        if expected:
            self.sync(g)

    def sync(self, g: str) -> None:
        if not self.reachable(g):
            return
        table = dict(self.world[g])

        def synced() -> None:
            self.heard(g, incremental=False)
            self.known[g] = table
            self.dead.discard(g)

        self.step("sync", lambda: self.sm.sync(g, full(table), self.now), synced)

    def tick(self) -> None:
        def expire() -> None:
            for g in sorted(self.known.keys() - self.dead):
                if self.now - self.last_seen[g] > self.config.dead_after:
                    self.dead.add(g)
                    self.known[g] = {}
            self.last_tick = self.now

        # A journal skips ticks that are not due: they must change nothing.
        before = None if self.sm.tick_due(self.now) else self.sm.snapshot(self.now)
        self.step("tick", lambda: self.sm.tick(self.now), expire)
        if before is not None:
            assert self.sm.snapshot(self.now) == before

    def run(self, op: Op) -> None:
        g = op.gateway
        if op.kind == "connect":
            if g in self.up:
                conn = f"{g}-c{self.next_id}"
                self.next_id += 1
                self.world[g][conn] = (op.user, frozenset())
                self.deliver(op, conn)
        elif op.kind in ("disconnect", "join", "leave", "redeliver"):
            conns = sorted(self.world[g])
            if not conns:
                return
            conn = conns[op.pick % len(conns)]
            user, rooms = self.world[g][conn]
            if op.kind == "leave" and op.room not in rooms and rooms:
                # Mostly leave a room the connection is in: that is the case with
                # rules (leaving any other is a no-op, tested on its own above).
                op = dataclasses.replace(op, room=min(rooms))
            if op.kind == "disconnect":
                del self.world[g][conn]
            elif op.kind == "join":
                self.world[g][conn] = (user, rooms | {op.room})
            elif op.kind == "leave":
                self.world[g][conn] = (user, rooms - {op.room})
            self.deliver(op, conn)
        elif op.kind == "ghost":
            if self.reachable(g):
                assert (
                    self.step(
                        "disconnect",
                        lambda: self.sm.disconnect(g, "never", self.now),
                        lambda: self.heard(g),
                    )
                    == []
                )
        elif op.kind == "crash":
            self.up.discard(g)
            self.world[g] = {}
        elif op.kind == "restart":
            self.up.add(g)
            self.cut_off.discard(g)
            self.world[g] = {}
            self.heartbeat(g)
        elif op.kind == "cut":
            self.cut_off.add(g)
        elif op.kind == "heal":
            self.cut_off.discard(g)
        elif op.kind == "heartbeat":
            self.heartbeat(g)
        elif op.kind == "sync":
            self.sync(g)
        elif op.kind == "advance":
            self.now += op.dt
            if op.beat:
                for each in GATEWAYS:
                    self.heartbeat(each)
            self.tick()
        elif op.kind == "failover":
            self.failover()
        elif op.kind == "settle":
            self.settle()

    def deliver(self, op: Op, conn: str) -> None:
        """Hand a change that happened in the world to the broker, unless it is lost."""
        g, sm = op.gateway, self.sm
        if not self.reachable(g):
            return
        user = self.world[g].get(conn, (op.user, frozenset()))[0]
        if op.kind == "redeliver":
            # A duplicate connect: a no-op if the broker knew the connection; if
            # the original was lost, it is the first the broker hears of it.
            duplicate = g not in self.dead and conn in self.known.get(g, {})
            events = self.step(
                "connect",
                lambda: sm.connect(g, conn, user, user.upper(), self.now),
                lambda: self.apply(g, conn, user, "connect", ""),
            )
            assert not (duplicate and events)
            return
        calls: dict[str, Callable[[], list[PresenceEvent]]] = {
            "connect": lambda: sm.connect(g, conn, user, user.upper(), self.now),
            "disconnect": lambda: sm.disconnect(g, conn, self.now),
            "join": lambda: sm.join(g, conn, op.room, self.now),
            "leave": lambda: sm.leave(g, conn, op.room, self.now),
        }
        table = self.known.get(g, {})
        took = g not in self.dead and conn in table and op.room in table[conn][1]
        events = self.step(
            op.kind, calls[op.kind], lambda: self.apply(g, conn, user, op.kind, op.room)
        )
        if op.kind == "leave" and took and (op.room, user) not in self.live()[1]:
            # An explicit leave is announced at once, never held in grace.
            assert (op.room, user) not in self.rooms
        if op.kind == "disconnect" and self.config.grace_seconds > 0:
            assert events == []

    def apply(self, g: str, conn: str, user: str, kind: str, room: str) -> None:
        if not self.heard(g):
            return
        known = self.known[g]
        if kind == "connect":
            known.setdefault(conn, (user, frozenset()))
        elif kind == "disconnect":
            known.pop(conn, None)
        elif conn in known:  # a join or leave of a connection it never heard of is lost
            rooms = known[conn][1]
            known[conn] = (user, rooms | {room} if kind == "join" else rooms - {room})

    def failover(self) -> None:
        data = json.loads(json.dumps(self.sm.snapshot(self.now)))
        self.sm = PresenceState.restore(data, self.now, self.config)
        self.sm.rebase(self.now, self.now)  # another process: fresh liveness
        for g in self.last_seen:
            self.last_seen[g] = self.now  # a fresh liveness period for everyone
        self.check(*self.live())

    def settle(self) -> None:
        """Heal everything, keep live gateways beating while death and grace run
        out, then the observer must see exactly the world."""
        self.cut_off.clear()
        rounds = (
            int(
                (self.config.dead_after + self.config.grace_seconds) / self.config.heartbeat_seconds
            )
            + 3
        )
        for _ in range(rounds):
            for g in GATEWAYS:
                self.heartbeat(g)
            self.now += self.config.heartbeat_seconds
            self.tick()
        for g in GATEWAYS:
            self.heartbeat(g)
        truth_users = {user for g in self.up for user, _ in self.world[g].values()}
        truth_rooms = {
            (room, user)
            for g in self.up
            for user, rooms in self.world[g].values()
            for room in rooms
        }
        assert self.online.keys() == truth_users
        assert self.rooms == truth_rooms
        for u in USERS:
            assert self.sm.socket_count(u) == sum(
                1 for g in self.up for user, _ in self.world[g].values() if user == u
            )


_TABLES = st.dictionaries(
    st.sampled_from([f"c{i}" for i in range(6)]),
    st.tuples(st.sampled_from(USERS), st.frozensets(st.sampled_from(ROOMS))),
    max_size=6,
)


def aggregate(*tables: Table) -> set[tuple[str, str, str]]:
    view = set()
    for table in tables:
        for user, rooms in table.values():
            view.add(("online", user, ""))
            view.update(("member", user, room) for room in rooms)
    return view


def as_changes(events: list[PresenceEvent]) -> list[tuple[str, str, str]]:
    changes = []
    for e in events:
        if isinstance(e, UserOnline | UserOffline):
            changes.append(("online", e.user, ""))
        else:
            changes.append(("member", e.user, e.room))
    return changes


@settings(max_examples=200, deadline=None)
@given(other=_TABLES, a=_TABLES, b=_TABLES)
def test_sync_emits_exactly_the_difference(other: Table, a: Table, b: Table) -> None:
    # Without grace every change is announced at once, so the events of a sync
    # must be exactly the difference of the aggregated views, each change once.
    p = state(grace_seconds=0)
    p.sync("g2", full(other), T0)
    p.sync("g1", full(a), T0)
    before, after = aggregate(other, a), aggregate(other, b)
    changes = as_changes(p.sync("g1", full(b), T0))
    assert len(changes) == len(set(changes))
    assert set(changes) == before ^ after
    # With grace nothing goes offline at once and every arrival is announced.
    p = state(grace_seconds=5)
    p.sync("g2", full(other), T0)
    p.sync("g1", full(a), T0)
    events = p.sync("g1", full(b), T0)
    assert not any(isinstance(e, UserOffline) for e in events)
    changes = as_changes(events)
    assert {c for c in changes if c not in before} == after - before
    assert {c for c in changes if c in before} <= before - after
    # Going back at once: within grace, what was only in grace comes back
    # silently; what was announced gone (a room dropped by a surviving
    # connection) is announced back, and nothing else of the old view moves.
    back = as_changes(p.sync("g1", full(a), T0))
    assert {c for c in back if c in before} == {c for c in changes if c in before}


@pytest.mark.parametrize("grace", [5.0, 0.0])
@settings(max_examples=200, deadline=None)
@given(ops=st.lists(OPS, min_size=10, max_size=80))
def test_random_interleavings_match_the_model(grace: float, ops: list[Op]) -> None:
    config = PresenceConfig(
        grace_seconds=grace, heartbeat_seconds=5, missed_heartbeats=3, tombstone_seconds=1e9
    )
    h = Harness(config, PresenceState(config))
    for op in ops:
        h.run(op)
    h.settle()
