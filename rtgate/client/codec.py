"""Frame encoding for the two subprotocols."""

from __future__ import annotations

import json
from typing import Any, Literal

import msgpack

Format = Literal["json", "msgpack"]
SUBPROTOCOLS: dict[str, str] = {"json": "rtgate.v1.json", "msgpack": "rtgate.v1.msgpack"}


def encode(fmt: Format, frame: dict[str, Any]) -> str | bytes:
    if fmt == "msgpack":
        packed: bytes = msgpack.packb(frame, use_bin_type=True)
        return packed
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def decode(fmt: Format, data: str | bytes) -> Any:
    if isinstance(data, str):
        return json.loads(data)
    if fmt == "msgpack":
        return msgpack.unpackb(data, raw=False)
    return json.loads(data.decode("utf-8"))
