"""The message store: one suite, run against SQLite and PostgreSQL alike.

PostgreSQL runs against a real server named by RTGATE_TEST_POSTGRES_DSN
(.ci/run sets it); each test gets a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker import settings, subjects
from broker.config import BrokerConfig, StoreSettings
from broker.store import (
    GLOBAL_CHANNEL,
    Channel,
    ChannelKind,
    Cursor,
    CursorError,
    PostgresStore,
    SqliteStore,
    Store,
    StoredMessage,
    StoreError,
    create_store,
    decode_cursor,
    encode_cursor,
    open_store,
)
from broker.store import postgres as pg_backend
from broker.store import sqlite as sqlite_backend

POSTGRES_DSN_ENV = "RTGATE_TEST_POSTGRES_DSN"
EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "broker.example.toml"

# Different lengths on purpose: as strings "9..." sorts after "1...", as numbers
# the newer incarnation is larger. The store must order them as numbers.
OLD_EPOCH = "999999999999999"
EPOCH = "1764331200123456"
NEW_EPOCH = "1764331300000000"


def room_msg(
    room: str, seq: int, *, epoch: str = EPOCH, prev: int = 0, user: str = "alice"
) -> StoredMessage:
    event = {
        "type": "chat:message",
        "data": {
            "roomId": room,
            "userId": user,
            "username": user.title(),
            "content": f"m{seq}",
            "timestamp": "2025-11-28T12:00:00.123Z",
            "id": subjects.message_id(epoch, seq),
            "offset": seq,
            "epoch": epoch,
            "prevOffset": prev,
        },
    }
    return StoredMessage(
        stream=subjects.ROOMS_STREAM,
        epoch=epoch,
        seq=seq,
        prev_seq=prev,
        subject=subjects.room_subject(room),
        kind="chat:message",
        room_id=room,
        from_user=user,
        to_user=None,
        event=event,
        stored_at=1764331200.25 + seq,
    )


def direct_msg(sender: str, recipient: str, seq: int, *, epoch: str = EPOCH) -> StoredMessage:
    event = {
        "type": "direct:message",
        "data": {
            "fromUserId": sender,
            "toUserId": recipient,
            "content": f"d{seq}",
            "id": subjects.message_id(epoch, seq),
            "offset": seq,
            "epoch": epoch,
            "prevOffset": 0,
        },
    }
    return StoredMessage(
        stream=subjects.DIRECT_STREAM,
        epoch=epoch,
        seq=seq,
        prev_seq=0,
        subject=subjects.direct_subject(recipient),
        kind="direct:message",
        room_id=None,
        from_user=sender,
        to_user=recipient,
        event=event,
        stored_at=1764331200.5,
    )


def global_msg(seq: int, *, epoch: str = EPOCH) -> StoredMessage:
    event = {
        "type": "global:message",
        "data": {
            "content": f"g{seq}",
            "id": subjects.message_id(epoch, seq),
            "offset": seq,
            "epoch": epoch,
            "prevOffset": seq - 1,
        },
    }
    return StoredMessage(
        stream=subjects.GLOBAL_STREAM,
        epoch=epoch,
        seq=seq,
        prev_seq=seq - 1,
        subject=subjects.GLOBAL_SUBJECT,
        kind="global:message",
        room_id=None,
        from_user="ops",
        to_user=None,
        event=event,
        stored_at=1764331200.75,
    )


def keys(items: list[StoredMessage]) -> list[tuple[str, str, int]]:
    return [(m.stream, m.epoch, m.seq) for m in items]


def newest_first(messages: list[StoredMessage]) -> list[StoredMessage]:
    return sorted(messages, key=lambda m: m.position, reverse=True)


async def walk(store: Store, channel: Channel, limit: int) -> list[StoredMessage]:
    """Every page of ``channel``, following nextCursor through its string form."""
    seen: list[StoredMessage] = []
    cursor: Cursor | None = None
    for _ in range(10_000):
        page = await store.page(channel, cursor, limit)
        assert len(page.items) <= limit
        seen.extend(page.items)
        if page.next_cursor is None:
            return seen
        assert page.items, "a cursor must come with items"
        cursor = decode_cursor(encode_cursor(page.next_cursor), channel)
    raise AssertionError("paging did not end")


# -- backends ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    # A new, unopened store on this test's database.
    make: Callable[[], Store]
    # Run one SQL statement outside the store; rows as tuples.
    raw: Callable[[str], Awaitable[list[tuple[Any, ...]]]]


def _sqlite_backend(path: Path) -> Backend:
    async def raw(statement: str) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
            return [tuple(row) for row in conn.execute(statement).fetchall()]

    return Backend("sqlite", lambda: SqliteStore(path), raw)


@contextlib.asynccontextmanager
async def _postgres_backend(dsn: str) -> AsyncIterator[Backend]:
    schema = f"rtgate_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        search_path = {"search_path": schema}

        async def raw(statement: str) -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(dsn, server_settings=search_path)
            try:
                return [tuple(row) for row in await conn.fetch(statement)]
            finally:
                await conn.close()

        yield Backend("postgres", lambda: PostgresStore(dsn, 2, server_settings=search_path), raw)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        yield _sqlite_backend(tmp_path / "state" / "rtgate.sqlite3")
        return
    dsn = os.environ.get(POSTGRES_DSN_ENV)
    if not dsn:
        pytest.skip(
            f"PostgreSQL store tests need a server: set {POSTGRES_DSN_ENV}, "
            f"e.g. postgresql://postgres@127.0.0.1:5432/test"
        )
    async with _postgres_backend(dsn) as found:
        yield found


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = backend.make()
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


# -- the shared suite ---------------------------------------------------------------


async def test_writes_are_idempotent(store: Store) -> None:
    batch = [room_msg("lobby", seq) for seq in range(1, 6)]
    assert await store.write(batch) == 5
    assert await store.write(batch) == 0  # a redelivered batch
    overlapping = [room_msg("lobby", seq) for seq in range(3, 9)]
    assert await store.write(overlapping) == 3
    # The same message twice in one batch is stored once.
    assert await store.write([room_msg("lobby", 9), room_msg("lobby", 9)]) == 1
    assert await store.write([]) == 0
    assert await store.count() == 9
    # Identity is (stream, epoch, seq): the same seq in another epoch or stream is new.
    assert await store.write([room_msg("lobby", 1, epoch=NEW_EPOCH), global_msg(1)]) == 2
    assert await store.count() == 11


async def test_page_newest_first_with_limit(store: Store) -> None:
    lobby = [room_msg("lobby", seq) for seq in range(1, 20, 2)]
    other = [room_msg("other", seq) for seq in range(2, 20, 2)]
    await store.write(lobby + other)
    room = Channel.room("lobby")
    page = await store.page(room, None, 3)
    # Read back exactly as written, event included.
    assert page.items == newest_first(lobby)[:3]
    assert [m.seq for m in page.items] == [19, 17, 15]
    assert page.next_cursor == Cursor(room, EPOCH, 15)
    second = await store.page(room, page.next_cursor, 3)
    assert [m.seq for m in second.items] == [13, 11, 9]
    # A limit covering everything: one page and no cursor.
    whole = await store.page(room, None, 10)
    assert [m.seq for m in whole.items] == list(range(19, 0, -2))
    assert whole.next_cursor is None
    empty = await store.page(Channel.room("empty"), None, 5)
    assert empty.items == [] and empty.next_cursor is None
    with pytest.raises(ValueError, match="limit"):
        await store.page(room, None, 0)
    with pytest.raises(ValueError, match="another channel"):
        await store.page(Channel.room("other"), page.next_cursor, 3)


async def test_walk_a_room_across_an_epoch_change(store: Store) -> None:
    # The stream was deleted and created again: seqs restart in a larger epoch.
    old = [room_msg("lobby", seq, epoch=OLD_EPOCH) for seq in range(1, 47, 2)]
    new = [room_msg("lobby", seq, epoch=NEW_EPOCH) for seq in range(1, 35, 2)]
    noise = [room_msg("other", seq, epoch=OLD_EPOCH) for seq in range(2, 47, 2)] + [
        room_msg("other", seq, epoch=NEW_EPOCH) for seq in range(2, 35, 2)
    ]
    await store.write(new[:5] + noise + old + new[5:])
    expected = keys(new[::-1] + old[::-1])
    for limit in (1, 5, 7, 17, 40, 100):
        seen = await walk(store, Channel.room("lobby"), limit)
        assert keys(seen) == expected, limit
    assert await store.count(Channel.room("lobby")) == len(old) + len(new)


async def test_direct_inbox_has_received_and_sent(store: Store) -> None:
    messages = [
        direct_msg("alice", "bob", 1),
        direct_msg("bob", "alice", 2),
        direct_msg("carol", "bob", 3),
        direct_msg("alice", "alice", 4),  # a note to oneself
        direct_msg("bob", "carol", 5),
        direct_msg("carol", "alice", 6),
        direct_msg("alice", "bob", 7, epoch=NEW_EPOCH),
    ]
    # A room message from alice is not in her inbox.
    await store.write([*messages, room_msg("lobby", 8)])
    for user, seqs in (
        ("alice", [7, 6, 4, 2, 1]),
        ("bob", [7, 5, 3, 2, 1]),
        ("carol", [6, 5, 3]),
        ("dave", []),
    ):
        inbox = Channel.direct(user)
        for limit in (1, 2, 3, 10):
            assert [m.seq for m in await walk(store, inbox, limit)] == seqs, (user, limit)
        assert await store.count(inbox) == len(seqs)
        assert all(
            inbox.includes(m) == (m.seq in seqs and m.stream == subjects.DIRECT_STREAM)
            for m in messages
        )
    first = await store.page(Channel.direct("alice"), None, 2)
    assert first.items == [messages[6], messages[5]]


async def test_global_channel(store: Store) -> None:
    news = [global_msg(seq, epoch=OLD_EPOCH) for seq in range(1, 8)]
    news += [global_msg(seq, epoch=NEW_EPOCH) for seq in range(1, 4)]
    await store.write([*news, room_msg("lobby", 1), direct_msg("a", "b", 1)])
    seen = await walk(store, GLOBAL_CHANNEL, 4)
    assert keys(seen) == keys(newest_first(news))
    assert await store.count(GLOBAL_CHANNEL) == 10
    assert await store.count() == 12


async def test_persisted_up_to_per_stream_and_epoch(store: Store) -> None:
    assert await store.persisted_up_to(subjects.ROOMS_STREAM, EPOCH) == 0
    await store.write(
        [
            room_msg("a", 3),
            room_msg("b", 9),
            room_msg("a", 5),
            room_msg("a", 2, epoch=NEW_EPOCH),
            direct_msg("x", "y", 4),
            global_msg(11, epoch=OLD_EPOCH),
        ]
    )
    assert await store.persisted_up_to(subjects.ROOMS_STREAM, EPOCH) == 9
    assert await store.persisted_up_to(subjects.ROOMS_STREAM, NEW_EPOCH) == 2
    assert await store.persisted_up_to(subjects.ROOMS_STREAM, OLD_EPOCH) == 0
    assert await store.persisted_up_to(subjects.DIRECT_STREAM, EPOCH) == 4
    assert await store.persisted_up_to(subjects.GLOBAL_STREAM, OLD_EPOCH) == 11
    assert await store.persisted_up_to(subjects.GLOBAL_STREAM, EPOCH) == 0
    with pytest.raises(ValueError, match="epoch"):
        await store.persisted_up_to(subjects.ROOMS_STREAM, "12x")


async def test_batch_of_1000_in_one_call(store: Store) -> None:
    batch = [room_msg(f"room-{seq % 7}", seq) for seq in range(1, 1001)]
    assert await store.write(batch) == 1000
    assert await store.count() == 1000
    assert await store.write(batch) == 0
    page = await store.page(Channel.room("room-3"), None, 100)
    assert page.items == newest_first([m for m in batch if m.room_id == "room-3"])[:100]
    assert await store.persisted_up_to(subjects.ROOMS_STREAM, EPOCH) == 1000


async def test_content_neither_backend_could_hold_as_is(store: Store) -> None:
    odd = room_msg("zoë 日本", 1)
    data = dict(odd.event["data"])
    # NUL (PostgreSQL text and JSONB refuse it), a lone surrogate (not UTF-8),
    # non-ASCII text and an emoji all come back exactly as sent.
    data["content"] = "nul \x00 surrogate \ud800 zoë 日本 🎉"
    odd = dataclasses.replace(odd, event={"type": "chat:message", "data": data})
    assert await store.write([odd]) == 1
    page = await store.page(Channel.room("zoë 日本"), None, 10)
    assert page.items == [odd]


async def test_schema_version_table_and_reopen(backend: Backend, store: Store) -> None:
    latest = len(sqlite_backend.MIGRATIONS)
    assert latest == len(pg_backend.MIGRATIONS)
    assert await store.schema_version() == latest
    assert await backend.raw("SELECT version FROM schema_version ORDER BY version") == [
        (v,) for v in range(1, latest + 1)
    ]
    await store.write([room_msg("lobby", 1)])
    await store.close()
    await store.close()  # harmless twice

    before = await backend.raw("SELECT version, applied_at FROM schema_version")
    again = backend.make()
    await again.open()  # nothing to migrate
    try:
        assert await backend.raw("SELECT version, applied_at FROM schema_version") == before
        assert await again.count() == 1
    finally:
        await again.close()

    # A database migrated by a newer rtgate is refused, not written to.
    await backend.raw(f"INSERT INTO schema_version (version, applied_at) VALUES ({latest + 1}, 0)")
    newer = backend.make()
    with pytest.raises(StoreError, match="newer than this rtgate knows"):
        await newer.open()
    await newer.close()


async def test_a_closed_store_says_so(backend: Backend) -> None:
    unopened = backend.make()
    with pytest.raises(StoreError, match="not open"):
        await unopened.write([room_msg("lobby", 1)])
    with pytest.raises(StoreError, match="not open"):
        await unopened.page(GLOBAL_CHANNEL, None, 1)
    await unopened.open()
    with pytest.raises(StoreError, match="already open"):
        await unopened.open()
    await unopened.close()
    with pytest.raises(StoreError, match="not open"):
        await unopened.count()


# -- cursors (pure) -----------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_cursor_round_trip() -> None:
    for channel in (
        Channel.room("lobby"),
        Channel.room("a.b@x.com ~ 日本"),
        Channel.direct("auth0|123"),
        GLOBAL_CHANNEL,
    ):
        cursor = Cursor(channel, EPOCH, 42)
        text = encode_cursor(cursor)
        assert text.replace("-", "").replace("_", "").isalnum()  # URL-safe, no padding
        assert decode_cursor(text, channel) == cursor
    assert Cursor(GLOBAL_CHANNEL, OLD_EPOCH, 9).position < Cursor(GLOBAL_CHANNEL, EPOCH, 1).position


@pytest.mark.parametrize(
    "text",
    [
        "",
        "!!!!",
        "abc",
        "a" * 5000,
        "eyJ2IjoxfQ==",  # padding is not part of the alphabet
        _b64(b"\xff\xfe"),
        _b64(b"not json"),
        _b64(b"[1,2,3]"),
        _b64(b'{"v":1,"k":"room","c":"lobby","e":"1"}'),
        _b64(b'{"v":1,"k":"room","c":"lobby","e":"1","s":2,"x":3}'),
        _b64(b'{"v":1,"k":"hall","c":"lobby","e":"1","s":2}'),
        _b64(b'{"v":1,"k":"room","c":"lobby","e":1,"s":2}'),
        _b64(b'{"v":1,"k":"room","c":"lobby","e":"01","s":2}'),
        _b64(b'{"v":1,"k":"room","c":"lobby","e":"1","s":0}'),
        _b64(b'{"v":1,"k":"room","c":"lobby","e":"1","s":true}'),
        _b64(b'{"v":1,"k":"room","c":"lobby","e":"1","s":"2"}'),
        _b64(b'{"v":1,"k":"room","c":"","e":"1","s":2}'),
        _b64(b'{"v":1,"k":"global","c":"x","e":"1","s":2}'),
    ],
)
def test_garbage_is_not_a_cursor(text: str) -> None:
    with pytest.raises(CursorError, match="not a valid cursor"):
        decode_cursor(text, Channel.room("lobby"))


def test_cursor_from_another_version() -> None:
    text = _b64(b'{"v":2,"k":"room","c":"lobby","e":"1","s":2}')
    with pytest.raises(CursorError, match="another version"):
        decode_cursor(text, Channel.room("lobby"))


def test_foreign_cursor() -> None:
    text = encode_cursor(Cursor(Channel.room("lobby"), EPOCH, 5))
    for other in (Channel.room("lobby2"), Channel.direct("lobby"), GLOBAL_CHANNEL):
        with pytest.raises(CursorError, match="foreign cursor"):
            decode_cursor(text, other)
    inbox = encode_cursor(Cursor(Channel.direct("alice"), EPOCH, 5))
    with pytest.raises(CursorError, match="foreign cursor"):
        decode_cursor(inbox, Channel.direct("bob"))
    assert issubclass(CursorError, ValueError)


# -- messages and channels (pure) ----------------------------------------------------


def test_stored_message_refuses_what_cannot_be_stored() -> None:
    good = room_msg("lobby", 1)
    for changes, needle in (
        ({"stream": "RT_OTHER"}, "stream"),
        ({"epoch": "01"}, "epoch"),
        ({"epoch": "-5"}, "epoch"),
        ({"epoch": "99999999999999999999"}, "epoch"),
        ({"seq": 0}, "seq"),
        ({"seq": True}, "seq"),
        ({"prev_seq": -1}, "prev_seq"),
        ({"room_id": None}, "room_id"),
        ({"room_id": "a\x00b"}, "NUL"),
        ({"from_user": "\ud800"}, "Unicode"),
        ({"subject": ""}, "subject"),
        ({"event": []}, "event"),
    ):
        with pytest.raises(ValueError, match=needle):
            dataclasses.replace(good, **changes)
    with pytest.raises(ValueError, match="to_user"):
        dataclasses.replace(direct_msg("a", "b", 1), to_user=None)
    # The columns that mark a channel imply the stream (the queries rely on it).
    with pytest.raises(ValueError, match="room_id is only for RT_ROOMS"):
        dataclasses.replace(global_msg(1), room_id="lobby")
    with pytest.raises(ValueError, match="to_user is only for RT_DIRECT"):
        dataclasses.replace(good, to_user="bob")


def test_channels() -> None:
    with pytest.raises(ValueError):
        Channel.room("")
    with pytest.raises(ValueError):
        Channel(ChannelKind.GLOBAL, "x")
    assert Channel.room("lobby").stream == subjects.ROOMS_STREAM
    assert Channel.direct("bob").stream == subjects.DIRECT_STREAM
    assert GLOBAL_CHANNEL.stream == subjects.GLOBAL_STREAM
    assert Channel.room("lobby").includes(room_msg("lobby", 1))
    assert not Channel.room("lobby").includes(room_msg("other", 1))
    assert GLOBAL_CHANNEL.includes(global_msg(1))
    assert not GLOBAL_CHANNEL.includes(room_msg("lobby", 1))


# -- configuration --------------------------------------------------------------------


def test_example_config_is_the_defaults() -> None:
    assert settings.load(BrokerConfig, EXAMPLE, {}) == BrokerConfig()
    text = EXAMPLE.read_text()
    for field in dataclasses.fields(StoreSettings):
        assert f"\n{field.name} = " in text, field.name


def test_store_settings() -> None:
    config = settings.load(BrokerConfig, None, {"RTGATE_BROKER__STATE_DIR": "/var/lib/rt"})
    assert config.store == StoreSettings()
    assert config.sqlite_file == Path("/var/lib/rt/rtgate.sqlite3")
    assert isinstance(create_store(config), SqliteStore)
    config = settings.load(BrokerConfig, None, {"RTGATE_STORE__SQLITE_PATH": "/tmp/x.db"})
    assert config.sqlite_file == Path("/tmp/x.db")
    config = settings.load(
        BrokerConfig,
        None,
        {
            "RTGATE_STORE__BACKEND": "postgres",
            "RTGATE_STORE__POSTGRES_DSN": "postgresql://u:p@db/rtgate",
            "RTGATE_STORE__POSTGRES_POOL_SIZE": "8",
        },
    )
    assert config.store.postgres_pool_size == 8
    assert isinstance(create_store(config), PostgresStore)
    for env, needle in (
        ({"RTGATE_STORE__BACKEND": "mysql"}, "store.backend must be sqlite or postgres"),
        ({"RTGATE_STORE__BACKEND": "postgres"}, "store.postgres_dsn must be set"),
        ({"RTGATE_STORE__POSTGRES_DSN": "postgresql://db/x"}, "store.backend is sqlite"),
        (
            {
                "RTGATE_STORE__BACKEND": "postgres",
                "RTGATE_STORE__POSTGRES_DSN": "postgresql://d",
                "RTGATE_STORE__POSTGRES_POOL_SIZE": "0",
            },
            "postgres_pool_size",
        ),
        ({"RTGATE_STORE__SQLITE": "x"}, r"store\.sqlite"),
    ):
        with pytest.raises(settings.ConfigError, match=needle):
            settings.load(BrokerConfig, None, env)


async def test_open_store_from_config(tmp_path: Path) -> None:
    config = settings.load(
        BrokerConfig, None, {"RTGATE_BROKER__STATE_DIR": str(tmp_path / "state")}
    )
    store = await open_store(config)
    try:
        assert await store.write([room_msg("lobby", 1)]) == 1
    finally:
        await store.close()
    assert (tmp_path / "state" / "rtgate.sqlite3").is_file()


async def test_unreachable_postgres_is_a_store_error() -> None:
    # Port 9 (discard) is closed on any sane test machine.
    store = PostgresStore("postgresql://nobody@127.0.0.1:9/none", connect_timeout=2)
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL"):
        await store.open()


async def test_json_events_stay_readable_in_the_database(backend: Backend, store: Store) -> None:
    await store.write([room_msg("zoë", 1)])
    (event,) = (await backend.raw("SELECT event FROM messages"))[0]
    assert "zoë" in event  # UTF-8 text, not \\u escapes
    assert json.loads(event) == room_msg("zoë", 1).event


async def test_prev_on_subject(store: Store) -> None:
    await store.write([room_msg("a", 1), room_msg("b", 2), room_msg("a", 4), room_msg("a", 7)])
    subject = room_msg("a", 1).subject
    epoch = room_msg("a", 1).epoch
    assert await store.prev_on_subject(subject, epoch, 7) == 4
    assert await store.prev_on_subject(subject, epoch, 4) == 1
    assert await store.prev_on_subject(subject, epoch, 1) == 0
