"""Presence watches that survive reconnects (sans-I/O).

The server ends a connection's watches with it (docs/protocol.md,
``presence:subscribe``). The client remembers whom the application watches and
the last state it reported, subscribes again after each reconnect, and turns
what changed while it was away into the ``user:online`` / ``user:offline``
events the application would have seen.
"""

from __future__ import annotations

from typing import Any

# Users per presence:subscribe frame (the server's limit).
CHUNK = 100


class Watches:
    def __init__(self) -> None:
        self._online: dict[str, bool | None] = {}
        self._names: dict[str, str] = {}

    @property
    def users(self) -> list[str]:
        return list(self._online)

    def chunks(self) -> list[list[str]]:
        users = self.users
        return [users[i : i + CHUNK] for i in range(0, len(users), CHUNK)]

    def subscribed(self, user_ids: Any, ack: Any) -> None:
        online = ack.get("online") if isinstance(ack, dict) else None
        for user in user_ids if isinstance(user_ids, list) else []:
            if isinstance(user, str):
                state = online.get(user) if isinstance(online, dict) else None
                self._online[user] = state if isinstance(state, bool) else None

    def unsubscribed(self, user_ids: Any) -> None:
        for user in user_ids if isinstance(user_ids, list) else []:
            self._online.pop(user, None)

    def event(self, frame_type: str, data: Any) -> None:
        if not isinstance(data, dict):
            return
        user = data.get("userId")
        if not isinstance(user, str) or user not in self._online:
            return
        self._online[user] = frame_type == "user:online"
        if isinstance(data.get("username"), str):
            self._names[user] = data["username"]

    def resubscribed(self, ack: Any) -> list[tuple[str, dict[str, Any]]]:
        """Apply the state after a reconnect; the events for what changed meanwhile."""
        online = ack.get("online") if isinstance(ack, dict) else None
        events: list[tuple[str, dict[str, Any]]] = []
        if not isinstance(online, dict):
            return events
        for user, state in online.items():
            if user not in self._online or not isinstance(state, bool):
                continue
            before = self._online[user]
            self._online[user] = state
            if before is None or before == state:
                continue
            data: dict[str, Any] = {
                "userId": user,
                "username": self._names.get(user, user),
                "resubscribed": True,
            }
            events.append(("user:online" if state else "user:offline", data))
        return events
