"""Python asyncio client for rtgate: reconnects, queues while offline, recovers.

    from rtgate.client import connect

    client = await connect(["ws://127.0.0.1:8080/ws"], token="...")
    client.on("chat:message", lambda m: print(m["username"], m["content"]))
    await client.join("lobby")
    await client.send_message("lobby", "hello")

See docs/client-python.md.
"""

from rtgate.client.backoff import Backoff
from rtgate.client.clock import Clock, ManualClock, SystemClock
from rtgate.client.connection import Client, State, TokenProvider, connect
from rtgate.client.errors import (
    ConnectionClosed,
    DedupWindowExpired,
    Disconnected,
    QueueOverflow,
    RequestTimeout,
    RtgateError,
)

__all__ = [
    "Backoff",
    "Client",
    "Clock",
    "ConnectionClosed",
    "DedupWindowExpired",
    "Disconnected",
    "ManualClock",
    "QueueOverflow",
    "RequestTimeout",
    "RtgateError",
    "State",
    "SystemClock",
    "TokenProvider",
    "connect",
]
