"""The presence service's journal: every input, in order, before its events go out.

The active presence service appends each report it applies (and each tick
that changed something) to a JetStream stream, waits for the append to be
stored, and only then publishes the resulting events. A service taking over
restores the last snapshot and replays the journal after it, with the old
service's clock readings, so it knows exactly what was announced, up to the
last input, and announces nothing twice.

Appends carry the sequence the writer expects to be the stream's last. A new
active service appends a takeover mark first, so a former one that has not
noticed it lost the lease fails its next append (``Fenced``) and stops.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

import structlog
from nats.aio.client import Client as Nats
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from broker import jsread

log = structlog.get_logger("rtgate.presence")

STREAM = "RT_PRESENCE_LOG"
SUBJECT = "rt.presence-journal"
# A journal is trimmed at every snapshot; these bound it if snapshots fail.
MAX_AGE_SECONDS = 3600.0
MAX_BYTES = 256 * 1024 * 1024
_PAGE = 1000
# JetStream's error code for a wrong Nats-Expected-Last-Sequence.
_WRONG_LAST_SEQUENCE = 10071
# The kind of an entry holding several reports (``encode_batch``).
BATCH = "batch"
# The kind of an entry that drops a gateway's incomplete sync (its parts
# stopped arriving): a replay must forget the parts it has, as the service did.
SYNC_EXPIRED = "sync-expired"


class Fenced(Exception):
    """Someone else appended to the journal: another service is active now."""


class JournalGap(Exception):
    """Entries after the snapshot are gone (aged out): the journal cannot be replayed."""


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    now: float
    # A report kind (events, heartbeat, sync), "batch", "tick", "sync-expired" or "takeover".
    kind: str
    gateway: str
    report: Any


def encode(now: float, kind: str, gateway: str, report: bytes = b"null") -> bytes:
    """``report`` is the gateway's JSON message as received: embedded, not re-encoded."""
    head = json.dumps({"now": now, "kind": kind, "gateway": gateway})
    return head[:-1].encode() + b', "report": ' + report + b"}"


def encode_batch(now: float, reports: list[tuple[str, str, bytes]]) -> bytes:
    """Several reports received while the last append was in flight, as one
    entry of kind ``batch``: ``report`` is ``[[kind, gateway, report], ...]``."""
    items = [
        json.dumps([kind, gateway])[:-1].encode() + b", " + raw + b"]"
        for kind, gateway, raw in reports
    ]
    return encode(now, BATCH, "", b"[" + b", ".join(items) + b"]")


def unbatch(entry: Entry) -> list[tuple[str, str, Any]]:
    """The (kind, gateway, report) inputs of an entry, in order."""
    if entry.kind != BATCH:
        return [(entry.kind, entry.gateway, entry.report)]
    if not isinstance(entry.report, list):
        raise ValueError("a batch entry without a list of reports")
    out: list[tuple[str, str, Any]] = []
    for item in entry.report:
        if not isinstance(item, list) or len(item) != 3:
            raise ValueError("a batch item is not [kind, gateway, report]")
        out.append((str(item[0]), str(item[1]), item[2]))
    return out


class Journal:
    def __init__(self, nc: Nats, replicas: int, timeout: float, writer: str = "") -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=timeout)
        self._replicas = replicas
        self._timeout = timeout
        # The stream's last sequence as this writer knows it.
        self.last_seq = 0
        # Every entry's Nats-Msg-Id starts with this (unique per writer and
        # takeover), so the writer can recognise its own entries.
        self._writer = writer or secrets.token_hex(8)
        self._count = 0

    async def open(self) -> None:
        config = StreamConfig(
            name=STREAM,
            subjects=[SUBJECT],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=MAX_AGE_SECONDS,
            max_bytes=MAX_BYTES,
            num_replicas=self._replicas,
            allow_direct=True,
        )
        try:
            info = await self._js.stream_info(STREAM)
        except NotFoundError:
            try:
                info = await self._js.add_stream(config)
            except APIError:
                info = await self._js.stream_info(STREAM)  # created meanwhile
        self.last_seq = int(info.state.last_seq)

    async def append(self, entry: bytes) -> int:
        """Store one entry; ``Fenced`` if the stream moved on without us."""
        self._count += 1
        msg_id = f"{self._writer}-{self._count}"
        for _ in range(2):
            try:
                ack = await self._js.publish(
                    SUBJECT,
                    entry,
                    stream=STREAM,
                    headers={
                        "Nats-Expected-Last-Sequence": str(self.last_seq),
                        "Nats-Msg-Id": msg_id,
                    },
                )
            except APIError as exc:
                if exc.err_code != _WRONG_LAST_SEQUENCE:
                    raise
                # An earlier append of ours may have been stored after all (its
                # ack timed out): then the last entry is ours, not a successor's.
                last = await self._own_last()
                if last is None:
                    raise Fenced(str(exc)) from None
                self.last_seq = last
                continue
            self.last_seq = ack.seq
            return ack.seq
        raise Fenced("the journal keeps moving")

    async def _own_last(self) -> int | None:
        """The sequence of the journal's last entry if this writer wrote it."""
        msg = await jsread.get_one(self._nc, STREAM, self._timeout, last_by_subj=SUBJECT)
        if msg is None or not msg.headers:
            return None
        if not msg.headers.get("Nats-Msg-Id", "").startswith(self._writer + "-"):
            return None
        return int(msg.headers["Nats-Sequence"])

    async def after(self, seq: int) -> list[Entry]:
        """Every entry after ``seq``, in order; ``JournalGap`` if some are gone."""
        first = await jsread.first_seq(self._nc, STREAM, self._timeout)
        if first > seq + 1 and self.last_seq > seq:
            raise JournalGap(f"journal starts at {first}, the snapshot ends at {seq}")
        out: list[Entry] = []
        while True:
            page = await jsread.run_of(self._nc, STREAM, SUBJECT, seq, _PAGE, self._timeout)
            for stored in page:
                e = stored.event
                out.append(
                    Entry(
                        stored.seq,
                        float(e["now"]),
                        str(e["kind"]),
                        str(e["gateway"]),
                        e.get("report"),
                    )
                )
            if len(page) < _PAGE:
                return out
            seq = page[-1].seq

    async def trim(self, upto: int) -> None:
        """Forget entries up to ``upto`` (a snapshot covers them)."""
        try:
            await self._js.purge_stream(STREAM, seq=upto + 1)
        except Exception as exc:
            log.warning("presence journal trim failed", error=repr(exc))
