"""The gateway's side of presence: report, watch, ask, fence.

* Report: the hub tells this link of every authenticated connection and
  room membership change; the link sends them to the presence service as
  batched changes, with a heartbeat that carries a digest of what it
  reported, and the full state (read from the hub's connections: no copy is
  kept, it would cost ~0.2 KiB per connection) when the service asks for it
  (it does when the digests differ or when it takes over). One task
  publishes all of it, so the service sees this gateway's reports in the
  order they happened, and a heartbeat's digest always covers exactly the
  changes sent before it.
* Watch: ``presence:subscribe`` registers a connection as a watcher of users;
  ``user:online``/``user:offline`` arrive on one wildcard subscription per
  gateway and go to the local watchers only. Those events are at most once,
  so the link checks what its watchers saw against the service
  (``WatchView``) after a NATS reconnect, after a takeover, and every
  ``recheck_seconds``, and tells them what they missed.
* Ask: queries go to the service by request/reply; no answer is
  ``unavailable``, never an empty list.
* Fence: everything the service publishes carries its lease revision; events
  older than the newest revision seen here are dropped, so a former active
  service that has not noticed its takeover cannot speak.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import structlog
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker import presence_wire as wire
from broker import subjects
from broker.background import Background
from broker.presence_state import GatewayDigest
from broker.settings import PresenceSettings
from gateway.errors import ErrorCode, ProtocolError, raise_for_reply
from gateway.publisher import unavailable
from gateway.watchview import WatchView

if TYPE_CHECKING:
    from gateway.client import Client

log = structlog.get_logger("rtgate.presence")

# Changes per message; a burst (a drain, a reconnect wave) goes out in chunks.
_BATCH = 500
# Users per query when checking what watchers saw (the service's limit).
_CHECK_PAGE = 100
_MAX_RETRY_SECONDS = 30.0
# The watched states the events announce.
_STATES = {"user:online": True, "user:offline": False}


class PresenceLink:
    def __init__(
        self,
        gateway_id: str,
        settings: PresenceSettings,
        request_timeout: float,
        background: Background,
        deliver: Callable[[set[Client], dict[str, Any]], None],
        clients: Callable[[], Iterable[Client]],
        on_fenced: Callable[[], None] | None = None,
        on_corrected: Callable[[], None] | None = None,
    ) -> None:
        self._gateway = gateway_id
        self._settings = settings
        self._timeout = request_timeout
        self._background = background
        self._deliver = deliver
        self._on_fenced = on_fenced
        self._nc: Nats | None = None
        # The authenticated connections, with their rooms: what was reported.
        self._clients = clients
        self._count = 0
        self._digest = GatewayDigest()
        self._queue: list[wire.Change] = []
        self._wake = asyncio.Event()
        # A gateway (re)starting under an id the service knows replaces what
        # it knew at once, instead of at the first heartbeat.
        self._sync_wanted = True
        self._watchers: dict[str, set[Client]] = {}
        self._view = WatchView()
        self._on_corrected = on_corrected
        self._recheck = asyncio.Event()
        self._subs: list[Subscription] = []
        # The newest fencing token seen.
        self.revision = 0

    @property
    def enabled(self) -> bool:
        return self._settings.enabled

    async def start(self, nc: Nats) -> None:
        self._nc = nc
        if not self.enabled:
            return
        prefix = len(subjects.LIVE_PRESENCE_USER_PREFIX)
        watchers = self._watchers

        async def on_user_event(msg: Msg) -> None:
            if not self.accept(msg):
                return
            try:
                user = subjects.decode_token(msg.subject[prefix:])
            except (ValueError, UnicodeDecodeError):
                return
            targets = watchers.get(user)
            if not targets:
                return
            try:
                event = json.loads(msg.data)
                kind, data = event["type"], event["data"]
                username = data.get("username")
            except (ValueError, TypeError, KeyError, AttributeError):
                log.warning("malformed presence event", subject=msg.subject[:200])
                return
            if kind in _STATES and not self._view.event(
                user, _STATES[kind], username if isinstance(username, str) else None
            ):
                return  # watchers already see this (a check told them)
            self._deliver(targets, event)

        async def on_sync_request(msg: Msg) -> None:
            if not self.accept(msg) and not self._takeover(msg):
                return
            self._sync_wanted = True
            self._wake.set()

        self._subs = [
            await nc.subscribe(subjects.LIVE_PRESENCE_USER_PREFIX + "*", cb=on_user_event),
            await nc.subscribe(subjects.PRESENCE_SYNC_SUBJECT, cb=on_sync_request),
            await nc.subscribe(subjects.presence_sync_subject(self._gateway), cb=on_sync_request),
        ]
        self._background.spawn(self._report())
        self._background.spawn(self._check_watched())

    # -- fencing -------------------------------------------------------------

    def accept(self, msg: Msg) -> bool:
        """False for a message from a presence service older than one already heard."""
        headers = msg.headers
        raw = headers.get(subjects.HDR_PRESENCE_REVISION) if headers else None
        return raw is None or self.accept_revision(raw)

    def _takeover(self, msg: Msg) -> bool:
        """A new service's takeover broadcast is believed even with a lower token: the
        lease bucket may have been recreated (its revisions start again), and a
        former service never broadcasts a takeover after it was replaced."""
        try:
            request = json.loads(msg.data)
            revision = int(request["revision"])
        except (ValueError, KeyError, TypeError):
            return False
        if request.get("reason") != "takeover":
            return False
        log.warning(
            "presence service token went back: the lease was reset",
            known=self.revision,
            new=revision,
        )
        self._new_service(revision)
        return True

    def accept_revision(self, raw: str) -> bool:
        try:
            revision = int(raw)
        except ValueError:
            return False
        if revision < self.revision:
            if self._on_fenced is not None:
                self._on_fenced()
            return False
        if revision > self.revision:
            self._new_service(revision)
        return True

    def _new_service(self, revision: int) -> None:
        # A former service may have died between journaling a change and
        # publishing it: the new one counts it as told. Check with it.
        if self.revision:
            self.recheck()
        self.revision = revision

    # -- reporting (called by the hub; never awaits) ---------------------------
    # The hub calls each exactly once per change: a connection authenticated,
    # renamed by a refreshed token, closed (before its rooms are dropped); a
    # room added to or removed from ``client.rooms``.

    def connected(self, client: Client) -> None:
        user, name = _who(client)
        self._count += 1
        self._digest.add_connection(client.conn_id, user, name)
        self._push(wire.Change("connect", client.conn_id, user, name))

    def renamed(self, client: Client, old_username: str) -> None:
        user, name = _who(client)
        if name == old_username:
            return
        self._digest.remove_connection(client.conn_id, user, old_username)
        self._digest.add_connection(client.conn_id, user, name)
        self._push(wire.Change("connect", client.conn_id, user, name))

    def disconnected(self, client: Client) -> None:
        user, name = _who(client)
        conn = client.conn_id
        for room in client.rooms:
            self._digest.remove_room(conn, room)
        self._count -= 1
        self._digest.remove_connection(conn, user, name)
        self._push(wire.Change("disconnect", conn, user, name))

    def joined(self, client: Client, room: str) -> None:
        user, name = _who(client)
        self._digest.add_room(client.conn_id, room)
        self._push(wire.Change("join", client.conn_id, user, name, room))

    def left(self, client: Client, room: str) -> None:
        user, name = _who(client)
        self._digest.remove_room(client.conn_id, room)
        self._push(wire.Change("leave", client.conn_id, user, name, room))

    def _push(self, change: wire.Change) -> None:
        if not self.enabled:
            return
        self._queue.append(change)
        self._wake.set()

    async def _report(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._settings.heartbeat_seconds
        next_beat = loop.time()
        while not self._background.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_beat - loop.time()))
            self._wake.clear()
            if self._background.stopping:
                return
            try:
                await self._send_pending()
                if loop.time() >= next_beat:
                    next_beat = loop.time() + interval
                    assert self._nc is not None
                    await self._nc.publish(
                        subjects.presence_subject("heartbeat", self._gateway),
                        wire.encode_heartbeat(
                            self._gateway, self._digest.value, self._count, interval
                        ),
                    )
            except Exception as exc:
                # Whatever did not go out, the service learns from the digest.
                log.warning("presence report failed", error=repr(exc))
                self._queue.clear()
                await self._background.sleep(1)

    async def _send_pending(self) -> None:
        nc = self._nc
        assert nc is not None
        if self._sync_wanted:
            self._sync_wanted = False
            # The full state replaces every change not yet sent.
            self._queue.clear()
            state = {c.conn_id: (*_who(c), c.rooms) for c in self._clients()}
            # Start the digest over from what is sent: should it ever drift, one
            # sync repairs it instead of a sync at every heartbeat.
            self._digest = GatewayDigest()
            for conn, (user, name, rooms) in state.items():
                self._digest.add_connection(conn, user, name)
                for room in rooms:
                    self._digest.add_room(conn, room)
            self._count = len(state)
            subject = subjects.presence_subject("sync", self._gateway)
            for part in wire.encode_sync(self._gateway, state):
                await nc.publish(subject, part)
        subject = subjects.presence_subject("events", self._gateway)
        while self._queue:
            batch = self._queue[:_BATCH]
            del self._queue[:_BATCH]
            await nc.publish(subject, wire.encode_changes(self._gateway, batch))

    # -- watching ------------------------------------------------------------

    def watch(self, client: Client, users: list[str]) -> None:
        watching = client.watching
        if watching is None:
            watching = client.watching = set()
        for user in users:
            watching.add(user)
            clients = self._watchers.get(user)
            if clients is None:
                clients = self._watchers[user] = set()
                self._view.track(user)
            clients.add(client)

    def unwatch(self, client: Client, users: list[str] | None = None) -> None:
        """Stop watching ``users`` (all when None)."""
        watching = client.watching
        if not watching:
            return
        for user in list(watching) if users is None else users:
            watching.discard(user)
            clients = self._watchers.get(user)
            if clients is not None:
                clients.discard(client)
                if not clients:
                    del self._watchers[user]
                    self._view.forget(user)
        if not watching:
            client.watching = None

    # -- checking what watchers saw ---------------------------------------------

    def recheck(self) -> None:
        """Check every watched user with the service soon (NATS came back, a new
        service took over)."""
        self._recheck.set()

    def mark(self) -> int:
        """Before asking for watched users' state: pass it to ``observed``."""
        return self._view.mark()

    def as_seen(self, online: dict[str, bool]) -> dict[str, bool]:
        """An answer as this gateway's watchers now see it: an event newer than the
        answer, or a correction made meanwhile, wins (for a watcher's ack)."""
        out: dict[str, bool] = {}
        for user, answer in online.items():
            seen = self._view.state(user)
            out[user] = answer if seen is None else seen
        return out

    async def observed(
        self, online: dict[str, bool], since: int, asker: Client | None = None
    ) -> None:
        """The service's answer about watched users, asked at ``since``: watchers
        whose view it contradicts are told (except ``asker``)."""
        for user, is_online in online.items():
            if not isinstance(is_online, bool) or not self._view.differs(user, is_online, since):
                continue
            username: str | None = None
            sockets = 1
            if is_online:
                # An online event names the user and counts their sockets.
                detail = await self.ask({"op": "user", "userId": user})
                is_online = detail.get("online") is True
                username = (
                    detail.get("username") if isinstance(detail.get("username"), str) else None
                )
                count = detail.get("socketCount")
                sockets = count if isinstance(count, int) and count > 0 else 1
            told = self._view.correct(user, is_online, username, since)
            targets = self._watchers.get(user, set()) - ({asker} if asker else set())
            if told is None or not targets:
                continue
            data: dict[str, Any] = {"userId": user, "username": told}
            if is_online:
                data["socketCount"] = sockets
            self._deliver(
                targets, {"type": "user:online" if is_online else "user:offline", "data": data}
            )
            log.info(
                "presence event missed; watchers corrected",
                user=user[:64],
                online=is_online,
                watchers=len(targets),
            )
            if self._on_corrected is not None:
                self._on_corrected()

    async def _check_watched(self) -> None:
        """Every ``recheck_seconds``, and soon after ``recheck()``, ask for every
        watched user; retried with backoff while the service cannot answer."""
        period = self._settings.recheck_seconds or None
        retry = 0.0
        while not self._background.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recheck.wait(), retry or period)
            self._recheck.clear()
            if self._background.stopping:
                return
            try:
                users = self._view.users()
                for start in range(0, len(users), _CHECK_PAGE):
                    since = self.mark()
                    reply = await self.ask(
                        {"op": "users", "userIds": users[start : start + _CHECK_PAGE]}
                    )
                    await self.observed(reply.get("online") or {}, since)
                retry = 0.0
            except ProtocolError:
                # No service answers (a takeover settling, NATS away): try again.
                retry = min(max(2 * retry, 0.5), period or _MAX_RETRY_SECONDS)
            except Exception as exc:
                log.warning("presence check failed", error=repr(exc))
                retry = period or _MAX_RETRY_SECONDS

    # -- queries -------------------------------------------------------------

    async def ask(self, query: dict[str, Any]) -> dict[str, Any]:
        """One query to the presence service; ProtocolError when it cannot answer."""
        nc = self._nc
        if not self.enabled:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "presence is disabled on this gateway")
        if nc is None or not nc.is_connected:
            raise unavailable()
        try:
            msg = await nc.request(
                subjects.PRESENCE_API_SUBJECT, json.dumps(query).encode(), timeout=self._timeout
            )
        except Exception as exc:  # timeout, no responders: no active presence service
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                "presence is unavailable right now (no presence service answered)",
            ) from exc
        if not self.accept(msg):
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                "presence is unavailable right now (a replaced service answered)",
            )
        try:
            reply: dict[str, Any] = json.loads(msg.data)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.INTERNAL, "malformed presence reply") from exc
        raise_for_reply(reply, "presence query")
        return reply

    async def room_page(self, room: str, cursor: str | None, limit: int) -> dict[str, Any]:
        """``{roomId, members, count, cursor?}``: a page of a room's members."""
        query: dict[str, Any] = {"op": "room", "roomId": room, "limit": limit}
        if cursor is not None:
            query["cursor"] = cursor
        reply = await self.ask(query)
        page = {"roomId": room, "members": reply.get("members", []), "count": reply.get("count", 0)}
        if reply.get("cursor"):
            page["cursor"] = reply["cursor"]
        return page

    async def visible(self, asker: str, users: list[str], policy: str) -> dict[str, bool]:
        """Who of ``users`` is online; ``forbidden`` if the policy hides any of them."""
        query: dict[str, Any] = {"op": "users", "userIds": users}
        if policy == "shared-rooms":
            query["asker"] = asker
        reply = await self.ask(query)
        hidden = reply.get("hidden") or []
        if hidden:
            shown = ", ".join(str(u)[:64] for u in hidden[:5])
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"you share no room with: {shown}" + (" ..." if len(hidden) > 5 else ""),
                user_ids=[str(u) for u in hidden],
            )
        online: dict[str, bool] = reply.get("online", {})
        return online

    async def close(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()


def _who(client: Client) -> tuple[str, str]:
    identity = client.identity
    assert identity is not None, "only authenticated connections are reported"
    return identity.user_id, identity.username
