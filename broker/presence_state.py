"""The presence state machine: who is online, who is in which room. Pure code.

No asyncio, no NATS, no clock: every input carries ``now`` (seconds on any
monotonic clock the caller keeps using) and returns the events it caused, so
the NATS shell around it only moves messages and this module can be tested
exhaustively (tests/test_presence_state.py, docs/presence.md).

What it tracks is each gateway's connections (``(gateway, conn)`` -> user,
username, rooms). What it *announces* is derived from that: a user is online
while they have a connection anywhere, and a member of a room while one of
their connections is in it. Observers only ever learn changes through the
events returned here, so the rules below are about those events:

* Aggregation: ``UserOnline`` on a user's first connection anywhere,
  ``UserOffline`` after the last one is gone; ``RoomUserJoined`` on the first
  connection of a user in a room, ``RoomUserLeft`` after the last one is gone.
  A second tab is not an event.
* Grace: when a connection *ends* (disconnect, its gateway declared dead, or a
  sync that no longer lists it), what it made present stays announced for
  ``grace_seconds``; coming back within that time cancels it silently. An
  explicit ``leave`` (or a sync listing the connection without the room) is a
  decision, not network flapping, so it is announced at once.
* Events of one user are ordered: online before any joined, every left before
  offline.
* Idempotence: inputs are keyed by ``(gateway, conn)``; a repeated connect, a
  disconnect, join or leave of an unknown connection, a join of a room already
  joined or a leave of one not joined change nothing and emit nothing.
* Gateways: silence for more than ``missed_heartbeats * heartbeat_seconds``
  (any input counts as a sign of life) declares a gateway dead at the next
  ``tick``: its connections end at once, with grace as for a disconnect. A dead
  gateway's incremental inputs are ignored, and its heartbeats answer
  ``needs_sync=True``, until it sends its full state with ``sync``.

Users in grace are still present: ``is_online`` is true, they are listed by
``room_members`` (with ``socket_count`` 0) and count for ``shares_room``, since
no offline or left event has told anyone otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import math
from collections.abc import Collection, Mapping
from typing import Any, ClassVar, NamedTuple

# ---------------------------------------------------------------------------
# Events (outputs)


@dataclasses.dataclass(frozen=True, slots=True)
class UserOnline:
    kind: ClassVar[str] = "user:online"
    user: str
    username: str
    socket_count: int


@dataclasses.dataclass(frozen=True, slots=True)
class UserOffline:
    kind: ClassVar[str] = "user:offline"
    user: str
    username: str


@dataclasses.dataclass(frozen=True, slots=True)
class RoomUserJoined:
    kind: ClassVar[str] = "room:user_joined"
    room: str
    user: str
    username: str


@dataclasses.dataclass(frozen=True, slots=True)
class RoomUserLeft:
    kind: ClassVar[str] = "room:user_left"
    room: str
    user: str
    username: str


PresenceEvent = UserOnline | UserOffline | RoomUserJoined | RoomUserLeft


# ---------------------------------------------------------------------------
# Configuration, query results


@dataclasses.dataclass(frozen=True, slots=True)
class PresenceConfig:
    # How long what an ended connection made present stays announced.
    grace_seconds: float = 5.0
    # The gateways' heartbeat period, and how many may be missed before death.
    heartbeat_seconds: float = 5.0
    missed_heartbeats: int = 3
    # A dead gateway is remembered (so its return forces a sync) this long.
    # Gateways of autoscaled deployments get fresh ids; without a limit the
    # table would grow by one entry per pod ever run.
    tombstone_seconds: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("grace_seconds", "heartbeat_seconds", "tombstone_seconds"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.heartbeat_seconds <= 0:
            raise ValueError("heartbeat_seconds must be > 0")
        if not isinstance(self.missed_heartbeats, int) or self.missed_heartbeats < 1:
            raise ValueError(f"missed_heartbeats must be >= 1, got {self.missed_heartbeats!r}")

    @property
    def dead_after(self) -> float:
        """Silence (seconds) after which a gateway is declared dead: strictly more than this."""
        return self.missed_heartbeats * self.heartbeat_seconds


class ConnectionInfo(NamedTuple):
    """One connection as a gateway reports it in ``sync``; any 3-tuple works too."""

    user: str
    username: str
    rooms: frozenset[str]


# What ``sync`` and ``digest_of`` take: conn id -> (user, username, rooms).
FullState = Mapping[str, tuple[str, str, Collection[str]]]


class RoomMember(NamedTuple):
    user: str
    username: str
    # This user's connections that are in the room; 0 while in grace.
    socket_count: int


class PresenceCounters(NamedTuple):
    users_online: int  # announced online, users in grace included
    connections: int  # live connections on gateways not declared dead
    rooms: int  # rooms with at least one announced member
    gateways_alive: int  # known gateways not declared dead


# ---------------------------------------------------------------------------
# Digest: what a heartbeat carries instead of the full state


def _term(kind: bytes, *parts: str) -> int:
    # Length-prefixed, so ("ab", "c") and ("a", "bc") differ; surrogatepass
    # because ids decoded from JSON may hold lone surrogates.
    data = bytearray(kind)
    for part in parts:
        raw = part.encode("utf-8", "surrogatepass")
        data += len(raw).to_bytes(4, "big") + raw
    return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "big")


_MASK = (1 << 128) - 1


class GatewayDigest:
    """An order-independent summary of one gateway's connections and memberships.

    The digest is a count and the sum (mod 2**128) of one hash per connection
    and one per (connection, room), so it is updated in O(1) per event: a
    gateway keeps one next to its connection table and puts ``value`` in every
    heartbeat, and the presence state keeps one per gateway the same way. 128
    bits, because sums of 64-bit hashes admit practical crafted collisions
    (generalised birthday) from anyone who controls many room ids.
    """

    __slots__ = ("_count", "_sum")

    def __init__(self) -> None:
        self._count = 0
        self._sum = 0

    def add_connection(self, conn: str, user: str, username: str) -> None:
        self._count += 1
        self._sum = (self._sum + _term(b"c", conn, user, username)) & _MASK

    def remove_connection(self, conn: str, user: str, username: str) -> None:
        self._count -= 1
        self._sum = (self._sum - _term(b"c", conn, user, username)) & _MASK

    def add_room(self, conn: str, room: str) -> None:
        self._sum = (self._sum + _term(b"r", conn, room)) & _MASK

    def remove_room(self, conn: str, room: str) -> None:
        self._sum = (self._sum - _term(b"r", conn, room)) & _MASK

    @property
    def value(self) -> str:
        # The count in clear makes a mismatch readable in logs.
        return f"{self._count}.{self._sum:032x}"


def digest_of(connections: FullState) -> str:
    """The digest of a whole connection table, equal to the running ``GatewayDigest``."""
    digest = GatewayDigest()
    for conn, (user, username, rooms) in connections.items():
        digest.add_connection(conn, user, username)
        for room in _rooms_arg(rooms):
            digest.add_room(conn, room)
    return digest.value


def _rooms_arg(rooms: Collection[str]) -> frozenset[str]:
    # A bare string is a Collection[str] too; taken as is it would join one
    # room per character.
    if isinstance(rooms, str):
        raise TypeError(f"rooms must be a collection of room ids, not the string {rooms!r}")
    return frozenset(rooms)


# ---------------------------------------------------------------------------
# Internal records (mutable, owned by one PresenceState)


@dataclasses.dataclass(slots=True)
class _Conn:
    user: str
    username: str
    rooms: set[str]


@dataclasses.dataclass(slots=True)
class _Gateway:
    last_seen: float
    dead_since: float | None = None
    conns: dict[str, _Conn] = dataclasses.field(default_factory=dict)
    digest: GatewayDigest = dataclasses.field(default_factory=GatewayDigest)


@dataclasses.dataclass(slots=True)
class _User:
    """A user who is announced online: live connections, or in grace."""

    username: str
    sockets: int = 0
    # Live connection count per room (entries > 0 only).
    rooms: dict[str, int] = dataclasses.field(default_factory=dict)
    # Rooms still announced although no connection is in them: room -> deadline.
    pending_rooms: dict[str, float] = dataclasses.field(default_factory=dict)
    # Set while sockets == 0: when the offline is due.
    offline_at: float | None = None


# Heap entry kinds; rooms sort first so a user's lefts precede their offline.
_ROOM, _USER = 0, 1

SNAPSHOT_VERSION = 1


class PresenceState:
    """Aggregated presence over all gateways. Not thread-safe; one owner calls it."""

    def __init__(self, config: PresenceConfig | None = None) -> None:
        self.config = config or PresenceConfig()
        self._gateways: dict[str, _Gateway] = {}
        self._users: dict[str, _User] = {}
        # room -> announced members (live or in grace).
        self._rooms: dict[str, set[str]] = {}
        self._connections = 0
        # Grace deadlines: (deadline, kind, user, room). Cancelling leaves the
        # entry in place; it is checked against the user record when popped.
        self._deadlines: list[tuple[float, int, str, str]] = []

    # -- inputs from gateways ------------------------------------------------

    def connect(
        self, gateway: str, conn: str, user: str, username: str, now: float
    ) -> list[PresenceEvent]:
        """An authenticated connection appeared. A repeat for the same user only
        refreshes the username (a refreshed token may rename); a repeat for another
        user means the conn id was reused after a lost disconnect: replace it."""
        gw = self._live_gateway(gateway, now)
        if gw is None:
            return []
        events: list[PresenceEvent] = []
        old = gw.conns.get(conn)
        if old is not None:
            if old.user == user:
                self._rename(gw, conn, old, username)
                return []
            del gw.conns[conn]
            self._detach(gw, conn, old, now, events, graceful=True)
        self._add(gw, conn, user, username, events)
        return events

    def disconnect(self, gateway: str, conn: str, now: float) -> list[PresenceEvent]:
        gw = self._live_gateway(gateway, now)
        if gw is None:
            return []
        old = gw.conns.pop(conn, None)
        if old is None:
            return []
        events: list[PresenceEvent] = []
        self._detach(gw, conn, old, now, events, graceful=True)
        return events

    def join(self, gateway: str, conn: str, room: str, now: float) -> list[PresenceEvent]:
        gw = self._live_gateway(gateway, now)
        if gw is None:
            return []
        c = gw.conns.get(conn)
        if c is None or room in c.rooms:
            return []
        events: list[PresenceEvent] = []
        self._join(gw, conn, c, room, events)
        return events

    def leave(self, gateway: str, conn: str, room: str, now: float) -> list[PresenceEvent]:
        """An explicit leave (or a kick): announced at once, without grace."""
        gw = self._live_gateway(gateway, now)
        if gw is None:
            return []
        c = gw.conns.get(conn)
        if c is None or room not in c.rooms:
            return []
        events: list[PresenceEvent] = []
        self._leave(gw, conn, c, room, now, events, graceful=False)
        return events

    def heartbeat(self, gateway: str, digest: str, now: float) -> tuple[list[PresenceEvent], bool]:
        """A gateway is alive; ``needs_sync`` says its state must be sent in full:
        it was declared dead, or the digest differs (lost events, a restart under
        the same id, a state machine rebuilt without it). Emits nothing today;
        the list keeps every input's result the same shape."""
        gw = self._gateways.get(gateway)
        if gw is None:
            # First word from it (or from before our restart): an empty table,
            # which the digest comparison fills in through a sync.
            gw = self._gateways[gateway] = _Gateway(last_seen=now)
        gw.last_seen = max(gw.last_seen, now)
        if gw.dead_since is not None:
            return [], True
        return [], digest != gw.digest.value

    def sync(self, gateway: str, full_state: FullState, now: float) -> list[PresenceEvent]:
        """Replace everything known about ``gateway`` with ``full_state`` (conn ->
        (user, username, rooms)), emitting only what truly changed. It also revives
        a gateway declared dead.

        Additions are applied before removals: a user who moved from one
        connection to another of the same gateway, or a room that one
        connection left while another joined it, then never drops to zero and
        so emits nothing, even without grace. Connections that are gone end
        with grace, like a disconnect; rooms a surviving connection no longer
        lists end without, like a leave."""
        wanted = {
            conn: (user, username, _rooms_arg(rooms))
            for conn, (user, username, rooms) in full_state.items()
        }
        gw = self._gateways.get(gateway)
        if gw is None:
            gw = self._gateways[gateway] = _Gateway(last_seen=now)
        gw.dead_since = None
        gw.last_seen = max(gw.last_seen, now)
        events: list[PresenceEvent] = []

        gone: list[tuple[str, _Conn]] = []
        left: list[tuple[str, _Conn, str]] = []
        for conn, c in list(gw.conns.items()):
            target = wanted.get(conn)
            if target is None or target[0] != c.user:
                del gw.conns[conn]
                gone.append((conn, c))
            else:
                left.extend((conn, c, room) for room in sorted(c.rooms - target[2]))

        # New connections, grouped by user so UserOnline carries the final count.
        by_user: dict[str, list[str]] = {}
        for conn, (user, _username, _rooms) in wanted.items():
            if conn not in gw.conns:
                by_user.setdefault(user, []).append(conn)
        for user, conns in by_user.items():
            was_present = user in self._users
            for conn in conns:
                self._attach(gw, conn, user, wanted[conn][1])
            u = self._users[user]
            if not was_present:
                events.append(UserOnline(user, u.username, u.sockets))
        for conn, (_user, username, rooms) in wanted.items():
            c = gw.conns[conn]
            if c.username != username:
                self._rename(gw, conn, c, username)
            for room in sorted(rooms - c.rooms):
                self._join(gw, conn, c, room, events)

        for conn, c, room in left:
            self._leave(gw, conn, c, room, now, events, graceful=False)
        for conn, c in gone:
            self._detach(gw, conn, c, now, events, graceful=True)
        return events

    def tick_due(self, now: float) -> bool:
        """Whether ``tick(now)`` would change anything: a gateway to declare dead or
        to forget, or a grace deadline reached. Cheap: a journal records only the
        ticks that matter."""
        if self._deadlines and self._deadlines[0][0] <= now:
            return True
        dead_after = self.config.dead_after
        for gw in self._gateways.values():
            if gw.dead_since is None:
                if now - gw.last_seen > dead_after:
                    return True
            elif now - max(gw.dead_since, gw.last_seen) > self.config.tombstone_seconds:
                return True
        return False

    def tick(self, now: float) -> list[PresenceEvent]:
        """Declare silent gateways dead, forget old tombstones, and announce what
        grace no longer covers. Call it often (every second or faster): a deadline
        is only acted upon at the first tick at or after it."""
        events: list[PresenceEvent] = []
        dead_after = self.config.dead_after
        for name in sorted(self._gateways):
            gw = self._gateways[name]
            if gw.dead_since is None:
                if now - gw.last_seen > dead_after:
                    self._declare_dead(gw, now, events)
            elif now - max(gw.dead_since, gw.last_seen) > self.config.tombstone_seconds:
                # Silent for that long since its death (a returning gateway's
                # heartbeats keep its tombstone): forget it.
                del self._gateways[name]
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, kind, user, room = heapq.heappop(heap)
            u = self._users.get(user)
            if u is None:
                continue
            if kind == _ROOM:
                if u.pending_rooms.get(room) == deadline:
                    del u.pending_rooms[room]
                    self._announce_left(room, user, u.username, events)
            elif u.offline_at == deadline and u.sockets == 0:
                self._announce_offline(user, u, events)
        return events

    # -- queries ---------------------------------------------------------------

    def is_online(self, user: str) -> bool:
        """Announced online: a live connection somewhere, or still in grace."""
        return user in self._users

    def socket_count(self, user: str) -> int:
        """Live connections of ``user`` on gateways not declared dead."""
        u = self._users.get(user)
        return u.sockets if u is not None else 0

    def username(self, user: str) -> str | None:
        """The most recently seen username of an announced user."""
        u = self._users.get(user)
        return u.username if u is not None else None

    def room_members(
        self, room: str, after: str | None = None, limit: int | None = None
    ) -> list[RoomMember]:
        """Announced members sorted by user id, those in grace included (with
        ``socket_count`` 0). ``after`` (a user id) and ``limit`` page through large
        rooms: the next page starts after the last user id of the previous one."""
        members = self._rooms.get(room)
        if not members:
            return []
        ids = sorted(m for m in members if after is None or m > after)
        if limit is not None:
            ids = ids[: max(0, limit)]
        result = []
        for user in ids:
            u = self._users[user]
            result.append(RoomMember(user, u.username, u.rooms.get(room, 0)))
        return result

    def room_count(self, room: str) -> int:
        return len(self._rooms.get(room, ()))

    def rooms_of(self, user: str) -> frozenset[str]:
        """Rooms ``user`` is announced in, those in grace included."""
        u = self._users.get(user)
        if u is None:
            return frozenset()
        return frozenset(u.rooms.keys() | u.pending_rooms.keys())

    def shares_room(self, a: str, b: str) -> bool:
        """Whether two users are announced in a common room (grace included): the
        test of the ``shared-rooms`` visibility policy."""
        ua, ub = self._users.get(a), self._users.get(b)
        if ua is None or ub is None:
            return False
        if len(ua.rooms) + len(ua.pending_rooms) > len(ub.rooms) + len(ub.pending_rooms):
            ua, ub = ub, ua
        return any(
            room in ub.rooms or room in ub.pending_rooms for room in (*ua.rooms, *ua.pending_rooms)
        )

    def counters(self) -> PresenceCounters:
        alive = sum(1 for gw in self._gateways.values() if gw.dead_since is None)
        return PresenceCounters(len(self._users), self._connections, len(self._rooms), alive)

    def gateway_connections(self, gateway: str) -> dict[str, ConnectionInfo]:
        """What is known of one gateway's connections (empty once declared dead)."""
        gw = self._gateways.get(gateway)
        if gw is None:
            return {}
        return {
            conn: ConnectionInfo(c.user, c.username, frozenset(c.rooms))
            for conn, c in gw.conns.items()
        }

    def alive_gateways(self) -> set[str]:
        return {name for name, gw in self._gateways.items() if gw.dead_since is None}

    def gateway_alive(self, gateway: str) -> bool:
        gw = self._gateways.get(gateway)
        return gw is not None and gw.dead_since is None

    # -- snapshot --------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """Everything needed to continue elsewhere, as plain JSON-serialisable data.

        Deadlines are stored as seconds remaining at ``now``, because monotonic
        clocks of two processes (the old and the new leader) share no origin.
        """
        gateways: dict[str, Any] = {}
        for name, gw in self._gateways.items():
            gateways[name] = {
                "dead": gw.dead_since is not None,
                # Seconds since last heard from (and since death): a replay of
                # journaled ticks must declare deaths exactly when they happened.
                "silent": max(0.0, now - gw.last_seen),
                "deadFor": 0.0 if gw.dead_since is None else max(0.0, now - gw.dead_since),
                "connections": {
                    conn: [c.user, c.username, sorted(c.rooms)] for conn, c in gw.conns.items()
                },
            }
        grace: dict[str, Any] = {}
        for user, u in self._users.items():
            if u.offline_at is None and not u.pending_rooms:
                continue
            grace[user] = {
                "username": u.username,
                "offline_in": None if u.offline_at is None else max(0.0, u.offline_at - now),
                "rooms": {room: max(0.0, at - now) for room, at in u.pending_rooms.items()},
            }
        return {"version": SNAPSHOT_VERSION, "gateways": gateways, "grace": grace}

    @classmethod
    def restore(
        cls, data: Mapping[str, Any], now: float, config: PresenceConfig | None = None
    ) -> PresenceState:
        """Rebuild from ``snapshot()``, emitting nothing: the snapshot's announced
        view is what observers already know. Exact, with ``now`` on the clock the
        snapshot was taken with (a journal replay continues on it); moving to
        another process's clock is ``rebase``, which also gives every gateway a
        fresh liveness period. Dead gateways stay dead until they sync."""
        if data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported presence snapshot version {data.get('version')!r}")
        state = cls(config)
        for name, entry in data["gateways"].items():
            gw = state._gateways[str(name)] = _Gateway(
                last_seen=now - float(entry.get("silent", 0.0))
            )
            if entry["dead"]:
                gw.dead_since = now - float(entry.get("deadFor", 0.0))
                continue
            for conn, (user, username, rooms) in entry["connections"].items():
                state._attach(gw, str(conn), str(user), str(username))
                c = gw.conns[str(conn)]
                for room in rooms:
                    if str(room) not in c.rooms:
                        state._join(gw, str(conn), c, str(room), [])
        for key, entry in data["grace"].items():
            user = str(key)
            u = state._users.get(user)
            if u is None:
                u = state._users[user] = _User(str(entry["username"]))
            if entry["offline_in"] is not None and u.sockets == 0:
                u.offline_at = now + float(entry["offline_in"])
                heapq.heappush(state._deadlines, (u.offline_at, _USER, user, ""))
            for room, remaining in entry["rooms"].items():
                if str(room) in u.rooms:
                    continue  # live again after all; nothing to expire
                at = now + float(remaining)
                u.pending_rooms[str(room)] = at
                state._rooms.setdefault(str(room), set()).add(user)
                heapq.heappush(state._deadlines, (at, _ROOM, user, str(room)))
            if u.sockets == 0 and u.offline_at is None:
                # Pending rooms without a pending offline: inconsistent input.
                # Keep the invariant (present => live or offline pending) by
                # letting the offline follow the last room.
                u.offline_at = max(u.pending_rooms.values(), default=now)
                heapq.heappush(state._deadlines, (u.offline_at, _USER, user, ""))
        return state

    def rebase(self, now: float, clock: float) -> None:
        """Move to another clock: ``clock`` on the old one is ``now`` on the new.

        What remained of each deadline at ``clock`` remains at ``now``, and every
        gateway gets a fresh liveness period (as ``restore`` does): nobody heard
        their heartbeats in between. The state is otherwise unchanged."""
        delta = now - clock
        for gw in self._gateways.values():
            gw.last_seen = now
            if gw.dead_since is not None:
                gw.dead_since += delta
        for u in self._users.values():
            if u.offline_at is not None:
                u.offline_at += delta
            for room in u.pending_rooms:
                u.pending_rooms[room] += delta
        # A uniform shift keeps the heap order.
        self._deadlines = [
            (at + delta, kind, user, room) for at, kind, user, room in self._deadlines
        ]

    # -- internals -------------------------------------------------------------

    def _live_gateway(self, gateway: str, now: float) -> _Gateway | None:
        """The gateway an incremental input comes from, or None to ignore the input
        because the gateway was declared dead: its table here is empty, so a join
        or leave could not be applied, and a partial picture would only be
        replaced by the full one it owes us."""
        gw = self._gateways.get(gateway)
        if gw is None:
            gw = self._gateways[gateway] = _Gateway(last_seen=now)
        elif gw.dead_since is not None:
            return None
        gw.last_seen = max(gw.last_seen, now)
        return gw

    def _attach(self, gw: _Gateway, conn: str, user: str, username: str) -> None:
        """Add a connection without rooms; the caller announces the user if new."""
        gw.conns[conn] = _Conn(user, username, set())
        gw.digest.add_connection(conn, user, username)
        self._connections += 1
        u = self._users.get(user)
        if u is None:
            u = self._users[user] = _User(username)
        u.username = username
        u.sockets += 1
        u.offline_at = None  # back within grace: cancel silently

    def _add(
        self, gw: _Gateway, conn: str, user: str, username: str, events: list[PresenceEvent]
    ) -> None:
        was_present = user in self._users
        self._attach(gw, conn, user, username)
        if not was_present:
            events.append(UserOnline(user, username, self._users[user].sockets))

    def _rename(self, gw: _Gateway, conn: str, c: _Conn, username: str) -> None:
        if c.username == username:
            return
        gw.digest.remove_connection(conn, c.user, c.username)
        gw.digest.add_connection(conn, c.user, username)
        c.username = username
        self._users[c.user].username = username

    def _join(
        self, gw: _Gateway, conn: str, c: _Conn, room: str, events: list[PresenceEvent]
    ) -> None:
        c.rooms.add(room)
        gw.digest.add_room(conn, room)
        u = self._users[c.user]
        count = u.rooms.get(room, 0)
        u.rooms[room] = count + 1
        if count:
            return  # another tab is already there
        if u.pending_rooms.pop(room, None) is not None:
            return  # back within grace: the left was never announced
        self._rooms.setdefault(room, set()).add(c.user)
        events.append(RoomUserJoined(room, c.user, u.username))

    def _leave(
        self,
        gw: _Gateway,
        conn: str,
        c: _Conn,
        room: str,
        now: float,
        events: list[PresenceEvent],
        graceful: bool,
    ) -> None:
        c.rooms.discard(room)
        gw.digest.remove_room(conn, room)
        u = self._users[c.user]
        count = u.rooms[room] - 1
        if count:
            u.rooms[room] = count
            return
        del u.rooms[room]
        grace = self.config.grace_seconds
        if graceful and grace > 0:
            at = now + grace
            u.pending_rooms[room] = at
            heapq.heappush(self._deadlines, (at, _ROOM, c.user, room))
        else:
            self._announce_left(room, c.user, u.username, events)

    def _detach(
        self,
        gw: _Gateway,
        conn: str,
        c: _Conn,
        now: float,
        events: list[PresenceEvent],
        graceful: bool,
    ) -> None:
        """End a connection already removed from ``gw.conns``."""
        for room in sorted(c.rooms):
            self._leave(gw, conn, c, room, now, events, graceful)
        gw.digest.remove_connection(conn, c.user, c.username)
        self._connections -= 1
        u = self._users[c.user]
        u.sockets -= 1
        if u.sockets:
            return
        grace = self.config.grace_seconds
        if graceful and grace > 0:
            u.offline_at = now + grace
            heapq.heappush(self._deadlines, (u.offline_at, _USER, c.user, ""))
        else:
            self._announce_offline(c.user, u, events)

    def _declare_dead(self, gw: _Gateway, now: float, events: list[PresenceEvent]) -> None:
        # Grace applies, counted from now: clients of a crashed gateway are
        # reconnecting elsewhere, and a gateway that was only cut off (a
        # partition, a long pause) and resyncs within grace causes no flapping.
        # The bound "dead after 3 heartbeats, reported within grace more" holds.
        gw.dead_since = now
        conns, gw.conns = gw.conns, {}
        for conn, c in conns.items():
            self._detach(gw, conn, c, now, events, graceful=True)
        gw.digest = GatewayDigest()

    def _announce_left(
        self, room: str, user: str, username: str, events: list[PresenceEvent]
    ) -> None:
        members = self._rooms.get(room)
        if members is not None:
            members.discard(user)
            if not members:
                del self._rooms[room]
        events.append(RoomUserLeft(room, user, username))

    def _announce_offline(self, user: str, u: _User, events: list[PresenceEvent]) -> None:
        # Every room first, so no observer sees a member who is offline.
        for room in sorted(u.pending_rooms):
            self._announce_left(room, user, u.username, events)
        u.pending_rooms.clear()
        del self._users[user]
        events.append(UserOffline(user, u.username))
