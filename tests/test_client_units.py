"""The Python client's sans-I/O cores: backoff, close-code policy, offline queue and
pacing, recovery positions and gap detection, typing throttle, presence watches."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path
from typing import Any

import pytest

from gateway import disconnect
from gateway.ratelimit import TokenBucket as ServerBucket
from rtgate.client import policy
from rtgate.client.backoff import Backoff
from rtgate.client.outbox import DEDUP_MARGIN, Entry, Outbox
from rtgate.client.policy import Reconnect, decide
from rtgate.client.recovery import DIRECT, GLOBAL, Fill, Position, Recovery, room_channel
from rtgate.client.throttle import TypingThrottle
from rtgate.client.watches import Watches

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

# -- backoff --------------------------------------------------------------------------


def test_backoff_ceiling_grows_by_the_factor_up_to_the_cap() -> None:
    b = Backoff()
    assert [round(b.ceiling(n), 4) for n in range(1, 6)] == [1.0, 1.5, 2.25, 3.375, 5.0625]
    assert b.ceiling(9) == pytest.approx(1.5**8)  # 25.6
    assert b.ceiling(10) == 30.0 and b.ceiling(100) == 30.0
    assert b.ceiling(10**9) == 30.0  # no float overflow for a client that never gives up


def test_backoff_full_jitter_stays_within_bounds_and_spreads() -> None:
    b = Backoff()
    rng = random.Random(1234)
    for attempt in range(1, 40):
        draws = [b.delay(attempt, rng.random) for _ in range(400)]
        ceiling = b.ceiling(attempt)
        assert all(0 <= d <= ceiling for d in draws)
        assert all(d <= 30.0 for d in draws)
        # Full jitter: uniform over [0, ceiling], not bunched at the top.
        assert min(draws) < 0.05 * ceiling and max(draws) > 0.95 * ceiling
        assert 0.4 * ceiling < sum(draws) / len(draws) < 0.6 * ceiling
    # The same seed draws the same delays: reconnect timing tests can predict them.
    first = [b.delay(n, random.Random(7).random) for n in range(1, 5)]
    assert first == [b.delay(n, random.Random(7).random) for n in range(1, 5)]


def test_backoff_attempts_run_out_only_when_limited() -> None:
    assert not Backoff().exhausted(10**6)
    b = Backoff(max_attempts=3)
    assert not b.exhausted(3) and b.exhausted(4)
    assert Backoff(max_attempts=0).exhausted(1)
    rng = random.Random(5)
    assert all(60 <= Backoff().long_delay(rng.random) <= 300 for _ in range(100))
    with pytest.raises(ValueError):
        Backoff(base=0)
    with pytest.raises(ValueError):
        Backoff(cap=0.5)


# -- close-code policy ------------------------------------------------------------------


def _server_codes() -> list[disconnect.Disconnect]:
    # Every constant, not just disconnect.ALL: ALL lists one entry per code.
    return [v for v in vars(disconnect).values() if isinstance(v, disconnect.Disconnect)]


def test_policy_table_matches_the_gateways_close_codes() -> None:
    server = _server_codes()
    assert len(server) >= len(disconnect.ALL)
    for d in server:
        assert d.code in policy.CLOSE_CODES, f"client does not know close code {d.code}"
        assert policy.rule(d.code).value == d.reconnect.value, d
    assert set(policy.CLOSE_CODES) == {d.code for d in server}
    assert {r.value for r in Reconnect} == {r.value for r in disconnect.Reconnect}


def test_policy_table_matches_the_protocol_document() -> None:
    text = PROTOCOL.read_text().split("## 10. Close codes", 1)[1].split("## 11.", 1)[0]
    rows = re.findall(r"^\| (\d{4}) \| [^|]+\| [^|]+\| ([^|]+) \|", text, re.M)
    assert len(rows) >= 11
    for code, column in rows:
        assert policy.rule(int(code)).value == column.strip(), code


@pytest.mark.parametrize("code", [1000, 1007, 1008, 1009, 4403])
def test_never_reconnect_after_final_codes(code: int) -> None:
    d = decide(code, 1, backoff=Backoff(), random=lambda: 0.5, can_refresh=True)
    assert not d.reconnect and not d.exhausted


def test_decisions_per_close_code() -> None:
    b = Backoff()
    half = 0.5

    def go(code: int | None, attempt: int = 1, **kw: Any) -> policy.Decision:
        return decide(code, attempt, backoff=b, random=lambda: half, **kw)

    # 4401: only with a new token from token_provider, at once the first time.
    assert not go(4401).reconnect
    assert go(4401, can_refresh=True) == policy.Decision(True, 0.0, new_token=True)
    assert go(4401, 3, can_refresh=True) == policy.Decision(True, half * 2.25, new_token=True)
    # 1012: exactly the afterMs of the reconnect frame; else 1 to 5 s.
    assert go(1012, after_ms=250) == policy.Decision(True, 0.25)
    assert go(1012).delay == 3.0
    # 4429: long.
    assert go(4429).delay == 60 + half * 240
    # 4408: at once, then backoff.
    assert go(4408).delay == 0.0 and go(4408, 2).delay == half * 1.5
    # Backoff codes, a dropped connection (1006 / None), unknown codes.
    for code in (1011, 1013, 1006, None, 1001, 4999):
        assert go(code, 4) == policy.Decision(True, half * 3.375)
    # Attempts run out.
    limited = Backoff(max_attempts=2)
    assert decide(1006, 3, backoff=limited, random=lambda: 0.1).exhausted
    assert decide(1006, 2, backoff=limited, random=lambda: 0.1).reconnect


# -- offline queue --------------------------------------------------------------------


def _entry(n: int, durable: bool = False) -> Entry:
    return Entry(
        "chat:message" if durable else "ping", {"n": n}, durable=durable, idempotent=not durable
    )


def _drain(box: Outbox, now: float) -> list[Entry]:
    out = []
    while (take := box.take(now)).entry is not None:
        out.append(take.entry)
    return out


def test_queue_keeps_order_and_drops_the_oldest_on_overflow() -> None:
    box = Outbox(limit=3)
    dropped = [d for n in range(5) for d in box.push(_entry(n))]
    assert [d.data["n"] for d in dropped] == [0, 1]
    assert box.dropped == 2 and len(box) == 3
    assert [e.data["n"] for e in _drain(box, 0.0)] == [2, 3, 4]


def test_requeued_frames_go_first_in_their_order() -> None:
    box = Outbox(limit=4)
    sent = [_entry(n) for n in range(3)]
    for n in (3, 4):
        box.push(_entry(n))
    dropped = box.requeue(sent)  # 5 > 4: the oldest goes
    assert [d.data["n"] for d in dropped] == [0]
    assert [e.data["n"] for e in _drain(box, 0.0)] == [1, 2, 3, 4]
    e = _entry(9)
    box.push(e)
    assert box.remove(e) and not box.remove(e) and len(box) == 0


def test_queue_is_paced_below_the_servers_bucket() -> None:
    rate, burst = 20.0, 10
    box = Outbox(limit=1000)
    for n in range(300):
        box.push(_entry(n))
    box.configure(0.0, rate, burst, 120.0)
    server = ServerBucket(rate, burst, 0.0)
    now, sent = 0.0, 0
    while len(box):
        take = box.take(now)
        if take.entry is not None:
            assert server.take(now), f"server would refuse frame {sent} at {now:.3f}"
            sent += 1
        else:
            assert take.wait is not None and take.wait > 0
            now += take.wait
    assert sent == 300
    # Not much slower than the server allows either: 90 % of its rate.
    assert now == pytest.approx((300 - 8) / (rate * 0.9), rel=0.01)


def test_frames_sent_outside_the_queue_are_paid_for() -> None:
    box = Outbox()
    box.configure(0.0, 10.0, 5, None)  # 4 tokens, 9/s
    for n in range(5):
        box.push(_entry(n))
    box.spend(0.0)  # auth
    box.spend(0.0)  # resume
    assert len(_drain(box, 0.0)) == 2
    take = box.take(0.0)
    assert take.entry is None and take.wait == pytest.approx(1 / 9)


def test_durable_frames_older_than_the_dedup_window_are_failed_not_resent() -> None:
    window = 120.0
    box = Outbox()
    box.configure(0.0, None, None, window)
    old, fresh, plain = _entry(1, durable=True), _entry(2, durable=True), _entry(3)
    for e in (old, fresh, plain):
        box.push(e)
    assert _drain(box, 0.0) == [old, fresh, plain]  # first sends at t=0
    # The connection drops before the acks; ``old`` comes back late, ``fresh`` in time.
    never_sent = _entry(4, durable=True)
    box.requeue([old, plain])
    box.push(never_sent)
    take = box.take(window - DEDUP_MARGIN - 0.5)
    assert take.entry is old and take.expired == ()
    box.requeue([old, fresh])
    late = window - DEDUP_MARGIN + 0.5
    take = box.take(late)
    assert take.expired == (old, fresh)
    assert take.entry is plain  # not durable: no window to respect
    # Queued while offline for longer than the window but never sent: it goes.
    assert box.take(late + 1000).entry is never_sent
    assert old.sends == 2 and old.first_sent_at == 0.0


# -- recovery -------------------------------------------------------------------------

EPOCH = "1764331200123456"


def _msg(
    room: str, offset: int, prev: int, epoch: str = EPOCH, kind: str = "chat:message"
) -> tuple[str, dict[str, Any]]:
    return kind, {
        "roomId": room,
        "content": f"m{offset}",
        "id": f"{epoch}-{offset}",
        "offset": offset,
        "epoch": epoch,
        "prevOffset": prev,
    }


def _dm(offset: int, prev: int, epoch: str = "99") -> tuple[str, dict[str, Any]]:
    return "direct:message", {
        "toUserId": "alice",
        "content": f"d{offset}",
        "id": f"{epoch}-{offset}",
        "offset": offset,
        "epoch": epoch,
        "prevOffset": prev,
    }


def _joined(room: str = "lobby", offset: int = 10) -> Recovery:
    r = Recovery()
    r.track(room)
    r.joined(room, offset, EPOCH)
    return r


def test_positions_follow_frames_including_own_sent_and_frames_before_the_join_ack() -> None:
    r = Recovery()
    r.track("lobby")
    assert r.observe(*_msg("lobby", 12, 5)).deliver  # before the ack, newer than it
    r.joined("lobby", 11, EPOCH)
    assert r.position(room_channel("lobby")) == Position(12, EPOCH)
    assert r.observe(*_msg("lobby", 15, 12, kind="chat:message:sent")).deliver
    assert r.position(room_channel("lobby")) == Position(15, EPOCH)
    # Durable room events share the chain; ephemeral ones are not tracked.
    event = {
        "roomId": "lobby",
        "event": "x",
        "id": f"{EPOCH}-17",
        "offset": 17,
        "epoch": EPOCH,
        "prevOffset": 15,
    }
    assert r.observe("room:event", event).deliver
    assert r.observe("room:event", {"roomId": "lobby", "event": "y"}).deliver
    assert r.observe("chat:typing", {"roomId": "lobby", "isTyping": True}).deliver
    assert r.position(room_channel("lobby")) == Position(17, EPOCH)
    # A room the client is not in: delivered, not tracked.
    assert r.observe(*_msg("elsewhere", 3, 0)).deliver
    assert r.position(room_channel("elsewhere")) is None
    assert r.observe(*_dm(4, 0)).deliver
    assert r.positions() == {
        "room:lobby": {"offset": 17, "epoch": EPOCH},
        "direct": {"offset": 4, "epoch": "99"},
    }


def test_the_same_message_is_delivered_once() -> None:
    r = _joined()
    assert r.observe(*_msg("lobby", 11, 10)).deliver
    assert not r.observe(*_msg("lobby", 11, 10)).deliver


def test_gap_while_connected_fills_with_room_join_since_in_order() -> None:
    r = _joined(offset=10)
    assert r.observe(*_msg("lobby", 11, 10)).deliver
    # 12 and 13 never came; 14 shows the gap.
    seen = r.observe(*_msg("lobby", 14, 13))
    assert not seen.deliver and seen.fill == Fill("room:lobby", Position(11, EPOCH))
    assert seen.fill.type == "room:join"
    assert seen.fill.data == {"roomId": "lobby", "since": {"offset": 11, "epoch": EPOCH}}
    # A live frame before the gateway handles the fill: held, no second fill.
    later = r.observe(*_msg("lobby", 15, 14))
    assert not later.deliver and later.fill is None
    # The replay: 12, 13, 14, 15, each continuing the chain.
    for off, prev in ((12, 11), (13, 12), (14, 13), (15, 14)):
        assert r.observe(*_msg("lobby", off, prev)).deliver
    ack = {
        "roomId": "lobby",
        "offset": 15,
        "epoch": EPOCH,
        "rooms": {"lobby": {"recovered": True, "missed": 4, "offset": 15, "epoch": EPOCH}},
    }
    settled = r.fill_result(seen.fill, ack)
    assert settled.deliver == []  # the held ones came again in the replay
    assert settled.events == [
        {"channel": "room:lobby", "roomId": "lobby", "recovered": True, "missed": 4}
    ]
    assert r.position("room:lobby") == Position(15, EPOCH) and not r.filling("room:lobby")


def test_a_fill_that_cannot_recover_releases_what_it_held() -> None:
    r = _joined(offset=10)
    fill = r.observe(*_msg("lobby", 14, 13)).fill
    assert fill is not None
    r.observe(*_msg("lobby", 16, 14))
    ack = {"rooms": {"lobby": {"recovered": False, "missed": 0, "offset": 16, "epoch": EPOCH}}}
    settled = r.fill_result(fill, ack)
    assert [d["offset"] for _, d in settled.deliver] == [14, 16]
    assert settled.events[0]["recovered"] is False
    # Unavailable: try again later from the current position, still holding.
    r2 = _joined(offset=10)
    fill2 = r2.observe(*_msg("lobby", 14, 13)).fill
    assert fill2 is not None
    again = r2.fill_failed(fill2, {"code": "unavailable", "message": "x"})
    assert again.retry == [Fill("room:lobby", Position(10, EPOCH))] and again.deliver == []
    assert r2.filling("room:lobby")


def test_direct_and_global_gaps_fill_with_resume() -> None:
    r = Recovery()
    assert r.observe(*_dm(3, 0)).deliver
    fill = r.observe(*_dm(9, 7)).fill
    assert fill is not None and fill.type == "resume"
    assert fill.data == {DIRECT: {"offset": 3, "epoch": "99"}}
    assert fill.outcome({"rooms": {}, DIRECT: {"recovered": True}}) == {"recovered": True}


def test_resume_frame_and_its_outcomes() -> None:
    r = _joined("lobby", 10)
    r.track("team")
    r.joined("team", 0, EPOCH)
    r.track("secret")
    r.joined("secret", 4, EPOCH)
    r.track("flaky")
    r.joined("flaky", 7, EPOCH)
    r.track("pending")  # its join has no ack yet: sent again after the resume
    data = r.resume_data()
    assert data == {
        "rooms": {
            "lobby": {"offset": 10, "epoch": EPOCH},
            "team": {"offset": 0, "epoch": EPOCH},
            "secret": {"offset": 4, "epoch": EPOCH},
            "flaky": {"offset": 7, "epoch": EPOCH},
        },
        DIRECT: {"offset": 0, "epoch": ""},
        GLOBAL: {"offset": 0, "epoch": ""},
    }
    # Replayed frames, and a live direct message that came before the resume's replay.
    assert r.observe(*_msg("lobby", 11, 10)).deliver
    assert r.observe(*_dm(5, 4)).deliver
    ack = {
        "rooms": {
            "lobby": {"recovered": True, "missed": 1, "offset": 11, "epoch": EPOCH},
            "team": {"recovered": False, "missed": 0, "offset": 0, "epoch": EPOCH},
            "secret": {"recovered": False, "error": {"code": "forbidden", "message": "no"}},
            "flaky": {"recovered": False, "error": {"code": "unavailable", "message": "x"}},
        },
        DIRECT: {"recovered": False, "missed": 0, "offset": 5, "epoch": "99"},
        GLOBAL: {"recovered": False, "missed": 0, "offset": 2, "epoch": "77"},
    }
    settled = r.resume_result(ack)
    events = {e["channel"]: e for e in settled.events}
    assert events["room:lobby"]["recovered"] is True and events["room:lobby"]["missed"] == 1
    # An empty room then and now: nothing was missed.
    assert events["room:team"]["recovered"] is True
    assert events["room:secret"]["error"]["code"] == "forbidden"
    # First connection: the inbox and global positions are only being established.
    assert DIRECT not in events and GLOBAL not in events and "room:flaky" not in events
    assert settled.retry == [Fill("room:flaky", Position(7, EPOCH))]
    assert sorted(r.rooms) == ["flaky", "lobby", "pending", "team"]
    assert r.position(GLOBAL) == Position(2, "77") and r.position(DIRECT) == Position(5, "99")
    # Next time the inbox and global go in with their positions, and report.
    data = r.resume_data()
    assert data[DIRECT] == {"offset": 5, "epoch": "99"}
    settled = r.resume_result(
        {
            "rooms": {},
            DIRECT: {"recovered": True, "missed": 0, "offset": 5, "epoch": "99"},
            GLOBAL: {"recovered": True, "missed": 0, "offset": 2, "epoch": "77"},
        }
    )
    assert {e["channel"] for e in settled.events} >= {DIRECT, GLOBAL}


def test_live_direct_message_before_the_resume_replay_is_not_delivered_twice() -> None:
    r = Recovery()
    r.observe(*_dm(3, 0))
    r.resume_data()
    # Live before the replay (the inbox receives from authentication on): a gap, held.
    assert not r.observe(*_dm(9, 7)).deliver
    # The replay brings 7 and 9 after position 3.
    assert r.observe(*_dm(7, 3)).deliver and r.observe(*_dm(9, 7)).deliver
    settled = r.resume_result(
        {"rooms": {}, DIRECT: {"recovered": True, "missed": 2, "offset": 9, "epoch": "99"}}
    )
    assert settled.deliver == []
    assert r.position(DIRECT) == Position(9, "99")


def test_a_new_epoch_restarts_the_channel_and_says_so() -> None:
    r = _joined(offset=10)
    seen = r.observe(*_msg("lobby", 1, 0, epoch="2"))
    assert seen.deliver and seen.notice is not None and seen.notice["recovered"] is False
    assert r.position("room:lobby") == Position(1, "2")


def test_positions_survive_a_restart_and_leaving_forgets_the_room() -> None:
    r = _joined("lobby", 10)
    r.observe(*_dm(4, 0))
    again = Recovery()
    again.load(r.positions())
    assert again.positions() == r.positions()
    again.forget("lobby")
    assert again.rooms == [] and "rooms" in again.resume_data()


# -- typing throttle ---------------------------------------------------------------------


def test_typing_throttle() -> None:
    t = TypingThrottle(interval=1.0)
    assert not t.offer("r", False, 0.0).send  # never started: nothing to stop
    assert t.offer("r", True, 0.0).send
    assert not t.offer("r", True, 0.3).send  # a keystroke inside the interval
    stop = t.offer("r", False, 0.5)
    assert not stop.send and stop.release_at == 1.0
    # More toggles inside the interval: one timer, the latest state wins.
    assert t.offer("r", True, 0.6) == t.offer("r", False, 0.7) == type(stop)(False)
    assert t.release("r", 1.0) is False
    assert not t.offer("r", False, 5.0).send  # already stopped
    assert t.offer("r", True, 5.0).send
    assert t.offer("r", True, 6.2).send  # still typing: once per interval keeps it lit
    # Typing resumed before the release: nothing to send then.
    assert t.offer("r", False, 6.5).release_at == 7.2
    assert not t.offer("r", True, 6.6).send
    assert t.release("r", 7.2) is None
    # Rooms are independent.
    assert t.offer("other", True, 6.7).send


def test_typing_throttle_never_loses_the_final_state() -> None:
    rng = random.Random(3)
    t = TypingThrottle(interval=0.5)
    now, sent, timer = 0.0, [], None
    last = False
    for _ in range(500):
        now += rng.random() * 0.3
        if timer is not None and timer <= now:
            value = t.release("r", timer)
            if value is not None:
                sent.append((timer, value))
            timer = None
        last = rng.random() < 0.6
        offer = t.offer("r", last, now)
        if offer.send:
            sent.append((now, last))
        elif offer.release_at is not None:
            timer = offer.release_at
    if timer is not None:
        value = t.release("r", timer)
        if value is not None:
            sent.append((timer, value))
    times = [s[0] for s in sent]
    assert all(b - a >= 0.5 - 1e-9 for a, b in itertools.pairwise(times))
    assert sent[-1][1] == last


# -- presence watches --------------------------------------------------------------------


def test_watches_report_what_changed_while_away() -> None:
    w = Watches()
    w.subscribed(["bob", "carol", "dave"], {"online": {"bob": True, "carol": False, "dave": True}})
    w.event("user:offline", {"userId": "dave", "username": "Dave"})
    w.unsubscribed(["carol"])
    assert w.users == ["bob", "dave"]
    events = w.resubscribed({"online": {"bob": False, "dave": True}, "watching": 2})
    assert events == [
        ("user:offline", {"userId": "bob", "username": "bob", "resubscribed": True}),
        ("user:online", {"userId": "dave", "username": "Dave", "resubscribed": True}),
    ]
    many = Watches()
    many.subscribed([f"u{i}" for i in range(250)], {"online": {}})
    assert [len(c) for c in many.chunks()] == [100, 100, 50]


# -- renewing watches after a reconnect ----------------------------------------------


async def test_renewing_a_chunk_drops_every_refused_user_and_renews_the_rest() -> None:
    """Each refusal names users who share no room with us any more; the client
    drops them and asks again for the rest, until nobody is refused."""
    from rtgate.client import Client, RtgateError

    client = Client("ws://127.0.0.1:1/ws", token="t")
    client._watches.subscribed(["bob", "carol", "dave"], {"online": {"bob": True}})
    asked: list[list[str]] = []
    refusals = [["carol"], ["dave"]]

    async def internal(_conn: Any, kind: str, data: Any) -> Any:
        assert kind == "presence:subscribe"
        asked.append(list(data["userIds"]))
        if refusals:
            raise RtgateError("forbidden", "you share no room", user_ids=refusals.pop(0))
        return {"online": {u: False for u in data["userIds"]}, "watching": len(data["userIds"])}

    client._internal = internal  # type: ignore[method-assign]
    events: list[tuple[str, Any]] = []
    client.on_any(lambda kind, data: events.append((kind, data)))
    await client._renew(None, ["bob", "carol", "dave"])  # type: ignore[arg-type]
    assert asked == [["bob", "carol", "dave"], ["bob", "dave"], ["bob"]]
    assert [(k, d.get("userIds")) for k, d in events if k == "error"] == [
        ("error", ["carol"]),
        ("error", ["dave"]),
    ]
    assert ("user:offline", {"userId": "bob", "username": "bob", "resubscribed": True}) in events
    assert client._watches.users == ["bob"]
