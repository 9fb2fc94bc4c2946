// The client against real gateway processes (started by tests/test_js_client.py):
// requests and typed errors, ack timeout, unsubscribe, the helpers, msgpack.
import { decode, encode } from "@msgpack/msgpack";
import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, it } from "node:test";
import { RtgateError } from "../../gateway/static/client.js";
import { nextEvent } from "../support/scripted-server.mjs";
import { Clients, contents, gateways, mint, skip, unique, until } from "../support/gateway.mjs";

let clients;
beforeEach(() => {
  clients = new Clients();
});
afterEach(() => clients.closeAll());

describe("requests against a gateway", { skip }, () => {
  it("resolve with the ack's data and reject with typed errors", async () => {
    const room = unique("room");
    const alice = await clients.connected(unique("alice"), {});
    const joined = await alice.join(room);
    assert.equal(joined.roomId, room);
    assert.ok(Number.isInteger(joined.offset) && typeof joined.epoch === "string");
    const sent = nextEvent(alice, "chat:message:sent");
    const message = await alice.sendMessage(room, "hello");
    assert.equal(message.content, "hello");
    assert.ok(message.offset > 0);
    assert.equal((await sent).id, message.id);
    assert.deepEqual(alice.positions.rooms[room], { offset: message.offset, epoch: message.epoch },
      "its own chat:message:sent counts");

    await assert.rejects(alice.sendMessage(unique("elsewhere"), "hi"),
      (err) => err instanceof RtgateError && err.code === "forbidden" && /join the room/.test(err.message));
    await assert.rejects(alice.sendMessage(room, "x".repeat(5000)), { code: "too_large" });
    await assert.rejects(alice.request("no:such:type", {}), { code: "bad_request" });
    const limited = await clients.connected(unique("limited"), { token: mint(unique("limited"), { rooms: ["team-*"] }) });
    await assert.rejects(limited.join("lobby"), { code: "forbidden" });
    assert.equal(alice.state, "connected");
  });

  it("time out when the gateway does not answer, and carry on when it does again", async () => {
    const { stall } = gateways;
    const client = await clients.connected(unique("stalled"), { urls: [stall.url] });
    assert.equal(await client.ping("warm"), "warm");
    process.kill(stall.pid, "SIGSTOP");
    try {
      await assert.rejects(client.ping("lost", { timeoutMs: 300 }), { name: "RtgateError", code: "timeout" });
    } finally {
      process.kill(stall.pid, "SIGCONT");
    }
    // The late ack of "lost" is ignored; the connection is fine.
    assert.equal(await client.ping("after"), "after");
    assert.equal(client.state, "connected");
  });

  it("stop calling a listener once unsubscribed", async () => {
    const room = unique("room");
    const alice = await clients.connected(unique("alice"));
    const bob = await clients.connected(unique("bob"), { urls: [gateways.urls[1]] });
    await alice.join(room);
    await bob.join(room);
    const heard = [];
    const off = bob.on("chat:message", (d) => heard.push(d.content));
    const all = [];
    bob.onAny((type, d) => type === "chat:message" && all.push(d.content));
    await alice.sendMessage(room, "one");
    await until(() => heard.length === 1);
    off();
    await alice.sendMessage(room, "two");
    await until(() => all.length === 2, "two reaching bob");
    assert.deepEqual(heard, ["one"]);
    assert.deepEqual(all, ["one", "two"]);
  });
});

describe("helpers against a gateway", { skip }, () => {
  it("direct, typing, history, presence and presence watches", async () => {
    const room = unique("room");
    const aliceId = unique("alice");
    const bobId = unique("bob");
    const alice = await clients.connected(aliceId);
    const bob = await clients.connected(bobId, { urls: [gateways.urls[1]] });
    await alice.join(room);
    await bob.join(room);

    const dm = nextEvent(bob, "direct:message");
    const sent = await alice.direct(bobId, "psst");
    assert.equal((await dm).id, sent.id);
    assert.deepEqual(bob.positions.direct, { offset: sent.offset, epoch: sent.epoch });

    const typing = nextEvent(bob, "chat:typing");
    alice.typing(room, true);
    assert.deepEqual(await typing, { roomId: room, userId: aliceId, username: aliceId, isTyping: true });

    await alice.sendMessage(room, "first");
    await alice.sendMessage(room, "second");
    const page = await alice.history({ roomId: room, limit: 10 });
    assert.deepEqual(page.items.map((i) => i.data.content), ["second", "first"]);

    // Presence is the presence service's view, one NATS hop behind the joins.
    await until(async () => (await alice.presence(room)).count === 2, "both in the room's presence");
    const members = (await alice.presence(room)).members.map((m) => m.userId).sort();
    assert.deepEqual(members, [aliceId, bobId].sort());
    const watch = await alice.presenceSubscribe([bobId]);
    assert.deepEqual(watch, { online: { [bobId]: true }, watching: 1 });
    const offline = nextEvent(alice, "user:offline");
    await bob.close();
    assert.equal((await offline).userId, bobId);
  });

  it("speaks msgpack when given an encoder", async () => {
    const room = unique("room");
    const alice = await clients.connected(unique("alice"), { format: "msgpack", msgpack: { encode, decode } });
    const bob = await clients.connected(unique("bob"), { urls: [gateways.urls[1]] });
    await alice.join(room);
    await bob.join(room);
    const got = contents(alice);
    await bob.sendMessage(room, "to msgpack");
    const stored = await alice.sendMessage(room, "from msgpack");
    assert.equal(stored.content, "from msgpack");
    await until(() => got.length === 1);
    assert.deepEqual(got, ["to msgpack"]);
    const page = await alice.history({ roomId: room });
    assert.deepEqual(page.items.map((i) => i.data.content), ["from msgpack", "to msgpack"]);
  });
});
