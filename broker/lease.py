"""A lease in a NATS KV bucket: at most one holder at a time, lost if not renewed.

Used so that a second broker replica on SQLite (one file per host, so two
replicas would each persist half the messages into separate files) refuses
to start instead. Acquire is a create (fails while someone holds the key);
renewal is a publish expecting the last revision we wrote, with a per-message
TTL so a crashed holder's lease expires by itself.
"""

from __future__ import annotations

import asyncio
import json

import structlog
from nats.aio.client import Client
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from broker.background import Background

log = structlog.get_logger("rtgate.lease")

BUCKET = "rtgate_leases"


class LeaseHeld(RuntimeError):
    """Another process holds the lease; the message names it."""


class Lease:
    def __init__(self, nc: Client, key: str, holder: str, ttl_seconds: int = 6) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._key = key
        self._holder = holder
        self._ttl = max(2, ttl_seconds)
        self._value = json.dumps({"holder": holder}).encode()
        self._revision = 0
        # The revision the lease was acquired at: it only grows from one holder
        # to the next, so it fences a former holder that does not know it lost.
        self.token = 0
        self.lost = False

    @property
    def ttl(self) -> int:
        return self._ttl

    async def _bucket(self) -> KeyValue:
        try:
            return await self._js.key_value(BUCKET)
        except Exception:
            return await self._js.create_key_value(bucket=BUCKET, history=1)

    async def try_acquire(self) -> str | None:
        """One attempt: None when the lease is now ours, else who holds it."""
        kv = await self._bucket()
        try:
            self._revision = await kv.create(self._key, self._value, msg_ttl=self._ttl)
        except KeyWrongLastSequenceError:
            entry = await kv.get(self._key)
            holder: str = json.loads(entry.value or b"{}").get("holder", "?") if entry else "?"
            return holder
        self.token = self._revision
        self.lost = False
        return None

    async def acquire(self, wait: float | None = None) -> None:
        """Take the lease, waiting up to ``wait`` seconds (default: one TTL and a half)
        for a holder that crashed to time out; LeaseHeld if someone still holds it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._ttl * 1.5 if wait is None else wait)
        while True:
            holder = await self.try_acquire()
            if holder is None:
                return
            if loop.time() >= deadline:
                raise LeaseHeld(holder)
            await asyncio.sleep(0.5)

    async def renew(self) -> bool:
        """Extend the lease; False (and ``lost``) if it is no longer ours."""
        try:
            ack = await self._js.publish(
                f"$KV.{BUCKET}.{self._key}",
                self._value,
                msg_ttl=self._ttl,
                headers={"Nats-Expected-Last-Subject-Sequence": str(self._revision)},
            )
            self._revision = ack.seq
            return True
        except Exception as exc:
            if not self.lost:
                log.error("lease renewal failed", key=self._key, error=repr(exc))
            self.lost = True
            return False

    async def keep(self, background: Background) -> None:
        """Renew every third of the TTL until stopped; mark ``lost`` if renewal fails."""
        while await background.sleep(self._ttl / 3):
            await self.renew()

    async def release(self) -> None:
        try:
            kv = await self._js.key_value(BUCKET)
            await kv.delete(self._key, last=self._revision)
        except Exception as exc:
            log.debug("lease release failed", error=repr(exc))
