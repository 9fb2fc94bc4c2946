"""A small test client over aiohttp: send frames, await acks and events."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from typing import Any

import aiohttp
import msgpack

TIMEOUT = 5.0


class Closed(Exception):
    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed {code} {reason}")
        self.code = code
        self.reason = reason


class WsClient:
    def __init__(
        self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, binary: bool
    ) -> None:
        self.session = session
        self.ws = ws
        self.binary = binary
        self.frames: list[dict[str, Any]] = []  # every non-ack frame received, in order
        self._ids = itertools.count(1)
        self._acks: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._new = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        token: str | None = None,
        msgpack_: bool = False,
        protocols: tuple[str, ...] | None = None,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
    ) -> WsClient:
        session = aiohttp.ClientSession()
        params = dict(query or {})
        if token is not None:
            params["token"] = token
        if protocols is None:
            protocols = ("rtgate.v1.msgpack",) if msgpack_ else ("rtgate.v1.json",)
        try:
            ws = await session.ws_connect(
                url,
                params=params,
                protocols=protocols,
                headers=headers,
                autoping=True,
                max_msg_size=0,
            )
        except BaseException:
            await session.close()
            raise
        return cls(session, ws, binary=ws.protocol == "rtgate.v1.msgpack")

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    frame = json.loads(msg.data)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    frame = msgpack.unpackb(msg.data, raw=False)
                else:
                    continue
                if frame.get("type") == "ack" and frame.get("id") in self._acks:
                    fut = self._acks.pop(frame["id"])
                    if not fut.done():
                        fut.set_result(frame)
                else:
                    self.frames.append(frame)
                self._new.set()
        finally:
            self.close_code = self.ws.close_code
            self.close_reason = ""
            self.closed.set()
            self._new.set()
            for fut in self._acks.values():
                if not fut.done():
                    fut.set_exception(Closed(self.close_code, "closed"))

    def encode(self, frame: Any) -> Any:
        return msgpack.packb(frame) if self.binary else json.dumps(frame)

    async def send_raw(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_str(data)

    async def send(self, kind: str, data: Any = None, *, id: int | None = None) -> None:
        frame: dict[str, Any] = {"type": kind}
        if data is not None:
            frame["data"] = data
        if id is not None:
            frame["id"] = id
        await self.send_raw(self.encode(frame))

    async def request(
        self, kind: str, data: Any = None, timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """Send with an id and return the whole ack frame."""
        frame_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._acks[frame_id] = fut
        await self.send(kind, data, id=frame_id)
        return await asyncio.wait_for(fut, timeout)

    async def ok(self, kind: str, data: Any = None, timeout: float = TIMEOUT) -> Any:
        """Send and return the ack's data, failing the test on an error ack."""
        ack = await self.request(kind, data, timeout)
        assert ack["ok"] is True, ack
        return ack["data"]

    async def ok_once_available(
        self, kind: str, data: Any = None, attempts: int = 100, pause: float = 0.05
    ) -> Any:
        """Send until the gateway stops answering ``unavailable`` (the backbone is
        coming back); any other error fails the test. Polling is the point here:
        the client has no event for "the stream exists again"."""
        for _ in range(attempts):
            ack = await self.request(kind, data)
            if ack["ok"]:
                return ack["data"]
            assert ack["error"]["code"] == "unavailable", ack
            await asyncio.sleep(pause)
        raise AssertionError(f"{kind} still unavailable after {attempts} attempts")

    async def error(self, kind: str, data: Any = None, timeout: float = TIMEOUT) -> str:
        """Send and return the ack's error code, failing the test on an ok ack."""
        ack = await self.request(kind, data, timeout)
        assert ack["ok"] is False, ack
        error = ack["error"]
        assert {"code", "message"} <= set(error) <= {"code", "message", "userIds"}, error
        assert error["message"]
        # Only forbidden presence requests name users.
        assert "userIds" not in error or error["code"] == "forbidden", error
        return str(ack["error"]["code"])

    async def next(self, kind: str, timeout: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        """Wait for the first unseen frame of ``kind`` whose data matches; consume it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, frame in enumerate(self.frames):
                data = frame.get("data")
                if frame.get("type") == kind and all(
                    isinstance(data, dict) and data.get(k) == v for k, v in match.items()
                ):
                    del self.frames[i]
                    return frame
            if self.closed.is_set():
                raise Closed(self.close_code, f"while waiting for {kind}")
            self._new.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no {kind} {match} within {timeout}s; have {self.frames}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), remaining)

    def take(self, kind: str) -> list[dict[str, Any]]:
        """Every received frame of ``kind`` so far, consumed."""
        picked = [f for f in self.frames if f.get("type") == kind]
        self.frames = [f for f in self.frames if f.get("type") != kind]
        return picked

    async def wait_closed(self, timeout: float = TIMEOUT) -> int | None:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        await self.session.close()
