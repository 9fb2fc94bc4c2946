// The typing throttle: at most one frame per interval, the last state always sent.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { _internal } from "../../gateway/static/client.js";

const { TypingThrottle } = _internal;

describe("TypingThrottle", () => {
  it("sends the first change at once and coalesces the rest of the interval", () => {
    const t = new TypingThrottle(500, 3000);
    assert.deepEqual(t.update("a", true, 0), { send: true });
    assert.deepEqual(t.update("a", false, 100), { wakeAt: 500 });
    assert.deepEqual(t.update("a", true, 200), { wakeAt: 500 });
    assert.deepEqual(t.update("a", false, 300), { wakeAt: 500 });
    assert.deepEqual(t.due("a", 500), { send: false }, "the latest state wins");
  });

  it("always delivers the closing false, however fast it toggles", () => {
    const t = new TypingThrottle(500, 3000);
    const sent = [];
    let wake = null;
    for (let now = 0; now <= 2000; now += 10) {
      if (wake !== null && now >= wake) {
        const r = t.due("a", now);
        wake = null;
        if (r.send !== undefined) sent.push(r.send);
      }
      const r = t.update("a", now !== 2000 && now % 20 === 0, now);
      if (r.send !== undefined) sent.push(r.send);
      if (r.wakeAt !== undefined) wake = r.wakeAt;
    }
    const r = t.due("a", 2500);
    if (r.send !== undefined) sent.push(r.send);
    assert.equal(sent.at(-1), false);
    assert.ok(sent.length <= 6, `${sent.length} frames in 2.5 s`);
  });

  it("does not repeat an unchanged state before repeatMs", () => {
    const t = new TypingThrottle(500, 3000);
    assert.deepEqual(t.update("a", true, 0), { send: true });
    assert.deepEqual(t.update("a", true, 600), {});
    assert.deepEqual(t.update("a", true, 2999), {});
    assert.deepEqual(t.update("a", true, 3000), { send: true }, "a keep-alive for receivers that expire");
  });

  it("drops a pending state that ends where it started", () => {
    const t = new TypingThrottle(500, 3000);
    t.update("a", true, 0);
    t.update("a", false, 100);
    t.update("a", true, 200);
    assert.deepEqual(t.due("a", 500), {});
  });

  it("throttles each room on its own and forgets everything on reset", () => {
    const t = new TypingThrottle(500, 3000);
    assert.deepEqual(t.update("a", true, 0), { send: true });
    assert.deepEqual(t.update("b", true, 0), { send: true });
    t.reset();
    assert.deepEqual(t.update("a", true, 1), { send: true });
  });
});
