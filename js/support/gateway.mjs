// The real gateways the pytest wrapper (tests/test_js_client.py) started, read from the
// environment, and small helpers for tests that talk to them.

import { createHmac, randomBytes } from "node:crypto";
import WebSocket from "ws";
import { RtgateClient } from "../../gateway/static/client.js";

const env = process.env;

/** Null when run without the wrapper (plain `npm test`): the gateway tests skip. */
export const gateways = env.RTGATE_TEST_URLS ? {
  urls: env.RTGATE_TEST_URLS.split(","),
  ids: (env.RTGATE_TEST_GATEWAY_IDS ?? "").split(","),
  secret: env.RTGATE_TEST_SECRET,
  victim: { url: env.RTGATE_TEST_VICTIM_URL, pid: Number(env.RTGATE_TEST_VICTIM_PID), id: env.RTGATE_TEST_VICTIM_ID },
  stall: { url: env.RTGATE_TEST_STALL_URL, pid: Number(env.RTGATE_TEST_STALL_PID) },
} : null;

export const skip = gateways ? false : "no gateway: run through pytest tests/test_js_client.py";

/** Names unique to this run, so that test files sharing the gateways never meet. */
export function unique(prefix) {
  return `${prefix}-${randomBytes(4).toString("hex")}`;
}

/** An HS256 JWT, as `rtgate token` mints them. */
export function mint(sub, claims = {}, secret = gateways?.secret) {
  const now = Math.floor(Date.now() / 1000);
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const head = part({ alg: "HS256", typ: "JWT" });
  const body = part({ sub, iat: now, exp: now + 3600, ...claims });
  const signature = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${signature}`;
}

/** Clients made by a test, closed by `closeAll`. */
export class Clients {
  list = [];

  make(user, options = {}) {
    const client = new RtgateClient({
      urls: [gateways.urls[0]], token: mint(user), WebSocket, ...options,
    });
    this.list.push(client);
    return client;
  }

  /** A connected client, resumed and ready. */
  async connected(user, options = {}) {
    const client = this.make(user, options);
    await client.connect();
    await until(() => client.state === "connected");
    return client;
  }

  async closeAll() {
    await Promise.all(this.list.map((c) => c.close()));
  }
}

/**
 * A WebSocket class whose sockets the test can cut (terminate: the client sees 1006, as
 * when a network drops), with the gateway left running.
 */
export function cuttable() {
  const sockets = [];
  class CuttableWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      sockets.push(this);
    }
  }
  return { WebSocket: CuttableWebSocket, cut: () => sockets.at(-1).terminate() };
}

/**
 * Wait until `check` holds. For state that follows frames already on their way, or
 * another process's view (the presence service); where an event exists, await it.
 */
export async function until(check, what = "condition", timeoutMs = 10000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Collect the `content` of every frame of `type` a client receives. */
export function contents(client, type = "chat:message") {
  const got = [];
  client.on(type, (data) => got.push(data.content));
  return got;
}
