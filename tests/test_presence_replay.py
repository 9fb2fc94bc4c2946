"""The presence service without NATS: a takeover's replay of the journal
reproduces what the last service announced (fed from journal entries directly;
these are the cases where the replay once diverged, found in review), and the
reports waiting for the journal stay bounded."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from broker import presence as presence_module
from broker import presence_journal
from broker import presence_wire as wire
from broker.presence import PresenceService
from broker.presence_journal import Entry
from broker.presence_state import PresenceConfig, PresenceState
from broker.settings import PresenceSettings

SETTINGS = PresenceSettings(heartbeat_seconds=5, missed_heartbeats=3, grace_seconds=1)


class _Journal:
    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries

    async def after(self, seq: int) -> list[Entry]:
        return [e for e in self.entries if e.seq > seq]


def _service() -> PresenceService:
    return PresenceService(None, SETTINGS, "c", CollectorRegistry())  # type: ignore[arg-type]


def _events(gateway: str, *changes: wire.Change) -> Any:
    return wire.parse(wire.encode_changes(gateway, list(changes)))


def _saved(state: PresenceState, clock: float, seq: int) -> dict[str, Any]:
    return {"holder": "a", "clock": clock, "journalSeq": seq, "state": state.snapshot(clock)}


def _entry(seq: int, raw: bytes) -> Entry:
    """A journal entry as the service wrote it."""
    e = json.loads(raw)
    return Entry(seq, e["now"], e["kind"], e["gateway"], e["report"])


def _config() -> PresenceConfig:
    return PresenceConfig(grace_seconds=1, heartbeat_seconds=5, missed_heartbeats=3)


async def test_entries_after_a_takeover_mark_run_on_the_next_services_clock() -> None:
    # Service A (clock near 1000) saved alice online; B took over (its clock near
    # 5), saw her disconnect and announced her offline; then C takes over.
    a = PresenceState(_config())
    a.connect("g1", "c1", "alice", "Alice", 1000.0)
    saved = _saved(a, 1000.0, 1)
    journal = _Journal(
        [
            Entry(2, 5.0, "takeover", "b", None),
            Entry(
                3,
                5.1,
                "events",
                "g1",
                _events("g1", wire.Change("disconnect", "c1", "alice", "Alice")),
            ),
            Entry(4, 6.2, "tick", "", None),  # grace (1 s) over: B announced the offline
        ]
    )
    state, exact = await _service()._rebuild(saved, journal, 42.0)  # type: ignore[arg-type]
    assert exact and state is not None
    assert not state.is_online("alice")
    assert state.tick(42.0 + 3600) == []  # nothing left to announce twice


async def test_a_journaled_tick_declares_the_same_death_on_replay() -> None:
    # g1 was last heard at 0; A saved at 14, and its tick at 15.1 declared g1 dead.
    a = PresenceState(_config())
    a.connect("g1", "c1", "bob", "Bob", 0.0)
    saved = _saved(a, 14.0, 1)
    journal = _Journal([Entry(2, 15.1, "tick", "", None), Entry(3, 16.2, "tick", "", None)])
    state, _ = await _service()._rebuild(saved, journal, 7.0)  # type: ignore[arg-type]
    assert state is not None
    assert not state.gateway_alive("g1") and not state.is_online("bob")


async def test_a_batch_entry_replays_its_reports_in_order() -> None:
    # Reports that arrived during one append share the next: alice connects on
    # g1 and g2, then g1's tab closes. Replayed, she is online with one socket
    # and nothing is left to announce.
    reports = [
        (
            "events",
            "g1",
            wire.encode_changes("g1", [wire.Change("connect", "c1", "alice", "Alice")]),
        ),
        (
            "events",
            "g2",
            wire.encode_changes("g2", [wire.Change("connect", "c2", "alice", "Alice")]),
        ),
        (
            "events",
            "g1",
            wire.encode_changes("g1", [wire.Change("disconnect", "c1", "alice", "Alice")]),
        ),
    ]
    entry = _entry(2, presence_journal.encode_batch(3.0, reports))
    assert entry.kind == presence_journal.BATCH and len(entry.report) == 3
    assert [k for k, _, _ in presence_journal.unbatch(entry)] == ["events"] * 3
    state, exact = await _service()._rebuild(
        None, _Journal([Entry(1, 1.0, "takeover", "a", None), entry]), 9.0
    )  # type: ignore[arg-type]
    assert exact and state is not None
    assert state.is_online("alice")
    assert state.socket_count("alice") == 1
    assert state.tick(9.0 + 3600) == []


def test_a_malformed_batch_entry_is_refused() -> None:
    for report in ({"not": "a list"}, [["events", "g1"]], ["x"]):
        with pytest.raises(ValueError):
            presence_journal.unbatch(Entry(1, 1.0, presence_journal.BATCH, "", report))


def _sync_part(gateway: str, part: int, parts: int, conn: str, user: str) -> Any:
    return {
        "gateway": gateway,
        "syncId": "s1",
        "part": part,
        "parts": parts,
        "connections": [[conn, user, user, ["lobby"]]],
    }


async def test_an_expired_sync_is_not_completed_by_a_late_part_on_replay() -> None:
    # Part 0 of 2 arrived, then nothing for 10 s: the service dropped the sync
    # (journaled). The late part 1 then started a new, incomplete assembly.
    journal = _Journal(
        [
            Entry(1, 1.0, "takeover", "a", None),
            Entry(2, 2.0, "sync", "g1", _sync_part("g1", 0, 2, "c1", "alice")),
            _entry(
                3,
                presence_journal.encode_batch(
                    12.5, [(presence_journal.SYNC_EXPIRED, "g1", b"null")]
                ),
            ),
            Entry(4, 13.0, "sync", "g1", _sync_part("g1", 1, 2, "c2", "bob")),
        ]
    )
    service = _service()
    state, exact = await service._rebuild(None, journal, 20.0)  # type: ignore[arg-type]
    assert exact and state is not None
    assert not state.is_online("alice") and not state.is_online("bob")


class _Msg:
    def __init__(self, subject: str, data: bytes) -> None:
        self.subject = subject
        self.data = data


async def test_reports_waiting_for_the_journal_are_bounded_in_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the byte bound the subscription callback waits (nats-py's pending
    limits take over) until the committer takes reports out."""
    report = wire.encode_heartbeat("g1", "d" * 16, 0, 5.0)
    monkeypatch.setattr(presence_module, "MAX_WAITING_BYTES", 3 * len(report))
    service = _service()
    service._committer = asyncio.get_running_loop().create_future()  # "leading"
    msg = _Msg("rt.presence.heartbeat.g1", report)
    for _ in range(3):
        await service._on_report(msg)  # type: ignore[arg-type]
    fourth = asyncio.ensure_future(service._on_report(msg))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert not fourth.done() and len(service._waiting) == 3
    # The committer takes a batch: room again.
    del service._waiting[:2]
    service._waiting_bytes -= 2 * len(report)
    service._has_room.set()
    await asyncio.wait_for(fourth, 1)
    assert len(service._waiting) == 2
    service._committer.cancel()
