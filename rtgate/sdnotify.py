"""systemd's notify protocol (sd_notify), spoken directly.

``Type=notify`` units learn from us when the service is ready (``READY=1``),
when it begins to stop (``STOPPING=1``) and that it is still alive
(``WATCHDOG=1`` when the unit sets ``WatchdogSec=``). The protocol is one
datagram of ``KEY=VALUE`` lines to the Unix socket named by ``$NOTIFY_SOCKET``
(``@`` at the start names an abstract socket), so no systemd bindings are
needed. Without ``$NOTIFY_SOCKET`` (not under systemd) every call is a no-op.

What to send is decided from the environment once (``Notifier.from_env``) and
the sending is one ``sendto`` per message: failures are logged, never raised,
because a service must not die because its supervisor went away.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("rtgate.sdnotify")


def socket_address(name: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` as an address for ``sendto``: ``@name`` is abstract (leading NUL)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, as systemd advises.

    None when no watchdog is asked for, or when it is meant for another
    process (``$WATCHDOG_PID`` names a different pid, e.g. a parent shell's).
    """
    usec = environ.get("WATCHDOG_USEC", "").strip()
    if not usec:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID", "").strip()
    if watchdog_pid and watchdog_pid != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC: not an integer", value=usec)
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


class Notifier:
    """Sends READY/STOPPING/WATCHDOG to systemd; a no-op when ``address`` is None."""

    def __init__(self, address: str | None, watchdog_seconds: float | None = None) -> None:
        self.address = address or None
        self.watchdog_seconds = watchdog_seconds if self.address else None
        self.sent_ready = False
        self.sent_stopping = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_interval(env, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True when it was sent."""
        if self.address is None:
            return False
        data = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(data, socket_address(self.address))
        except OSError as exc:
            log.warning("sd_notify failed", socket=self.address, error=repr(exc))
            return False
        return True

    def ready(self, status: str = "") -> None:
        """Once: the service listens and NATS is connected."""
        if self.sent_ready:
            return
        self.sent_ready = True
        self.notify("READY=1", f"MAINPID={os.getpid()}", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "") -> None:
        """Once: draining or stopping has begun."""
        if self.sent_stopping:
            return
        self.sent_stopping = True
        self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """Ping while the event loop runs: a stuck loop misses pings and systemd restarts us."""
        interval = self.watchdog_seconds
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)
