"""The reference: a bare aiohttp WebSocket fan-out server (uvloop), no NATS, no auth.

It speaks just enough of rtgate's protocol v1 (JSON) for the same load
generator to measure it: a ``welcome`` on connect, ``ack`` for ``room:join``
and ``chat:message``, and every ``chat:message`` relayed to the other members
of the room as ``{"type":"chat:message","data":{...content, timestamp,
offset...}}``. The token in the query string is ignored.

The fan-out uses the technique of gateway/writer.py and nothing more: the
frame is built once per message, queued as the same bytes to every member,
and each socket's queue is written with one ``transport.write`` per event-loop
iteration. The per-connection outbox is bounded the same way (frames, and
bytes including the transport's buffer), so the two servers do the same work
per delivery except what rtgate adds around it.

Run: ``python benchmarks/bare_server.py --port 8099``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import struct
import time
from typing import Any

import uvloop
from aiohttp import WSMsgType, web

_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack

OUTBOX_FRAMES = 1024
OUTBOX_BYTES = 4 * 1024 * 1024
HEARTBEAT_SECONDS = 25.0


def text_frame(payload: bytes) -> bytes:
    """One complete, final, unmasked text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return _pack_short(0x81, 126, n) + payload
    return _pack_long(0x81, 127, n) + payload


def encode(obj: Any) -> bytes:
    return text_frame(_json(obj).encode("utf-8"))


def timestamp(epoch_seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch_seconds, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Outbox:
    """A connection's pending frames, written with one call per loop iteration."""

    __slots__ = ("bytes", "closed", "frames", "rooms", "session", "transport", "ws")

    def __init__(
        self, ws: web.WebSocketResponse, transport: asyncio.Transport, session: str
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.session = session
        self.frames: list[bytes] = []
        self.bytes = 0
        self.closed = False
        self.rooms: set[str] = set()


class Fanout:
    def __init__(self) -> None:
        self.rooms: dict[str, set[Outbox]] = {}
        self._dirty: list[Outbox] = []
        self._scheduled = False
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.frames_sent = 0
        self.slow_consumers = 0

    def send(self, box: Outbox, frame: bytes) -> None:
        if box.closed:
            return
        frames = box.frames
        frames.append(frame)
        box.bytes += len(frame)
        if (
            len(frames) > OUTBOX_FRAMES
            or box.bytes + box.transport.get_write_buffer_size() > OUTBOX_BYTES
        ):
            self.slow_consumers += 1
            box.closed = True
            box.frames.clear()
            loop = asyncio.get_running_loop()
            task = loop.create_task(box.ws.close(code=1013, message=b"slow consumer"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if len(frames) == 1:
            self._dirty.append(box)
            if not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        dirty = self._dirty
        self._dirty = []
        sent = 0
        for box in dirty:
            frames = box.frames
            if not frames or box.closed:
                continue
            transport = box.transport
            if transport.is_closing():
                box.closed = True
                frames.clear()
                continue
            sent += len(frames)
            transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
            box.frames = []
            box.bytes = 0
        self.frames_sent += sent

    def handle(self, box: Outbox, raw: bytes) -> None:
        try:
            frame = json.loads(raw)
            kind = frame["type"]
        except (ValueError, KeyError, TypeError):
            self.send(box, encode({"type": "error", "data": {"code": "bad_frame"}}))
            return
        frame_id = frame.get("id")
        data = frame.get("data")
        if kind == "room:join":
            room_id = data["roomId"] if isinstance(data, dict) else str(data)
            self.rooms.setdefault(room_id, set()).add(box)
            box.rooms.add(room_id)
            reply: Any = {"roomId": room_id, "offset": 0, "epoch": "bare"}
        elif kind == "chat:message":
            room_id = data["roomId"]
            members = self.rooms.get(room_id, ())
            seq = next(self._seq)
            body = {
                "roomId": room_id,
                "userId": box.session,
                "username": box.session,
                "content": data["content"],
                "timestamp": timestamp(time.time()),
                "id": f"bare-{seq}",
                "offset": seq,
                "epoch": "bare",
                "prevOffset": seq - 1,
            }
            shared = encode({"type": "chat:message", "data": body})
            for member in members:
                if member is not box:
                    self.send(member, shared)
            reply = {"message": body}
        elif kind == "room:leave":
            room_id = data["roomId"] if isinstance(data, dict) else str(data)
            self.leave(box, room_id)
            reply = {"roomId": room_id}
        else:
            reply = None
        if frame_id is not None:
            self.send(box, encode({"type": "ack", "id": frame_id, "ok": True, "data": reply}))

    def leave(self, box: Outbox, room_id: str) -> None:
        box.rooms.discard(room_id)
        members = self.rooms.get(room_id)
        if members is not None:
            members.discard(box)
            if not members:
                del self.rooms[room_id]


FANOUT = web.AppKey("fanout", Fanout)
_sessions = itertools.count(1)


async def websocket(request: web.Request) -> web.StreamResponse:
    fanout = request.app[FANOUT]
    ws = web.WebSocketResponse(
        protocols=("rtgate.v1.json",),
        heartbeat=HEARTBEAT_SECONDS,
        max_msg_size=64 * 1024,
        compress=False,
        timeout=3.0,
        decode_text=False,
    )
    await ws.prepare(request)
    transport = request.transport
    if transport is None:
        return ws
    session = f"s{next(_sessions)}"
    box = Outbox(ws, transport, session)
    fanout.send(
        box, encode({"type": "welcome", "data": {"sessionId": session, "gatewayId": "bare"}})
    )
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                fanout.handle(box, msg.data)
    finally:
        box.closed = True
        box.frames.clear()
        for room_id in list(box.rooms):
            fanout.leave(box, room_id)
    return ws


async def healthz(request: web.Request) -> web.Response:
    fanout = request.app[FANOUT]
    return web.json_response(
        {"status": "ok", "framesSent": fanout.frames_sent, "slowConsumers": fanout.slow_consumers}
    )


def create_app() -> web.Application:
    app = web.Application()
    app[FANOUT] = Fanout()
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    args = parser.parse_args()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(
        create_app(),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        shutdown_timeout=2,
    )


if __name__ == "__main__":
    main()
