// Type declarations for the rtgate client (client.js), protocol v1.
// docs/client-js.md explains the behaviour; docs/protocol.md the frames.

/** `{offset, epoch}` of the last stored frame seen on a channel. */
export interface Position {
  offset: number;
  epoch: string;
}

/** Positions to resume from, e.g. kept in sessionStorage across a page reload. */
export interface Positions {
  rooms: Record<string, Position>;
  direct?: Position;
  global?: Position;
}

export interface Clock {
  /** Milliseconds, monotonic. */
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export interface BackoffOptions {
  /** First step of the exponential backoff, ms. Default 1000. */
  baseMs?: number;
  /** Growth per attempt. Default 1.5. */
  factor?: number;
  /** Largest step, ms. Default 30000. */
  capMs?: number;
  /** Reconnect attempts without a welcome before giving up. Default Infinity. */
  maxAttempts?: number;
  /** After close 4429 the delay is uniform in [longMinMs, longMaxMs). Default 60000. */
  longMinMs?: number;
  /** Default 300000. */
  longMaxMs?: number;
}

/** A constructor compatible with the browser's WebSocket (the `ws` package in Node). */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => any;

export interface RtgateClientOptions {
  /** Gateway WebSocket URLs (".../ws"), tried in rotation. */
  urls: string | string[];
  /** A JWT. With a tokenProvider too, the provider is asked when this one is refused. */
  token?: string;
  /** Returns a fresh JWT: at start (without `token`), after a 4401, on `auth:expiring`. */
  tokenProvider?: () => string | Promise<string>;
  /** Wire format. Default "json". "msgpack" needs `msgpack`. */
  format?: "json" | "msgpack";
  /** e.g. `import { encode, decode } from "@msgpack/msgpack"` */
  msgpack?: { encode(value: unknown): Uint8Array; decode(data: Uint8Array): unknown };
  /** Default globalThis.WebSocket. */
  WebSocket?: WebSocketConstructor;
  /** Offline queue size; when full, the oldest frame is dropped. Default 1000. */
  queueLimit?: number;
  backoff?: BackoffOptions;
  /** Default ack timeout of requests, ms, counted from when a frame is written. Default 5000. */
  requestTimeoutMs?: number;
  /** A connection without a welcome after this long is given up. Default 10000. */
  connectTimeoutMs?: number;
  /** Idle time before the client pings. Default: welcome.heartbeatSeconds. 0 disables. */
  pingIntervalMs?: number;
  /** A ping without an answer within this drops the connection. Default 10000. */
  pingTimeoutMs?: number;
  /** At most one typing frame per room per interval. Default 500. */
  typingIntervalMs?: number;
  /** An unchanged typing state is sent again only after this. Default 3000. */
  typingRepeatMs?: number;
  /** Default: performance.now and the global timers. */
  clock?: Clock;
  /** Default Math.random (backoff jitter). */
  random?: () => number;
  /** Rooms and positions to resume on the first connection (see `positions`). */
  resumeFrom?: Positions;
}

export type State = "idle" | "connecting" | "connected" | "reconnecting" | "closed";

export interface RequestOptions {
  /** Ack timeout, ms, counted from when the frame is written to a connection. */
  timeoutMs?: number;
  /** Aborting removes the frame from the queue, or stops waiting for its ack. */
  signal?: AbortSignal;
}

export interface SendOptions extends RequestOptions {
  /** Idempotency key (1 to 64 printable characters); a UUID is generated if absent. */
  clientId?: string;
}

export interface ErrorBody {
  code: string;
  message: string;
}

export interface Welcome {
  sessionId: string;
  userId: string;
  username: string;
  gatewayId: string;
  heartbeatSeconds: number;
  dedupWindowSeconds: number;
  limits: {
    ratePerSecond: number;
    rateBurst: number;
    maxFrameBytes: number;
    maxContentBytes: number;
    maxRooms: number;
  };
}

/** What every stored message carries (see docs/protocol.md, Offsets and recovery). */
export interface Stored {
  timestamp: string;
  id: string;
  offset: number;
  epoch: string;
  /** Absent in a send's ack. */
  prevOffset?: number;
}

/** A stored chat message (chat:message, chat:message:sent, a send's ack). */
export interface ChatMessage extends Stored {
  roomId: string;
  userId: string;
  username: string;
  content: string;
}

export interface DirectMessage extends Stored {
  fromUserId: string;
  fromUsername: string;
  toUserId: string;
  content: string;
}

export interface GlobalMessage extends Stored {
  fromUserId: string;
  fromUsername: string;
  content: string;
}

export interface RoomEvent {
  roomId: string;
  event: string;
  data: unknown;
  userId: string;
  username: string;
  timestamp: string;
  /** Durable events only. */
  id?: string;
  offset?: number;
  epoch?: string;
  prevOffset?: number;
}

export interface HistoryPage {
  /** Newest first. */
  items: Array<{ type: string; data: any }>;
  nextCursor?: string;
}

export interface PresencePage {
  roomId: string;
  members: Array<{ userId: string; username: string; socketCount: number }>;
  count: number;
  cursor?: string;
}

export interface JoinAck {
  roomId: string;
  offset: number;
  epoch: string;
}

export interface RecoveredEvent {
  /** "room:<roomId>", "direct" or "global". */
  channel: string;
  roomId?: string;
  /** false: messages may be missing; load history(). */
  recovered: boolean;
  missed: number;
  error?: ErrorBody;
  /** "epoch changed": the stream was created again; older messages are in history(). */
  reason?: string;
}

/** Lifecycle events, emitted by the client itself. */
export interface LifecycleEvents {
  connect: Welcome;
  /** Every lost connection; the last event of all has willReconnect false. */
  disconnect: { code: number; reason: string; willReconnect: boolean };
  reconnecting: { attempt: number; delay: number; url: string };
  /** maxAttempts ran out; the final disconnect follows. */
  reconnect_failed: { attempts: number };
  recovered: RecoveredEvent;
  queue_overflow: { dropped: number; type: string };
  /** For a status badge. retryInMs: ms until the next attempt (0: under way), else null. */
  state: { state: State; retryInMs: number | null; queued: number };
  /** A refresh after auth:expiring was accepted. */
  token_refreshed: Record<string, never>;
}

/** Server frames, by type. */
export interface ServerEvents {
  welcome: Welcome;
  "chat:message": ChatMessage;
  "chat:message:sent": ChatMessage;
  "chat:typing": { roomId: string; userId: string; username: string; isTyping: boolean };
  "direct:message": DirectMessage;
  "global:message": GlobalMessage;
  "room:event": RoomEvent;
  "room:removed": { roomId: string; reason: string };
  /** `resubscribed: true` (and no username): a change seen when watches were renewed. */
  "user:online": { userId: string; username?: string; socketCount?: number; resubscribed?: true };
  "user:offline": { userId: string; username?: string; resubscribed?: true };
  "room:user_joined": { roomId: string; userId: string; username: string };
  "room:user_left": { roomId: string; userId: string; username: string };
  "auth:expiring": { expiresAt: string };
  pong: unknown;
  reconnect: { afterMs: number };
  /** A protocol error frame, or presence watches that could not be renewed. */
  error: ErrorBody;
}

export type Events = LifecycleEvents & ServerEvents;

export declare class RtgateError extends Error {
  constructor(code: string, message: string, details?: Record<string, unknown>);
  /**
   * The server's code (bad_request, forbidden, rate_limited, too_large, limit_exceeded,
   * unavailable, unauthenticated, internal) or the client's own: timeout, disconnected,
   * queue_overflow, dedup_expired, closed, aborted, too_large.
   */
  readonly code: string;
  /** With "closed" after a close by the server or given-up reconnects: its code and reason. */
  readonly closeCode?: number;
  readonly reason?: string;
  /** With "forbidden" from a presence request: the users you share no room with. */
  readonly userIds?: string[];
}

export declare class RtgateClient {
  constructor(options: RtgateClientOptions);

  readonly state: State;
  /** Frames waiting in the offline queue (or for the rate limit). */
  readonly queued: number;
  /** Frames dropped from a full queue. */
  readonly dropped: number;
  readonly welcome: Welcome | null;
  /** Rooms resumed after a reconnect. */
  readonly rooms: string[];
  /** A copy of the positions; pass it back as `resumeFrom`. */
  readonly positions: Positions;

  /** Resolves with the first welcome; rejects with RtgateError when the client gives up. */
  connect(): Promise<Welcome>;
  /** Close for good; pending and queued requests reject with "closed". */
  close(): Promise<void>;

  on<K extends keyof Events>(event: K, listener: (data: Events[K]) => unknown): () => void;
  on(event: string, listener: (data: any) => unknown): () => void;
  off(event: string, listener: (data: any) => unknown): void;
  /** Every server frame except acks. */
  onAny(listener: (type: string, data: any) => unknown): () => void;

  /** Resolves with the ack's data; rejects with RtgateError. */
  request<T = any>(type: string, data?: unknown, options?: RequestOptions): Promise<T>;
  join(roomId: string, options?: RequestOptions): Promise<JoinAck>;
  leave(roomId: string, options?: RequestOptions): Promise<{ roomId: string }>;
  /** Resolves with the stored message. */
  sendMessage(roomId: string, content: string, options?: SendOptions): Promise<ChatMessage>;
  direct(toUserId: string, content: string, options?: SendOptions): Promise<DirectMessage>;
  /** Admins only. */
  broadcast(content: string, options?: SendOptions): Promise<GlobalMessage>;
  roomEvent(roomId: string, event: string, data: unknown,
            options?: SendOptions & { durable?: boolean }): Promise<{ id: string; offset: number; epoch: string } | null>;
  /** Throttled; dropped while not connected. */
  typing(roomId: string, isTyping: boolean): void;
  history(query: { roomId?: string; direct?: boolean; cursor?: string; limit?: number },
          options?: RequestOptions): Promise<HistoryPage>;
  presence(roomId: string, options?: RequestOptions & { cursor?: string; limit?: number }): Promise<PresencePage>;
  presenceUsers(userIds: string[], options?: RequestOptions): Promise<{ online: Record<string, boolean> }>;
  presenceSubscribe(userIds: string[], options?: RequestOptions): Promise<{ online: Record<string, boolean>; watching: number }>;
  presenceUnsubscribe(userIds: string[], options?: RequestOptions): Promise<{ watching: number }>;
  ping(data?: unknown, options?: RequestOptions): Promise<unknown>;
}

/** The client's decision-making parts, exported for its tests. Not a stable API. */
export declare const _internal: Readonly<Record<string, any>>;
