// A WebSocket server on a real socket whose every answer the test scripts: close codes,
// reconnect frames, gaps, withheld acks. For the client behaviours a real gateway will
// not produce on demand. (Behaviour against a real gateway: gateway.test.mjs.)

import { once } from "node:events";
import net from "node:net";
import { WebSocketServer } from "ws";

export class ScriptedServer {
  /** @type {ScriptedConnection[]} */
  connections = [];
  #waiting = [];

  static async start() {
    const server = new ScriptedServer();
    server.wss = new WebSocketServer({
      host: "127.0.0.1",
      port: 0,
      // Pick the client's first offer, as the gateway does for the two it knows.
      handleProtocols: (protocols) => protocols.values().next().value ?? false,
    });
    await once(server.wss, "listening");
    server.url = `ws://127.0.0.1:${server.wss.address().port}/ws`;
    server.wss.on("connection", (ws, req) => {
      const conn = new ScriptedConnection(ws, req);
      server.connections.push(conn);
      const waiter = server.#waiting.shift();
      if (waiter) waiter(conn);
    });
    return server;
  }

  /** The next connection (one already made and not yet taken, or the next to come). */
  nextConnection() {
    const fresh = this.connections.find((c) => !c.taken);
    if (fresh) {
      fresh.taken = true;
      return Promise.resolve(fresh);
    }
    return new Promise((resolve) => this.#waiting.push((conn) => {
      conn.taken = true;
      resolve(conn);
    }));
  }

  async close() {
    for (const c of this.connections) c.ws.terminate();
    this.wss.close();
    await once(this.wss, "close");
  }
}

export class ScriptedConnection {
  /** Every frame received, in order. */
  frames = [];
  #waiting = [];
  taken = false;

  constructor(ws, req) {
    this.ws = ws;
    this.protocol = ws.protocol;
    this.requestUrl = req.url;
    this.closed = new Promise((resolve) => ws.on("close", (code) => resolve(code)));
    ws.on("message", (data) => {
      const frame = JSON.parse(data.toString());
      this.frames.push(frame);
      this.#waiting = this.#waiting.filter(({ test, resolve }) => {
        if (!test(frame)) return true;
        resolve(frame);
        return false;
      });
    });
  }

  /** The next frame of `type` not yet returned by next(). */
  next(type) {
    this.seen ??= new Set();
    const found = this.frames.find((f) => f.type === type && !this.seen.has(f));
    if (found) {
      this.seen.add(found);
      return Promise.resolve(found);
    }
    return new Promise((resolve) => this.#waiting.push({
      test: (f) => f.type === type && !this.seen.has(f),
      resolve: (f) => {
        this.seen.add(f);
        resolve(f);
      },
    }));
  }

  of(type) {
    return this.frames.filter((f) => f.type === type);
  }

  send(frame) {
    this.ws.send(JSON.stringify(frame));
  }

  ack(id, data = null) {
    this.send({ type: "ack", id, ok: true, data });
  }

  fail(id, code, message = code, extra = {}) {
    this.send({ type: "ack", id, ok: false, error: { code, message, ...extra } });
  }

  close(code, reason = "") {
    this.ws.close(code, reason);
  }

  /**
   * Answer auth with an ack and a welcome, and (unless ackResume is false) the resume with
   * every channel recovered where it was. Returns {auth, resume}.
   */
  async accept({ limits = {}, dedupWindowSeconds = 120, heartbeatSeconds = 25, outcomes = {}, ackResume = true } = {}) {
    const auth = await this.next("auth");
    this.ack(auth.id, { userId: "alice", username: "alice", expiresAt: null });
    this.send({ type: "welcome", data: {
      sessionId: "0123456789abcdef", userId: "alice", username: "alice", gatewayId: "scripted",
      heartbeatSeconds, dedupWindowSeconds,
      limits: { ratePerSecond: 20, rateBurst: 50, maxFrameBytes: 65536, maxContentBytes: 4096, maxRooms: 100, ...limits },
    } });
    const resume = await this.next("resume");
    if (!ackResume) return { auth, resume };
    const rooms = {};
    for (const [roomId, pos] of Object.entries(resume.data.rooms ?? {})) {
      rooms[roomId] = outcomes[roomId] ?? { recovered: pos.offset > 0, missed: 0, offset: pos.offset, epoch: pos.epoch || "E1" };
    }
    const ack = { rooms };
    for (const name of ["direct", "global"]) {
      const pos = resume.data[name];
      if (pos) ack[name] = outcomes[name] ?? { recovered: pos.offset > 0, missed: 0, offset: pos.offset, epoch: pos.epoch || "E1" };
    }
    this.ack(resume.id, ack);
    return { auth, resume };
  }
}

/** A ws:// URL where nothing listens: connecting fails at once. */
export async function deadUrl() {
  const server = net.createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  server.close();
  await once(server, "close");
  return `ws://127.0.0.1:${port}/ws`;
}

/** The next `event` of a client, as a promise. */
export function nextEvent(client, event, test = () => true) {
  return new Promise((resolve) => {
    const off = client.on(event, (data) => {
      if (!test(data)) return;
      off();
      resolve(data);
    });
  });
}
