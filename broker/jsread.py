"""Reading stored messages back from JetStream: one by sequence, or a run of one subject.

nats-py 2.16 has no API for batch direct get, so this speaks the JSON API:
a request to ``$JS.API.DIRECT.GET.<stream>`` with our own inbox as reply,
answered by one message per stored message and a status 204 at the end of
the batch. One request returns a whole run of one subject (measured: 1000
messages of a room in under 100 ms), where one request per message would
take several times longer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import streams, subjects


class ReadError(Exception):
    """The stream did not answer usefully (timeout, a lagging replica, an error status)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Stored:
    seq: int
    subject: str
    event: dict[str, Any]
    # The server's storage time, RFC 3339 with nanoseconds.
    time: str


def _status(msg: Msg) -> str | None:
    return msg.headers.get(subjects.HDR_STATUS) if msg.headers else None


def _stored(msg: Msg) -> Stored:
    headers = msg.headers or {}
    return Stored(
        seq=int(headers[subjects.HDR_SEQUENCE]),
        subject=headers.get("Nats-Subject", ""),
        event=json.loads(msg.data),
        time=headers.get("Nats-Time-Stamp", ""),
    )


async def get_one(nc: Client, stream: str, timeout: float, **request: Any) -> Msg | None:
    """One message (``seq=`` or ``last_by_subj=``), or None when there is none."""
    try:
        msg = await nc.request(
            streams.direct_get_subject(stream),
            streams.direct_get_request(**request),
            timeout=timeout,
        )
    except Exception as exc:
        raise ReadError(f"direct get on {stream} failed: {exc!r}") from exc
    status = _status(msg)
    if status == "404":
        return None
    if status is not None:
        raise ReadError(f"direct get on {stream} answered {status}")
    return msg


async def last_seq(nc: Client, stream: str, subject: str, timeout: float) -> int:
    """The sequence of the newest message on ``subject`` (0 when there is none)."""
    msg = await get_one(nc, stream, timeout, last_by_subj=subject)
    if msg is None or msg.headers is None:
        return 0
    return int(msg.headers[subjects.HDR_SEQUENCE])


async def run_of(
    nc: Client,
    stream: str,
    subject: str,
    after: int,
    limit: int,
    timeout: float,
    min_last_seq: int = 0,
) -> list[Stored]:
    """Up to ``limit`` messages on ``subject`` with sequence > ``after``, in order.

    ``min_last_seq`` makes a replica that has not caught up with that sequence
    refuse (412) instead of answering from stale state.
    """
    if limit <= 0:
        return []
    request: dict[str, Any] = {"seq": after + 1, "next_by_subj": subject, "batch": limit}
    if min_last_seq > 0:
        request["min_last_seq"] = min_last_seq
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, pending_msgs_limit=limit + 16)
    out: list[Stored] = []
    try:
        await nc.publish(
            streams.direct_get_subject(stream), streams.direct_get_request(**request), reply=inbox
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ReadError(f"batch get on {stream} timed out after {len(out)} messages")
            try:
                msg = await sub.next_msg(timeout=remaining)
            except Exception as exc:
                raise ReadError(f"batch get on {stream} timed out: {exc!r}") from exc
            status = _status(msg)
            if status is None:
                out.append(_stored(msg))
                continue
            if status in ("204", "404"):  # end of batch, or nothing at all
                return out
            raise ReadError(f"batch get on {stream} answered {status}")
    finally:
        await sub.unsubscribe()


async def bounds(nc: Client, stream: str, timeout: float) -> tuple[int, int]:
    """The stream's first and last sequences: anything below the first is gone
    (purged or aged out); the last is the stream's high-water mark."""
    try:
        info = await nc.jetstream(timeout=timeout).stream_info(stream)
    except Exception as exc:
        raise ReadError(f"stream info for {stream} failed: {exc!r}") from exc
    return int(info.state.first_seq), int(info.state.last_seq)


async def first_seq(nc: Client, stream: str, timeout: float) -> int:
    return (await bounds(nc, stream, timeout))[0]
