// Positions per channel, duplicates, gap detection and resume (docs/protocol.md section 7).
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { _internal } from "../../gateway/static/client.js";

const { Recovery } = _internal;

const chat = (offset, prevOffset, { roomId = "lobby", epoch = "E1", type = "chat:message" } = {}) =>
  ({ type, data: { roomId, content: `m${offset}`, offset, prevOffset, epoch, id: `${epoch}-${offset}` } });
const offsets = (frames) => frames.map((f) => f.data.offset);

describe("Recovery.channelOf", () => {
  it("names the channel of stored frames only", () => {
    assert.equal(Recovery.channelOf("chat:message", chat(1, 0).data), "room:lobby");
    assert.equal(Recovery.channelOf("chat:message:sent", chat(1, 0).data), "room:lobby", "own messages count");
    assert.equal(Recovery.channelOf("room:event", { roomId: "r", offset: 4, epoch: "E" }), "room:r");
    assert.equal(Recovery.channelOf("room:event", { roomId: "r", event: "cursor" }), null, "ephemeral");
    assert.equal(Recovery.channelOf("direct:message", { offset: 2, epoch: "D" }), "direct");
    assert.equal(Recovery.channelOf("global:message", { offset: 2, epoch: "G" }), "global");
    assert.equal(Recovery.channelOf("chat:typing", { roomId: "r" }), null);
  });
});

describe("Recovery.receive", () => {
  it("delivers a chain in order and advances the position", () => {
    const r = new Recovery();
    for (const [o, p] of [[10, 0], [12, 10], [15, 12]]) assert.deepEqual(offsets(r.receive(chat(o, p)).deliver), [o]);
    assert.deepEqual(r.positions.get("room:lobby"), { offset: 15, epoch: "E1" });
  });

  it("passes through frames that are not stored", () => {
    const r = new Recovery();
    const typing = { type: "chat:typing", data: { roomId: "lobby", isTyping: true } };
    assert.deepEqual(r.receive(typing).deliver, [typing]);
  });

  it("drops a copy it already has", () => {
    const r = new Recovery();
    r.receive(chat(10, 0));
    r.receive(chat(12, 10));
    assert.deepEqual(r.receive(chat(12, 10)).deliver, []);
    assert.deepEqual(r.receive(chat(10, 0)).deliver, []);
  });

  it("on a gap, holds the frame and asks for a replay from its position", () => {
    const r = new Recovery();
    r.receive(chat(10, 0));
    const gap = r.receive(chat(20, 15));
    assert.deepEqual(gap.deliver, []);
    assert.deepEqual(gap.fill, { offset: 10, epoch: "E1" });
    assert.equal(gap.channel, "room:lobby");
    // A later live frame waits too; the replay continues the chain and is delivered.
    assert.deepEqual(r.receive(chat(22, 20)).deliver, []);
    assert.deepEqual(offsets(r.receive(chat(15, 10)).deliver), [15]);
    assert.deepEqual(offsets(r.receive(chat(20, 15)).deliver), [20]);
    assert.deepEqual(offsets(r.receive(chat(22, 20)).deliver), [22]);
    // The held copies are duplicates by then.
    assert.deepEqual(r.endFill("room:lobby", { recovered: true, missed: 3, offset: 22, epoch: "E1" }), []);
    assert.deepEqual(offsets(r.receive(chat(23, 22)).deliver), [23]);
  });

  it("a replay that stops short releases the held frames in order", () => {
    const r = new Recovery();
    r.receive(chat(10, 0));
    r.receive(chat(30, 25));
    r.receive(chat(20, 15)); // still ahead of the position: held too
    assert.deepEqual(offsets(r.endFill("room:lobby", { recovered: false, missed: 0, offset: 30, epoch: "E1" })), [20, 30]);
    assert.deepEqual(r.positions.get("room:lobby"), { offset: 30, epoch: "E1" });
  });

  it("a failed fill releases the held frames as they are", () => {
    const r = new Recovery();
    r.receive(chat(10, 0));
    r.receive(chat(20, 15));
    assert.deepEqual(offsets(r.endFill("room:lobby", null)), [20]);
  });

  it("prevOffset 0 continues any chain (nothing earlier left in the stream)", () => {
    const r = new Recovery();
    r.receive(chat(10, 0));
    assert.deepEqual(offsets(r.receive(chat(40, 0)).deliver), [40]);
  });

  it("starts again on a new epoch and says so", () => {
    const r = new Recovery();
    r.receive(chat(10, 0));
    const result = r.receive(chat(1, 0, { epoch: "E2" }));
    assert.deepEqual(offsets(result.deliver), [1]);
    assert.equal(result.epochChanged, true);
    assert.deepEqual(r.positions.get("room:lobby"), { offset: 1, epoch: "E2" });
  });

  it("during a resume, holds live frames that arrive before the replay of their channel", () => {
    // The inbox is delivered from authentication on: a live message can beat the replay.
    const dm = (offset, prevOffset) => ({ type: "direct:message", data: { offset, prevOffset, epoch: "D" } });
    const r = new Recovery();
    r.receive(dm(7, 5));
    const request = r.resumeRequest();
    r.beginResume(request);
    assert.deepEqual(r.receive(dm(10, 9)).deliver, [], "held, not delivered ahead of 8 and 9");
    assert.equal(r.receive(dm(10, 9)).fill, undefined, "no gap fill: the resume is one");
    for (const [o, p] of [[8, 7], [9, 8], [10, 9]]) assert.deepEqual(offsets(r.receive(dm(o, p)).deliver), [o]);
    const { deliver, events } = r.applyResume(request, {
      rooms: {}, direct: { recovered: true, missed: 3, offset: 10, epoch: "D" },
      global: { recovered: false, missed: 0, offset: 0, epoch: "G" },
    });
    assert.deepEqual(deliver, [], "the held copy of 10 was a duplicate");
    assert.deepEqual(events.map((e) => [e.channel, e.recovered]), [["direct", true], ["global", false]]);
  });

  it("after a resume that could not replay, releases the held frames in order", () => {
    const r = new Recovery();
    r.receive({ type: "direct:message", data: { offset: 7, prevOffset: 0, epoch: "D" } });
    const request = r.resumeRequest();
    r.beginResume(request);
    r.receive({ type: "direct:message", data: { offset: 90, prevOffset: 80, epoch: "D" } });
    const { deliver } = r.applyResume(request, {
      rooms: {}, direct: { recovered: false, missed: 0, offset: 90, epoch: "D" }, global: { recovered: false, missed: 0, offset: 0, epoch: "G" },
    });
    assert.deepEqual(offsets(deliver), [90]);
  });

  it("keeps channels apart", () => {
    const r = new Recovery();
    r.receive(chat(10, 0, { roomId: "a" }));
    r.receive(chat(11, 0, { roomId: "b" }));
    r.receive({ type: "direct:message", data: { offset: 3, prevOffset: 0, epoch: "D" } });
    assert.deepEqual(offsets(r.receive(chat(12, 10, { roomId: "a" })).deliver), [12]);
    assert.ok(r.receive({ type: "direct:message", data: { offset: 9, prevOffset: 5, epoch: "D" } }).fill);
  });

  it("forgets fills when the connection is lost (the resume replays them)", () => {
    const r = new Recovery();
    r.receive(chat(10, 0));
    r.receive(chat(20, 15));
    r.connectionLost();
    assert.deepEqual(r.positions.get("room:lobby"), { offset: 10, epoch: "E1" });
    assert.equal(r.fills.size, 0);
  });
});

describe("resume", () => {
  it("asks for every room, the inbox and global, with 0 where there is no position", () => {
    const r = new Recovery();
    r.joined("lobby");
    r.joined("empty");
    r.advance("room:lobby", 41, "E1");
    r.advance("direct", 7, "D1");
    assert.deepEqual(r.resumeRequest(), {
      rooms: { lobby: { offset: 41, epoch: "E1" }, empty: { offset: 0, epoch: "" } },
      direct: { offset: 7, epoch: "D1" },
      global: { offset: 0, epoch: "" },
    });
  });

  it("takes the ack's positions and reports each channel", () => {
    const r = new Recovery();
    for (const room of ["lobby", "secret", "busy"]) r.joined(room);
    r.advance("room:lobby", 41, "E1");
    const request = r.resumeRequest();
    const { events } = r.applyResume(request, {
      rooms: {
        lobby: { recovered: true, missed: 3, offset: 45, epoch: "E1" },
        secret: { recovered: false, error: { code: "forbidden", message: "token does not allow this room" } },
        busy: { recovered: false, error: { code: "unavailable", message: "recovery read failed" } },
      },
      direct: { recovered: false, missed: 0, offset: 9, epoch: "D1" },
      global: { recovered: true, missed: 0, offset: 0, epoch: "G1" },
    });
    assert.deepEqual(events, [
      { channel: "room:lobby", roomId: "lobby", recovered: true, missed: 3 },
      { channel: "room:secret", roomId: "secret", recovered: false, missed: 0, error: { code: "forbidden", message: "token does not allow this room" } },
      { channel: "room:busy", roomId: "busy", recovered: false, missed: 0, error: { code: "unavailable", message: "recovery read failed" } },
      { channel: "direct", recovered: false, missed: 0 },
      { channel: "global", recovered: true, missed: 0 },
    ]);
    assert.deepEqual(r.positions.get("room:lobby"), { offset: 45, epoch: "E1" });
    assert.deepEqual(r.positions.get("direct"), { offset: 9, epoch: "D1" });
    assert.deepEqual([...r.rooms].sort(), ["busy", "lobby"], "forbidden is forgotten, unavailable kept to retry");
  });

  it("round-trips through positions for a page reload", () => {
    const r = new Recovery();
    r.joined("lobby");
    r.advance("room:lobby", 41, "E1");
    r.advance("global", 3, "G1");
    const again = new Recovery(r.snapshot());
    assert.deepEqual(again.resumeRequest(), r.resumeRequest());
  });
});
