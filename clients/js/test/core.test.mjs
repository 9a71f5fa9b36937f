// The sans-I/O core against scripted gateway messages (node --test; run by
// tests/test_client_js.py). Every case asserts what the application would see, event by event.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Backoff, ClientCore } from "../index.js";

const F = "tracking";
const X = "F1";

function core(options = {}) {
  return new ClientCore({ urls: ["ws://a/v1/stream", "ws://b/v1/stream"], random: () => 1, ...options });
}

const msg = (o) => JSON.stringify(o);
const subscribed = (seq, epoch, recovered = false) =>
  msg({ type: "subscribed", feed: F, fixture: X, seq, epoch, recovered });
const frame = (seq, data = { ix: seq }) => `{"type":"frame","feed":"${F}","fixture":"${X}","seq":${seq},"data":${JSON.stringify(data)}}`;

// Connect, open, and return the texts sent.
function open(c, now = 0) {
  c.connecting();
  c.opened(now);
  return c.takeOutgoing().map((t) => JSON.parse(t));
}

const kinds = (events) => events.map((e) => (e.event === "frame" ? `frame ${e.seq}` : e.event === "loss" ? `loss ${e.from_seq}-${e.to_seq} ${e.reason}` : e.event));

test("first subscribe sends the backfill option, frames come through once", () => {
  const c = core();
  c.subscribe(F, X, { backfill: 5 });
  assert.deepEqual(open(c), [{ op: "subscribe", feed: F, fixture: X, backfill: 5 }]);
  c.received(subscribed(10, "e1"));
  for (const s of [6, 7, 8, 9, 10, 11]) c.received(frame(s));
  c.received(frame(11)); // a duplicate
  const events = c.takeEvents();
  assert.deepEqual(kinds(events), ["state", "state", "subscribed", "frame 6", "frame 7", "frame 8", "frame 9", "frame 10", "frame 11"]);
  assert.equal(c.stats.duplicates, 1);
  assert.equal(events[2].resumed, false);
  assert.equal(events[3].epoch, "e1");
});

test("frame data is kept verbatim (decimal strings, spacing)", () => {
  const c = core();
  c.subscribe(F, X);
  open(c);
  c.received(subscribed(0, "e1"));
  c.received(`{"type":"frame","feed":"${F}","fixture":"${X}","seq":1,"data":{"x": 1.50,"y":"a"}}`);
  const f = c.takeEvents().find((e) => e.event === "frame");
  assert.equal(f.dataText, '{"x": 1.50,"y":"a"}');
  assert.deepEqual(f.data, { x: 1.5, y: "a" });
  assert.equal(JSON.stringify(f).includes("dataText"), false);
});

test("reconnect: next URL, resume with after + epoch, recovered: no loss", () => {
  const c = core();
  c.subscribe(F, X, { backfill: -1 });
  open(c);
  c.received(subscribed(3, "e1"));
  for (const s of [1, 2, 3, 4]) c.received(frame(s));
  c.takeEvents();
  const out = c.closed(100, { code: 1006 });
  assert.ok(out.retryIn >= 100 && out.retryIn <= 10_000);
  assert.equal(c.connecting(), "ws://b/v1/stream");
  c.opened(200);
  assert.deepEqual(c.takeOutgoing().map((t) => JSON.parse(t)), [
    { op: "subscribe", feed: F, fixture: X, after: 4, epoch: "e1" },
  ]);
  c.received(subscribed(6, "e1", true));
  c.received(frame(4)); // replayed by an overlapping backfill: dropped
  c.received(frame(5));
  c.received(frame(6));
  const events = c.takeEvents();
  assert.deepEqual(kinds(events), ["state", "state", "state", "subscribed", "frame 5", "frame 6"]);
  assert.deepEqual(
    { resumed: events[3].resumed, recovered: events[3].recovered },
    { resumed: true, recovered: true },
  );
  assert.equal(c.connecting(), "ws://a/v1/stream"); // and round again
});

test("not recovered: a loss event before the next frame, with the range", () => {
  const c = core();
  c.subscribe(F, X);
  open(c);
  c.received(subscribed(0, "e1"));
  c.received(frame(1));
  c.received(frame(2));
  c.closed(1, {});
  open(c);
  c.takeEvents();
  c.received(subscribed(40, "e1", false));
  c.received(frame(41));
  const events = c.takeEvents();
  assert.deepEqual(kinds(events), ["subscribed", "loss 3-40 not_recovered", "frame 41"]);
  assert.equal(events[1].epoch_before, "e1");
  assert.equal(events[1].epoch_after, "e1");
});

test("a resume answered by an instance behind the client (same epoch): no loss, nothing twice", () => {
  // Failover in a cluster to an instance still catching up: recovered false, its seq below ours.
  const c = core();
  c.subscribe(F, X);
  open(c);
  c.received(subscribed(0, "e1"));
  for (let s = 1; s <= 50; s++) c.received(frame(s));
  c.closed(1, {});
  open(c);
  c.takeEvents();
  c.received(subscribed(40, "e1", false));
  for (let s = 41; s <= 52; s++) c.received(frame(s));
  assert.deepEqual(kinds(c.takeEvents()), ["subscribed", "frame 51", "frame 52"]);
  assert.equal(c.stats.duplicates, 10);
  assert.equal(c.stats.losses, 0);
});

test("a lost connection: the state event first, then the replays it ended", () => {
  const c = core();
  c.replay(F, X, { rate: 10 });
  open(c);
  c.takeEvents();
  c.closed(1, { code: 1001, reason: "going away" });
  assert.deepEqual(c.takeEvents().map((e) => e.event), ["state", "replay_end"]);
});

test("a new epoch with no frame yet: the loss says to_seq null", () => {
  const c = core();
  c.subscribe(F, X);
  open(c);
  c.received(subscribed(0, "e1"));
  c.received(frame(1));
  c.closed(1, {});
  open(c);
  c.takeEvents();
  c.received(subscribed(0, "e2", false));
  c.received(frame(1));
  assert.deepEqual(kinds(c.takeEvents()), ["subscribed", "loss 2-null epoch_changed", "frame 1"]);
});

test("errors: a refused unsubscribe names its topic, a refused replay ends it, others name none", () => {
  const c = core();
  c.subscribe(F, X);
  c.subscribe(F, "Y");
  open(c);
  c.received(subscribed(0, "e1"));
  c.unsubscribe(F, X);
  const request = c.takeOutgoing().at(-1);
  assert.deepEqual(JSON.parse(request), { op: "unsubscribe", feed: F, fixture: X });
  c.received(msg({ type: "error", message: `not subscribed to tracking/${X}`, request }));
  c.replay(F, "Y", { rate: 5 });
  const replayed = c.takeOutgoing().at(-1);
  c.received(msg({ type: "error", message: "no recording reaches the start of tracking/Y", request: replayed }));
  c.received(msg({ type: "error", message: "invalid JSON", request: "{" }));
  const errors = c.takeEvents().filter((e) => e.event === "error" || e.event.startsWith("replay"));
  assert.deepEqual(errors.map((e) => [e.event, e.feed, e.fixture]), [
    ["error", F, X],
    ["error", F, "Y"],
    ["error", null, null],
  ]);
  assert.equal(c.active, 1); // the subscription to Y goes on
});

test("why a connection ended: never opened, closed with a code, lost", () => {
  const c = core();
  c.subscribe(F, X);
  c.connecting();
  c.closed(0, { reason: "connect ECONNREFUSED 127.0.0.1:9" });
  c.connecting();
  c.closed(0, { code: 1006 });
  open(c);
  c.closed(0, { code: 4008, reason: "slow consumer" });
  open(c);
  c.closed(0, { code: 1006, reason: "" });
  const reasons = c.takeEvents().filter((e) => e.state === "disconnected").map((e) => e.reason);
  assert.deepEqual(reasons, ["cannot connect: connect ECONNREFUSED 127.0.0.1:9", "cannot connect", "closed 4008: slow consumer", "connection lost"]);
});

test("a new epoch (gateway restarted without a recorder): loss epoch_changed", () => {
  const c = core();
  c.subscribe(F, X);
  open(c);
  c.received(subscribed(0, "e1"));
  c.received(frame(1));
  c.closed(1, {});
  open(c);
  c.takeEvents();
  c.received(subscribed(7, "e2", false));
  c.received(frame(8));
  c.received(frame(1)); // old numbering of the new epoch: a duplicate by (epoch, seq)
  const events = c.takeEvents();
  assert.deepEqual(kinds(events), ["subscribed", "loss 2-7 epoch_changed", "frame 8"]);
  assert.deepEqual([events[1].epoch_before, events[1].epoch_after], ["e1", "e2"]);
  assert.equal(events[2].epoch, "e2");
});

test("gap message and an unexplained seq jump are both loss events", () => {
  const c = core();
  c.subscribe(F, X);
  open(c);
  c.received(subscribed(0, "e1"));
  c.received(frame(1));
  c.received(msg({ type: "gap", feed: F, fixture: X, from_seq: 2, to_seq: 9, reason: "slow_consumer" }));
  c.received(frame(10));
  c.received(frame(12));
  assert.deepEqual(kinds(c.takeEvents()).slice(3), [
    "frame 1",
    "loss 2-9 slow_consumer",
    "frame 10",
    "loss 11-11 sequence_gap",
    "frame 12",
  ]);
  assert.equal(c.stats.losses, 2);
});

test("max_rate subscriptions: seq jumps are no loss, resubscribed live only", () => {
  const c = core();
  c.subscribe(F, X, { maxRate: 10 });
  assert.deepEqual(open(c), [{ op: "subscribe", feed: F, fixture: X, max_rate: 10 }]);
  c.received(subscribed(0, "e1"));
  c.received(frame(1));
  c.received(frame(5));
  c.closed(1, {});
  assert.deepEqual(open(c), [{ op: "subscribe", feed: F, fixture: X, max_rate: 10 }]);
  c.received(subscribed(30, "e1"));
  c.received(frame(31));
  assert.deepEqual(kinds(c.takeEvents()).filter((k) => k !== "state"), [
    "subscribed", "frame 1", "frame 5", "subscribed", "frame 31",
  ]);
});

test("an error in reply to a subscribe ends that subscription, text verbatim", () => {
  const c = core();
  c.subscribe(F, "nope");
  c.subscribe(F, X);
  const sent = (open(c), null);
  void sent;
  const request = JSON.stringify({ op: "subscribe", feed: F, fixture: "nope", backfill: 0 });
  c.received(msg({ type: "error", message: "unknown fixture 'nope' of feed 'tracking'", request }));
  const events = c.takeEvents().filter((e) => e.event !== "state");
  assert.deepEqual(events, [
    { event: "error", message: "unknown fixture 'nope' of feed 'tracking'", request, feed: F, fixture: "nope", fatal: false },
    { event: "unsubscribed", feed: F, fixture: "nope", reason: "unknown fixture 'nope' of feed 'tracking'" },
  ]);
  assert.equal(c.active, 1);
  // Not retried on the next connection.
  c.closed(1, {});
  assert.deepEqual(open(c).map((r) => r.fixture), [X]);
});

test("a truncated request still names its subscription", () => {
  const c = core();
  const long = "x".repeat(300);
  c.subscribe(F, long);
  open(c);
  const sent = JSON.stringify({ op: "subscribe", feed: F, fixture: long, backfill: 0 });
  c.received(msg({ type: "error", message: "unknown fixture", request: `${sent.slice(0, 256)}...` }));
  const err = c.takeEvents().find((e) => e.event === "error");
  assert.equal(err.fixture, long);
});

test("status stopped: a status event, then unsubscribed", () => {
  const c = core();
  c.subscribe(F, X);
  open(c);
  c.received(subscribed(0, "e1"));
  c.received(msg({ type: "status", feed: F, fixture: X, state: "stopped", detail: "" }));
  assert.deepEqual(kinds(c.takeEvents()).slice(2), ["subscribed", "status", "unsubscribed"]);
  assert.equal(c.active, 0);
});

test("401 at the upgrade is fatal: error fatal, state closed, no retry", () => {
  const c = core();
  c.subscribe(F, X);
  c.connecting();
  assert.deepEqual(c.closed(5, { httpStatus: 401 }), { fatal: true });
  const events = c.takeEvents();
  assert.equal(c.state, "closed");
  const err = events.find((e) => e.event === "error");
  assert.equal(err.fatal, true);
  assert.match(err.message, /401/);
  assert.deepEqual(events.at(-1), { event: "state", state: "closed", url: "ws://a/v1/stream", reason: err.message.replace(/^/, "") });
  assert.throws(() => c.connecting());
});

test("raw: every message as it came, before what it means", () => {
  const c = core({ raw: true });
  c.subscribe(F, X);
  open(c);
  c.takeEvents();
  const hb = msg({ type: "heartbeat", time: "2026-01-01T00:00:00.000Z" });
  c.received(hb);
  c.received(subscribed(0, "e1"));
  const events = c.takeEvents();
  assert.deepEqual(events.map((e) => e.event), ["raw", "raw", "subscribed"]);
  assert.equal(events[0].text, hb);
  // A frame dropped as a duplicate is not in the raw output either: each frame once.
  c.received(frame(1));
  c.received(frame(1));
  c.received(frame(2));
  assert.deepEqual(c.takeEvents().map((e) => (e.event === "raw" ? `raw ${JSON.parse(e.text).seq}` : e.event)), [
    "raw 1", "frame", "raw 2", "frame",
  ]);
});

test("replay messages become replay events; a lost connection ends the replay", () => {
  const c = core();
  c.replay(F, X, { rate: 40 });
  assert.deepEqual(open(c), [{ op: "replay", feed: F, fixture: X, rate: 40 }]);
  c.received(msg({ type: "replay_started", feed: F, fixture: X, epoch: "e1", from_seq: 1, rate: 40, looped: false }));
  c.received(msg({ type: "replay_frame", feed: F, fixture: X, seq: 1, data: { ix: 1 } }));
  c.received(msg({ type: "replay_frame", feed: F, fixture: X, seq: 2, data: { ix: 2 } }));
  c.closed(1, {});
  assert.deepEqual(open(c), []); // not asked again: the application decides
  const events = c.takeEvents().filter((e) => e.event !== "state");
  assert.deepEqual(events.map((e) => e.event), ["replay_started", "replay_frame", "replay_frame", "replay_end"]);
  assert.deepEqual(events[1], { event: "replay_frame", feed: F, fixture: X, seq: 1, data: { ix: 1 } });
  assert.equal(events[1].dataText, '{"ix":1}');
  assert.deepEqual(events[3], { event: "replay_end", feed: F, fixture: X, reason: "disconnected", last_seq: 2 });
  assert.equal(c.active, 0);
  // Asked while disconnected: sent once connected; the gateway's own end ends it.
  c.closed(2, {});
  c.replay(F, X, { rate: 40, from: { seq: 5 } });
  assert.deepEqual(open(c), [{ op: "replay", feed: F, fixture: X, rate: 40, from: { seq: 5 } }]);
  c.received(msg({ type: "replay_end", feed: F, fixture: X, reason: "end", last_seq: 9 }));
  assert.deepEqual(c.takeEvents().at(-1), { event: "replay_end", feed: F, fixture: X, reason: "end", last_seq: 9 });
  assert.equal(c.active, 0);
  assert.throws(() => c.replay(F, X, { rate: 0 }), /rate must be an integer 1 to 1000/);
  c.replay(F, X, { rate: 5, looped: true, from: { ut: 1000 } });
  c.stopReplay(F, X);
  assert.deepEqual(JSON.parse(c.takeOutgoing().at(-1)), { op: "stop_replay", feed: F, fixture: X });
});

test("a connection lost before the first frame resumes from the subscribe's seq", () => {
  // Live only (backfill 0): the frames published while disconnected are not lost.
  const c = core();
  c.subscribe(F, X);
  open(c);
  c.received(subscribed(100, "e1"));
  c.closed(1, {});
  assert.deepEqual(open(c), [{ op: "subscribe", feed: F, fixture: X, after: 100, epoch: "e1" }]);
  c.received(subscribed(150, "e1", true));
  c.received(frame(101));
  c.received(frame(103)); // a seq the gateway skipped without a gap message
  assert.deepEqual(kinds(c.takeEvents()).filter((k) => k !== "state"), [
    "subscribed", "subscribed", "frame 101", "loss 102-102 sequence_gap", "frame 103",
  ]);
  // backfill n: from n before the seq of the subscribe; not recovered: the loss from there.
  const b = core();
  b.subscribe(F, X, { backfill: 10 });
  open(b);
  b.received(subscribed(100, "e1"));
  b.closed(1, {});
  assert.deepEqual(open(b), [{ op: "subscribe", feed: F, fixture: X, after: 90, epoch: "e1" }]);
  b.received(subscribed(500, "e1", false));
  assert.deepEqual(kinds(b.takeEvents()).slice(-1), ["loss 91-500 not_recovered"]);
  // backfill -1 (everything held) before any frame: asked again as it was.
  const a = core();
  a.subscribe(F, X, { backfill: -1 });
  open(a);
  a.received(subscribed(100, "e1"));
  a.closed(1, {});
  assert.deepEqual(open(a), [{ op: "subscribe", feed: F, fixture: X, backfill: -1 }]);
});

test("writeDelay: the connection option in every URL opened", () => {
  const c = core({ writeDelay: 5, urls: ["ws://a/v1/stream", "ws://b/v1/stream?x=1"] });
  assert.deepEqual([c.connecting(), c.connecting()], ["ws://a/v1/stream?write_delay=5", "ws://b/v1/stream?x=1&write_delay=5"]);
  assert.equal(c.url, "ws://b/v1/stream?x=1"); // what state events name
  assert.throws(() => core({ writeDelay: 1001 }), /writeDelay/);
  assert.throws(() => core({ writeDelay: 1.5 }), /writeDelay/);
});

test("bad arguments are refused with the field named", () => {
  assert.throws(() => new ClientCore({ urls: [] }), /urls/);
  assert.throws(() => new ClientCore({ urls: ["http://x"] }), /ws:\/\//);
  const c = core();
  assert.throws(() => c.subscribe("", X), /feed/);
  assert.throws(() => c.subscribe(F, X, { backfill: -2 }), /backfill/);
  assert.throws(() => c.subscribe(F, X, { maxRate: 0.001 }), /maxRate/);
  assert.throws(() => c.subscribe(F, X, { maxRate: 5, backfill: 3 }), /maxRate/);
  c.subscribe(F, X);
  assert.throws(() => c.subscribe(F, X), /already subscribed/);
});

test("backoff: full jitter, capped, reset after a connection that lived long enough", () => {
  const b = new Backoff({ min: 100, max: 1000, random: () => 1 });
  assert.deepEqual([1, 2, 3, 4, 5, 6].map(() => b.next()), [100, 200, 400, 800, 1000, 1000]);
  const zero = new Backoff({ min: 100, max: 1000, random: () => 0 });
  assert.equal(zero.next(), 0); // full jitter: anywhere in [0, ceiling]
  const c = core({ backoffMin: 100, backoffMax: 10_000 });
  c.subscribe(F, X);
  const delays = [];
  for (let i = 0; i < 4; i++) {
    c.connecting();
    delays.push(c.closed(0, {}).retryIn);
  }
  assert.deepEqual(delays, [100, 200, 400, 800]);
  c.connecting();
  c.opened(0);
  assert.equal(c.closed(10_000, {}).retryIn, 100); // lived 10 s: reset
  assert.equal(c.watchdogMs, 30_000);
});
