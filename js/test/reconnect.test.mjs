// Reconnecting against real gateway processes: the offline queue across a dropped
// connection, failover to the second URL when the first gateway dies (resume, no loss,
// no duplicate), and tokens (4401, auth:expiring). The clients' timers run on a fake
// clock, so no test waits for a backoff.
import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, it } from "node:test";
import { FakeClock } from "../support/fake-clock.mjs";
import { nextEvent } from "../support/scripted-server.mjs";
import { Clients, contents, cuttable, gateways, mint, skip, unique, until } from "../support/gateway.mjs";

let clients;
beforeEach(() => {
  clients = new Clients();
});
afterEach(() => clients.closeAll());

describe("the offline queue against a gateway", { skip }, () => {
  it("keeps order, drops the oldest beyond queueLimit, and delivers the rest once", async () => {
    const room = unique("room");
    const clock = new FakeClock();
    const socket = cuttable();
    const alice = await clients.connected(unique("alice"), {
      WebSocket: socket.WebSocket, clock, random: () => 0.5, queueLimit: 5,
    });
    const bob = await clients.connected(unique("bob"), { urls: [gateways.urls[1]] });
    await alice.join(room);
    await bob.join(room);
    const heard = contents(bob);

    const reconnecting = nextEvent(alice, "reconnecting");
    socket.cut();
    const { delay } = await reconnecting;
    const sends = Array.from({ length: 7 }, (_, i) => alice.sendMessage(room, `m${i}`));
    assert.equal(alice.queued, 5);
    assert.equal(alice.dropped, 2);
    await assert.rejects(sends[0], { code: "queue_overflow" });
    await assert.rejects(sends[1], { code: "queue_overflow" });

    clock.advance(delay);
    const stored = await Promise.all(sends.slice(2));
    assert.deepEqual(stored.map((m) => m.content), ["m2", "m3", "m4", "m5", "m6"]);
    assert.ok(stored.every((m, i) => i === 0 || m.offset > stored[i - 1].offset), "stored in send order");
    await alice.sendMessage(room, "end");
    await until(() => heard.includes("end"));
    assert.deepEqual(heard, ["m2", "m3", "m4", "m5", "m6", "end"]);
  });
});

describe("failover", { skip }, () => {
  it("reconnects to the second URL when the first gateway dies, and resumes with no loss or duplicate", async () => {
    const room = unique("room");
    const clock = new FakeClock();
    const { victim } = gateways;
    const alice = await clients.connected(unique("alice"), {
      urls: [victim.url, gateways.urls[1]], clock, random: () => 0.5,
    });
    assert.equal(alice.welcome.gatewayId, victim.id);
    const bob = await clients.connected(unique("bob"));
    await alice.join(room);
    await bob.join(room);
    const aliceHeard = contents(alice);
    const bobHeard = contents(bob);
    const recovered = [];
    alice.on("recovered", (e) => recovered.push(e));
    const disconnects = [];
    alice.on("disconnect", (e) => disconnects.push(e));

    await bob.sendMessage(room, "b1");
    await until(() => aliceHeard.length === 1);

    const reconnecting = nextEvent(alice, "reconnecting");
    process.kill(victim.pid, "SIGKILL");
    const attempt = await reconnecting;
    assert.equal(attempt.url, gateways.urls[1]);
    assert.deepEqual(disconnects, [{ code: 1006, reason: "", willReconnect: true }]);
    // Sent while alice is away: hers waits in the queue, bob's are stored.
    const mine = alice.sendMessage(room, "a-offline");
    for (const text of ["b2", "b3", "b4"]) await bob.sendMessage(room, text);

    clock.advance(attempt.delay);
    await mine;
    assert.equal(alice.welcome.gatewayId, gateways.ids[1]);
    assert.deepEqual(recovered.filter((e) => e.roomId === room),
      [{ channel: `room:${room}`, roomId: room, recovered: true, missed: 3 }]);
    await bob.sendMessage(room, "b5");
    await alice.sendMessage(room, "a-end");
    await until(() => aliceHeard.includes("b5") && bobHeard.includes("a-end"));
    assert.deepEqual(aliceHeard, ["b1", "b2", "b3", "b4", "b5"]);
    assert.deepEqual(bobHeard, ["a-offline", "a-end"]);
  });
});

describe("tokens", { skip }, () => {
  it("after a 4401 gets a new token from tokenProvider and connects", async () => {
    const user = unique("alice");
    let calls = 0;
    const client = clients.make(user, {
      token: mint(user, {}, "not-the-gateway-secret-0123456789abcdef"),
      tokenProvider: async () => {
        calls += 1;
        return mint(user);
      },
      backoff: { baseMs: 50 },
    });
    const disconnects = [];
    client.on("disconnect", (d) => disconnects.push(d));
    const welcome = await client.connect();
    assert.equal(welcome.userId, user);
    assert.equal(calls, 1);
    assert.deepEqual(disconnects, [{ code: 4401, reason: "token signature invalid", willReconnect: true }]);
  });

  it("refreshes on auth:expiring and outlives the first token", async () => {
    const user = unique("alice");
    const exp = Math.floor(Date.now() / 1000) + 2;
    let calls = 0;
    const client = clients.make(user, {
      token: mint(user, { exp }),
      tokenProvider: async () => {
        calls += 1;
        return mint(user);
      },
    });
    const expiring = nextEvent(client, "auth:expiring");
    const disconnects = [];
    client.on("disconnect", (d) => disconnects.push(d));
    await client.connect();
    await expiring; // at once: the gateway warns 60 s ahead
    await until(() => calls === 1);
    // Past the first token's expiry the gateway would close with 4401 had it not been replaced.
    await until(() => Date.now() / 1000 > exp + 0.5, "the first token's expiry", 5000);
    assert.equal(await client.ping("still here"), "still here");
    assert.deepEqual(disconnects, []);
  });
});
