"""Server-side WebSocket frames built once and written as bytes (RFC 6455 section 5.2).

Server frames are unmasked, so one byte string is a valid frame for every
recipient: the fan-out path builds a frame once per wire format and queues
the same bytes to every socket.
"""

from __future__ import annotations

import struct

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8

_FIN = 0x80
_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack


def build(opcode: int, payload: bytes) -> bytes:
    """One complete, final, unmasked frame."""
    n = len(payload)
    first = _FIN | opcode
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return _pack_short(first, 126, n) + payload
    return _pack_long(first, 127, n) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    # Control frame payloads are limited to 125 bytes: 2 for the code, the rest reason.
    data = reason.encode("utf-8")[:123]
    return build(OP_CLOSE, code.to_bytes(2, "big") + data)
