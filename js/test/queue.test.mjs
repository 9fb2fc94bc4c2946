// The offline queue, what may be resent, the dedup window, and rate pacing.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { _internal } from "../../gateway/static/client.js";

const { OutboundQueue, TokenBucket, isDurable, isRetriable, dedupExpired, PACE_RATE } = _internal;

const entry = (seq) => ({ seq, name: `m${seq}` });

describe("OutboundQueue", () => {
  it("keeps order and drops the oldest when full, counting them", () => {
    const q = new OutboundQueue(3);
    const dropped = [];
    for (let i = 0; i < 5; i++) dropped.push(...q.push(entry(i)));
    assert.deepEqual(q.items.map((e) => e.seq), [2, 3, 4]);
    assert.deepEqual(dropped.map((e) => e.seq), [0, 1]);
    assert.equal(q.dropped, 2);
    assert.equal(q.length, 3);
  });

  it("puts frames whose connection was lost back in their original place", () => {
    const q = new OutboundQueue(10);
    q.push(entry(5));
    q.push(entry(6));
    q.requeue([entry(2), entry(4)]);
    assert.deepEqual(q.items.map((e) => e.seq), [2, 4, 5, 6]);
  });

  it("applies the limit to requeued frames too", () => {
    const q = new OutboundQueue(2);
    q.push(entry(5));
    const dropped = q.requeue([entry(1), entry(2)]);
    assert.deepEqual(dropped.map((e) => e.seq), [1]);
    assert.deepEqual(q.items.map((e) => e.seq), [2, 5]);
  });

  it("with limit 0 keeps nothing", () => {
    const q = new OutboundQueue(0);
    assert.equal(q.push(entry(1)).length, 1);
    assert.equal(q.length, 0);
    assert.equal(q.dropped, 1);
  });

  it("removes and drains", () => {
    const q = new OutboundQueue(5);
    const a = entry(1);
    q.push(a);
    q.push(entry(2));
    assert.equal(q.remove(a), true);
    assert.equal(q.remove(a), false);
    assert.deepEqual(q.drain().map((e) => e.seq), [2]);
    assert.equal(q.length, 0);
  });
});

describe("what is sent again after a lost connection", () => {
  it("durable frames are chat, direct, global and durable room events", () => {
    assert.equal(isDurable("chat:message", { roomId: "a" }), true);
    assert.equal(isDurable("direct:message", {}), true);
    assert.equal(isDurable("broadcast:global", {}), true);
    assert.equal(isDurable("room:event", { durable: true }), true);
    assert.equal(isDurable("room:event", { durable: false }), false);
    assert.equal(isDurable("chat:typing", {}), false);
  });

  it("idempotent frames and durable frames with a clientId are resent; others fail", () => {
    for (const type of ["room:join", "room:leave", "history", "presence", "presence:subscribe", "ping"]) {
      assert.equal(isRetriable(type, {}), true, type);
    }
    assert.equal(isRetriable("chat:message", { clientId: "x" }), true);
    assert.equal(isRetriable("chat:message", {}), false);
    assert.equal(isRetriable("room:event", { durable: false, clientId: "x" }), false);
    assert.equal(isRetriable("chat:typing", {}), false);
    assert.equal(isRetriable("batch", []), false);
  });

  it("a durable frame first sent longer ago than the dedup window is not resent", () => {
    const window = 120_000;
    const sent = { durable: true, firstSentAt: 1000 };
    assert.equal(dedupExpired(sent, 1000 + 118_000, window), false);
    // A 2 s margin covers the resend's trip to the server.
    assert.equal(dedupExpired(sent, 1000 + 118_001, window), true);
    assert.equal(dedupExpired({ durable: true }, 1e9, window), false, "never sent: no risk");
    assert.equal(dedupExpired({ durable: false, firstSentAt: 0 }, 1e9, window), false);
  });
});

describe("TokenBucket", () => {
  it("paces below the welcome's limits", () => {
    const bucket = TokenBucket.forLimits({ ratePerSecond: 20, rateBurst: 50 }, 0);
    let sent = 0;
    while (bucket.take(0)) sent++;
    assert.equal(sent, 40);
    const wait = bucket.waitMs(0);
    assert.equal(wait, Math.ceil(1000 / (20 * PACE_RATE)));
    assert.equal(bucket.take(wait - 1), false);
    assert.equal(bucket.take(wait), true);
  });

  it("never lets more through than the server's own bucket would accept", () => {
    const limits = { ratePerSecond: 10, rateBurst: 5 };
    const client = TokenBucket.forLimits(limits, 0);
    let server = { tokens: 5, at: 0 };
    for (let now = 0; now < 10_000; now += 7) {
      if (!client.take(now)) continue;
      server.tokens = Math.min(5, server.tokens + ((now - server.at) / 1000) * 10);
      server.at = now;
      assert.ok(server.tokens >= 1, `the server would refuse the frame sent at ${now} ms`);
      server.tokens -= 1;
    }
  });

  it("keeps what was spent before the welcome's limits arrive", () => {
    const bucket = TokenBucket.forLimits(undefined, 0);
    bucket.force(0); // auth
    bucket.configure({ ratePerSecond: 10, rateBurst: 5 }, 0);
    assert.equal(bucket.burst, 4);
    assert.equal(bucket.tokens, 3);
  });

  it("lets forced frames go into debt, delaying the ones after", () => {
    const bucket = TokenBucket.forLimits({ ratePerSecond: 10, rateBurst: 2 }, 0);
    bucket.force(0);
    bucket.force(0);
    assert.equal(bucket.tokens, -1);
    assert.equal(bucket.waitMs(0), Math.ceil(2 / 9 * 1000));
  });
});
