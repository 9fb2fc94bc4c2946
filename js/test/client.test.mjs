// RtgateClient against a scripted server on a real socket, with a fake clock: reconnect
// timing, the close-code policy end to end, tokens, acks, the queue, pacing and recovery,
// without waiting for any backoff.
import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, it } from "node:test";
import WebSocket from "ws";
import { RtgateClient, RtgateError } from "../../gateway/static/client.js";
import { FakeClock } from "../support/fake-clock.mjs";
import { deadUrl, nextEvent, ScriptedServer } from "../support/scripted-server.mjs";

let server;
let clock;
let clients;

beforeEach(async () => {
  server = await ScriptedServer.start();
  clock = new FakeClock();
  clients = [];
});

afterEach(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await server.close();
});

function makeClient(options = {}) {
  const client = new RtgateClient({
    urls: [server.url], token: "t0", WebSocket, clock, random: () => 0.5, ...options,
  });
  clients.push(client);
  return client;
}

/** Connect and complete auth, welcome and the first resume. */
async function connected(options = {}, accept = {}) {
  const client = makeClient(options);
  const welcome = client.connect();
  const conn = await server.nextConnection();
  await conn.accept(accept);
  await welcome;
  await until(() => client.state === "connected", "the resume's ack");
  return { client, conn };
}

/** Cut a connection and accept the client's next one, 500 ms of backoff later. */
async function reconnected(client, conn) {
  conn.ws.terminate();
  await nextEvent(client, "reconnecting");
  clock.advance(500);
  const again = await server.nextConnection();
  await again.accept();
  return again;
}

/** Wait for a condition that follows a frame already on its way (a few event-loop turns). */
async function until(check, what = "condition") {
  for (let i = 0; i < 200; i++) {
    if (check()) return;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  assert.fail(`timed out waiting for ${what}`);
}

describe("connecting", () => {
  it("authenticates with the auth frame, never in the URL, and offers the JSON subprotocol", async () => {
    const client = makeClient();
    const welcomed = client.connect();
    const conn = await server.nextConnection();
    assert.equal(conn.requestUrl, "/ws");
    assert.equal(conn.protocol, "rtgate.v1.json");
    const { auth, resume } = await conn.accept();
    assert.deepEqual(auth.data, { token: "t0" });
    assert.equal((await welcomed).gatewayId, "scripted");
    // The first resume only learns where the inbox and global channel stand.
    assert.deepEqual(resume.data, { rooms: {}, direct: { offset: 0, epoch: "" }, global: { offset: 0, epoch: "" } });
  });

  it("tries the URLs in rotation with full-jitter backoff", async () => {
    const urls = [await deadUrl(), await deadUrl(), server.url];
    const client = makeClient({ urls });
    const attempts = [];
    client.on("reconnecting", (e) => attempts.push(e));
    const states = [];
    client.on("state", (s) => states.push(s.state));
    const welcomed = client.connect();
    await until(() => attempts.length === 1);
    assert.deepEqual(attempts[0], { attempt: 1, delay: 500, url: urls[1] });
    assert.deepEqual(clock.pending(), [500], "only the reconnect timer");
    clock.advance(499);
    assert.equal(attempts.length, 1, "not before the delay");
    clock.advance(1);
    await until(() => attempts.length === 2);
    assert.deepEqual(attempts[1], { attempt: 2, delay: 750, url: urls[2] });
    clock.advance(750);
    await (await server.nextConnection()).accept();
    await welcomed;
    await until(() => client.state === "connected");
    const changes = states.filter((state, i) => state !== states[i - 1]);
    assert.deepEqual(changes, ["connecting", "reconnecting", "connected"]);
  });

  it("gives up after maxAttempts: reconnect_failed, connect() rejects, queued requests fail", async () => {
    const client = makeClient({ urls: [await deadUrl()], backoff: { maxAttempts: 2 } });
    const failed = nextEvent(client, "reconnect_failed");
    const welcomed = client.connect();
    const queued = client.join("lobby");
    for (let i = 0; i < 2; i++) {
      await nextEvent(client, "reconnecting");
      clock.advance(30000);
    }
    assert.deepEqual(await failed, { attempts: 2 });
    await assert.rejects(welcomed, { name: "RtgateError", code: "closed", message: /gave up after 2/ });
    await assert.rejects(queued, { code: "closed" });
    assert.equal(client.state, "closed");
  });
});

describe("the close-code policy", () => {
  for (const code of [1000, 1007, 1008, 1009, 4403]) {
    it(`never reconnects after ${code}: a final disconnect`, async () => {
      const { client, conn } = await connected({ tokenProvider: async () => "t1" });
      const disconnect = nextEvent(client, "disconnect");
      const pending = client.history({ roomId: "lobby" });
      await conn.next("history");
      conn.close(code, "bye");
      assert.deepEqual(await disconnect, { code, reason: "bye", willReconnect: false });
      await assert.rejects(pending, (err) => err instanceof RtgateError && err.code === "closed" && err.closeCode === code);
      assert.equal(client.state, "closed");
      assert.deepEqual(clock.pending(), [], "no timer left: nothing will reconnect");
    });
  }

  it("after 1012 waits exactly the afterMs of the reconnect frame", async () => {
    const { client, conn } = await connected();
    const reconnecting = nextEvent(client, "reconnecting");
    conn.send({ type: "reconnect", data: { afterMs: 2417 } });
    conn.close(1012, "service restart");
    assert.equal((await reconnecting).delay, 2417);
    const state = client.state;
    assert.equal(state, "reconnecting");
    clock.advance(2416);
    assert.equal(server.connections.length, 1);
    clock.advance(1);
    await (await server.nextConnection()).accept();
    await until(() => client.state === "connected");
  });

  it("after 4429 backs off for minutes", async () => {
    const { client, conn } = await connected();
    const reconnecting = nextEvent(client, "reconnecting");
    conn.close(4429, "too many connections");
    const { delay } = await reconnecting;
    assert.equal(delay, 180000, "uniform in [60 s, 300 s), random() = 0.5");
  });

  it("after 4401 asks the tokenProvider for a new token, then reconnects with it", async () => {
    let calls = 0;
    const { client, conn } = await connected({ tokenProvider: async () => `fresh-${++calls}` });
    assert.equal(calls, 0, "the given token is used first");
    const disconnect = nextEvent(client, "disconnect");
    conn.close(4401, "token expired");
    assert.deepEqual(await disconnect, { code: 4401, reason: "token expired", willReconnect: true });
    clock.advance(0); // no wait: the new token is the fix
    const again = await server.nextConnection();
    const { auth } = await again.accept();
    assert.deepEqual(auth.data, { token: "fresh-1" });
    assert.equal(calls, 1);
  });

  it("after 4401 without a tokenProvider stops: the same token would fail again", async () => {
    const client = makeClient();
    const welcomed = client.connect();
    const conn = await server.nextConnection();
    await conn.next("auth");
    conn.close(4401, "token signature invalid");
    await assert.rejects(welcomed, { code: "closed", closeCode: 4401, reason: "token signature invalid" });
  });

  it("reconnects with backoff after a dropped connection (1006)", async () => {
    const { client, conn } = await connected();
    const reconnecting = nextEvent(client, "reconnecting");
    conn.ws.terminate();
    assert.deepEqual(await reconnecting, { attempt: 1, delay: 500, url: server.url });
  });

  it("refreshes the token on auth:expiring without reconnecting", async () => {
    const { client, conn } = await connected({ tokenProvider: async () => "renewed" });
    conn.send({ type: "auth:expiring", data: { expiresAt: "2030-01-01T00:00:00.000Z" } });
    const refresh = await conn.next("auth");
    assert.deepEqual(refresh.data, { token: "renewed" });
    const refreshed = nextEvent(client, "token_refreshed");
    conn.ack(refresh.id, { userId: "alice" });
    await refreshed;
  });
});

describe("requests", () => {
  it("resolve with the ack's data or reject with the server's code", async () => {
    const { client, conn } = await connected();
    const ok = client.join("lobby");
    const join = await conn.next("room:join");
    conn.ack(join.id, { roomId: "lobby", offset: 41, epoch: "E1" });
    assert.deepEqual(await ok, { roomId: "lobby", offset: 41, epoch: "E1" });
    const bad = client.join("secret");
    conn.fail((await conn.next("room:join")).id, "forbidden", "token does not allow this room");
    await assert.rejects(bad, { name: "RtgateError", code: "forbidden", message: "token does not allow this room" });
  });

  it("time out on the client's clock", async () => {
    const { client, conn } = await connected();
    const slow = client.history({ roomId: "lobby" }, { timeoutMs: 2000 });
    const frame = await conn.next("history");
    clock.advance(1999);
    clock.advance(1);
    await assert.rejects(slow, { code: "timeout" });
    conn.ack(frame.id, { items: [] }); // late: ignored
    const next = client.ping("x");
    conn.ack((await conn.next("ping")).id, "x");
    assert.equal(await next, "x");
  });

  it("give durable sends a clientId and keep the caller's own", async () => {
    const { client, conn } = await connected();
    client.sendMessage("lobby", "hi").catch(() => {});
    client.sendMessage("lobby", "again", { clientId: "mine-1" }).catch(() => {});
    const [a, b] = [await conn.next("chat:message"), await conn.next("chat:message")];
    assert.match(a.data.clientId, /^[0-9a-f-]{32,36}$/);
    assert.equal(b.data.clientId, "mine-1");
  });

  it("refuse a frame over maxFrameBytes locally instead of being closed with 1009", async () => {
    const { client } = await connected({}, { limits: { maxFrameBytes: 1024 } });
    await assert.rejects(client.sendMessage("lobby", "x".repeat(2000)), { code: "too_large" });
    assert.equal(client.state, "connected");
  });

  it("can be aborted", async () => {
    const client = makeClient();
    const controller = new AbortController();
    const request = client.join("lobby", { signal: controller.signal });
    assert.equal(client.queued, 1);
    controller.abort();
    await assert.rejects(request, { code: "aborted" });
    assert.equal(client.queued, 0);
  });
});

describe("listeners", () => {
  it("on() returns the unsubscribe function; onAny sees every frame", async () => {
    const { client, conn } = await connected();
    const got = [];
    const any = [];
    const off = client.on("user:online", (d) => got.push(d.userId));
    const offAny = client.onAny((type, d) => any.push(`${type}:${d.userId}`));
    conn.send({ type: "user:online", data: { userId: "bob" } });
    await until(() => got.length === 1);
    off();
    conn.send({ type: "user:online", data: { userId: "carol" } });
    await until(() => any.length === 2);
    assert.deepEqual(got, ["bob"]);
    assert.deepEqual(any, ["user:online:bob", "user:online:carol"]);
    offAny();
  });

  it("a throwing listener breaks neither the client nor the other listeners", async () => {
    const { client, conn } = await connected();
    const logged = [];
    const original = console.error;
    console.error = (...args) => logged.push(args);
    try {
      const got = [];
      client.on("pong", () => {
        throw new Error("boom");
      });
      client.on("pong", (d) => got.push(d));
      conn.send({ type: "pong", data: 1 });
      await until(() => got.length === 1);
      assert.equal(logged.length, 1);
    } finally {
      console.error = original;
    }
  });
});

describe("the offline queue", () => {
  it("keeps frames in order while offline, drops the oldest when full, flushes after resume", async () => {
    const { client, conn } = await connected({ queueLimit: 3 });
    const join = client.join("lobby");
    conn.ack((await conn.next("room:join")).id, { roomId: "lobby", offset: 5, epoch: "E1" });
    await join;
    const reconnecting = nextEvent(client, "reconnecting");
    conn.ws.terminate();
    await reconnecting;
    const overflow = [];
    client.on("queue_overflow", (e) => overflow.push(e));
    const badges = [];
    client.on("state", (s) => badges.push(s));
    const sends = ["a", "b", "c", "d", "e"].map((text) => client.sendMessage("lobby", text));
    assert.equal(client.queued, 3);
    assert.equal(client.dropped, 2);
    assert.deepEqual(overflow, [{ dropped: 1, type: "chat:message" }, { dropped: 2, type: "chat:message" }]);
    await assert.rejects(sends[0], { code: "queue_overflow" });
    await assert.rejects(sends[1], { code: "queue_overflow" });
    assert.deepEqual(badges.at(-1), { state: "reconnecting", retryInMs: 500, queued: 3 });

    clock.advance(500);
    const again = await server.nextConnection();
    const { resume } = await again.accept({ ackResume: false });
    // Nothing from the queue goes before the resume's ack: rooms are joined first.
    assert.equal(client.queued, 3);
    assert.deepEqual(resume.data.rooms, { lobby: { offset: 5, epoch: "E1" } });
    again.ack(resume.id, { rooms: { lobby: { recovered: true, missed: 0, offset: 5, epoch: "E1" } } });
    const flushed = [await again.next("chat:message"), await again.next("chat:message"), await again.next("chat:message")];
    assert.deepEqual(flushed.map((f) => f.data.content), ["c", "d", "e"]);
    assert.deepEqual(again.frames.map((f) => f.type), ["auth", "resume", "chat:message", "chat:message", "chat:message"]);
    for (const f of flushed) again.ack(f.id, { message: { content: f.data.content } });
    assert.deepEqual((await Promise.all(sends.slice(2))).map((m) => m.content), ["c", "d", "e"]);
  });

  it("sends a durable frame whose ack was lost again with the same clientId", async () => {
    const { client, conn } = await connected();
    const sent = client.sendMessage("lobby", "hello");
    const first = await conn.next("chat:message");
    const again = await reconnected(client, conn);
    const retry = await again.next("chat:message");
    assert.equal(retry.data.clientId, first.data.clientId);
    const message = { roomId: "lobby", content: "hello", offset: 9, epoch: "E1" };
    again.ack(retry.id, { message });
    assert.deepEqual(await sent, message);
  });

  it("fails a frame that is not safe to send twice when its connection is lost", async () => {
    const { client, conn } = await connected();
    const event = client.roomEvent("lobby", "cursor:move", { x: 1 });
    await conn.next("room:event");
    conn.ws.terminate();
    await assert.rejects(event, { code: "disconnected" });
  });

  it("does not resend a durable frame first sent longer ago than the dedup window", async () => {
    const { client, conn } = await connected({}, { dedupWindowSeconds: 120 });
    const sent = client.sendMessage("lobby", "old");
    await conn.next("chat:message");
    conn.ws.terminate();
    await nextEvent(client, "reconnecting");
    clock.advance(200_000);
    const again = await server.nextConnection();
    await again.accept({ dedupWindowSeconds: 120 });
    await assert.rejects(sent, { code: "dedup_expired" });
    assert.equal(again.of("chat:message").length, 0);
  });

  it("paces the flush to welcome.limits so the server never refuses a frame", async () => {
    const limits = { ratePerSecond: 10, rateBurst: 5 };
    const client = makeClient();
    const sends = Array.from({ length: 12 }, (_, i) => client.ping(i).catch(() => {}));
    const welcomed = client.connect();
    const conn = await server.nextConnection();
    const arrivals = [];
    conn.ws.on("message", () => arrivals.push(clock.now()));
    await conn.accept({ limits });
    await welcomed;
    await until(() => client.state === "connected");
    for (let i = 0; i < 100 && conn.of("ping").length < 12; i++) {
      await new Promise((resolve) => setTimeout(resolve, 2)); // let the frames travel
      clock.advance(50);
    }
    assert.equal(conn.of("ping").length, 12);
    // The server's bucket: rate 10/s, burst 5, full when the socket opened.
    let tokens = 5;
    let at = arrivals[0];
    for (const t of arrivals) {
      tokens = Math.min(5, tokens + ((t - at) / 1000) * 10);
      at = t;
      assert.ok(tokens >= 1, `refused at ${t} ms`);
      tokens -= 1;
    }
    void sends;
  });
});

describe("recovery", () => {
  it("resumes rooms from their positions and reports recovered: false", async () => {
    const { client, conn } = await connected();
    const join = client.join("lobby");
    conn.ack((await conn.next("room:join")).id, { roomId: "lobby", offset: 5, epoch: "E1" });
    await join;
    conn.send({ type: "chat:message:sent", data: { roomId: "lobby", offset: 8, prevOffset: 5, epoch: "E1", content: "mine" } });
    await until(() => client.positions.rooms.lobby.offset === 8, "own message counted");
    conn.ws.terminate();
    await nextEvent(client, "reconnecting");
    const recovered = [];
    client.on("recovered", (e) => recovered.push(e));
    clock.advance(500);
    const again = await server.nextConnection();
    const { resume } = await again.accept({
      outcomes: { lobby: { recovered: false, missed: 0, offset: 30, epoch: "E1" } },
    });
    assert.deepEqual(resume.data.rooms, { lobby: { offset: 8, epoch: "E1" } });
    await until(() => recovered.length === 3);
    assert.deepEqual(recovered[0], { channel: "room:lobby", roomId: "lobby", recovered: false, missed: 0 });
    assert.deepEqual(client.positions.rooms.lobby, { offset: 30, epoch: "E1" });
  });

  it("fills a gap with room:join since and delivers in order, once", async () => {
    const { client, conn } = await connected();
    const join = client.join("lobby");
    conn.ack((await conn.next("room:join")).id, { roomId: "lobby", offset: 10, epoch: "E1" });
    await join;
    const seen = [];
    client.on("chat:message", (d) => seen.push(d.offset));
    const msg = (offset, prevOffset) => ({ type: "chat:message", data: { roomId: "lobby", offset, prevOffset, epoch: "E1" } });
    conn.send(msg(12, 10));
    conn.send(msg(20, 15)); // 15 never came
    const fill = (await conn.next("room:join"));
    assert.deepEqual(fill.data, { roomId: "lobby", since: { offset: 12, epoch: "E1" } });
    conn.send(msg(21, 20)); // live, while the fill runs: held
    conn.send(msg(15, 12)); // the replay
    conn.send(msg(20, 15));
    conn.send(msg(21, 20));
    conn.ack(fill.id, { roomId: "lobby", offset: 21, epoch: "E1", rooms: { lobby: { recovered: true, missed: 3, offset: 21, epoch: "E1" } } });
    await until(() => seen.length >= 4);
    conn.send(msg(22, 21));
    await until(() => seen.length >= 5);
    assert.deepEqual(seen, [12, 15, 20, 21, 22]);
  });

  it("subscribes presence watches again after a reconnect", async () => {
    const { client, conn } = await connected();
    const sub = client.presenceSubscribe(["bob", "carol"]);
    conn.ack((await conn.next("presence:subscribe")).id, { online: { bob: true, carol: false }, watching: 2 });
    await sub;
    const again = await reconnected(client, conn);
    const resub = await again.next("presence:subscribe");
    assert.deepEqual(resub.data.userIds.sort(), ["bob", "carol"]);
    const changes = [];
    client.onAny((type, d) => type.startsWith("user:") && changes.push([type, d]));
    again.ack(resub.id, { online: { bob: false, carol: true }, watching: 2 });
    await until(() => changes.length === 2);
    assert.deepEqual(changes, [
      ["user:offline", { userId: "bob", resubscribed: true }],
      ["user:online", { userId: "carol", resubscribed: true }],
    ]);
  });

  it("renews the other watches when some users no longer share a room", async () => {
    const { client, conn } = await connected();
    const sub = client.presenceSubscribe(["bob", "carol", "dave"]);
    conn.ack((await conn.next("presence:subscribe")).id, { online: { bob: true, carol: true, dave: false }, watching: 3 });
    await sub;
    const again = await reconnected(client, conn);
    const errors = [];
    client.on("error", (e) => errors.push(e));
    const first = await again.next("presence:subscribe");
    assert.deepEqual(first.data.userIds.sort(), ["bob", "carol", "dave"]);
    again.fail(first.id, "forbidden", "you share no room with: carol", { userIds: ["carol"] });
    const second = await again.next("presence:subscribe");
    assert.deepEqual(second.data.userIds.sort(), ["bob", "dave"]);
    // Meanwhile dave left too: refused again, for him.
    again.fail(second.id, "forbidden", "you share no room with: dave", { userIds: ["dave"] });
    const last = await again.next("presence:subscribe");
    assert.deepEqual(last.data.userIds, ["bob"]);
    const changes = [];
    client.onAny((type, d) => type.startsWith("user:") && changes.push([type, d]));
    again.ack(last.id, { online: { bob: false }, watching: 1 });
    await until(() => changes.length === 1);
    assert.deepEqual(changes, [["user:offline", { userId: "bob", resubscribed: true }]]);
    assert.deepEqual(errors.map((e) => [e.code, e.userIds]), [["forbidden", ["carol"]], ["forbidden", ["dave"]]]);
    // carol and dave are no longer watched: the next reconnect does not ask for them.
    const third = await reconnected(client, again);
    assert.deepEqual((await third.next("presence:subscribe")).data.userIds, ["bob"]);
  });

  it("delivers the inbox in order, once, when a live message beats the resume's replay", async () => {
    const { client, conn } = await connected();
    const got = [];
    client.on("direct:message", (d) => got.push(d.offset));
    const dm = (offset, prevOffset) => ({ type: "direct:message", data: { offset, prevOffset, epoch: "D1", content: `${offset}` } });
    conn.send(dm(7, 0));
    await until(() => got.length === 1);
    conn.ws.terminate();
    await nextEvent(client, "reconnecting");
    clock.advance(500);
    const again = await server.nextConnection();
    const { resume } = await again.accept({ ackResume: false });
    assert.deepEqual(resume.data.direct, { offset: 7, epoch: "D1" });
    again.send(dm(10, 9)); // live: the connection is in its inbox since authenticating
    again.send(dm(8, 7)); // the replay
    again.send(dm(9, 8));
    again.send(dm(10, 9));
    again.ack(resume.id, { rooms: {}, direct: { recovered: true, missed: 3, offset: 10, epoch: "D1" },
      global: { recovered: false, missed: 0, offset: 0, epoch: "G1" } });
    await until(() => client.state === "connected");
    again.send(dm(11, 10));
    await until(() => got.length === 5);
    assert.deepEqual(got, [7, 8, 9, 10, 11]);
  });
});

describe("typing", () => {
  it("is throttled on the wire and not queued while offline", async () => {
    const { client, conn } = await connected();
    for (let i = 0; i < 5; i++) client.typing("lobby", true);
    client.typing("lobby", false);
    clock.advance(500);
    await until(() => conn.of("chat:typing").length === 2);
    assert.deepEqual(conn.of("chat:typing").map((f) => f.data.isTyping), [true, false]);
    conn.ws.terminate();
    await nextEvent(client, "reconnecting");
    client.typing("lobby", true);
    assert.equal(client.queued, 0);
  });
});

describe("msgpack", () => {
  it("needs an encoder and offers the msgpack subprotocol", () => {
    assert.throws(() => new RtgateClient({ urls: [server.url], token: "t", WebSocket, format: "msgpack" }), TypeError);
  });
});

describe("close()", () => {
  it("rejects what is pending and queued, and stops every timer", async () => {
    const { client, conn } = await connected();
    const pending = assert.rejects(client.history({ roomId: "lobby" }), { code: "closed" });
    await conn.next("history");
    await client.close();
    await pending;
    await assert.rejects(client.join("x"), { code: "closed" });
    assert.equal(client.state, "closed");
    assert.deepEqual(clock.pending(), []);
  });
});

describe("liveness", () => {
  it("pings after a quiet heartbeat and drops a connection that does not answer", async () => {
    const { client, conn } = await connected({}, { heartbeatSeconds: 25 });
    clock.advance(24_999);
    assert.equal(conn.of("ping").length, 0);
    clock.advance(1);
    const ping = await conn.next("ping");
    conn.ack(ping.id, null);
    await until(() => clock.pending().includes(25_000), "the next quiet interval");
    clock.advance(10_000);
    const heard = nextEvent(client, "user:online");
    conn.send({ type: "user:online", data: { userId: "bob" } }); // any frame restarts the interval
    await heard;
    clock.advance(15_000);
    assert.equal(conn.of("ping").length, 1, "quiet for 15 s only");
    clock.advance(10_000);
    await conn.next("ping"); // not answered
    const disconnect = nextEvent(client, "disconnect");
    clock.advance(10_000);
    assert.deepEqual(await disconnect, { code: 1006, reason: "no answer to ping", willReconnect: true });
  });
});
