"""Connection-state recovery: replay what a client missed, then continue live.

The order makes it gap- and duplicate-free: the client holds the channel's
live frames (the hub queues them on the client instead of sending), the
stream is read after the client's position, the replay is sent, and then the
held frames whose offsets the replay already covered are dropped.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import TYPE_CHECKING, Any

from broker import jsread
from gateway import codec
from gateway.errors import ErrorCode, ProtocolError
from gateway.hub import decorate, stored_event

if TYPE_CHECKING:
    from gateway.client import Client

MAX_EPOCH = 32


@dataclasses.dataclass(frozen=True, slots=True)
class Position:
    offset: int
    epoch: str


@dataclasses.dataclass(slots=True)
class Budget:
    """Messages one resume may still replay, across all its channels."""

    remaining: int


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    hold_key: str
    stream: str
    subject: str


def position(value: Any) -> Position:
    """``{offset, epoch}`` from a client, validated."""
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a position is {offset, epoch}")
    offset = value.get("offset")
    epoch = value.get("epoch")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "position offset must be an integer >= 0")
    if not isinstance(epoch, str) or len(epoch) > MAX_EPOCH:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "position epoch must be a string")
    return Position(offset, epoch)


def nats_time(text: str) -> float | None:
    """Seconds since the epoch from a NATS RFC 3339 timestamp (nanosecond fractions)."""
    if not text:
        return None
    head, _, rest = text.rstrip("Z").partition(".")
    fraction = rest[:6].ljust(6, "0") if rest else "000000"
    try:
        moment = datetime.datetime.fromisoformat(f"{head}.{fraction}+00:00")
    except ValueError:
        return None
    return moment.timestamp()


def outcome(recovered: bool, missed: int, offset: int, epoch: str) -> dict[str, Any]:
    return {"recovered": recovered, "missed": missed, "offset": offset, "epoch": epoch}


async def replay(
    client: Client, target: Target, since: Position | None, budget: Budget
) -> dict[str, Any]:
    """Send what ``client`` missed on a channel it holds, then release the hold.

    The caller has put a hold on ``target.hold_key`` and subscribed the client;
    this always releases the hold, whatever happens.
    """
    node = client.node
    nc = node.nc
    timeout = node.config.nats.request_timeout
    streams = node.config.streams
    epoch = node.epochs.get(target.stream, "")
    delivered = 0
    replayed = 0
    recovered = False
    try:
        last = await jsread.last_seq(nc, target.stream, target.subject, timeout)
        first, high = await jsread.bounds(nc, target.stream, timeout)
        # A position is a stream sequence: the client has everything on this
        # channel up to it. 0 is "before anything in this epoch" (a channel
        # that was empty when the client got its position).
        if since is not None and since.epoch == epoch and since.offset <= high:
            delivered = since.offset
            # Something after the position was purged or aged out: cannot be whole.
            if since.offset + 1 >= first:
                cap = min(streams.recovery_max_messages, budget.remaining)
                run = await jsread.run_of(
                    nc,
                    target.stream,
                    target.subject,
                    since.offset,
                    cap + 1,
                    timeout,
                    min_last_seq=last,
                )
                oldest = nats_time(run[0].time) if run else None
                too_old = (
                    oldest is not None and time.time() - oldest > streams.recovery_window_seconds
                )
                if len(run) <= cap and not too_old:
                    delivered = _send_run(client, target, run, since.offset, epoch)
                    replayed = len(run)
                    budget.remaining -= replayed
                    recovered = True
        delivered = await _release(client, target, delivered if recovered else None, epoch)
    except jsread.ReadError as exc:
        client.holds_release(target.hold_key, None)
        raise ProtocolError(ErrorCode.UNAVAILABLE, f"recovery read failed: {exc}") from exc
    except BaseException:
        client.holds_release(target.hold_key, None)
        raise
    metrics = node.metrics
    metrics.recoveries.labels("recovered" if recovered else "not_recovered").inc()
    metrics.recovered_messages.inc(replayed)
    return outcome(recovered, replayed, max(position_of(last, high), delivered), epoch)


def position_of(channel_last: int, stream_last: int) -> int:
    """The position to hand out for a channel: its newest message, or, when it has
    none in the stream, the stream's high-water mark, so that whatever arrives
    later is recognisably after it (0 would mean "from the epoch's start", which
    a purged stream cannot replay)."""
    return channel_last if channel_last > 0 else stream_last


def _send_run(
    client: Client, target: Target, run: list[jsread.Stored], after: int, epoch: str
) -> int:
    prev = after
    for stored in run:
        event = stored_event(stored, target.stream, prev)
        if event is None:
            continue
        decorate(event, epoch)
        client.writer.send(codec.encode_frame(client.fmt, event.event))
        prev = stored.seq
    return prev


async def _release(client: Client, target: Target, delivered: int | None, epoch: str) -> int:
    """Send the held live frames that the replay did not cover; fill a hole between them.

    ``delivered`` is the last offset the client now has, or None when nothing
    was recovered (then every held frame goes out as it came).
    """
    held = client.holds_peek(target.hold_key)
    if delivered is not None and held:
        first_stored = next((h for h in held if h[0] > delivered), None)
        if first_stored is not None and first_stored[1] > delivered:
            # Stored after our read but before the first held frame, and its
            # live copy never reached us: read it too.
            node = client.node
            run = await jsread.run_of(
                node.nc,
                target.stream,
                target.subject,
                delivered,
                first_stored[1] - delivered,
                node.config.nats.request_timeout,
                min_last_seq=first_stored[1],
            )
            delivered = _send_run(client, target, run, delivered, epoch)
    return client.holds_release(target.hold_key, delivered)
