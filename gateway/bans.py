"""Who may not come back: users denied after a disconnect, and users banned from rooms.

The truth lives in a NATS KV bucket (per-key TTL, so entries vanish by
themselves); every gateway watches it into this in-memory table, so the
checks on connect, auth and join cost a dict lookup, not a round trip.
"""

from __future__ import annotations

import json
from typing import Any

from broker import subjects

BUCKET = "rtgate_denylist"


def user_key(user_id: str) -> str:
    return "user." + subjects.encode_token(user_id)


def room_key(room_id: str, user_id: str) -> str:
    return f"room.{subjects.encode_token(room_id)}.{subjects.encode_token(user_id)}"


def entry(until: float, reason: str) -> bytes:
    return json.dumps({"until": until, "reason": reason}).encode()


class Bans:
    """Key -> (until, reason); entries past ``until`` count as absent."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, str]] = {}

    def apply(self, key: str, value: bytes | None) -> None:
        """One update from the bucket: a value sets, None (delete/purge) clears."""
        if value is None:
            self._entries.pop(key, None)
            return
        try:
            data: Any = json.loads(value)
            self._entries[key] = (float(data["until"]), str(data.get("reason", "")))
        except (ValueError, KeyError, TypeError):
            self._entries.pop(key, None)

    def active(self, key: str, now: float) -> tuple[float, str] | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[0] <= now:
            del self._entries[key]
            return None
        return found

    def denied(self, user_id: str, now: float) -> tuple[float, str] | None:
        return self.active(user_key(user_id), now)

    def banned(self, room_id: str, user_id: str, now: float) -> tuple[float, str] | None:
        return self.active(room_key(room_id, user_id), now)

    def __len__(self) -> int:
        return len(self._entries)
