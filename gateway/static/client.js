// rtgate client: one dependency-free ES module for browsers and Node (protocol v1).
//
//   import { RtgateClient } from "https://your-gateway/client.js";
//   const client = new RtgateClient({ urls: ["wss://your-gateway/ws"], tokenProvider });
//   await client.connect();
//
// What it does for you (docs/client-js.md has the details, docs/protocol.md the wire):
// reconnects through a list of gateways with backoff and jitter, following the close-code
// table; authenticates with the `auth` frame (never a token in the URL); keeps an offline
// queue flushed after the rooms are resumed, paced to the server's rate limit; acks as
// Promises; resumes every room, the direct inbox and global messages from the last offsets
// it saw, and fills gaps it notices while connected.
//
// The decisions (backoff, close policy, queue, pacing, recovery, typing throttle) are plain
// synchronous classes at the top of this file, exported under `_internal` for the tests.
// `RtgateClient` below them only moves frames and timers.

/** @typedef {{offset: number, epoch: string}} Position */

/** The error of every rejected request: the server's `code` or one of the client's own. */
export class RtgateError extends Error {
  /**
   * @param {string} code e.g. "forbidden" from the server, or "timeout", "disconnected",
   *   "queue_overflow", "dedup_expired", "closed", "aborted", "too_large" from the client
   * @param {string} message for people; program against `code`
   * @param {Record<string, unknown>} [details] e.g. {closeCode, reason} for "closed"
   */
  constructor(code, message, details) {
    super(message);
    this.name = "RtgateError";
    this.code = code;
    if (details) Object.assign(this, details);
  }
}

// ---------------------------------------------------------------------------------------
// Backoff and the close-code policy (docs/protocol.md section 10, gateway/disconnect.py)
// ---------------------------------------------------------------------------------------

const DEFAULT_BACKOFF = Object.freeze({
  baseMs: 1000,
  factor: 1.5,
  capMs: 30000,
  maxAttempts: Infinity,
  // 4429 (too many connections): "minutes", uniformly in [longMinMs, longMaxMs).
  longMinMs: 60000,
  longMaxMs: 300000,
});

/**
 * Full jitter: uniform in [0, min(cap, base * factor^attempt)). `attempt` counts from 0.
 * @param {number} attempt
 * @param {{baseMs: number, factor: number, capMs: number}} backoff
 * @param {() => number} random
 */
function backoffDelay(attempt, backoff, random) {
  const ceiling = Math.min(backoff.capMs, backoff.baseMs * backoff.factor ** attempt);
  return Math.floor(random() * ceiling);
}

/** @typedef {"never"|"backoff"|"after_delay"|"new_token"|"long_backoff"|"immediately"} Policy */

/** @type {Map<number, Policy>} the "Reconnect" column of the close code table */
const CLOSE_POLICY = new Map([
  [1000, "never"], [1007, "never"], [1008, "never"], [1009, "never"],
  [1011, "backoff"], [1012, "after_delay"], [1013, "backoff"],
  [4401, "new_token"], [4403, "never"], [4408, "immediately"], [4429, "long_backoff"],
]);

/**
 * What to do after a close with `code`. Codes the table does not name (1006 for a dropped
 * or refused connection, 1001, 1005, ...) reconnect with backoff.
 * @param {number} code
 * @returns {Policy}
 */
function closePolicy(code) {
  return CLOSE_POLICY.get(code) ?? "backoff";
}

/**
 * Decides whether and when to reconnect. `failures` counts attempts since the last welcome.
 */
class ReconnectPlanner {
  /**
   * @param {Partial<typeof DEFAULT_BACKOFF>} [backoff]
   * @param {() => number} [random]
   */
  constructor(backoff = {}, random = Math.random) {
    this.backoff = { ...DEFAULT_BACKOFF, ...backoff };
    this.random = random;
    this.failures = 0;
  }

  /** A welcome arrived: the next drop starts again from the first step. */
  reset() {
    this.failures = 0;
  }

  /**
   * @param {number} code the close code (1006 when the connection failed or dropped)
   * @param {{afterMs?: number|null, canRefreshToken?: boolean}} [context] `afterMs` from the
   *   `reconnect` frame that preceded a 1012; `canRefreshToken`: a tokenProvider exists
   * @returns {{reconnect: false, policy: Policy, exhausted: boolean} |
   *   {reconnect: true, policy: Policy, exhausted: false, attempt: number, delay: number,
   *   refreshToken: boolean}}
   */
  plan(code, { afterMs = null, canRefreshToken = false } = {}) {
    const policy = closePolicy(code);
    // Never retry with the same token: without a provider a 4401 is final.
    if (policy === "never" || (policy === "new_token" && !canRefreshToken)) {
      return { reconnect: false, policy, exhausted: false };
    }
    if (this.failures >= this.backoff.maxAttempts) {
      return { reconnect: false, policy, exhausted: true };
    }
    const attempt = ++this.failures;
    let delay;
    if (policy === "after_delay") {
      // The gateway already drew afterMs at random; without one, 1 to 5 s as the table says.
      delay = Number.isFinite(afterMs) && /** @type {number} */ (afterMs) >= 0
        ? /** @type {number} */ (afterMs)
        : 1000 + Math.floor(this.random() * 4000);
    } else if (policy === "long_backoff") {
      const { longMinMs, longMaxMs } = this.backoff;
      delay = Math.floor(longMinMs + (longMaxMs - longMinMs) * this.random());
    } else if ((policy === "immediately" || policy === "new_token") && attempt === 1) {
      // Nothing to wait for: the new token (or prompt auth) is the fix. A repeat backs off.
      delay = 0;
    } else {
      delay = backoffDelay(attempt - 1, this.backoff, this.random);
    }
    return { reconnect: true, policy, exhausted: false, attempt, delay, refreshToken: policy === "new_token" };
  }
}

// ---------------------------------------------------------------------------------------
// Outbound: which frames are safe to send again, the offline queue, pacing
// ---------------------------------------------------------------------------------------

const DURABLE_TYPES = new Set(["chat:message", "direct:message", "broadcast:global"]);
// Sending these twice has the effect of sending them once, so a frame whose ack was lost
// with the connection is sent again after the reconnect.
const IDEMPOTENT_TYPES = new Set([
  "room:join", "room:leave", "history", "presence", "presence:users", "presence:subscribe",
  "presence:unsubscribe", "ping",
]);

/** @param {unknown} value @returns {value is Record<string, any>} */
function isObject(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/**
 * Stored by JetStream and deduplicated by `clientId`: chat, direct, global, durable room event.
 * @param {string} type @param {unknown} data
 */
function isDurable(type, data) {
  return DURABLE_TYPES.has(type) || (type === "room:event" && isObject(data) && data.durable === true);
}

/**
 * May this frame be sent again after its connection was lost before its ack?
 * @param {string} type @param {unknown} data
 */
function isRetriable(type, data) {
  return IDEMPOTENT_TYPES.has(type) || (isDurable(type, data) && isObject(data) && typeof data.clientId === "string");
}

const DEDUP_MARGIN_MS = 2000;

/**
 * A durable frame first sent longer ago than the server's dedup window may already be
 * stored, and the server would no longer recognise a resend as a retry. The margin covers
 * the network delay of the resend.
 * @param {{durable: boolean, firstSentAt?: number}} entry
 * @param {number} now
 * @param {number} windowMs the welcome's dedupWindowSeconds in ms
 */
function dedupExpired(entry, now, windowMs) {
  if (!entry.durable || entry.firstSentAt === undefined) return false;
  return now - entry.firstSentAt > windowMs - DEDUP_MARGIN_MS;
}

/**
 * Frames waiting to be sent, oldest first, at most `limit` (the oldest are dropped).
 * Entries need a numeric `seq` (creation order) so that frames whose connection was lost
 * go back in their original place.
 * @template {{seq: number}} T
 */
class OutboundQueue {
  /** @param {number} limit */
  constructor(limit) {
    this.limit = limit;
    /** @type {T[]} */
    this.items = [];
    this.dropped = 0;
  }

  get length() {
    return this.items.length;
  }

  /** @param {T} entry @returns {T[]} the entries dropped to make room */
  push(entry) {
    this.items.push(entry);
    return this.#trim();
  }

  /** @param {T[]} entries frames to send again, merged back by `seq` @returns {T[]} dropped */
  requeue(entries) {
    if (entries.length === 0) return [];
    this.items = [...entries, ...this.items].sort((a, b) => a.seq - b.seq);
    return this.#trim();
  }

  /** @returns {T | undefined} */
  peek() {
    return this.items[0];
  }

  /** @returns {T | undefined} */
  shift() {
    return this.items.shift();
  }

  /** @param {T} entry @returns {boolean} whether it was queued */
  remove(entry) {
    const index = this.items.indexOf(entry);
    if (index < 0) return false;
    this.items.splice(index, 1);
    return true;
  }

  /** @returns {T[]} everything, emptying the queue */
  drain() {
    const items = this.items;
    this.items = [];
    return items;
  }

  #trim() {
    const over = this.items.length - this.limit;
    if (over <= 0) return [];
    this.dropped += over;
    return this.items.splice(0, over);
  }
}

// The server's bucket fills from when our frame arrives, ours from when we send it; a
// network hiccup can bunch frames together. Pacing a little below the limit keeps that
// from ever spending the server's last token.
const PACE_RATE = 0.9;
const PACE_BURST = 0.8;

/** Token bucket mirroring the server's per-connection rate limit (welcome.limits). */
class TokenBucket {
  /** @param {number} ratePerSecond @param {number} burst @param {number} now ms */
  constructor(ratePerSecond, burst, now) {
    this.rate = ratePerSecond;
    this.burst = burst;
    this.tokens = burst;
    this.at = now;
  }

  /**
   * Paced below the advertised limits (PACE_RATE, PACE_BURST).
   * @param {{ratePerSecond?: number, rateBurst?: number} | undefined} limits
   * @param {number} now
   */
  static forLimits(limits, now) {
    const bucket = new TokenBucket(1, 1, now);
    bucket.configure(limits, now);
    bucket.tokens = bucket.burst;
    return bucket;
  }

  /**
   * Adopt the welcome's limits, keeping what was already spent on this connection.
   * @param {{ratePerSecond?: number, rateBurst?: number} | undefined} limits
   * @param {number} now
   */
  configure(limits, now) {
    this.#refill(now);
    const rate = limits?.ratePerSecond > 0 ? limits.ratePerSecond : 20;
    const burst = limits?.rateBurst >= 1 ? limits.rateBurst : 50;
    const spent = this.burst - this.tokens;
    this.rate = rate * PACE_RATE;
    this.burst = Math.max(1, Math.floor(burst * PACE_BURST));
    this.tokens = Math.min(this.burst, this.burst - spent);
  }

  /** @param {number} now @returns {boolean} a token was available and is now spent */
  take(now) {
    this.#refill(now);
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }

  /** Spend a token even if none is left (auth, resume): later frames wait longer. */
  force(now) {
    this.#refill(now);
    this.tokens -= 1;
  }

  /** @param {number} now @returns {number} ms until `take` can succeed */
  waitMs(now) {
    this.#refill(now);
    return this.tokens >= 1 ? 0 : Math.ceil(((1 - this.tokens) / this.rate) * 1000);
  }

  /** @param {number} now */
  #refill(now) {
    if (now > this.at) {
      this.tokens = Math.min(this.burst, this.tokens + ((now - this.at) / 1000) * this.rate);
    }
    this.at = now;
  }
}

// ---------------------------------------------------------------------------------------
// Recovery: positions per channel, gap detection, resume (docs/protocol.md section 7)
// ---------------------------------------------------------------------------------------

/** @type {Position} "no position": the channel is joined, nothing is replayed */
const NO_POSITION = Object.freeze({ offset: 0, epoch: "" });

/**
 * @typedef {{type: string, data: any}} Frame
 * @typedef {{recovered?: boolean, missed?: number, offset?: number, epoch?: string,
 *   error?: {code: string, message: string}}} Outcome
 * @typedef {{channel: string, roomId?: string, recovered: boolean, missed: number,
 *   error?: {code: string, message: string}, reason?: string}} RecoveredEvent
 */

/**
 * Tracks the last `{offset, epoch}` of every channel ("room:<id>", "direct", "global"),
 * drops copies it already has, and holds frames after a gap until the gap is filled.
 */
class Recovery {
  /** @param {{rooms?: Record<string, Position>, direct?: Position, global?: Position}} [seed] */
  constructor(seed) {
    /** @type {Map<string, Position>} */
    this.positions = new Map();
    /** Rooms to resume after a reconnect. @type {Set<string>} */
    this.rooms = new Set();
    /**
     * Channels being replayed (a gap fill, or a resume), with the live frames held
     * meanwhile: those that do not continue the chain wait for the replay's answer.
     * @type {Map<string, Frame[]>}
     */
    this.fills = new Map();
    for (const [roomId, pos] of Object.entries(seed?.rooms ?? {})) {
      this.rooms.add(roomId);
      if (isPosition(pos)) this.positions.set(roomKey(roomId), { ...pos });
    }
    for (const name of ["direct", "global"]) {
      const pos = seed?.[/** @type {"direct"|"global"} */ (name)];
      if (isPosition(pos)) this.positions.set(name, { ...pos });
    }
  }

  /**
   * The channel of a stored frame, or null for anything else (typing, presence, ephemeral
   * room events, acks).
   * @param {string} type @param {unknown} data
   */
  static channelOf(type, data) {
    if (!isObject(data) || !Number.isInteger(data.offset) || data.offset <= 0 ||
        typeof data.epoch !== "string") {
      return null;
    }
    switch (type) {
      case "chat:message":
      case "chat:message:sent":
      case "room:event":
        return typeof data.roomId === "string" ? roomKey(data.roomId) : null;
      case "direct:message":
        return "direct";
      case "global:message":
        return "global";
      default:
        return null;
    }
  }

  /**
   * Move a channel forward; a new epoch replaces the old position.
   * @param {string} channel @param {unknown} offset @param {unknown} epoch
   */
  advance(channel, offset, epoch) {
    if (!Number.isInteger(offset) || typeof epoch !== "string") return;
    const pos = this.positions.get(channel);
    if (!pos || pos.epoch !== epoch || /** @type {number} */ (offset) > pos.offset) {
      this.positions.set(channel, { offset: /** @type {number} */ (offset), epoch });
    }
  }

  /**
   * One frame from the server.
   * @param {Frame} frame
   * @returns {{deliver: Frame[], channel?: string, fill?: Position, epochChanged?: boolean}}
   *   `deliver`: frames to hand to the application now, in order; `fill`: a gap was seen,
   *   ask for a replay from this position (the frame is held until `endFill`)
   */
  receive(frame) {
    const channel = Recovery.channelOf(frame.type, frame.data);
    if (channel === null) return { deliver: [frame] };
    const { offset, epoch } = frame.data;
    const prev = Number.isInteger(frame.data.prevOffset) ? frame.data.prevOffset : 0;
    const pos = this.positions.get(channel);
    if (!pos || pos.epoch !== epoch) {
      // First sight of the channel, or its stream was created again: start from here.
      const epochChanged = pos !== undefined && pos.epoch !== "";
      const held = this.fills.get(channel) ?? [];
      this.fills.delete(channel);
      this.positions.set(channel, { offset, epoch });
      return { deliver: [...held, frame], channel, epochChanged };
    }
    if (offset <= pos.offset) return { deliver: [], channel }; // a copy we already have
    const held = this.fills.get(channel);
    if (held) {
      // While filling, the replay continues the chain; anything beyond it waits.
      if (prev <= pos.offset) {
        this.positions.set(channel, { offset, epoch });
        return { deliver: [frame], channel };
      }
      held.push(frame);
      return { deliver: [], channel };
    }
    if (prev > pos.offset) {
      this.fills.set(channel, [frame]);
      return { deliver: [], channel, fill: { offset: pos.offset, epoch: pos.epoch } };
    }
    this.positions.set(channel, { offset, epoch });
    return { deliver: [frame], channel };
  }

  /**
   * The fill's answer arrived (null: it failed). Returns the held frames still to deliver.
   * @param {string} channel @param {Outcome | null} outcome @returns {Frame[]}
   */
  endFill(channel, outcome) {
    const held = (this.fills.get(channel) ?? []).sort((a, b) => a.data.offset - b.data.offset);
    this.fills.delete(channel);
    const ok = outcome !== null && !outcome.error;
    // Recovered: the replay came before the answer and already covers the held frames.
    if (ok && outcome.recovered) this.advance(channel, outcome.offset, outcome.epoch);
    const out = [];
    for (const frame of held) {
      const pos = this.positions.get(channel);
      if (pos && pos.epoch === frame.data.epoch && frame.data.offset <= pos.offset) continue;
      out.push(frame);
      this.advance(channel, frame.data.offset, frame.data.epoch);
    }
    // Not recovered: what lies between is lost to live delivery (history has it).
    if (ok && !outcome.recovered) this.advance(channel, outcome.offset, outcome.epoch);
    return out;
  }

  /**
   * A resume is about to replay these channels. Live frames can come first (the inbox
   * and global channel are delivered from authentication on): hold those that do not
   * continue the chain, or the replay's older frames would look like copies.
   * @param {{rooms: Record<string, Position>, direct?: Position, global?: Position}} request
   */
  beginResume(request) {
    const channels = [...Object.keys(request.rooms).map(roomKey), "direct", "global"];
    for (const channel of channels) {
      if (this.positions.has(channel) && !this.fills.has(channel)) this.fills.set(channel, []);
    }
  }

  /** The `resume` frame's data: every room we are in, the inbox and global. */
  resumeRequest() {
    /** @type {Record<string, Position>} */
    const rooms = {};
    for (const roomId of this.rooms) rooms[roomId] = { ...(this.positions.get(roomKey(roomId)) ?? NO_POSITION) };
    return {
      rooms,
      direct: { ...(this.positions.get("direct") ?? NO_POSITION) },
      global: { ...(this.positions.get("global") ?? NO_POSITION) },
    };
  }

  /**
   * Take the positions from a resume ack.
   * @param {{rooms: Record<string, Position>, direct?: Position, global?: Position}} request
   * @param {any} data the ack's data
   * @returns {{events: RecoveredEvent[], deliver: Frame[]}} held frames to deliver, then
   *   one event per channel
   */
  applyResume(request, data) {
    /** @type {RecoveredEvent[]} */
    const events = [];
    /** @type {Frame[]} */
    const deliver = [];
    for (const roomId of Object.keys(request.rooms)) {
      /** @type {Outcome} */
      const outcome = data?.rooms?.[roomId] ??
        { recovered: false, error: { code: "internal", message: "the resume ack has no entry for this room" } };
      const channel = roomKey(roomId);
      if (outcome.error) {
        // unavailable: the room can still be joined later (the client tries room:join
        // with since); forbidden, limit_exceeded: it is not ours any more.
        deliver.push(...this.endFill(channel, null));
        if (outcome.error.code !== "unavailable") this.forgetRoom(roomId);
      } else {
        this.rooms.add(roomId);
        deliver.push(...this.endFill(channel, outcome));
      }
      events.push(recoveredEvent(channel, outcome, roomId));
    }
    for (const name of /** @type {const} */ (["direct", "global"])) {
      if (!request[name]) continue;
      const outcome = data?.[name] ??
        { recovered: false, error: { code: "internal", message: `the resume ack has no '${name}' entry` } };
      deliver.push(...this.endFill(name, outcome.error ? null : outcome));
      events.push(recoveredEvent(name, outcome));
    }
    return { events, deliver };
  }

  /** @param {string} roomId */
  joined(roomId) {
    this.rooms.add(roomId);
  }

  /** @param {string} roomId */
  forgetRoom(roomId) {
    this.rooms.delete(roomId);
    this.positions.delete(roomKey(roomId));
    this.fills.delete(roomKey(roomId));
  }

  /** The connection is gone: fills in flight are lost, and resume replays what they held. */
  connectionLost() {
    this.fills.clear();
  }

  /** A copy of the positions, in the shape of `resumeFrom` (for sessionStorage). */
  snapshot() {
    /** @type {Record<string, Position>} */
    const rooms = {};
    for (const roomId of this.rooms) rooms[roomId] = { ...(this.positions.get(roomKey(roomId)) ?? NO_POSITION) };
    const direct = this.positions.get("direct");
    const global = this.positions.get("global");
    return {
      rooms,
      ...(direct ? { direct: { ...direct } } : {}),
      ...(global ? { global: { ...global } } : {}),
    };
  }
}

/** @param {string} roomId */
function roomKey(roomId) {
  return `room:${roomId}`;
}

/** @param {unknown} pos @returns {pos is Position} */
function isPosition(pos) {
  return isObject(pos) && Number.isInteger(pos.offset) && pos.offset >= 0 && typeof pos.epoch === "string";
}

/**
 * @param {string} channel @param {Outcome} outcome @param {string} [roomId]
 * @param {string} [reason] @returns {RecoveredEvent}
 */
function recoveredEvent(channel, outcome, roomId, reason) {
  return {
    channel,
    ...(roomId !== undefined ? { roomId } : {}),
    recovered: outcome.recovered === true,
    missed: outcome.missed ?? 0,
    ...(outcome.error ? { error: outcome.error } : {}),
    ...(reason ? { reason } : {}),
  };
}

// ---------------------------------------------------------------------------------------
// Typing throttle
// ---------------------------------------------------------------------------------------

/**
 * At most one typing frame per room per `intervalMs`: the first change in an idle interval
 * goes out at once, later ones replace each other and the latest goes out when the
 * interval ends, so the final state (the closing `false`) is always sent. An unchanged
 * state is repeated only after `repeatMs`, for receivers that expire indicators.
 */
class TypingThrottle {
  /** @param {number} [intervalMs] @param {number} [repeatMs] */
  constructor(intervalMs = 500, repeatMs = 3000) {
    this.intervalMs = intervalMs;
    this.repeatMs = repeatMs;
    /** @type {Map<string, {sent?: boolean, sentAt: number, until: number, pending?: boolean}>} */
    this.rooms = new Map();
  }

  /**
   * @param {string} roomId @param {boolean} isTyping @param {number} now
   * @returns {{send?: boolean, wakeAt?: number}} `send`: send this value now;
   *   `wakeAt`: call `due` then
   */
  update(roomId, isTyping, now) {
    let state = this.rooms.get(roomId);
    if (!state) {
      state = { sentAt: -Infinity, until: -Infinity };
      this.rooms.set(roomId, state);
    }
    if (now < state.until) {
      state.pending = isTyping;
      return { wakeAt: state.until };
    }
    return this.#emit(state, isTyping, now);
  }

  /** @param {string} roomId @param {number} now @returns {{send?: boolean, wakeAt?: number}} */
  due(roomId, now) {
    const state = this.rooms.get(roomId);
    if (!state || state.pending === undefined) return {};
    if (now < state.until) return { wakeAt: state.until };
    const value = state.pending;
    state.pending = undefined;
    return this.#emit(state, value, now);
  }

  /** The server forgets typing state with the connection; so do we. */
  reset() {
    this.rooms.clear();
  }

  /** @param {{sent?: boolean, sentAt: number, until: number, pending?: boolean}} state
   *  @param {boolean} value @param {number} now */
  #emit(state, value, now) {
    if (state.sent === value && now - state.sentAt < this.repeatMs) return {};
    state.sent = value;
    state.sentAt = now;
    state.until = now + this.intervalMs;
    return { send: value };
  }
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

/** @param {Record<string, unknown>} obj a copy without undefined values (msgpack would send nil) */
function compact(obj) {
  /** @type {Record<string, unknown>} */
  const out = {};
  for (const [key, value] of Object.entries(obj)) if (value !== undefined) out[key] = value;
  return out;
}

/** A unique clientId (UUID where the platform has one; randomUUID needs a secure context). */
function newClientId() {
  const c = globalThis.crypto;
  if (c?.randomUUID) return c.randomUUID();
  const bytes = new Uint8Array(16);
  if (c?.getRandomValues) c.getRandomValues(bytes);
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const utf8 = new TextEncoder();
const utf8Decoder = new TextDecoder();

/** @type {Clock} */
const SYSTEM_CLOCK = {
  now: globalThis.performance?.now ? () => globalThis.performance.now() : () => Date.now(),
  setTimeout: (/** @type {() => void} */ fn, /** @type {number} */ ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (/** @type {any} */ handle) => globalThis.clearTimeout(handle),
};

/**
 * @typedef {{now(): number, setTimeout(fn: () => void, ms: number): unknown,
 *   clearTimeout(handle: unknown): void}} Clock
 * @typedef {{encode(value: unknown): Uint8Array, decode(data: Uint8Array): unknown}} Msgpack
 * @typedef {"idle"|"connecting"|"connected"|"reconnecting"|"closed"} State
 * @typedef {{timeoutMs?: number, signal?: AbortSignal}} RequestOptions
 */

/**
 * @typedef {object} Entry a frame the application sent, until it is answered
 * @property {number} seq creation order
 * @property {string} type
 * @property {unknown} data
 * @property {boolean} durable
 * @property {boolean} retriable
 * @property {number} timeoutMs
 * @property {(data: any) => void} resolve
 * @property {(err: RtgateError) => void} reject
 * @property {number} [firstSentAt]
 * @property {number} [id] the frame id of the current send
 * @property {unknown} [timer]
 * @property {boolean} [settled]
 */

/**
 * @typedef {object} Internal a frame the client sends for itself (auth, resume, fills, ping)
 * @property {true} internal
 * @property {(err: RtgateError | null, data?: any) => void} callback
 * @property {unknown} [timer]
 */

// ---------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------

export class RtgateClient {
  /** @type {string[]} */ #urls;
  #urlIndex = 0;
  /** @type {string | undefined} */ #token;
  /** @type {(() => string | Promise<string>) | undefined} */ #tokenProvider;
  #tokenStale = false;
  #refreshing = false;
  #format;
  /** @type {Msgpack | undefined} */ #msgpack;
  #WebSocket;
  /** @type {Clock} */ #clock;
  #random;
  #requestTimeoutMs;
  #connectTimeoutMs;
  /** @type {number | undefined} */ #pingIntervalMs;
  #pingTimeoutMs;

  /** @type {State} */ #state = "idle";
  /** @type {any} the current connection: {ws, url, opened, welcomed, closed} */
  #conn = null;
  #ready = false;
  #everWelcomed = false;
  /** @type {Record<string, any> | null} */ #welcome = null;
  /** @type {number | null} */ #afterMs = null;
  /** @type {number | null} */ #retryAt = null;
  #lastInbound = 0;

  #planner;
  /** @type {OutboundQueue<Entry>} */ #outbox;
  #bucket;
  #recovery;
  #typing;
  /** @type {Map<number, Entry | Internal>} frames in flight by id */
  #pending = new Map();
  #nextId = 1;
  #seq = 0;
  /** Watched users and their last known state. @type {Map<string, boolean>} */ #watched = new Map();

  /** @type {Map<string, unknown>} */ #timers = new Map();
  /** @type {Map<string, unknown>} */ #typingTimers = new Map();
  /** @type {Map<string, Set<Function>>} */ #listeners = new Map();
  /** @type {Set<Function>} */ #anyListeners = new Set();
  /** @type {{promise: Promise<any>, resolve: Function, reject: Function} | null} */ #connecting = null;
  #resumeFailures = 0;

  /**
   * @param {import("./client.d.ts").RtgateClientOptions} options
   */
  constructor(options) {
    const o = options ?? /** @type {any} */ ({});
    const urls = typeof o.urls === "string" ? [o.urls] : Array.isArray(o.urls) ? [...o.urls] : [];
    if (urls.length === 0 || !urls.every((u) => typeof u === "string" && u)) {
      throw new TypeError("urls: give one or more WebSocket URLs, e.g. ['wss://host/ws']");
    }
    if (typeof o.token !== "string" && typeof o.tokenProvider !== "function") {
      throw new TypeError("give a token or a tokenProvider (an async function returning one)");
    }
    const format = o.format ?? "json";
    if (format !== "json" && format !== "msgpack") throw new TypeError('format: "json" or "msgpack"');
    if (format === "msgpack" && (typeof o.msgpack?.encode !== "function" || typeof o.msgpack?.decode !== "function")) {
      throw new TypeError('format "msgpack" needs msgpack: {encode, decode}, e.g. from @msgpack/msgpack');
    }
    const WS = o.WebSocket ?? globalThis.WebSocket;
    if (typeof WS !== "function") {
      throw new TypeError("no WebSocket implementation: pass {WebSocket} (in Node 20, the ws package)");
    }
    this.#urls = urls;
    this.#token = typeof o.token === "string" ? o.token : undefined;
    this.#tokenProvider = o.tokenProvider;
    this.#format = format;
    this.#msgpack = o.msgpack;
    this.#WebSocket = WS;
    this.#clock = o.clock ?? SYSTEM_CLOCK;
    this.#random = o.random ?? Math.random;
    this.#requestTimeoutMs = o.requestTimeoutMs ?? 5000;
    this.#connectTimeoutMs = o.connectTimeoutMs ?? 10000;
    this.#pingIntervalMs = o.pingIntervalMs;
    this.#pingTimeoutMs = o.pingTimeoutMs ?? 10000;
    this.#planner = new ReconnectPlanner(o.backoff, this.#random);
    this.#outbox = new OutboundQueue(o.queueLimit ?? 1000);
    this.#bucket = TokenBucket.forLimits(undefined, this.#clock.now());
    this.#recovery = new Recovery(o.resumeFrom);
    this.#typing = new TypingThrottle(o.typingIntervalMs ?? 500, o.typingRepeatMs ?? 3000);
  }

  // -- public state --------------------------------------------------------------------

  /**
   * "idle" (before connect), "connecting", "connected" (authenticated and resumed: the
   * queue flows), "reconnecting" or "closed".
   */
  get state() {
    return this.#state;
  }

  /** Frames waiting in the offline queue (or for the rate limit). */
  get queued() {
    return this.#outbox.length;
  }

  /** Frames dropped because the queue was full (oldest first). */
  get dropped() {
    return this.#outbox.dropped;
  }

  /** The latest `welcome` data, or null before the first one. */
  get welcome() {
    return this.#welcome;
  }

  /** Rooms this client is in and will resume after a reconnect. */
  get rooms() {
    return [...this.#recovery.rooms];
  }

  /** Positions to keep across a page reload; pass them back as `resumeFrom`. */
  get positions() {
    return this.#recovery.snapshot();
  }

  // -- connection ----------------------------------------------------------------------

  /**
   * Open the connection. Resolves with the first `welcome` data; rejects with an
   * RtgateError when the client gives up (a final close code, maxAttempts, close()).
   * Calling it again returns the same promise.
   * @returns {Promise<Record<string, any>>}
   */
  connect() {
    if (this.#connecting) return this.#connecting.promise;
    /** @type {any} */
    const deferred = {};
    deferred.promise = new Promise((resolve, reject) => {
      deferred.resolve = resolve;
      deferred.reject = reject;
    });
    // A caller that never awaits connect() must not get an unhandled rejection.
    deferred.promise.catch(() => {});
    this.#connecting = deferred;
    if (this.#state === "closed") {
      deferred.reject(new RtgateError("closed", "the client was closed"));
    } else if (this.#welcome) {
      deferred.resolve(this.#welcome);
    } else if (this.#state === "idle") {
      this.#open();
    }
    return deferred.promise;
  }

  /**
   * Close for good: pending requests and queued frames are rejected with "closed".
   * @returns {Promise<void>} resolves when the socket has closed
   */
  close() {
    if (this.#state === "closed") return Promise.resolve();
    const conn = this.#conn;
    this.#conn = null;
    this.#ready = false;
    for (const name of [...this.#timers.keys()]) this.#clearTimer(name);
    for (const handle of this.#typingTimers.values()) this.#clock.clearTimeout(handle);
    this.#typingTimers.clear();
    this.#retryAt = null;
    this.#failEverything(new RtgateError("closed", "the client was closed"));
    this.#state = "closed";
    this.#emit("disconnect", { code: 1000, reason: "client closed", willReconnect: false });
    this.#emitState();
    if (!conn) return Promise.resolve();
    const closed = new Promise((resolve) => {
      conn.closed = true;
      const ws = conn.ws;
      ws.onopen = ws.onmessage = null;
      // Keep an error handler: the ws package throws on an "error" nobody listens to.
      ws.onerror = () => {};
      ws.onclose = () => resolve(undefined);
      try {
        ws.close(1000, "client closed");
      } catch {
        resolve(undefined);
      }
    });
    return /** @type {Promise<void>} */ (closed);
  }

  // -- events --------------------------------------------------------------------------

  /**
   * Listen to a server frame type ("chat:message", ...) or a lifecycle event ("connect",
   * "disconnect", "reconnecting", "reconnect_failed", "recovered", "queue_overflow",
   * "state", "token_refreshed"). Returns the function that removes the listener.
   * @param {string} event @param {(data: any) => unknown} listener @returns {() => void}
   */
  on(event, listener) {
    let set = this.#listeners.get(event);
    if (!set) this.#listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => this.off(event, listener);
  }

  /** @param {string} event @param {(data: any) => unknown} listener */
  off(event, listener) {
    this.#listeners.get(event)?.delete(listener);
  }

  /**
   * Every server frame except acks, as (type, data). Returns the unsubscribe function.
   * @param {(type: string, data: any) => unknown} listener @returns {() => void}
   */
  onAny(listener) {
    this.#anyListeners.add(listener);
    return () => {
      this.#anyListeners.delete(listener);
    };
  }

  // -- requests ------------------------------------------------------------------------

  /**
   * Send a frame and wait for its ack: resolves with the ack's `data`, rejects with an
   * RtgateError carrying the server's `code`. While offline the frame waits in the queue;
   * `timeoutMs` counts from when it is written to a connection. Durable frames get a
   * `clientId` when they have none, so a resend after a lost ack is stored once.
   * @param {string} type @param {unknown} [data] @param {RequestOptions} [options]
   * @returns {Promise<any>}
   */
  request(type, data, options = {}) {
    if (this.#state === "closed") return Promise.reject(new RtgateError("closed", "the client was closed"));
    if (typeof type !== "string" || !type) return Promise.reject(new TypeError("type must be a non-empty string"));
    if (options.signal?.aborted) return Promise.reject(new RtgateError("aborted", "the request was aborted"));
    const durable = isDurable(type, data);
    if (durable && isObject(data) && data.clientId === undefined) data = { ...data, clientId: newClientId() };
    return new Promise((resolve, reject) => {
      /** @type {Entry} */
      const entry = {
        seq: this.#seq++,
        type,
        data: data === undefined ? null : data,
        durable,
        retriable: isRetriable(type, data),
        timeoutMs: options.timeoutMs ?? this.#requestTimeoutMs,
        resolve,
        reject,
      };
      if (options.signal) {
        options.signal.addEventListener("abort", () => this.#abort(entry), { once: true });
      }
      this.#enqueue(entry);
    });
  }

  /** @param {string} roomId @param {RequestOptions} [options] */
  join(roomId, options) {
    return this.request("room:join", { roomId }, options);
  }

  /** @param {string} roomId @param {RequestOptions} [options] */
  leave(roomId, options) {
    // Forget it now, so that a reconnect before the ack does not resume it.
    this.#recovery.forgetRoom(roomId);
    return this.request("room:leave", { roomId }, options);
  }

  /**
   * A durable chat message. Resolves with the stored message (the ack's `message`).
   * @param {string} roomId @param {string} content
   * @param {RequestOptions & {clientId?: string}} [options]
   */
  async sendMessage(roomId, content, options = {}) {
    const data = await this.request("chat:message", compact({ roomId, content, clientId: options.clientId }), options);
    return data?.message;
  }

  /**
   * A durable direct message to a user. Resolves with the stored message.
   * @param {string} toUserId @param {string} content
   * @param {RequestOptions & {clientId?: string}} [options]
   */
  async direct(toUserId, content, options = {}) {
    const data = await this.request("direct:message", compact({ toUserId, content, clientId: options.clientId }), options);
    return data?.message;
  }

  /**
   * A global message to everyone (admins only). Resolves with the stored message.
   * @param {string} content @param {RequestOptions & {clientId?: string}} [options]
   */
  async broadcast(content, options = {}) {
    const data = await this.request("broadcast:global", compact({ content, clientId: options.clientId }), options);
    return data?.message;
  }

  /**
   * An application event in a room; `durable: true` stores it in the room's chain.
   * @param {string} roomId @param {string} event @param {unknown} data
   * @param {RequestOptions & {durable?: boolean, clientId?: string}} [options]
   */
  roomEvent(roomId, event, data, options = {}) {
    return this.request("room:event", compact({
      roomId, event, data: data === undefined ? null : data, durable: options.durable, clientId: options.clientId,
    }), options);
  }

  /**
   * Say whether you are typing. Throttled (see TypingThrottle); not queued while offline,
   * because a stale typing state is worse than none.
   * @param {string} roomId @param {boolean} isTyping
   */
  typing(roomId, isTyping) {
    if (!this.#ready) return;
    const now = this.#clock.now();
    this.#applyTyping(roomId, this.#typing.update(roomId, Boolean(isTyping), now), now);
  }

  /**
   * A page of stored messages, newest first: `{roomId}` or `{direct: true}`, with the
   * previous page's `nextCursor` for older ones.
   * @param {{roomId?: string, direct?: boolean, cursor?: string, limit?: number}} query
   * @param {RequestOptions} [options]
   */
  history(query, options) {
    return this.request("history", compact({ ...query }), options);
  }

  /**
   * The members of a room, on every gateway.
   * @param {string} roomId @param {{cursor?: string, limit?: number} & RequestOptions} [options]
   */
  presence(roomId, options = {}) {
    return this.request("presence", compact({ roomId, cursor: options.cursor, limit: options.limit }), options);
  }

  /** Which of these users are online. @param {string[]} userIds @param {RequestOptions} [options] */
  presenceUsers(userIds, options) {
    return this.request("presence:users", { userIds }, options);
  }

  /**
   * Watch users: their state now, `user:online` / `user:offline` from then on. The client
   * subscribes again after every reconnect and sends `user:online` / `user:offline` with
   * `resubscribed: true` for users whose state changed while it was away.
   * @param {string[]} userIds @param {RequestOptions} [options]
   */
  presenceSubscribe(userIds, options) {
    return this.request("presence:subscribe", { userIds }, options);
  }

  /** @param {string[]} userIds @param {RequestOptions} [options] */
  presenceUnsubscribe(userIds, options) {
    for (const id of userIds) this.#watched.delete(id);
    return this.request("presence:unsubscribe", { userIds }, options);
  }

  /** An application-level round trip. @param {unknown} [data] @param {RequestOptions} [options] */
  ping(data, options) {
    return this.request("ping", data, options);
  }

  // -- internals: the queue --------------------------------------------------------------

  /** @param {Entry} entry */
  #enqueue(entry) {
    const now = this.#clock.now();
    if (this.#ready && this.#outbox.length === 0 && this.#bucket.take(now)) {
      this.#write(entry);
      return;
    }
    this.#overflowed(this.#outbox.push(entry));
    this.#pump();
    if (this.#state !== "connected") this.#emitState();
  }

  /** @param {Entry[]} dropped */
  #overflowed(dropped) {
    for (const entry of dropped) {
      this.#settle(entry, null, new RtgateError("queue_overflow",
        `the offline queue is full (${this.#outbox.limit} frames): the oldest frame was dropped`));
      this.#emit("queue_overflow", { dropped: this.#outbox.dropped, type: entry.type });
    }
  }

  /** Send queued frames as fast as the rate limit allows, once resumed. */
  #pump() {
    if (!this.#ready || this.#timers.has("pump")) return;
    const windowMs = (this.#welcome?.dedupWindowSeconds ?? 120) * 1000;
    for (;;) {
      const entry = this.#outbox.peek();
      if (!entry) return;
      const now = this.#clock.now();
      if (dedupExpired(entry, now, windowMs)) {
        this.#outbox.shift();
        this.#settle(entry, null, new RtgateError("dedup_expired",
          `first sent ${Math.round((now - /** @type {number} */ (entry.firstSentAt)) / 1000)} s ago, longer than the ` +
          "server's dedup window: it may or may not have been stored, and a resend could store it twice"));
        continue;
      }
      if (!this.#bucket.take(now)) {
        this.#setTimer("pump", this.#bucket.waitMs(now), () => this.#pump());
        return;
      }
      this.#outbox.shift();
      this.#write(entry);
    }
  }

  /** @param {Entry} entry */
  #write(entry) {
    const conn = this.#conn;
    const id = this.#nextId++;
    const frame = { type: entry.type, id, data: entry.data };
    let payload;
    try {
      payload = this.#encode(frame);
    } catch (err) {
      this.#settle(entry, null, new RtgateError("bad_request", `cannot encode the frame: ${/** @type {Error} */ (err).message}`));
      return;
    }
    const max = this.#welcome?.limits?.maxFrameBytes;
    // The server closes the connection with 1009 (and we may not reconnect) for an
    // oversized frame: refuse it here instead.
    if (max && overLimit(payload, max)) {
      this.#settle(entry, null, new RtgateError("too_large", `the frame is over the server's limit of ${max} bytes`));
      return;
    }
    entry.id = id;
    entry.firstSentAt ??= this.#clock.now();
    this.#pending.set(id, entry);
    entry.timer = this.#clock.setTimeout(() => {
      if (this.#pending.get(id) !== entry) return;
      this.#pending.delete(id);
      this.#settle(entry, null, new RtgateError("timeout", `no ack for '${entry.type}' within ${entry.timeoutMs} ms`));
    }, entry.timeoutMs);
    try {
      conn.ws.send(payload);
    } catch {
      // The socket is closing; its close event sends this again or fails it.
    }
  }

  /**
   * A frame the client sends for itself, ahead of the queue.
   * @param {string} type @param {unknown} data @param {number} timeoutMs
   * @param {(err: RtgateError | null, data?: any) => void} callback
   */
  #sendInternal(type, data, timeoutMs, callback) {
    const conn = this.#conn;
    if (!conn?.opened) {
      callback(new RtgateError("disconnected", "not connected"));
      return;
    }
    const id = this.#nextId++;
    /** @type {Internal} */
    const entry = { internal: true, callback };
    this.#bucket.force(this.#clock.now());
    this.#pending.set(id, entry);
    entry.timer = this.#clock.setTimeout(() => {
      if (this.#pending.get(id) !== entry) return;
      this.#pending.delete(id);
      callback(new RtgateError("timeout", `no ack for '${type}' within ${timeoutMs} ms`));
    }, timeoutMs);
    try {
      conn.ws.send(this.#encode({ type, id, data }));
    } catch {
      // The close event will follow.
    }
  }

  /**
   * @param {Entry} entry @param {any} data @param {RtgateError | null} error
   */
  #settle(entry, data, error) {
    if (entry.settled) return;
    entry.settled = true;
    if (entry.timer !== undefined) this.#clock.clearTimeout(entry.timer);
    if (error) entry.reject(error);
    else entry.resolve(data);
  }

  /** @param {Entry} entry */
  #abort(entry) {
    if (entry.settled) return;
    this.#outbox.remove(entry);
    if (entry.id !== undefined && this.#pending.get(entry.id) === entry) this.#pending.delete(entry.id);
    this.#settle(entry, null, new RtgateError("aborted", "the request was aborted"));
  }

  /** @param {RtgateError} error */
  #failEverything(error) {
    for (const entry of this.#pending.values()) {
      if ("internal" in entry) {
        if (entry.timer !== undefined) this.#clock.clearTimeout(entry.timer);
      } else {
        this.#settle(entry, null, error);
      }
    }
    this.#pending.clear();
    for (const entry of this.#outbox.drain()) this.#settle(entry, null, error);
    if (this.#connecting && !this.#welcome) this.#connecting.reject(error);
  }

  /** The connection is gone: frames in flight go back to the queue, or fail. */
  #requeueInflight() {
    /** @type {Entry[]} */
    const again = [];
    for (const entry of this.#pending.values()) {
      if (entry.timer !== undefined) this.#clock.clearTimeout(entry.timer);
      if ("internal" in entry) continue;
      if (entry.retriable) {
        entry.timer = undefined;
        again.push(entry);
      } else {
        this.#settle(entry, null, new RtgateError("disconnected",
          `the connection was lost before '${entry.type}' was answered; it is not sent again`));
      }
    }
    this.#pending.clear();
    this.#overflowed(this.#outbox.requeue(again));
  }

  // -- internals: connection -------------------------------------------------------------

  async #open() {
    this.#clearTimer("reconnect");
    this.#retryAt = null;
    if (this.#state === "closed") return;
    // retryInMs 0: an attempt is under way.
    this.#setState(this.#everWelcomed || this.#planner.failures > 0 ? "reconnecting" : "connecting", 0);
    const url = this.#urls[this.#urlIndex++ % this.#urls.length];
    let token;
    try {
      token = await this.#currentToken();
    } catch (err) {
      if (this.#isClosed()) return;
      this.#tokenStale = true;
      this.#afterClose(null, 4401, `tokenProvider failed: ${/** @type {Error} */ (err)?.message ?? err}`);
      return;
    }
    if (this.#isClosed()) return; // close() while the token was on its way
    const conn = { ws: /** @type {any} */ (null), url, opened: false, welcomed: false, closed: false };
    try {
      conn.ws = new this.#WebSocket(url, this.#format === "msgpack" ? "rtgate.v1.msgpack" : "rtgate.v1.json");
    } catch (err) {
      this.#afterClose(null, 1006, `cannot open ${url}: ${/** @type {Error} */ (err)?.message ?? err}`);
      return;
    }
    this.#conn = conn;
    const ws = conn.ws;
    ws.binaryType = "arraybuffer";
    ws.onopen = () => this.#onOpen(conn, token);
    ws.onmessage = (/** @type {{data: unknown}} */ event) => this.#onMessage(conn, event.data);
    ws.onclose = (/** @type {{code: number, reason: string}} */ event) => this.#onSocketClose(conn, event.code, event.reason);
    ws.onerror = () => {}; // a close event follows, with the code that matters
    this.#setTimer("connect", this.#connectTimeoutMs, () => this.#drop(conn, 1006, "no welcome in time"));
  }

  async #currentToken() {
    if (this.#tokenProvider && (this.#token === undefined || this.#tokenStale)) {
      const token = await this.#tokenProvider();
      if (typeof token !== "string" || !token) throw new TypeError("tokenProvider returned no token");
      this.#token = token;
      this.#tokenStale = false;
    }
    return /** @type {string} */ (this.#token);
  }

  /** @param {any} conn @param {string} token */
  #onOpen(conn, token) {
    if (conn !== this.#conn) return;
    conn.opened = true;
    // A new connection has a full bucket on the server.
    this.#bucket = TokenBucket.forLimits(this.#welcome?.limits, this.#clock.now());
    this.#sendInternal("auth", { token }, this.#connectTimeoutMs, () => {
      // Success is the welcome that follows; a bad token is a close 4401.
    });
  }

  /** @param {any} conn @param {unknown} raw */
  #onMessage(conn, raw) {
    if (conn !== this.#conn) return;
    let frame;
    try {
      frame = this.#decode(raw);
    } catch {
      return; // not ours to interpret; the server only sends well-formed frames
    }
    if (!isObject(frame) || typeof frame.type !== "string") return;
    this.#lastInbound = this.#clock.now();
    const { type, data } = frame;
    switch (type) {
      case "ack":
        this.#onAck(frame);
        return;
      case "welcome":
        this.#onWelcome(conn, data);
        break;
      case "reconnect":
        this.#afterMs = Number.isFinite(data?.afterMs) ? data.afterMs : null;
        break;
      case "auth:expiring":
        this.#refreshToken();
        break;
      case "room:removed":
        if (typeof data?.roomId === "string") this.#recovery.forgetRoom(data.roomId);
        break;
      case "user:online":
      case "user:offline":
        if (typeof data?.userId === "string" && this.#watched.has(data.userId)) {
          this.#watched.set(data.userId, type === "user:online");
        }
        break;
      default: {
        const result = this.#recovery.receive(/** @type {Frame} */ (frame));
        for (const f of result.deliver) this.#dispatch(f.type, f.data);
        if (result.epochChanged && result.channel) {
          this.#emit("recovered", recoveredEvent(result.channel, { recovered: false },
            result.channel.startsWith("room:") ? result.channel.slice(5) : undefined, "epoch changed"));
        }
        if (result.fill && result.channel) this.#fillGap(result.channel, result.fill);
        return;
      }
    }
    this.#dispatch(type, data);
  }

  /** @param {Record<string, any>} frame */
  #onAck(frame) {
    const entry = this.#pending.get(frame.id);
    if (!entry) return; // timed out, aborted, or from before a reconnect
    this.#pending.delete(frame.id);
    const error = frame.ok === true ? null
      : new RtgateError(frame.error?.code ?? "internal", frame.error?.message ?? "request failed",
        Array.isArray(frame.error?.userIds) ? { userIds: frame.error.userIds.map(String) } : undefined);
    if ("internal" in entry) {
      if (entry.timer !== undefined) this.#clock.clearTimeout(entry.timer);
      entry.callback(error, frame.data);
      return;
    }
    if (!error) this.#afterAck(entry, frame.data);
    this.#settle(entry, frame.data ?? null, error);
  }

  /** Keep the rooms and watches the application asked for, for the next resume. */
  #afterAck(/** @type {Entry} */ entry, /** @type {any} */ data) {
    if (entry.type === "room:join" && typeof data?.roomId === "string") {
      this.#recovery.joined(data.roomId);
      this.#recovery.advance(roomKey(data.roomId), data.offset, data.epoch);
    } else if (entry.type === "room:leave" && typeof data?.roomId === "string") {
      this.#recovery.forgetRoom(data.roomId);
    } else if (entry.type === "presence:subscribe" && isObject(data?.online)) {
      for (const [id, online] of Object.entries(data.online)) this.#watched.set(id, online === true);
    }
  }

  /** @param {any} conn @param {any} data */
  #onWelcome(conn, data) {
    this.#clearTimer("connect");
    conn.welcomed = true;
    this.#welcome = isObject(data) ? data : {};
    this.#bucket.configure(this.#welcome.limits, this.#clock.now());
    this.#planner.reset();
    this.#armIdle();
    const first = !this.#everWelcomed;
    this.#everWelcomed = true;
    // The state says "connected" once the rooms are resumed (#becomeReady).
    this.#emit("connect", this.#welcome);
    this.#connecting?.resolve(this.#welcome);
    this.#resume(conn, first);
  }

  /**
   * Rejoin every room and catch up every channel, then flush the queue. On the first
   * connection this only learns where the inbox and global channel stand.
   * @param {any} conn @param {boolean} first
   */
  #resume(conn, first) {
    const request = this.#recovery.resumeRequest();
    this.#recovery.beginResume(request);
    // A replay can be long (resume_budget messages): more time than a plain request.
    const timeoutMs = Math.max(30000, this.#requestTimeoutMs);
    this.#sendInternal("resume", request, timeoutMs, (error, data) => {
      if (conn !== this.#conn) return;
      if (error) {
        if (error.code === "unavailable" || error.code === "timeout") {
          // The backbone is away; the frame acted on nothing. Try again on this connection.
          const delay = backoffDelay(this.#resumeFailures++, this.#planner.backoff, this.#random) + 200;
          this.#setTimer("resume", delay, () => this.#resume(conn, first));
          return;
        }
        // Refused as a whole (a bug, or limits changed): positions cannot be used.
        const failed = this.#recovery.applyResume(request, { rooms: {} });
        for (const f of failed.deliver) this.#dispatch(f.type, f.data);
        for (const event of failed.events) {
          this.#emit("recovered", { ...event, error: { code: error.code, message: error.message } });
        }
        this.#becomeReady();
        return;
      }
      this.#resumeFailures = 0;
      const { events, deliver } = this.#recovery.applyResume(request, data);
      for (const f of deliver) this.#dispatch(f.type, f.data);
      for (const event of events) {
        // The first connection's positions for the inbox and global are only a baseline.
        const baseline = first && !event.roomId && request[/** @type {"direct"|"global"} */ (event.channel)].offset === 0;
        if (event.roomId && event.error?.code === "unavailable") {
          // Not rejoined this time: try with room:join and since; that reports the room.
          this.#fillGap(event.channel, null);
        } else if (!baseline) {
          this.#emit("recovered", event);
        }
      }
      this.#becomeReady();
    });
  }

  #becomeReady() {
    this.#ready = true;
    this.#retryAt = null;
    this.#setState("connected");
    this.#resubscribe();
    this.#pump();
  }

  /**
   * Presence watches end with a connection: subscribe again, in pages of 100, and
   * announce the users whose state changed meanwhile, as the events that were missed.
   */
  #resubscribe() {
    const users = [...this.#watched.keys()];
    for (let i = 0; i < users.length; i += 100) this.#renew(users.slice(i, i + 100));
  }

  /**
   * One page of watches. Under shared-rooms, users who share no room with us any
   * more (offline ones included) fail the whole page: drop those the refusal
   * names and renew the rest, until nobody is refused.
   * @param {string[]} page
   */
  #renew(page) {
    this.#sendInternal("presence:subscribe", { userIds: page }, this.#requestTimeoutMs, (error, data) => {
      if (error) {
        /** @type {string[]} */
        const hidden = error.code === "forbidden" && Array.isArray(error.userIds)
          ? error.userIds.filter((id) => page.includes(id)) : [];
        /** @type {Record<string, unknown>} */
        const event = { code: error.code, message: `presence watches not renewed: ${error.message}` };
        if (hidden.length > 0) {
          // The server does not watch them now: neither do we.
          for (const id of hidden) this.#watched.delete(id);
          event.userIds = hidden;
        }
        this.#emit("error", event);
        const rest = page.filter((id) => !hidden.includes(id));
        if (hidden.length > 0 && rest.length > 0) this.#renew(rest);
        return;
      }
      for (const [userId, online] of Object.entries(isObject(data?.online) ? data.online : {})) {
        if (!this.#watched.has(userId) || this.#watched.get(userId) === online) continue;
        this.#watched.set(userId, online === true);
        this.#dispatch(online ? "user:online" : "user:offline", { userId, resubscribed: true });
      }
    });
  }

  /**
   * Ask for a replay from `since` (a room: room:join with since; the inbox or global:
   * resume). `since` null: a room the resume could not rejoin (unavailable).
   * @param {string} channel @param {Position | null} since
   */
  #fillGap(channel, since) {
    const conn = this.#conn;
    const roomId = channel.startsWith("room:") ? channel.slice(5) : undefined;
    const from = since ?? this.#recovery.positions.get(channel) ?? NO_POSITION;
    const [type, data] = roomId !== undefined
      ? ["room:join", { roomId, since: from }]
      : ["resume", { [channel]: from }];
    this.#sendInternal(type, data, Math.max(30000, this.#requestTimeoutMs), (error, ack) => {
      if (conn !== this.#conn) return;
      /** @type {Outcome | null} */
      const outcome = error ? null : (roomId !== undefined ? ack?.rooms?.[roomId] : ack?.[channel]) ?? null;
      if (roomId !== undefined) {
        if (outcome && !outcome.error) this.#recovery.joined(roomId);
        else if (since === null) this.#recovery.forgetRoom(roomId);
      }
      for (const f of this.#recovery.endFill(channel, outcome)) this.#dispatch(f.type, f.data);
      const failure = error ? { code: error.code, message: error.message } : outcome?.error;
      this.#emit("recovered", recoveredEvent(channel, failure ? { recovered: false, error: failure } : /** @type {Outcome} */ (outcome), roomId));
    });
  }

  async #refreshToken() {
    if (!this.#tokenProvider || this.#refreshing) return;
    this.#refreshing = true;
    let token;
    try {
      token = await this.#tokenProvider();
    } catch {
      // Nothing to send; at expiry the server closes with 4401 and we try again then.
      return;
    } finally {
      this.#refreshing = false;
    }
    if (typeof token !== "string" || !token || this.#state === "closed") return;
    this.#token = token;
    this.#tokenStale = false;
    if (this.#conn?.welcomed) {
      this.#sendInternal("auth", { token }, this.#requestTimeoutMs, (error) => {
        // A refused refresh closes the connection with 4401: handled there.
        if (!error) this.#emit("token_refreshed", {});
      });
    }
  }

  /**
   * After a quiet interval, make sure the connection is still there: browsers answer the
   * server's pings without telling the page, and a dead network may not close the socket
   * for minutes. One timer per connection, checking when the last frame came.
   */
  #armIdle() {
    const interval = this.#pingIntervalMs ?? (this.#welcome?.heartbeatSeconds ?? 25) * 1000;
    const conn = this.#conn;
    if (!conn?.welcomed || !(interval > 0)) return;
    const check = () => {
      const quiet = this.#clock.now() - this.#lastInbound;
      if (quiet < interval) {
        this.#setTimer("idle", interval - quiet, check);
        return;
      }
      this.#sendInternal("ping", null, this.#pingTimeoutMs, (error) => {
        if (error?.code === "timeout") this.#drop(conn, 1006, "no answer to ping");
        else if (!error) this.#setTimer("idle", interval, check);
      });
    };
    this.#setTimer("idle", interval, check);
  }

  /**
   * Give up on a connection ourselves (no welcome, no pong) and carry on as if it had
   * dropped.
   * @param {any} conn @param {number} code @param {string} reason
   */
  #drop(conn, code, reason) {
    if (conn !== this.#conn || conn.closed) return;
    const ws = conn.ws;
    try {
      ws.close(4000, reason);
    } catch {
      // Already closing.
    }
    this.#onSocketClose(conn, code, reason);
  }

  /** @param {any} conn @param {number} code @param {string} reason */
  #onSocketClose(conn, code, reason) {
    if (conn.closed) return;
    conn.closed = true;
    const ws = conn.ws;
    ws.onopen = ws.onmessage = ws.onclose = null;
    if (conn !== this.#conn) return;
    this.#conn = null;
    this.#ready = false;
    for (const name of ["connect", "idle", "pump", "resume"]) this.#clearTimer(name);
    for (const handle of this.#typingTimers.values()) this.#clock.clearTimeout(handle);
    this.#typingTimers.clear();
    this.#typing.reset();
    this.#recovery.connectionLost();
    this.#requeueInflight();
    this.#afterClose(conn, code, reason);
  }

  /**
   * @param {any} conn null when no socket was opened (tokenProvider failed, bad URL)
   * @param {number} code @param {string} reason
   */
  #afterClose(conn, code, reason) {
    if (this.#state === "closed") return;
    const afterMs = this.#afterMs;
    this.#afterMs = null;
    const plan = this.#planner.plan(code, { afterMs, canRefreshToken: this.#tokenProvider !== undefined });
    if (!plan.reconnect) {
      // The end: reconnect_failed (if so), then always a final disconnect.
      if (plan.exhausted) this.#emit("reconnect_failed", { attempts: this.#planner.failures });
      this.#emit("disconnect", { code, reason: reason ?? "", willReconnect: false });
      const message = plan.exhausted
        ? `gave up after ${this.#planner.failures} reconnect attempts (last close ${code} ${reason ?? ""})`
        : `the server closed the connection with ${code} ${reason ?? ""}; not reconnecting`;
      this.#failEverything(new RtgateError("closed", message.trim(), { closeCode: code, reason: reason ?? "" }));
      this.#setState("closed");
      return;
    }
    if (conn?.opened) this.#emit("disconnect", { code, reason: reason ?? "", willReconnect: true });
    if (plan.refreshToken) this.#tokenStale = true;
    this.#retryAt = this.#clock.now() + plan.delay;
    this.#setState("reconnecting", plan.delay);
    this.#emit("reconnecting", { attempt: plan.attempt, delay: plan.delay, url: this.#urls[this.#urlIndex % this.#urls.length] });
    this.#setTimer("reconnect", plan.delay, () => this.#open());
  }

  // -- internals: typing -----------------------------------------------------------------

  /** @param {string} roomId @param {{send?: boolean, wakeAt?: number}} result @param {number} now */
  #applyTyping(roomId, result, now) {
    if (result.send !== undefined) {
      this.#sendInternal("chat:typing", { roomId, isTyping: result.send }, this.#requestTimeoutMs, () => {});
    }
    if (result.wakeAt !== undefined && !this.#typingTimers.has(roomId)) {
      this.#typingTimers.set(roomId, this.#clock.setTimeout(() => {
        this.#typingTimers.delete(roomId);
        if (!this.#ready) return;
        const later = this.#clock.now();
        this.#applyTyping(roomId, this.#typing.due(roomId, later), later);
      }, Math.max(0, result.wakeAt - now)));
    }
  }

  // -- internals: plumbing ---------------------------------------------------------------

  /** @param {object} frame */
  #encode(frame) {
    if (this.#format === "msgpack") return /** @type {Msgpack} */ (this.#msgpack).encode(frame);
    return JSON.stringify(frame);
  }

  /** @param {unknown} raw */
  #decode(raw) {
    if (this.#format === "msgpack") {
      const bytes = raw instanceof ArrayBuffer ? new Uint8Array(raw) : /** @type {Uint8Array} */ (raw);
      return /** @type {Msgpack} */ (this.#msgpack).decode(bytes);
    }
    if (typeof raw === "string") return JSON.parse(raw);
    const bytes = raw instanceof ArrayBuffer ? new Uint8Array(raw) : /** @type {Uint8Array} */ (raw);
    return JSON.parse(utf8Decoder.decode(bytes));
  }

  #isClosed() {
    return this.#state === "closed";
  }

  /** @param {string} name @param {number} ms @param {() => void} fn */
  #setTimer(name, ms, fn) {
    this.#clearTimer(name);
    this.#timers.set(name, this.#clock.setTimeout(() => {
      this.#timers.delete(name);
      fn();
    }, ms));
  }

  /** @param {string} name */
  #clearTimer(name) {
    if (!this.#timers.has(name)) return;
    this.#clock.clearTimeout(this.#timers.get(name));
    this.#timers.delete(name);
  }

  /** @param {State} state @param {number | null} [retryInMs] */
  #setState(state, retryInMs = null) {
    const changed = state !== this.#state;
    this.#state = state;
    if (changed || retryInMs !== null) this.#emitState(retryInMs);
  }

  /** @param {number | null} [retryInMs] */
  #emitState(retryInMs) {
    const retry = retryInMs ?? (this.#retryAt !== null ? Math.max(0, this.#retryAt - this.#clock.now()) : null);
    this.#emit("state", { state: this.#state, retryInMs: retry, queued: this.#outbox.length });
  }

  /** @param {string} type @param {unknown} data */
  #dispatch(type, data) {
    this.#emit(type, data);
    for (const listener of [...this.#anyListeners]) call(listener, type, data);
  }

  /** @param {string} event @param {unknown} data */
  #emit(event, data) {
    const set = this.#listeners.get(event);
    if (!set) return;
    for (const listener of [...set]) call(listener, data);
  }
}

/** A listener's failure must not break the client, nor the other listeners. */
function call(/** @type {Function} */ listener, /** @type {unknown[]} */ ...args) {
  try {
    const result = listener(...args);
    if (result && typeof result.then === "function") result.then(undefined, reportListenerError);
  } catch (err) {
    reportListenerError(err);
  }
}

function reportListenerError(/** @type {unknown} */ err) {
  console.error("rtgate: an event listener failed", err);
}

/** @param {string | Uint8Array} payload @param {number} max */
function overLimit(payload, max) {
  if (typeof payload !== "string") return payload.byteLength > max;
  // A UTF-16 unit is at most 3 UTF-8 bytes: most frames need no count.
  return payload.length * 3 > max && utf8.encode(payload).length > max;
}

/** The decision-making parts, for tests. Not a stable API. */
export const _internal = Object.freeze({
  DEFAULT_BACKOFF, backoffDelay, closePolicy, ReconnectPlanner, OutboundQueue, TokenBucket,
  Recovery, TypingThrottle, isDurable, isRetriable, dedupExpired, PACE_RATE, PACE_BURST,
});
