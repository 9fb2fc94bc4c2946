"""A real three-node NATS cluster from config/nats-cluster.conf: streams with
three replicas survive the loss of a node while messages flow. Every message
a client got an ok ack for reaches the room's other member and the broker's
store."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import KeyValueConfig, ObjectStoreConfig

from broker import subjects
from broker.persist import ACK_WAIT_SECONDS
from rtgate.natsserver import free_port
from tests.conftest import token, wait_until
from tests.natsconf import (
    BROKER_USER,
    GATEWAY_USER,
    PASSWORDS,
    ROUTE_PASSWORD,
    ConfiguredNats,
    cluster,
    user_env,
    wait_for_meta_leader,
)
from tests.procs import Procs
from tests.wsclient import Closed, WsClient

# Every service of a deployment shares its [streams] settings.
R3: dict[str, Any] = {
    "RTGATE_STREAMS__REPLICAS": "3",
    "RTGATE_NATS__ACK_TIMEOUT": "2",
    "RTGATE_NATS__REQUEST_TIMEOUT": "2",
}


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[ConfiguredNats]]:
    made = cluster(tmp_path)
    try:
        for node in made:
            node.start()
        wait_for_meta_leader(made)
        yield made
    finally:
        for node in made:
            node.stop()


async def _buckets_with_three_replicas(url: str) -> None:
    """What docs/load-balancing.md tells operators to do: the buckets rtgate would
    create with one replica, created beforehand with three, each by its user."""
    for user, make in (
        (BROKER_USER, "leases"),
        (GATEWAY_USER, "denylist"),
        (BROKER_USER, "presence"),
    ):
        nc = await nats.connect(url, user=user, password=PASSWORDS[user])
        try:
            js = nc.jetstream()
            if make == "leases":
                await js.create_key_value(
                    KeyValueConfig(bucket="rtgate_leases", history=1, replicas=3)
                )
            elif make == "denylist":
                await js.create_key_value(
                    KeyValueConfig(bucket="rtgate_denylist", history=1, replicas=3)
                )
            else:
                await js.create_object_store(
                    "rtgate_presence", config=ObjectStoreConfig(replicas=3)
                )
        finally:
            await nc.close()


async def _stream_leader(url: str) -> str:
    nc = await nats.connect(url, user=GATEWAY_USER, password=PASSWORDS[GATEWAY_USER])
    try:
        info = await nc.jetstream().stream_info(subjects.ROOMS_STREAM)
        assert info.config.num_replicas == 3
        assert info.cluster is not None and info.cluster.leader
        return info.cluster.leader
    finally:
        await nc.close()


def _stored_offsets(db: Path) -> set[int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT seq FROM messages WHERE stream = ?", (subjects.ROOMS_STREAM,)
        ).fetchall()
    return {int(r[0]) for r in rows}


async def test_acked_messages_survive_the_loss_of_a_nats_node(
    nodes: list[ConfiguredNats], tmp_path: Path
) -> None:
    urls = ",".join(node.url for node in nodes)
    await _buckets_with_three_replicas(nodes[0].url)
    procs = Procs(urls, tmp_path)
    clients: list[WsClient] = []
    try:
        procs.broker("b1", **user_env(BROKER_USER), **R3)
        ports = [
            procs.gateway(
                gw,
                **user_env(GATEWAY_USER),
                **R3,
                RTGATE_LIMITS__RATE_PER_SECOND="1000",
                RTGATE_LIMITS__RATE_BURST="1000",
            )[1]
            for gw in ("gw1", "gw2")
        ]
        for port, user in zip(ports, ("alice", "bob"), strict=True):
            client = await WsClient.connect(f"ws://127.0.0.1:{port}/ws", token=token(user))
            clients.append(client)
            await client.next("welcome")
            await client.ok("room:join", "lobby")
        alice, bob = clients
        victim_name = await _stream_leader(nodes[0].url)
        victim = next(n for n in nodes if n.name == victim_name.removeprefix("rtgate-"))

        acked: dict[int, dict[str, Any]] = {}  # offset -> message, every ok ack
        refused = 0
        after_kill = asyncio.Event()
        killed_at_count: int | None = None
        stop = asyncio.Event()

        async def send(i: int) -> None:
            nonlocal refused
            try:
                ack = await alice.request(
                    "chat:message", {"roomId": "lobby", "content": f"m{i}"}, timeout=10
                )
            except (TimeoutError, Closed):
                refused += 1
                return
            if not ack["ok"]:
                assert ack["error"]["code"] == "unavailable", ack
                refused += 1
                return
            message = ack["data"]["message"]
            acked[message["offset"]] = message
            if killed_at_count is not None and len(acked) >= killed_at_count + 50:
                after_kill.set()

        async def publish() -> None:
            # Up to 8 in flight, as a chatty client would have.
            window = asyncio.Semaphore(8)
            tasks: set[asyncio.Task[None]] = set()
            i = 0
            while not stop.is_set():
                await window.acquire()
                task = asyncio.ensure_future(send(i))
                task.add_done_callback(lambda _t: window.release())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
                await asyncio.sleep(0.005)  # a steady flow, not a flood
            await asyncio.gather(*tasks)

        flow = asyncio.ensure_future(publish())
        try:
            await wait_until(lambda: len(acked) >= 100, 10)
            killed_at_count = len(acked)
            killed = time.monotonic()
            victim.kill()
            # The flow goes on through the two remaining nodes.
            await asyncio.wait_for(after_kill.wait(), 20)
            outage = time.monotonic() - killed
        finally:
            stop.set()
            await flow
        assert len(acked) >= killed_at_count + 50

        # The last message makes bob's gateway fill any gap it has (live copies
        # are at most once; the stream has every message).
        last = (
            await alice.ok_once_available("chat:message", {"roomId": "lobby", "content": "end"})
        )["message"]
        acked[last["offset"]] = last
        await bob.next("chat:message", id=last["id"], timeout=10)
        got = [f["data"] for f in bob.take("chat:message")]
        ids = [d["id"] for d in got] + [last["id"]]
        assert len(ids) == len(set(ids)), "a message was delivered twice"
        missing = {m["id"] for m in acked.values()} - set(ids)
        assert not missing, f"acked but not delivered: {sorted(missing)}"

        # And the broker stored every one of them. A delivery to the broker that
        # was in flight through the killed node is redelivered after ack_wait.
        db = tmp_path / "b1" / "rtgate.sqlite3"
        try:
            await wait_until(
                lambda: set(acked) <= _stored_offsets(db), ACK_WAIT_SECONDS + 5, pause=0.1
            )
        except TimeoutError:
            missing = sorted(set(acked) - _stored_offsets(db))
            raise AssertionError(f"acked but not stored: offsets {missing}") from None
        print(
            f"acked {len(acked)}, refused {refused}, flow resumed {outage:.1f} s "
            f"after killing the stream leader {victim.name}"
        )
    finally:
        for client in clients:
            await client.close()
        procs.stop()


def test_a_node_without_the_route_password_cannot_join(
    nodes: list[ConfiguredNats], tmp_path: Path
) -> None:
    first = nodes[0]
    port, route, monitor = free_port(), free_port(), free_port()
    text = first.conf.read_text()
    text = re.sub(r"^listen: .*$", f"listen: 127.0.0.1:{port}", text, flags=re.MULTILINE)
    text = re.sub(r"^http: .*$", f"http: 127.0.0.1:{monitor}", text, flags=re.MULTILINE)
    text = re.sub(r"^  listen: .*$", f"  listen: 127.0.0.1:{route}", text, flags=re.MULTILINE)
    text = re.sub(
        r"^  store_dir: .*$", f'  store_dir: "{tmp_path / "rogue-store"}"', text, flags=re.MULTILINE
    )
    conf = tmp_path / "rogue.conf"
    conf.write_text(text)
    env = dict(
        first.env,
        RTGATE_NATS_SERVER_NAME="rogue",
        RTGATE_NATS_ROUTE_PASSWORD="guess",
        RTGATE_NATS_ROUTES=first.env["RTGATE_NATS_ROUTES"].replace(ROUTE_PASSWORD, "guess"),
    )
    rogue = ConfiguredNats("rogue", conf, port, monitor, tmp_path / "rogue.log", env)
    rogue.start()
    try:
        deadline = time.monotonic() + 10
        # The refusal is only in the logs: poll them.
        while "Authorization Violation" not in rogue.log.read_text():
            assert time.monotonic() < deadline, rogue.log.read_text()
            time.sleep(0.05)
        assert rogue.monitor("/routez")["num_routes"] == 0
        names = {r["remote_name"] for r in first.monitor("/routez")["routes"]}
        assert names == {"rtgate-nats-2", "rtgate-nats-3"}
    finally:
        rogue.stop()
