// The client's I/O layer over a scripted WebSocket (node --test; run by tests/test_client_js.py):
// the bounded queue's two policies (pause a socket that can; close and resume one that cannot),
// the heartbeat watchdog, the token's two ways, async iteration to the end.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Client } from "../index.js";

const F = "tracking";
const X = "F1";

// A WebSocket the test drives: every instance is recorded in `sockets`.
function fakeSocket({ pausable }) {
  const sockets = [];
  class Fake {
    constructor(url, protocols, init) {
      this.url = url;
      this.protocols = protocols;
      this.init = init;
      this.readyState = 0;
      this.sent = [];
      this.paused = false;
      this.closedWith = null;
      sockets.push(this);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closedWith = [code, reason];
      this.readyState = 3;
      queueMicrotask(() => this.onclose?.({ code, reason }));
    }
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    deliver(obj) {
      this.onmessage?.({ data: typeof obj === "string" ? obj : JSON.stringify(obj) });
    }
  }
  if (pausable) {
    Fake.prototype.pause = function pause() {
      this.paused = true;
    };
    Fake.prototype.resume = function resume() {
      this.paused = false;
    };
  }
  return { Fake, sockets };
}

const frame = (seq) => ({ type: "frame", feed: F, fixture: X, seq, data: { ix: seq } });
const subscribed = (seq, epoch, recovered = false) => ({ type: "subscribed", feed: F, fixture: X, seq, epoch, recovered });

async function take(client, n) {
  const out = [];
  while (out.length < n) out.push(await client.nextEvent());
  return out;
}

test("a socket that can pause is paused when the queue is full, resumed below half", async () => {
  const { Fake, sockets } = fakeSocket({ pausable: true });
  const client = new Client("ws://a/v1/stream", { WebSocket: Fake, maxQueue: 10, token: "t0k" });
  client.subscribe(F, X);
  const ws = sockets[0];
  assert.deepEqual(ws.init, { headers: { Authorization: "Bearer t0k" } });
  assert.deepEqual(ws.protocols, ["dde.v1"]);
  ws.open();
  ws.deliver(subscribed(0, "e1"));
  for (let s = 1; s <= 7; s++) ws.deliver(frame(s));
  // state x2 + subscribed + 7 frames = 10 queued: full.
  assert.equal(ws.paused, true);
  assert.equal(client.stats.pauses, 1);
  await take(client, 4);
  assert.equal(ws.paused, true); // 6 left: above half
  await take(client, 1);
  assert.equal(ws.paused, false);
  const rest = await take(client, 5);
  assert.deepEqual(rest.map((e) => e.seq), [3, 4, 5, 6, 7]);
  client.close();
});

test("a socket that cannot pause (a browser's) is closed when full; resumed with after once drained", async () => {
  const { Fake, sockets } = fakeSocket({ pausable: false });
  const client = new Client(["ws://a/v1/stream", "ws://b/v1/stream"], {
    WebSocket: Fake,
    maxQueue: 10,
    token: "t0k",
    tokenIn: "subprotocol",
  });
  client.subscribe(F, X);
  const ws = sockets[0];
  assert.deepEqual(ws.protocols, ["dde.v1", "dde.bearer.t0k"]);
  assert.equal(ws.init, undefined);
  ws.open();
  ws.deliver(subscribed(0, "e1"));
  for (let s = 1; s <= 9; s++) ws.deliver(frame(s)); // 8 and 9 arrive after the close: ignored
  assert.deepEqual(ws.closedWith, [4000, "client queue full"]);
  await new Promise((r) => setTimeout(r, 0)); // the close event
  assert.equal(client.state, "disconnected");
  assert.equal(sockets.length, 1); // not before the application caught up
  const first = await take(client, 10);
  assert.deepEqual(first.filter((e) => e.event === "frame").map((e) => e.seq), [1, 2, 3, 4, 5, 6, 7]);
  assert.equal(sockets.length, 2);
  const next = sockets[1];
  assert.equal(next.url, "ws://b/v1/stream");
  next.open();
  assert.deepEqual(next.sent, [{ op: "subscribe", feed: F, fixture: X, after: 7, epoch: "e1" }]);
  next.deliver(subscribed(9, "e1", true));
  next.deliver(frame(8));
  next.deliver(frame(9));
  const events = await take(client, 5);
  assert.deepEqual(events.map((e) => e.event), ["state", "state", "state", "subscribed", "frame"]);
  assert.equal(events[0].reason, "the application's queue is full");
  assert.deepEqual((await take(client, 1)).map((e) => e.seq), [9]);
  client.close();
});

test("the watchdog: no message for 3 heartbeats closes and reconnects", async () => {
  const { Fake, sockets } = fakeSocket({ pausable: true });
  const client = new Client("ws://a/v1/stream", {
    WebSocket: Fake,
    heartbeatInterval: 40,
    backoffMin: 1,
    backoffMax: 2,
  });
  client.subscribe(F, X);
  sockets[0].open();
  const events = [];
  for (;;) {
    const e = await client.nextEvent();
    events.push(e);
    if (e.event === "state" && e.state === "disconnected") break;
  }
  assert.match(events.at(-1).reason, /heartbeat watchdog/);
  assert.deepEqual(sockets[0].closedWith, [4000, "no message from the gateway"]);
  while (sockets.length < 2) await new Promise((r) => setTimeout(r, 5));
  client.close();
});

test("onEvent: events delivered as they come; iteration ends after close", async () => {
  const { Fake, sockets } = fakeSocket({ pausable: false });
  const seen = [];
  const client = new Client("ws://a/v1/stream", { WebSocket: Fake, onEvent: (e) => seen.push(e.event) });
  client.subscribe(F, X);
  sockets[0].open();
  sockets[0].deliver(subscribed(0, "e1"));
  client.close();
  assert.deepEqual(seen, ["state", "state", "subscribed", "unsubscribed", "state"]);
  const other = new Client("ws://a/v1/stream", { WebSocket: Fake });
  other.subscribe(F, X);
  other.close();
  const iterated = [];
  for await (const e of other) iterated.push(e.event);
  assert.deepEqual(iterated, ["state", "unsubscribed", "state"]);
});

test("a token a subprotocol cannot carry is refused without quoting it", () => {
  const { Fake } = fakeSocket({ pausable: false });
  const secret = "s3cret with space";
  assert.throws(
    () => new Client("ws://a/v1/stream", { WebSocket: Fake, token: secret, tokenIn: "subprotocol" }),
    (err) => /cannot travel as a subprotocol/.test(err.message) && !err.message.includes(secret),
  );
  // A WebSocket that refuses the token itself: its message never reaches an event with it.
  class Refusing {
    constructor(url, protocols) {
      throw new SyntaxError(`The subprotocol '${protocols[1]}' is invalid.`);
    }
  }
  const events = [];
  const client = new Client("ws://a/v1/stream", {
    WebSocket: Refusing,
    token: "tok3n",
    tokenIn: "subprotocol",
    onEvent: (e) => events.push(e),
  });
  client.subscribe(F, X);
  const error = events.find((e) => e.event === "error");
  assert.equal(error.fatal, true);
  assert.equal(error.message, "cannot open ws://a/v1/stream: The subprotocol 'dde.bearer.<token>' is invalid.");
  assert.equal(client.state, "closed");
  assert.ok(!JSON.stringify(events).includes("tok3n"));
});

test("no WebSocket anywhere: a clear error", () => {
  const saved = globalThis.WebSocket;
  delete globalThis.WebSocket;
  try {
    assert.throws(() => new Client("ws://a/v1/stream"), /no WebSocket here/);
  } finally {
    if (saved) globalThis.WebSocket = saved;
  }
  assert.throws(() => new Client("ws://a/v1/stream", { WebSocket: class {}, maxQueue: 0 }), /maxQueue/);
});
