// Backoff with full jitter and the close-code policy (docs/protocol.md section 10).
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { _internal } from "../../gateway/static/client.js";

const { backoffDelay, closePolicy, ReconnectPlanner, DEFAULT_BACKOFF } = _internal;
const almostOne = () => 0.999999;

describe("backoffDelay", () => {
  it("grows by 1.5 from 1 s and stops at 30 s", () => {
    const ceilings = Array.from({ length: 12 }, (_, i) => backoffDelay(i, DEFAULT_BACKOFF, almostOne));
    assert.deepEqual(ceilings, [999, 1499, 2249, 3374, 5062, 7593, 11390, 17085, 25628, 29999, 29999, 29999]);
  });

  it("is full jitter: anywhere from 0 up to the ceiling", () => {
    assert.equal(backoffDelay(3, DEFAULT_BACKOFF, () => 0), 0);
    assert.equal(backoffDelay(3, DEFAULT_BACKOFF, () => 0.5), Math.floor(0.5 * 3375));
  });
});

describe("closePolicy", () => {
  it("follows the table of gateway/disconnect.py", () => {
    const table = {
      1000: "never", 1007: "never", 1008: "never", 1009: "never", 4403: "never",
      1011: "backoff", 1013: "backoff", 1012: "after_delay", 4401: "new_token",
      4408: "immediately", 4429: "long_backoff",
    };
    for (const [code, policy] of Object.entries(table)) assert.equal(closePolicy(Number(code)), policy, code);
  });

  it("reconnects with backoff after codes it does not know (1006: the connection dropped)", () => {
    for (const code of [1001, 1005, 1006, 1015, 4000]) assert.equal(closePolicy(code), "backoff");
  });
});

describe("ReconnectPlanner", () => {
  it("never reconnects after 1000, 1007, 1008, 1009 or 4403", () => {
    const planner = new ReconnectPlanner({}, () => 0.5);
    for (const code of [1000, 1007, 1008, 1009, 4403]) {
      assert.deepEqual(planner.plan(code, { canRefreshToken: true }), { reconnect: false, policy: "never", exhausted: false });
    }
    assert.equal(planner.failures, 0);
  });

  it("reconnects after 4401 only with a way to get a new token: at once, then with backoff", () => {
    const planner = new ReconnectPlanner({}, () => 0.5);
    assert.equal(planner.plan(4401).reconnect, false);
    const plan = planner.plan(4401, { canRefreshToken: true });
    assert.equal(plan.reconnect, true);
    assert.equal(plan.refreshToken, true);
    assert.equal(plan.delay, 0);
    assert.equal(planner.plan(4401, { canRefreshToken: true }).delay, 750, "a new token refused again");
  });

  it("waits exactly afterMs after 1012, or 1 to 5 s without a reconnect frame", () => {
    const planner = new ReconnectPlanner({}, () => 0.5);
    assert.equal(planner.plan(1012, { afterMs: 2417 }).delay, 2417);
    assert.equal(planner.plan(1012, { afterMs: 0 }).delay, 0);
    assert.equal(planner.plan(1012).delay, 3000);
    assert.equal(new ReconnectPlanner({}, () => 0).plan(1012).delay, 1000);
  });

  it("backs off for minutes after 4429", () => {
    assert.equal(new ReconnectPlanner({}, () => 0).plan(4429).delay, 60000);
    assert.equal(new ReconnectPlanner({}, almostOne).plan(4429).delay, 299999);
  });

  it("retries 4408 at once, then with backoff", () => {
    const planner = new ReconnectPlanner({}, almostOne);
    assert.equal(planner.plan(4408).delay, 0);
    assert.equal(planner.plan(4408).delay, 1499);
  });

  it("grows per failure, starts again after a welcome, and gives up after maxAttempts", () => {
    const planner = new ReconnectPlanner({ maxAttempts: 3 }, almostOne);
    assert.deepEqual([1, 2, 3].map(() => planner.plan(1006).delay), [999, 1499, 2249]);
    assert.deepEqual(planner.plan(1006), { reconnect: false, policy: "backoff", exhausted: true });
    planner.reset();
    const again = planner.plan(1006);
    assert.equal(again.attempt, 1);
    assert.equal(again.delay, 999);
  });

  it("is infinite by default", () => {
    const planner = new ReconnectPlanner({}, almostOne);
    for (let i = 0; i < 1000; i++) assert.equal(planner.plan(1006).reconnect, true);
    assert.equal(planner.plan(1006).delay, 29999);
  });

  it("honours maxAttempts 0: no reconnect at all", () => {
    assert.equal(new ReconnectPlanner({ maxAttempts: 0 }).plan(1006).exhausted, true);
  });
});
