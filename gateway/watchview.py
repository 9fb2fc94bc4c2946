"""What this gateway's watchers were last told about each user they watch.

``user:online`` and ``user:offline`` travel on core NATS, at most once: a
gateway cut off from NATS, a slow-consumer drop, or a presence service that
died between journaling a change and publishing it each lose one for good.
The view remembers, per watched user, the state the watchers last saw, so an
answer from the presence service that disagrees is recognised as a missed
event and the watchers can be told. An answer is only believed if no event
for that user arrived after the question was asked: the event is newer.

Pure bookkeeping, no I/O: ``PresenceLink`` asks and delivers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Seen:
    # None until the first event or answer.
    online: bool | None = None
    username: str | None = None
    # The view's event count at the last event for this user.
    at: int = -1


class WatchView:
    def __init__(self) -> None:
        self._seen: dict[str, Seen] = {}
        self._events = 0

    def track(self, user: str) -> None:
        """``user`` gained a first local watcher. Answers to questions asked before
        this are not believed for them: an event may have come in between."""
        if user not in self._seen:
            self._events += 1
            self._seen[user] = Seen(at=self._events)

    def forget(self, user: str) -> None:
        """``user`` lost their last local watcher."""
        self._seen.pop(user, None)

    def users(self) -> list[str]:
        return list(self._seen)

    def state(self, user: str) -> bool | None:
        """What watchers of ``user`` were last told; None if not known."""
        seen = self._seen.get(user)
        return None if seen is None else seen.online

    def mark(self) -> int:
        """Taken before a question is sent; pass it with the answer."""
        return self._events

    def event(self, user: str, online: bool, username: str | None) -> bool:
        """An event arrived: False when watchers already see that state (a repeat,
        or a change an answer already corrected), so it need not be delivered."""
        self._events += 1
        seen = self._seen.get(user)
        if seen is None:
            return True  # nobody here watches them: nothing to track
        seen.at = self._events
        if username:
            seen.username = username
        if seen.online == online:
            return False
        seen.online = online
        return True

    def differs(self, user: str, online: bool, since: int) -> bool:
        """Whether an answer asked at ``since`` contradicts what watchers saw.

        A first answer for a user is what their new watcher's ack says, not a
        contradiction: it is taken as is.
        """
        seen = self._seen.get(user)
        if seen is None:
            return False
        if seen.online is None:
            # Taken even when an event came after the question: the event's
            # state would have been set, so there was none for this user.
            seen.online = online
            return False
        if seen.at > since:
            return False
        return seen.online != online

    def correct(self, user: str, online: bool, username: str | None, since: int) -> str | None:
        """Take an answer asked at ``since`` as the truth. Returns the username to
        tell watchers, or None when there is nothing to tell (an event came in
        meanwhile, the user is no longer watched, or the state agrees)."""
        seen = self._seen.get(user)
        if seen is None or seen.at > since or seen.online == online:
            return None
        seen.online = online
        if username:
            seen.username = username
        return seen.username or user
