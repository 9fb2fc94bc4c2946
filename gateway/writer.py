"""Bounded, batching per-connection outbound queues.

Frames are queued as prebuilt bytes and written with one ``transport.write``
per socket per event-loop iteration: the write syscall dominates the cost of
a delivery, and merging what is pending for a socket is ~10x cheaper than one
write per frame. Nothing here awaits a socket, so one slow peer never delays
another: a queue over its bound is dropped and its owner told to close it
with 1013.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# Pending frames that are written at once, without waiting for the end of the
# loop iteration, when the peer's transport buffer is empty.
_EAGER_FRAMES = 32


class Writer:
    __slots__ = (
        "_bytes",
        "_flusher",
        "_frames",
        "_max_bytes",
        "_max_frames",
        "_on_overflow",
        "_transport",
        "closed",
    )

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        flusher: Flusher,
        max_frames: int,
        max_bytes: int,
        on_overflow: Callable[[], None],
    ) -> None:
        self._transport = transport
        self._flusher = flusher
        self._frames: list[bytes] = []
        self._bytes = 0
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self._on_overflow = on_overflow
        self.closed = False

    def send(self, frame: bytes) -> bool:
        """Queue one complete frame; False if the connection is closed or just overflowed."""
        if self.closed:
            return False
        frames = self._frames
        frames.append(frame)
        self._bytes += len(frame)
        count = len(frames)
        buffered = self._transport.get_write_buffer_size()
        if count >= _EAGER_FRAMES and buffered == 0:
            # A burst is being handled without returning to the loop, and the
            # peer keeps up (nothing waits in the transport): write the batch now.
            self.flush()
            return True
        if count > self._max_frames or self._bytes + buffered > self._max_bytes:
            self.close()
            self._on_overflow()
            return False
        if count == 1:
            self._flusher.mark(self)
        return True

    def close(self) -> None:
        """Drop what is queued and accept nothing more (the close frame goes out separately)."""
        self.closed = True
        self._frames.clear()
        self._bytes = 0

    def flush(self) -> None:
        """Write everything pending in one call."""
        frames = self._frames
        count = len(frames)
        if not count or self.closed:
            return
        transport = self._transport
        if transport.is_closing():
            self.close()
            return
        data = frames[0] if count == 1 else b"".join(frames)
        self._frames = []
        self._bytes = 0
        transport.write(data)
        flusher = self._flusher
        flusher.frames_sent += count
        flusher.bytes_sent += len(data)

    @property
    def pending_frames(self) -> int:
        return len(self._frames)


class Flusher:
    """Flushes every writer that has pending frames, once per loop iteration.

    One scheduled callback for all sockets rather than one per socket keeps
    the per-delivery overhead to a list append.
    """

    __slots__ = (
        "_dirty",
        "_loop",
        "_observe_latency",
        "_scheduled",
        "_stamps",
        "bytes_sent",
        "frames_sent",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        observe_latency: Callable[[float], None] | None = None,
    ) -> None:
        self._loop = loop
        self._dirty: list[Writer] = []
        self._scheduled = False
        # perf_counter stamps of NATS messages fanned out since the last flush.
        self._stamps: list[float] = []
        self._observe_latency = observe_latency
        self.frames_sent = 0
        self.bytes_sent = 0

    def mark(self, writer: Writer) -> None:
        self._dirty.append(writer)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def stamp(self, received_at: float) -> None:
        """Record when a fanned-out message arrived, for the fan-out latency metric."""
        self._stamps.append(received_at)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        dirty = self._dirty
        self._dirty = []
        for writer in dirty:
            writer.flush()
        if self._stamps:
            stamps = self._stamps
            self._stamps = []
            if self._observe_latency is not None:
                now = time.perf_counter()
                for t in stamps:
                    self._observe_latency(now - t)
