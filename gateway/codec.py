"""Wire formats: JSON in text frames, msgpack in binary frames (sans-I/O)."""

from __future__ import annotations

import enum
import json
from typing import Any

import msgpack

from gateway import wsframe
from gateway.errors import ErrorCode, ProtocolError


class WireFormat(enum.IntEnum):
    # Small ints, so the fan-out loop can index a per-message frame cache.
    JSON = 0
    MSGPACK = 1

    @property
    def subprotocol(self) -> str:
        return SUBPROTOCOLS[self]


SUBPROTOCOLS: dict[WireFormat, str] = {
    WireFormat.JSON: "rtgate.v1.json",
    WireFormat.MSGPACK: "rtgate.v1.msgpack",
}
_BY_SUBPROTOCOL = {name: fmt for fmt, name in SUBPROTOCOLS.items()}

# check_circular off: decoded frames and our own dicts cannot be circular, and
# the check costs on every encode of the fan-out path.
_json_encoder = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, check_circular=False
)
_json_encode = _json_encoder.encode
_msgpack_packer = msgpack.Packer(use_bin_type=True)


def from_subprotocol(name: str | None) -> WireFormat:
    """The negotiated subprotocol's format; a client that offered none speaks JSON."""
    if name is None:
        return WireFormat.JSON
    return _BY_SUBPROTOCOL.get(name, WireFormat.JSON)


def encode_payload(fmt: WireFormat, obj: Any) -> bytes:
    if fmt is WireFormat.JSON:
        return _json_encode(obj).encode("utf-8")
    return _msgpack_packer.pack(obj)  # type: ignore[no-any-return]


def encode_frame(fmt: WireFormat, obj: Any) -> bytes:
    """A complete WebSocket frame carrying ``obj``."""
    if fmt is WireFormat.JSON:
        return wsframe.build(wsframe.OP_TEXT, _json_encode(obj).encode("utf-8"))
    return wsframe.build(wsframe.OP_BINARY, _msgpack_packer.pack(obj))


def decode(fmt: WireFormat, data: str | bytes) -> Any:
    """Parse one inbound message; any malformation is a ``bad_frame``."""
    if fmt is WireFormat.JSON:
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(ErrorCode.BAD_FRAME, "malformed JSON") from exc
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(ErrorCode.BAD_FRAME, "malformed msgpack") from exc
