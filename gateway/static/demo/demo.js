// rtgate demo chat: one plain ES module, no framework, no build step. Copy freely.
//
// Reading order: settings from the URL; the page's state; signing in and the
// client's events; rooms, messages and history; typing; presence; rendering.
// The client (reconnect, offline queue, resume after a reconnect) is /client.js:
// this file only reacts to its events.

import { RtgateClient } from "/client.js";

// ---- Settings ---------------------------------------------------------------

const params = new URLSearchParams(location.search);
// ?gateways=ws://a/ws,ws://b/ws tries several gateways in rotation; by default the
// gateway that served this page.
const GATEWAYS = (params.get("gateways") || "").split(",").map((u) => u.trim()).filter(Boolean);
if (GATEWAYS.length === 0) {
  GATEWAYS.push(`${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`);
}
// Messages per history page (?pageSize=5 makes "load older" easy to try).
const PAGE_SIZE = Math.min(100, Math.max(1, Number(params.get("pageSize")) || 30));
const FIRST_ROOM = "lobby";
const TYPING_IDLE_MS = 2000;   // we stop "typing" this long after the last keystroke
const TYPING_SHOW_MS = 6000;   // forget someone's "typing" if their "stopped" never comes

const $ = (id) => document.getElementById(id);

// ---- State -------------------------------------------------------------------

let client = null;
let me = null;                 // {userId, username}, from the welcome frame
let current = null;            // the room on screen
const rooms = new Map();       // roomId -> room state, see newRoom()
const online = new Map();      // userId -> true/false, for users we watch
const onlineAt = new Map();    // userId -> presenceClock of the last online/offline event
let presenceClock = 0;
// Every message id delivered live. A second live delivery of one would be a bug in
// the client or the server: it is not shown twice, but counted (data-duplicates).
const liveIds = new Set();
let duplicates = 0;
let status = { state: "idle", retryInMs: null, since: 0 };   // the client's last "state" event
let nextLocalId = 1;

function newRoom(roomId) {
  return {
    roomId,
    messages: new Map(),    // id -> message, shown sorted by (epoch, offset)
    pending: new Map(),     // local id -> {content, error?}: sent, not acknowledged yet
    cursor: undefined,      // history: the nextCursor of the last page loaded
    hasOlder: true,
    members: new Map(),     // userId -> {userId, username, socketCount}
    presenceEvents: null,   // while a presence query is in flight: events to apply on top
    typing: new Map(),      // userId -> {username, timer}
    unread: 0,
  };
}

// ---- Signing in -------------------------------------------------------------------

$("name").value = localStorage.getItem("rtgate-demo-name") || "";

$("signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = $("name").value.trim();
  if (!name) return;
  localStorage.setItem("rtgate-demo-name", name);
  $("signin").querySelector("button").disabled = true;
  try {
    await start(name);
  } catch (err) {
    notice(`Could not connect: ${err.message || err}`);
    $("signin").querySelector("button").disabled = false;
  }
});

// Dev tokens come from this page's own server (/dev/token, dev mode only). A real
// application gets them from its own backend in the same way.
async function fetchToken(name) {
  const resp = await fetch(`/dev/token?user=${encodeURIComponent(name)}`,
                           { signal: AbortSignal.timeout(3000) });
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error ? body.error.message : `HTTP ${resp.status}`);
  return body.token;
}

async function start(name) {
  // The first token up front, so that a name the server refuses is reported here.
  // The client keeps it across reconnects, on any gateway, and calls tokenProvider
  // only for a new one: before it expires, or after the server refused it (4401).
  const token = await fetchToken(name);
  client = new RtgateClient({ urls: GATEWAYS, token, tokenProvider: () => fetchToken(name) });
  listen(client);
  await client.connect();          // resolves on the first welcome
  $("signin").hidden = true;
  $("chat").hidden = false;
  await joinRoom(FIRST_ROOM);
}

function listen(client) {
  client.on("state", (s) => {
    status = { ...s, since: Date.now() };
    render();
  });
  client.on("connect", (welcome) => {
    me = { userId: welcome.userId, username: welcome.username };
    $("me").textContent = me.username;
    $("gateway").textContent = welcome.gatewayId;
    notice("");
  });
  client.on("disconnect", ({ code, reason, willReconnect }) => {
    // Typing is not replayed: whoever still types will say so again.
    for (const room of rooms.values()) {
      for (const { timer } of room.typing.values()) clearTimeout(timer);
      room.typing.clear();
    }
    render();
    if (!willReconnect) notice(`Disconnected for good (${code}${reason ? ": " + reason : ""}).`);
  });
  client.on("reconnect_failed", () => notice("Gave up reconnecting. Reload the page to retry."));
  client.on("queue_overflow", ({ dropped }) => notice(`Offline queue full: ${dropped} dropped.`));
  // After every reconnect the client resumes each room; it tells us how that went.
  client.on("recovered", ({ roomId, recovered, error }) => {
    const room = rooms.get(roomId);
    if (!room) return;
    if (error && error.code === "forbidden") {
      forgetRoom(roomId);
      return notice(`No longer allowed in ${roomId}: ${error.message}`);
    }
    if (!recovered) loadLatest(room);   // too long away: the gap is in history
    refreshPresence(room);              // presence events are not replayed
  });
  client.on("chat:message", (m) => addMessage(m, true));
  client.on("chat:message:sent", (m) => addMessage(m, true));   // our own, stored
  client.on("chat:typing", onTyping);
  client.on("room:user_joined", (d) => onMembership(d, true));
  client.on("room:user_left", (d) => onMembership(d, false));
  // Also after a reconnect, for watched users whose state changed meanwhile.
  client.on("user:online", (d) => setOnline(d.userId, true));
  client.on("user:offline", (d) => setOnline(d.userId, false));
  client.on("room:removed", ({ roomId, reason }) => {
    forgetRoom(roomId);
    notice(`Removed from ${roomId}: ${reason}`);
  });
}

// ---- Rooms ----------------------------------------------------------------------

$("join").addEventListener("submit", (event) => {
  event.preventDefault();
  const roomId = $("room-input").value.trim();
  $("room-input").value = "";
  if (roomId) joinRoom(roomId);
});

async function joinRoom(roomId) {
  if (rooms.has(roomId)) return show(roomId);
  // Known before the ack: live messages of the room can arrive before it.
  const room = newRoom(roomId);
  rooms.set(roomId, room);
  show(roomId);
  try {
    await client.join(roomId);
  } catch (err) {
    forgetRoom(roomId);
    notice(`Cannot join ${roomId}: ${err.message}`);
    return;
  }
  await Promise.all([loadOlder(room), refreshPresence(room)]);
}

async function leaveRoom(roomId) {
  forgetRoom(roomId);
  try {
    await client.leave(roomId);
  } catch (err) {
    notice(`Leaving ${roomId} failed: ${err.message}`);
  }
}

function forgetRoom(roomId) {
  rooms.delete(roomId);
  if (current === roomId) current = rooms.keys().next().value ?? null;
  render();
}

function show(roomId) {
  stopTyping();
  current = roomId;
  rooms.get(roomId).unread = 0;
  render();
  $("message-input").focus();
}

// ---- Messages and history ------------------------------------------------------------

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const content = $("message-input").value;
  if (!content.trim() || !current) return;
  $("message-input").value = "";
  stopTyping();
  send(current, content);
});

async function send(roomId, content) {
  const room = rooms.get(roomId);
  const localId = nextLocalId++;
  // Shown at once, greyed out. While offline the client queues it and sends it
  // after reconnecting; the clientId it adds makes a resend store it only once.
  room.pending.set(localId, { content });
  const sent = client.sendMessage(roomId, content);
  render();                          // after sendMessage: the queued count includes it
  try {
    const message = await sent;
    room.pending.delete(localId);
    addMessage(message, false);
  } catch (err) {
    room.pending.get(localId).error = err.message || String(err);
    render();
  }
}

// live: delivered as an event (chat:message, chat:message:sent), as opposed to an
// ack or a history page, which may repeat what came live.
function addMessage(m, live) {
  if (live) {
    if (liveIds.has(m.id)) duplicates += 1;
    liveIds.add(m.id);
  }
  const room = rooms.get(m.roomId);
  if (!room || room.messages.has(m.id)) return render();
  room.messages.set(m.id, m);
  if (live && m.roomId !== current && m.userId !== me.userId) room.unread += 1;
  render();
}

// History pages come newest first; "load older" asks for the page after the last one.
async function loadOlder(room) {
  if (!room.hasOlder) return;
  try {
    const page = await client.history({ roomId: room.roomId, cursor: room.cursor,
                                        limit: PAGE_SIZE });
    for (const item of page.items) {
      if (item.type === "chat:message") addMessage(item.data, false);
    }
    room.cursor = page.nextCursor;
    room.hasOlder = Boolean(page.nextCursor);
  } catch (err) {
    notice(`History of ${room.roomId} is not available: ${err.message}`);
  }
  render();
}

function loadLatest(room) {
  room.cursor = undefined;
  room.hasOlder = true;
  return loadOlder(room);
}

$("load-older").addEventListener("click", () => {
  if (current) loadOlder(rooms.get(current));
});

// ---- Typing -------------------------------------------------------------------------

let typingIn = null;      // the room we told we are typing in
let typingTimer = null;

$("message-input").addEventListener("input", () => {
  if (!current || client.state !== "connected") return;
  typingIn = current;
  client.typing(current, true);     // the client throttles; call it on every keystroke
  clearTimeout(typingTimer);
  typingTimer = setTimeout(stopTyping, TYPING_IDLE_MS);
});

function stopTyping() {
  clearTimeout(typingTimer);
  if (typingIn && client.state === "connected") client.typing(typingIn, false);
  typingIn = null;
}

function onTyping({ roomId, userId, username, isTyping }) {
  const room = rooms.get(roomId);
  if (!room) return;
  clearTimeout(room.typing.get(userId)?.timer);
  if (isTyping) {
    const timer = setTimeout(() => { room.typing.delete(userId); render(); }, TYPING_SHOW_MS);
    room.typing.set(userId, { username, timer });
  } else {
    room.typing.delete(userId);
  }
  render();
}

// ---- Presence ---------------------------------------------------------------------

// Who is in the room, across every gateway. Arrivals and departures that come
// while the query is in flight are newer than its answer: apply them on top.
async function refreshPresence(room) {
  room.presenceEvents = [];
  try {
    const page = await client.presence(room.roomId);
    room.members = new Map(page.members.map((m) => [m.userId, m]));
    for (const [data, joined] of room.presenceEvents) applyMembership(room, data, joined);
  } catch (err) {
    notice(`Presence of ${room.roomId} is not available: ${err.message}`);
  } finally {
    room.presenceEvents = null;
  }
  render();
  await watch([...room.members.keys()]);
}

function onMembership(data, joined) {
  const room = rooms.get(data.roomId);
  if (!room) return;
  if (room.presenceEvents) room.presenceEvents.push([data, joined]);
  applyMembership(room, data, joined);
  render();
  if (joined) watch([data.userId]);
}

function applyMembership(room, { userId, username }, joined) {
  if (joined) room.members.set(userId, { userId, username, socketCount: 1 });
  else room.members.delete(userId);
}

// Online/offline events for these users from now on, and their state now.
async function watch(userIds) {
  const ids = userIds.filter((id) => id !== me.userId && !online.has(id)).slice(0, 100);
  if (ids.length === 0) return;
  const askedAt = ++presenceClock;
  try {
    const ack = await client.presenceSubscribe(ids);
    for (const [id, isOnline] of Object.entries(ack.online)) {
      // An event received after we asked is at least as new as the answer.
      if (!(onlineAt.get(id) > askedAt)) online.set(id, isOnline);
    }
  } catch {
    // Right after a join the presence service may not know yet that we share the
    // room (forbidden), or be failing over (unavailable). The room's member list
    // still shows who is there; the next refresh subscribes again.
  }
  render();
}

function setOnline(userId, isOnline) {
  onlineAt.set(userId, ++presenceClock);
  online.set(userId, isOnline);
  render();
}

// ---- Rendering ----------------------------------------------------------------------

function render() {
  renderStatus();
  renderRooms();
  renderMessages();
  renderTyping();
  renderPresence();
}

function renderStatus() {
  const el = $("status");
  const { state } = status;
  // Read from the client: the queue changes without a state change.
  const queued = client ? client.queued : 0;
  const waiting = queued ? ` · ${queued} queued` : "";
  el.dataset.state = state;
  document.body.dataset.state = state;   // the CSS greys out what may be stale
  if (state === "connected") {
    el.textContent = "connected";
  } else if (state === "reconnecting") {
    // retryInMs is null while an attempt is under way.
    const left = Math.ceil(((status.retryInMs ?? 0) - (Date.now() - status.since)) / 1000);
    el.textContent = (left > 0 ? `reconnecting in ${left} s` : "reconnecting…") + waiting;
  } else if (state === "connecting") {
    el.textContent = "connecting…";
  } else if (state === "closed") {
    el.textContent = `offline${waiting}`;
  } else {
    el.textContent = "not signed in";
  }
}
// The "reconnecting in N s" countdown.
setInterval(() => { if (status.state === "reconnecting") renderStatus(); }, 250);

function renderRooms() {
  const list = $("rooms");
  list.replaceChildren(...[...rooms.values()].map((room) => {
    const li = element("li", { "data-testid": "room", "data-room": room.roomId,
                               "aria-current": String(room.roomId === current) });
    li.append(element("span", {}, "# " + room.roomId));
    if (room.unread) li.append(element("span", { class: "unread" }, String(room.unread)));
    const leave = element("button", { class: "leave", title: `leave ${room.roomId}`,
                                      "data-testid": "leave-button" }, "×");
    leave.addEventListener("click", (event) => { event.stopPropagation(); leaveRoom(room.roomId); });
    li.append(leave);
    li.addEventListener("click", () => show(room.roomId));
    return li;
  }));
}

function renderMessages() {
  const list = $("messages");
  const room = rooms.get(current);
  $("room-title").textContent = room ? "# " + room.roomId : "";
  list.dataset.duplicates = String(duplicates);
  $("load-older").disabled = !room || !room.hasOlder;
  $("load-older").textContent = room && !room.hasOlder ? "No older messages" : "Load older messages";
  // Keep the view where it was: at the bottom, or on the same messages after
  // older ones were added above them.
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
  const fromBottom = list.scrollHeight - list.scrollTop;
  const items = room ? [...room.messages.values()].sort(byPosition).map(messageItem) : [];
  if (room) {
    for (const [localId, p] of room.pending) items.push(pendingItem(localId, p));
  }
  list.replaceChildren(...items);
  list.scrollTop = atBottom ? list.scrollHeight : list.scrollHeight - fromBottom;
}

// Stream order: the epoch (a newer stream), then the offset within it.
function byPosition(a, b) {
  if (a.epoch !== b.epoch) return BigInt(a.epoch) < BigInt(b.epoch) ? -1 : 1;
  return a.offset - b.offset;
}

function messageItem(m) {
  const li = element("li", { class: "message" + (me && m.userId === me.userId ? " mine" : ""),
                             "data-testid": "message", "data-id": m.id, "data-user": m.userId });
  const time = new Date(m.timestamp);
  li.append(
    element("time", { datetime: m.timestamp, title: time.toLocaleString() },
            time.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })),
    element("span", { class: "author" }, m.username),
    element("span", { class: "text", "data-testid": "message-text" }, m.content),
  );
  return li;
}

function pendingItem(localId, p) {
  const li = element("li", { class: "message mine pending" + (p.error ? " failed" : ""),
                             "data-testid": "message-pending", "data-local-id": localId });
  const state = p.error ? `not sent: ${p.error}`
    : client.state === "connected" ? "sending…" : "queued, sent when back online";
  li.append(
    element("span", { class: "author" }, me ? me.username : ""),
    element("span", { class: "text" }, p.content),
    element("span", { class: "state" }, state),
  );
  return li;
}

function renderTyping() {
  const room = rooms.get(current);
  const names = room ? [...room.typing.values()].map((t) => t.username) : [];
  $("typing").textContent = names.length === 0 ? ""
    : names.length === 1 ? `${names[0]} is typing…`
    : `${names.slice(0, -1).join(", ")} and ${names.at(-1)} are typing…`;
}

function renderPresence() {
  const room = rooms.get(current);
  const members = room ? [...room.members.values()] : [];
  $("presence").replaceChildren(...members.map((m) => {
    // socketCount 0: their connection dropped a moment ago and they may be back
    // within the grace period (a reconnect, a reload).
    const isMe = me && m.userId === me.userId;
    const state = online.get(m.userId) === false ? "offline"
      : m.socketCount === 0 && !isMe ? "away" : "online";
    const li = element("li", { "data-testid": "member", "data-user": m.userId, "data-status": state },
                       m.username);
    if (isMe) li.append(element("span", { class: "note" }, " (you)"));
    else if (state !== "online") li.append(element("span", { class: "note" }, ` (${state})`));
    return li;
  }));
}

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

function element(tag, attributes, text) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) el.setAttribute(name, value);
  if (text !== undefined) el.textContent = text;
  return el;
}
