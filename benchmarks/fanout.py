"""Fan-out throughput and latency: rtgate (2 gateways on NATS) against a bare aiohttp server.

In one run, for each target:

* rtgate: one nats-server and ``--gateways`` (default two) ``python -m gateway``
  processes; the subscribers of one room are spread evenly over the gateways
  and the publishers alternate between them, so every message goes publisher
  -> gateway -> JetStream -> republish -> every gateway -> sockets.
* bare: one process of benchmarks/bare_server.py (frame built once, merged
  ``transport.write`` per loop iteration, no NATS, no auth).

Subscribers live in separate worker processes (raw asyncio + uvloop); one more
process publishes ``--rate`` messages per second in total, each with a
``--size``-byte content that starts with its send time (``time.time_ns()``,
the wall clock every process shares). The window runs from the first publish
until every expected delivery arrived (or ``--drain`` seconds after the last
publish). Server CPU is utime + stime from ``/proc/<pid>/stat`` over that
window, and write(2) calls come from ``/proc/<pid>/io``. The compared figure
is deliveries per CPU-second of the server processes: the gateways together
against the one bare process (the same deliveries either way); nats-server is
reported beside it. Everything shares one machine: the load generator
competes with the servers for the cores unless ``--pin`` separates them.

Run: ``.venv/bin/python benchmarks/fanout.py --subscribers 500 --rate 100 --duration 10``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from array import array
from pathlib import Path
from typing import Any

import loadgen
from loadgen import Children, cpu_seconds, cpu_times, expect, io_syscalls, start_members

TARGET_RATIO = 0.70


@dataclasses.dataclass
class Servers:
    sub_urls: list[str]
    pub_urls: list[str]
    # Processes whose CPU is the denominator of the comparison ...
    pids: dict[str, int]
    # ... and processes reported beside it (nats-server).
    extra_pids: dict[str, int]


@dataclasses.dataclass
class Result:
    target: str
    server_procs: int
    subscribers: int
    connected: int
    sent: int
    acked: int
    expected: int
    received: int
    publish_seconds: float
    window_seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu: dict[str, float]
    # System (kernel) share of server_cpu, summed over the server processes.
    server_sys: float
    # write(2)/writev(2) calls by the server processes in the window.
    server_writes: int
    extra_cpu: dict[str, float]
    client_cpu: float
    # CPU used on the machine by anything but the servers and the load generator: other
    # people's work competing for the cores (plus the benchmark's own parent process).
    other_cpu: float
    connect_seconds: float
    closed: int
    notes: list[str]

    @property
    def loss(self) -> int:
        return self.expected - self.received

    @property
    def deliveries_per_s(self) -> float:
        return self.received / self.publish_seconds if self.publish_seconds else 0.0

    @property
    def cpu(self) -> float:
        return sum(self.server_cpu.values())

    @property
    def per_cpu_s(self) -> float:
        return self.received / self.cpu if self.cpu else float("nan")

    @property
    def per_cpu_s_with_extra(self) -> float:
        total = self.cpu + sum(self.extra_cpu.values())
        return self.received / total if total else float("nan")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            loss=self.loss,
            deliveries_per_s=round(self.deliveries_per_s),
            server_cpu_total=round(self.cpu, 2),
            deliveries_per_server_cpu_s=round(self.per_cpu_s),
        )
        return d


def run_rtgate(children: Children, workdir: Path, args: argparse.Namespace) -> Result:
    nats = children.start_nats(workdir)
    per_conn = args.rate / args.publishers
    extra = {
        # Publishers send rate/publishers frames per second each; give them headroom.
        "RTGATE_LIMITS__RATE_PER_SECOND": str(max(20.0, 2 * per_conn)),
        "RTGATE_LIMITS__RATE_BURST": str(max(50, int(2 * per_conn))),
    }
    urls: list[str] = []
    pids: dict[str, int] = {}
    for i in range(1, args.gateways + 1):
        gw, url = loadgen.start_gateway(
            children, workdir, nats.url, f"bench-gw{i}", extra, args.source
        )
        urls.append(url)
        pids[f"gateway-{i}"] = gw.pid
    assert nats.proc is not None
    return measure(
        "rtgate", Servers(urls, urls, pids, {"nats-server": nats.proc.pid}), children, args
    )


def run_bare(children: Children, workdir: Path, args: argparse.Namespace) -> Result:
    bare, url = loadgen.start_bare(children, workdir)
    return measure("bare", Servers([url], [url], {"bare": bare.pid}, {}), children, args)


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def measure(target: str, servers: Servers, children: Children, args: argparse.Namespace) -> Result:
    pids = ", ".join(f"{k} {v}" for k, v in {**servers.pids, **servers.extra_pids}.items())
    print(f"{target} started: {pids}", flush=True)
    connect_started = time.monotonic()
    spec = {"urls": servers.sub_urls, "room": loadgen.ROOM, "concurrency": args.connect_concurrency}
    workers, connected, notes = start_members(
        children, spec, args.subscribers, args.workers, args.connect_timeout
    )
    connect_seconds = time.monotonic() - connect_started
    if connected == 0:
        raise RuntimeError(f"no subscriber could connect: {notes}")
    pub_proc, pub = children.worker(
        loadgen.publisher_worker,
        {"urls": servers.pub_urls, "publishers": args.publishers, "room": loadgen.ROOM},
    )
    ready = expect(pub, "ready", 30)
    if ready["connected"] != args.publishers:
        raise RuntimeError(f"publishers failed to connect: {ready['error']}")
    time.sleep(1.0)  # let the joins' traffic settle

    client_pids = {f"w{i}": p.pid for i, (p, _) in enumerate(workers) if p.pid is not None}
    if pub_proc.pid is not None:
        client_pids["publisher"] = pub_proc.pid
    server0, extra0, client0 = _cpu(servers.pids), _cpu(servers.extra_pids), _cpu(client_pids)
    busy0 = loadgen.machine_busy_seconds()
    sys0 = sum(cpu_times(pid)[1] for pid in servers.pids.values())
    writes0 = sum(io_syscalls(pid)[1] for pid in servers.pids.values())
    started = time.monotonic()
    pub.send(("go", args.rate, args.duration, args.size))
    published = expect(pub, "published", args.duration * 3 + 30)
    if published["ack_errors"]:
        notes.append(f"{published['ack_errors']} publishes refused: {published['first_error']}")
    publish_end = started + published["seconds"]
    expected = published["acked"] * connected
    received = 0
    while True:
        for _, pipe in workers:
            pipe.send(("report",))
        received = sum(expect(pipe, "report", 30)["received"] for _, pipe in workers)
        if received >= expected or time.monotonic() > publish_end + args.drain:
            break
        time.sleep(0.05)
    ended = time.monotonic()
    server1, extra1, client1 = _cpu(servers.pids), _cpu(servers.extra_pids), _cpu(client_pids)
    busy1 = loadgen.machine_busy_seconds()
    sys1 = sum(cpu_times(pid)[1] for pid in servers.pids.values())
    writes1 = sum(io_syscalls(pid)[1] for pid in servers.pids.values())

    latencies: array[int] = array("q")
    closed = 0
    received = 0
    for _, pipe in workers:
        pipe.send(("final",))
        final = expect(pipe, "final", 30)
        received += final["received"]
        closed += final["closed"]
        chunk: array[int] = array("q")
        chunk.frombytes(final["latencies_us"])
        latencies.extend(chunk)
    if closed:
        notes.append(f"{closed} subscriber connections were closed by the server")
    ordered = sorted(latencies)
    loadgen.end_workers(children, [*workers, (pub_proc, pub)])
    return Result(
        target=target,
        server_procs=len(servers.pids),
        subscribers=args.subscribers,
        connected=connected,
        sent=published["sent"],
        acked=published["acked"],
        expected=expected,
        received=received,
        publish_seconds=published["seconds"],
        window_seconds=ended - started,
        p50_ms=loadgen.percentile(ordered, 0.50) / 1000,
        p99_ms=loadgen.percentile(ordered, 0.99) / 1000,
        max_ms=(ordered[-1] / 1000) if ordered else float("nan"),
        server_cpu={k: round(server1[k] - server0[k], 2) for k in server0},
        server_sys=round(sys1 - sys0, 2),
        server_writes=writes1 - writes0,
        extra_cpu={k: round(extra1[k] - extra0[k], 2) for k in extra0},
        client_cpu=round(sum(client1[k] - client0[k] for k in client0), 2),
        other_cpu=round(
            busy1
            - busy0
            - sum(server1[k] - server0[k] for k in server0)
            - sum(extra1[k] - extra0[k] for k in extra0)
            - sum(client1[k] - client0[k] for k in client0),
            2,
        ),
        connect_seconds=round(connect_seconds, 2),
        closed=closed,
        notes=notes,
    )


def print_result(r: Result) -> None:
    procs = ", ".join(f"{k} {v:.2f}" for k, v in r.server_cpu.items())
    extra = ", ".join(f"{k} {v:.2f}" for k, v in r.extra_cpu.items()) or "-"
    print(
        f"--- {r.target}: {r.server_procs} server process(es), {r.connected}/{r.subscribers} "
        f"subscribers (connected in {r.connect_seconds:.1f}s)"
    )
    print(f"  messages        sent {r.sent}, acked {r.acked} in {r.publish_seconds:.2f}s")
    print(
        f"  deliveries      {r.received} of {r.expected} expected -> loss {r.loss}; "
        f"{r.deliveries_per_s:,.0f}/s ({r.deliveries_per_s / r.server_procs:,.0f}/s per "
        "server process)"
    )
    print(f"  latency         p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, max {r.max_ms:.2f} ms")
    print(
        f"  server CPU      {r.cpu:.2f} s ({r.server_sys:.2f} s system) over a "
        f"{r.window_seconds:.2f} s window ({procs}); beside it: {extra}"
    )
    if r.received:
        print(
            f"  per delivery    {r.cpu / r.received * 1e6:.1f} us server CPU "
            f"({(r.cpu - r.server_sys) / r.received * 1e6:.1f} user); "
            f"{r.server_writes / r.received:.2f} write syscalls (all sockets, NATS too)"
        )
    print(
        f"  per server CPU  {r.per_cpu_s:,.0f} deliveries per CPU-second"
        + (f" ({r.per_cpu_s_with_extra:,.0f} counting nats-server too)" if r.extra_cpu else "")
    )
    print(f"  load generator  {r.client_cpu:.2f} CPU-s (subscriber workers + publisher)")
    print(f"  other processes {r.other_cpu:.2f} CPU-s on the machine during the window")
    for note in r.notes:
        print(f"  NOTE            {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--subscribers", type=int, default=500)
    add("--rate", type=float, default=100.0, help="messages/s, all publishers")
    add("--duration", type=float, default=10.0, help="seconds of publishing")
    add("--size", type=int, default=200, help="content bytes per message")
    add("--publishers", type=int, default=2, help="publishers (alternating over the gateways)")
    add("--gateways", type=int, default=2, help="rtgate gateway processes (default 2)")
    add("--repeat", type=int, default=1, help="runs of each target")
    add(
        "--pin",
        action="store_true",
        help="pin the server processes (gateways and nats-server, or the bare "
        "server) to CPU 0 and the load generator to the other CPUs",
    )
    add(
        "--drain",
        type=float,
        default=5.0,
        help="max seconds to wait for deliveries after the last publish",
    )
    loadgen.add_common_arguments(parser)
    args = parser.parse_args()
    if args.size < 40:
        parser.error("--size must be at least 40 (the content carries the send time)")
    if args.pin and loadgen.cpu_count() < 2:
        parser.error("--pin needs at least 2 CPUs")
    describe = (
        f"{args.subscribers} subscribers, {args.rate:g} msg/s, {args.size} B content, "
        f"{args.duration:g} s, {args.publishers} publishers, {args.workers} subscriber "
        f"workers{'; servers pinned to CPU 0' if args.pin else ''}"
    )
    runs = 1 if args.only else 2
    timeout = args.timeout or 60 + args.repeat * runs * (args.duration * 2 + 60)
    results = loadgen.run_benchmark(
        "fanout",
        args,
        describe,
        args.subscribers * 2 + 1024,
        timeout,
        {"rtgate": run_rtgate, "bare": run_bare},
        print_result,
        args.repeat,
    )
    summarize(results, args)


def _median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def summarize(results: list[Result], args: argparse.Namespace) -> None:
    rt = [r for r in results if r.target == "rtgate"]
    bare = [r for r in results if r.target == "bare"]
    summary: dict[str, Any] = {
        "args": vars(args),
        "machine": loadgen.machine(),
        "results": [r.as_dict() for r in results],
    }
    if rt and bare:
        print("=== rtgate / bare")
        ratios = []
        for a, b in zip(rt, bare, strict=False):
            ratio = a.per_cpu_s / b.per_cpu_s
            ratios.append(ratio)
            with_nats = a.per_cpu_s_with_extra / b.per_cpu_s
            print(
                f"  deliveries per server CPU-second: {a.per_cpu_s:,.0f} / {b.per_cpu_s:,.0f}"
                f" = {ratio:.2f} (counting nats-server: {with_nats:.2f}); "
                f"p99 {a.p99_ms:.1f} vs {b.p99_ms:.1f} ms; loss {a.loss} vs {b.loss}; "
                f"other processes {a.other_cpu:.1f} / {b.other_cpu:.1f} CPU-s"
            )
        med = _median(ratios)
        verdict = "met" if med >= TARGET_RATIO else "NOT met"
        print(
            f"  ratio (median of {len(ratios)}): {med:.2f}; target >= {TARGET_RATIO:.2f}: {verdict}"
        )
        summary["ratio_median"] = med
    loadgen.write_json(args.json, summary)


if __name__ == "__main__":
    loadgen.entry("fanout", main)
