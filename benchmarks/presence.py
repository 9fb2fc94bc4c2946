"""What the presence service sustains, measured against a real broker process.

The broker runs as a process (``rtgate broker``); simulated gateways in this
process speak the presence protocol to it over a real nats-server, exactly as
gateways do (broker/presence_wire.py), heartbeats with digests included.

1. Populate: 10 gateways x 1000 users, each user in 1 of 1000 rooms, sent as
   full syncs; prints how long the service takes to apply them.
2. Churn: connect/disconnect/join reports as fast as the service takes them,
   batched as a busy gateway batches them (``--batch``, default 100 per
   message) and one per message (an idle gateway); prints inputs per second
   and per broker CPU-second. Every input is journaled before it is applied.
3. Dead gateway: one gateway with ``--dead-users`` (default 5000) users stops
   heartbeating; prints the time until the last of them is announced offline,
   against the stated bound (missed heartbeats x heartbeat + grace).

Usage: .venv/bin/python benchmarks/presence.py [--churn 30000] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nats
from nats.aio.client import Client as Nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import presence_wire as wire
from broker import subjects
from broker.presence_state import GatewayDigest
from rtgate.natsserver import NatsServer, env_without_rtgate, free_port

HEARTBEAT = 1.0
MISSED = 3
GRACE = 1.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


async def until(check: object, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("the presence service did not catch up")
        await asyncio.sleep(0.01)


class SimGateway:
    """A gateway's presence reporting without WebSockets."""

    def __init__(self, nc: Nats, name: str) -> None:
        self.nc = nc
        self.name = name
        self.digest = GatewayDigest()
        self.conns: dict[str, tuple[str, str, set[str]]] = {}
        self.beating = True
        self.last_beat = 0.0

    def connect(self, conn: str, user: str, room: str) -> list[wire.Change]:
        self.conns[conn] = (user, user, {room})
        self.digest.add_connection(conn, user, user)
        self.digest.add_room(conn, room)
        return [
            wire.Change("connect", conn, user, user),
            wire.Change("join", conn, user, user, room),
        ]

    def disconnect(self, conn: str) -> list[wire.Change]:
        user, name, rooms = self.conns.pop(conn)
        for room in rooms:
            self.digest.remove_room(conn, room)
        self.digest.remove_connection(conn, user, name)
        return [wire.Change("disconnect", conn, user, name)]

    async def send(self, changes: list[wire.Change]) -> None:
        await self.nc.publish(
            subjects.presence_subject("events", self.name), wire.encode_changes(self.name, changes)
        )

    async def sync(self) -> None:
        for part in wire.encode_sync(self.name, self.conns):
            await self.nc.publish(subjects.presence_subject("sync", self.name), part)

    async def heartbeats(self) -> None:
        while self.beating:
            await self.nc.publish(
                subjects.presence_subject("heartbeat", self.name),
                wire.encode_heartbeat(self.name, self.digest.value, len(self.conns), HEARTBEAT),
            )
            self.last_beat = time.perf_counter()
            await asyncio.sleep(HEARTBEAT)


async def online(nc: Nats, user: str) -> bool:
    try:
        msg = await nc.request(
            subjects.PRESENCE_API_SUBJECT,
            json.dumps({"op": "users", "userIds": [user]}).encode(),
            timeout=5,
        )
    except Exception:
        return False
    return bool(json.loads(msg.data).get("online", {}).get(user))


async def churn(
    nc: Nats, gateways: list[SimGateway], total: int, batch: int, pid: int, tag: str
) -> None:
    """``total`` inputs: each step disconnects a connection and connects (and joins)
    a new one for the same user, in messages of ``batch`` changes."""
    counter = 0
    sent = 0
    pending: dict[str, list[wire.Change]] = {g.name: [] for g in gateways}
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    while sent < total:
        g = gateways[counter % len(gateways)]
        conn = next(iter(g.conns))
        user, _, rooms = g.conns[conn]
        changes = g.disconnect(conn) + g.connect(f"{conn}.{counter}", user, next(iter(rooms)))
        counter += 1
        sent += len(changes)
        queue = pending[g.name]
        for change in changes:
            queue.append(change)
            if len(queue) >= batch:
                await g.send(queue[:])
                queue.clear()
    for g in gateways:
        if pending[g.name]:
            await g.send(pending[g.name])
    sentinel = f"sentinel-{tag}"
    await gateways[0].send(gateways[0].connect(sentinel, sentinel, "sentinel-room"))
    while not await online(nc, sentinel):  # noqa: ASYNC110 (another process's state)
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    print(
        f"churn ({tag}, {batch} per message): {sent} inputs in {elapsed:.2f} s = "
        f"{sent / elapsed:,.0f} inputs/s; broker CPU {cpu:.2f} s = "
        f"{sent / max(cpu, 1e-9):,.0f} inputs per CPU-second"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--rooms", type=int, default=1_000)
    parser.add_argument("--churn", type=int, default=30_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--single", type=int, default=3_000, help="inputs sent one per message")
    parser.add_argument("--dead-users", type=int, default=5_000)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="rtgate-presence-bench-"))
    server = NatsServer(tmp / "nats")
    server.start()
    port = free_port()
    env = env_without_rtgate(
        {
            "RTGATE_NATS__URLS": server.url,
            "RTGATE_BROKER__PORT": str(port),
            "RTGATE_BROKER__STATE_DIR": str(tmp / "broker"),
            "RTGATE_BROKER__PERSIST": "false",
            "RTGATE_PRESENCE__HEARTBEAT_SECONDS": str(HEARTBEAT),
            "RTGATE_PRESENCE__MISSED_HEARTBEATS": str(MISSED),
            "RTGATE_PRESENCE__GRACE_SECONDS": str(GRACE),
            "RTGATE_PRESENCE__SETTLE_SECONDS": "0.2",
            "RTGATE_LOG__LEVEL": "warning",
        }
    )
    broker = subprocess.Popen(  # noqa: ASYNC220 (started once, before any load)
        [sys.executable, "-m", "rtgate.cli", "broker"], env=env
    )
    nc = await nats.connect(server.url, pending_size=64 * 1024 * 1024)
    tasks: list[asyncio.Task[None]] = []
    try:
        await until(lambda: _safe_metric(port, "rtgate_presence_active") == 1.0, 30)
        while not await _answers(nc):  # noqa: ASYNC110 (another process's state)
            await asyncio.sleep(0.05)

        per = args.users // 10
        gateways = [SimGateway(nc, f"sim{g}") for g in range(10)]
        for g_index, g in enumerate(gateways):
            for i in range(per):
                n = g_index * per + i
                g.connect(f"c{n}", f"user{n}", f"room{n % args.rooms}")
        t0, cpu0 = time.perf_counter(), cpu_seconds(broker.pid)
        for g in gateways:
            await g.sync()
            tasks.append(asyncio.get_running_loop().create_task(g.heartbeats()))
        await until(lambda: _safe_metric(port, "rtgate_presence_connections") == args.users)
        print(
            f"populate: {args.users} users in {args.rooms} rooms over 10 gateways applied "
            f"in {time.perf_counter() - t0:.2f} s (broker CPU "
            f"{cpu_seconds(broker.pid) - cpu0:.2f} s; gauges lag up to 0.25 s)"
        )

        await churn(nc, gateways, args.churn, args.batch, broker.pid, "batched")
        await churn(nc, gateways, args.single, 1, broker.pid, "single")

        doomed = SimGateway(nc, "doomed")
        for i in range(args.dead_users):
            doomed.connect(f"d{i}", f"dead{i}", f"room{i % args.rooms}")
        offline: list[float] = []
        watched = subjects.LIVE_PRESENCE_USER_PREFIX + "*"

        async def on_event(msg: object) -> None:
            data = json.loads(msg.data)  # type: ignore[attr-defined]
            if data["type"] == "user:offline" and data["data"]["userId"].startswith("dead"):
                offline.append(time.perf_counter())

        sub = await nc.subscribe(watched, cb=on_event)
        await doomed.sync()
        beat = asyncio.get_running_loop().create_task(doomed.heartbeats())
        # The users, the two churn sentinels, the doomed gateway's users.
        await until(
            lambda: (
                _safe_metric(port, "rtgate_presence_connections")
                == args.users + 2 + args.dead_users
            )
        )
        await asyncio.sleep(HEARTBEAT * 1.5)
        doomed.beating = False
        await beat
        last_beat = doomed.last_beat
        cpu0 = cpu_seconds(broker.pid)
        await until(lambda: len(offline) >= args.dead_users, 60)
        took = offline[-1] - last_beat
        bound = MISSED * HEARTBEAT + GRACE
        cpu = cpu_seconds(broker.pid) - cpu0
        print(
            f"dead gateway: {args.dead_users} users offline {took:.2f} s after its last "
            f"heartbeat (bound {bound:.1f} s + two 0.25 s ticks + publishing); first to "
            f"last offline "
            f"{offline[-1] - offline[0]:.3f} s; broker CPU {cpu:.2f} s"
        )
        await sub.unsubscribe()
    finally:
        for g in gateways if "gateways" in locals() else []:
            g.beating = False
        for task in tasks:
            task.cancel()
        await nc.close()
        broker.terminate()
        broker.wait(15)
        server.stop()


def _safe_metric(port: int, name: str) -> float:
    try:
        return metric(port, name)
    except OSError:
        return float("nan")


async def _answers(nc: Nats) -> bool:
    try:
        msg = await nc.request(
            subjects.PRESENCE_API_SUBJECT,
            json.dumps({"op": "users", "userIds": []}).encode(),
            timeout=1,
        )
    except Exception:
        return False
    return "online" in json.loads(msg.data)


if __name__ == "__main__":
    asyncio.run(main())
