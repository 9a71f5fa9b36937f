// The sans-I/O core of the DDE gateway client (docs/clients-js.md): the protocol's state
// machine for /v1/stream (docs/protocol.md) with no socket, no timer and no clock of its own.
//
// The I/O layer (client.js) tells it what happened - a connection is being opened, it opened,
// a message arrived, it closed - and takes what the core produced: texts to send and events for
// the application. Everything the specification promises is decided here: which URL is next,
// the full-jitter backoff, what a (re)subscribe sends (after + epoch), the dedupe by
// (epoch, seq), and the `loss` events: the application sees each frame once, in order, or an
// explicit event saying what was not recovered. Never a silent skip.

/** The protocol versions this client speaks (the subprotocol offered at the upgrade). */
export const PROTOCOLS = Object.freeze(["dde.v1"]);
/** The subprotocol prefix that carries a token where headers cannot be set (browsers). */
export const BEARER_PREFIX = "dde.bearer.";

/** Defaults, in milliseconds (docs/clients-js.md lists them). */
export const DEFAULTS = Object.freeze({
  backoffMin: 100,
  backoffMax: 10_000,
  // A connection that lived this long resets the backoff to its minimum.
  backoffResetAfter: 10_000,
  // The gateway's heartbeat_interval; no message for watchdogFactor times it = a dead connection.
  heartbeatInterval: 10_000,
  watchdogFactor: 3,
  maxQueue: 10_000,
});

/** Full-jitter exponential backoff: attempt n waits a random time in [0, min(max, min * 2^n)]. */
export class Backoff {
  constructor({ min = DEFAULTS.backoffMin, max = DEFAULTS.backoffMax, random = Math.random } = {}) {
    if (!(min > 0) || !(max >= min)) throw new RangeError("backoff needs 0 < min <= max");
    this.min = min;
    this.max = max;
    this.random = random;
    this.attempt = 0;
  }

  /** The next delay (ms); each call doubles the ceiling up to `max`. */
  next() {
    const ceiling = Math.min(this.max, this.min * 2 ** this.attempt);
    if (ceiling < this.max) this.attempt += 1;
    return this.random() * ceiling;
  }

  reset() {
    this.attempt = 0;
  }
}

const key = (feed, fixture) => `${feed}\u0000${fixture}`;

function checkTopic(feed, fixture) {
  if (typeof feed !== "string" || feed === "") throw new TypeError("feed must be a non-empty string");
  if (typeof fixture !== "string" || fixture === "") {
    throw new TypeError("fixture must be a non-empty string");
  }
}

// The verbatim text of a frame's `data`: the gateway writes the envelope as
// {"type":"frame","feed":F,"fixture":X,"seq":S,"data":RAW} with RAW the vendor's bytes (and a
// replayed frame the same way, type "replay_frame").
function dataText(text, msg) {
  const prefix =
    `{"type":${JSON.stringify(msg.type)},"feed":${JSON.stringify(msg.feed)},"fixture":${JSON.stringify(msg.fixture)},` +
    `"seq":${msg.seq},"data":`;
  if (text.startsWith(prefix) && text.endsWith("}")) return text.slice(prefix.length, -1);
  return JSON.stringify(msg.data);
}

/**
 * One subscription's state: `subscribing` -> `subscribed` -> (`subscribing` on reconnect)
 * -> `unsubscribed`.
 */
class Subscription {
  constructor(feed, fixture, options) {
    this.feed = feed;
    this.fixture = fixture;
    this.backfill = options.backfill ?? 0;
    this.maxRate = options.maxRate ?? null;
    this.state = "subscribing";
    this.epoch = null;
    // The last seq handed to the application (null: none yet in this epoch).
    this.lastSeq = null;
    // Before the first frame: the seq the subscription's frames start after (backfill 0: the
    // topic's seq when subscribed; n: n before it), so a resume before any frame loses none.
    this.startAfter = null;
    this.resumed = false; // the subscribe in flight is a resume (after + epoch)
    this.sent = null; // the text of the subscribe in flight
    this.sequenceChecked = false; // a first frame arrived since the (re)subscribe
  }

  get conflated() {
    return this.maxRate !== null;
  }

  request() {
    const req = { op: "subscribe", feed: this.feed, fixture: this.fixture };
    // max_rate subscriptions are latest-only (docs/protocol.md): no `after`, never a resume.
    if (this.conflated) {
      req.max_rate = this.maxRate;
      this.resumed = this.epoch !== null;
    } else if (this.epoch !== null && (this.lastSeq ?? this.startAfter) !== null) {
      req.after = this.lastSeq ?? this.startAfter;
      req.epoch = this.epoch;
      this.resumed = true;
    } else {
      req.backfill = this.backfill;
      this.resumed = false;
    }
    this.sent = JSON.stringify(req);
    this.state = "subscribing";
    return this.sent;
  }
}

/** A replay asked for (issue 23's `replay` op): sent once; a lost connection ends it. */
class Replay {
  constructor(feed, fixture, options) {
    this.feed = feed;
    this.fixture = fixture;
    this.rate = options.rate;
    this.looped = Boolean(options.looped);
    this.from = options.from ?? null;
    this.lastSeq = null;
    this.sent = null;
  }

  request() {
    const req = { op: "replay", feed: this.feed, fixture: this.fixture, rate: this.rate };
    if (this.looped) req.looped = true;
    if (this.from !== null) req.from = this.from;
    this.sent = JSON.stringify(req);
    return this.sent;
  }
}

// The gateway truncates `request` in an error to 256 characters + "...": match either way.
function sameRequest(sent, request) {
  if (sent === null || typeof request !== "string") return false;
  if (sent === request) return true;
  return request.endsWith("...") && request.length > 3 && sent.startsWith(request.slice(0, -3));
}

/**
 * The client's protocol state, without I/O. Feed it with connecting(), opened(), received()
 * and closed(); take what it produced with takeOutgoing() and takeEvents().
 */
export class ClientCore {
  constructor(options = {}) {
    const urls = typeof options.urls === "string" ? [options.urls] : options.urls;
    if (!Array.isArray(urls) || urls.length === 0 || urls.some((u) => typeof u !== "string" || !u)) {
      throw new TypeError("urls must be a non-empty list of ws:// or wss:// URLs");
    }
    for (const url of urls) {
      if (!/^wss?:\/\//i.test(url)) throw new TypeError(`not a ws:// or wss:// URL: ${url}`);
    }
    this.urls = [...urls];
    // The connection option `?write_delay=MS` (docs/protocol.md): null = the gateway's default.
    this.writeDelay = options.writeDelay ?? null;
    if (this.writeDelay !== null && !(Number.isInteger(this.writeDelay) && this.writeDelay >= 0 && this.writeDelay <= 1000)) {
      throw new RangeError("writeDelay must be null or a whole number of milliseconds, 0 to 1000");
    }
    this.raw = Boolean(options.raw);
    this.heartbeatInterval = options.heartbeatInterval ?? DEFAULTS.heartbeatInterval;
    this.watchdogFactor = options.watchdogFactor ?? DEFAULTS.watchdogFactor;
    this.backoffResetAfter = options.backoffResetAfter ?? DEFAULTS.backoffResetAfter;
    this.backoff = new Backoff({
      min: options.backoffMin ?? DEFAULTS.backoffMin,
      max: options.backoffMax ?? DEFAULTS.backoffMax,
      random: options.random ?? Math.random,
    });
    /** `disconnected` -> `connecting` -> `connected` -> ... -> `closed` */
    this.state = "disconnected";
    this.url = null;
    this.next = 0; // index of the URL to try next
    this.openedAt = null;
    this.subs = new Map();
    this.replays = new Map();
    // The other requests sent on this connection (unsubscribe, stop_replay), to name the topic
    // of an error answering one: {text, feed, fixture}, the latest few.
    this.sentOther = [];
    this.outgoing = [];
    this.events = [];
    /** Counters an operator or a test may read. */
    this.stats = { duplicates: 0, reconnects: 0, connects: 0, losses: 0, pauses: 0, queueCloses: 0 };
  }

  // -- what the I/O layer calls -------------------------------------------------------------

  /** No message for this long (ms) means the connection is dead. */
  get watchdogMs() {
    return this.heartbeatInterval * this.watchdogFactor;
  }

  /** A connection is about to be opened: returns the URL to open (the next one in turn). */
  connecting() {
    if (this.state === "closed") throw new Error("the client is closed");
    this.url = this.urls[this.next % this.urls.length];
    this.next = (this.next + 1) % this.urls.length;
    this.setState("connecting", "");
    if (this.writeDelay === null) return this.url;
    return `${this.url}${this.url.includes("?") ? "&" : "?"}write_delay=${this.writeDelay}`;
  }

  /** The connection opened at time `now` (ms): every subscription is (re)sent. */
  opened(now) {
    if (this.state === "closed") return;
    this.openedAt = now;
    this.sentOther = [];
    this.stats.connects += 1;
    this.setState("connected", "");
    for (const sub of this.subs.values()) this.outgoing.push(sub.request());
    for (const replay of this.replays.values()) this.outgoing.push(replay.request());
  }

  /**
   * The connection closed (or failed to open) at `now`. `info`: {code, reason, httpStatus}.
   * Returns {retryIn: ms} or {fatal: true} (then the state is `closed`).
   */
  closed(now, info = {}) {
    if (this.state === "closed") return { fatal: true };
    const opened = this.openedAt !== null;
    const lived = opened ? now - this.openedAt : 0;
    this.openedAt = null;
    if (info.httpStatus === 401) {
      this.fail(`${this.url}: the gateway refused the token (HTTP 401)`);
      return { fatal: true };
    }
    if (lived >= this.backoffResetAfter) this.backoff.reset();
    let why;
    if (!opened) why = info.reason ? `cannot connect: ${info.reason}` : "cannot connect";
    else if (info.code && info.code !== 1006) {
      why = `closed ${info.code}${info.reason ? `: ${info.reason}` : ""}`;
    } else why = info.reason || "connection lost";
    this.setState("disconnected", why);
    // A replay the gateway was serving ends with the connection (the application may ask again).
    for (const [k, replay] of this.replays) {
      if (replay.sent === null) continue;
      this.replays.delete(k);
      this.emit({ event: "replay_end", feed: replay.feed, fixture: replay.fixture, reason: "disconnected", last_seq: replay.lastSeq });
    }
    for (const sub of this.subs.values()) if (sub.state === "subscribed") sub.state = "subscribing";
    this.stats.reconnects += 1;
    return { retryIn: this.backoff.next() };
  }

  /** A terminal error: the state becomes `closed`, no retry. */
  fail(message) {
    if (this.state === "closed") return;
    this.emit({ event: "error", message, request: null, feed: null, fixture: null, fatal: true });
    this.close(message);
  }

  /** The application's close(). */
  close(reason = "closed by the application") {
    if (this.state === "closed") return;
    for (const sub of this.subs.values()) this.endSubscription(sub, reason);
    this.replays.clear();
    this.setState("closed", reason);
  }

  /**
   * One text message from the gateway. With `raw`, a `raw` event first - except for a frame
   * dropped as a duplicate (the application has it already): what it prints has each frame once.
   */
  received(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      if (this.raw) this.emit({ event: "raw", text });
      this.emit({ event: "error", message: "the gateway sent invalid JSON", request: null, feed: null, fixture: null, fatal: false });
      return;
    }
    if (this.raw && msg?.type !== "frame") this.emit({ event: "raw", text });
    if (msg === null || typeof msg !== "object") return;
    switch (msg.type) {
      case "frame":
        this.onFrame(text, msg);
        break;
      case "subscribed":
        this.onSubscribed(msg);
        break;
      case "gap":
        this.onGap(msg);
        break;
      case "status":
        this.onStatus(msg);
        break;
      case "error":
        this.onError(msg);
        break;
      case "replay_started":
      case "replay_frame":
      case "replay_loop":
      case "replay_end":
        this.onReplay(text, msg);
        break;
      default:
        break; // heartbeat, and anything a newer gateway adds
    }
  }

  takeOutgoing() {
    const out = this.outgoing;
    this.outgoing = [];
    return out;
  }

  takeEvents() {
    const out = this.events;
    this.events = [];
    return out;
  }

  // -- what the application calls ------------------------------------------------------------

  /** Subscribe to (feed, fixture). options: {backfill: null|-1|0|n, maxRate: number|null}. */
  subscribe(feed, fixture, options = {}) {
    checkTopic(feed, fixture);
    if (this.state === "closed") throw new Error("the client is closed");
    const k = key(feed, fixture);
    if (this.subs.has(k)) throw new Error(`already subscribed to ${feed}/${fixture}`);
    const backfill = options.backfill ?? 0;
    if (backfill !== null && !(Number.isInteger(backfill) && backfill >= -1)) {
      throw new RangeError("backfill must be null or an integer >= -1");
    }
    const maxRate = options.maxRate ?? null;
    if (maxRate !== null && !(typeof maxRate === "number" && maxRate >= 0.01 && maxRate <= 1000)) {
      throw new RangeError("maxRate must be null or a number >= 0.01 and <= 1000");
    }
    if (maxRate !== null && backfill !== 0) {
      throw new RangeError("maxRate cannot be combined with a backfill other than 0");
    }
    const sub = new Subscription(feed, fixture, { backfill, maxRate });
    this.subs.set(k, sub);
    if (this.state === "connected") this.outgoing.push(sub.request());
    return sub;
  }

  unsubscribe(feed, fixture) {
    const sub = this.subs.get(key(feed, fixture));
    if (!sub) return;
    if (this.state === "connected") this.sendOther({ op: "unsubscribe", feed, fixture });
    this.endSubscription(sub, "unsubscribed by the application");
  }

  /** Replay a fixture from what the gateway holds (issue 23). options: {rate, looped, from}. */
  replay(feed, fixture, options) {
    checkTopic(feed, fixture);
    if (this.state === "closed") throw new Error("the client is closed");
    const rate = options?.rate;
    if (!Number.isInteger(rate) || rate < 1 || rate > 1000) {
      throw new RangeError("rate must be an integer 1 to 1000");
    }
    const k = key(feed, fixture);
    if (this.replays.has(k)) throw new Error(`already replaying ${feed}/${fixture}`);
    const replay = new Replay(feed, fixture, options);
    this.replays.set(k, replay);
    if (this.state === "connected") this.outgoing.push(replay.request());
    return replay;
  }

  stopReplay(feed, fixture) {
    const k = key(feed, fixture);
    if (!this.replays.has(k)) return;
    if (this.state === "connected") {
      this.sendOther({ op: "stop_replay", feed, fixture });
    } else {
      this.replays.delete(k);
      this.emit({ event: "replay_end", feed, fixture, reason: "stopped", last_seq: null });
    }
  }

  /** Subscriptions not ended yet. */
  get active() {
    return this.subs.size + this.replays.size;
  }

  // -- the protocol ----------------------------------------------------------------------------

  sendOther(req) {
    const text = JSON.stringify(req);
    this.sentOther.push({ text, feed: req.feed, fixture: req.fixture });
    if (this.sentOther.length > 64) this.sentOther.shift();
    this.outgoing.push(text);
  }

  setState(state, reason) {
    this.state = state;
    this.emit({ event: "state", state, url: this.url, reason });
  }

  emit(event) {
    this.events.push(event);
  }

  loss(sub, fromSeq, toSeq, epochBefore, epochAfter, reason) {
    this.stats.losses += 1;
    this.emit({
      event: "loss",
      feed: sub.feed,
      fixture: sub.fixture,
      from_seq: fromSeq,
      to_seq: toSeq,
      epoch_before: epochBefore,
      epoch_after: epochAfter,
      reason,
    });
  }

  endSubscription(sub, reason) {
    this.subs.delete(key(sub.feed, sub.fixture));
    sub.state = "unsubscribed";
    this.emit({ event: "unsubscribed", feed: sub.feed, fixture: sub.fixture, reason });
  }

  onSubscribed(msg) {
    const sub = this.subs.get(key(msg.feed, msg.fixture));
    if (!sub || sub.state !== "subscribing") return;
    const epochBefore = sub.epoch;
    const lastBefore = sub.lastSeq ?? sub.startAfter;
    const resumed = sub.resumed;
    sub.state = "subscribed";
    sub.sequenceChecked = false;
    this.emit({
      event: "subscribed",
      feed: sub.feed,
      fixture: sub.fixture,
      epoch: msg.epoch,
      seq: msg.seq,
      recovered: Boolean(msg.recovered),
      resumed,
    });
    if (sub.conflated) {
      // Latest only: seq jumps are the contract, so only the dedupe applies.
      if (msg.epoch !== epochBefore) sub.lastSeq = null;
      sub.epoch = msg.epoch;
      return;
    }
    sub.epoch = msg.epoch;
    if (!resumed) {
      // A first subscribe: whatever the backfill starts with is the first frame (the history
      // may hold fewer than asked). Live only: the next frame is seq + 1.
      sub.lastSeq = null;
      sub.startAfter = null;
      if (typeof msg.seq === "number" && sub.backfill === 0) {
        sub.lastSeq = msg.seq;
        sub.sequenceChecked = true;
      } else if (typeof msg.seq === "number" && sub.backfill > 0) {
        sub.startAfter = Math.max(0, msg.seq - sub.backfill);
      }
      return;
    }
    if (msg.recovered) {
      // Every frame after `after` follows (a recorder may have moved on to a new epoch whose
      // numbering continues the old one: the gateway says so with recovered: true).
      sub.sequenceChecked = true;
      return;
    }
    const reason = msg.epoch === epochBefore ? "not_recovered" : "epoch_changed";
    // A new epoch without a frame yet (seq 0): how far the loss goes is not known.
    const seq = typeof msg.seq === "number" ? msg.seq : null;
    const toSeq = reason === "epoch_changed" && seq === 0 ? null : seq;
    if (reason === "not_recovered" && toSeq !== null && toSeq <= lastBefore) {
      // Nothing was published since `after`: nothing to report, frames continue.
      sub.sequenceChecked = true;
      return;
    }
    this.loss(sub, lastBefore + 1, toSeq, epochBefore, msg.epoch, reason);
    sub.lastSeq = seq;
    sub.sequenceChecked = seq !== null;
  }

  onFrame(text, msg) {
    const sub = this.subs.get(key(msg.feed, msg.fixture));
    if (!sub || sub.state !== "subscribed" || typeof msg.seq !== "number") {
      if (this.raw) this.emit({ event: "raw", text });
      return;
    }
    const last = sub.lastSeq;
    if (last !== null && msg.seq <= last) {
      this.stats.duplicates += 1; // never delivered twice (nor printed twice by --raw)
      return;
    }
    if (this.raw) this.emit({ event: "raw", text });
    if (!sub.conflated && last !== null && sub.sequenceChecked && msg.seq > last + 1) {
      // No gap message said so: defensive, it should never happen.
      this.loss(sub, last + 1, msg.seq - 1, sub.epoch, sub.epoch, "sequence_gap");
    }
    sub.lastSeq = msg.seq;
    sub.sequenceChecked = true;
    const event = {
      event: "frame",
      feed: sub.feed,
      fixture: sub.fixture,
      epoch: sub.epoch,
      seq: msg.seq,
      data: msg.data,
    };
    // The vendor's frame text, byte for byte (not enumerable: JSON.stringify(event) skips it).
    Object.defineProperty(event, "dataText", { value: dataText(text, msg), enumerable: false });
    this.emit(event);
  }

  onGap(msg) {
    const sub = this.subs.get(key(msg.feed, msg.fixture));
    if (!sub || sub.state !== "subscribed") return;
    this.loss(sub, msg.from_seq, msg.to_seq, sub.epoch, sub.epoch, msg.reason || "slow_consumer");
    if (typeof msg.to_seq === "number" && (sub.lastSeq === null || msg.to_seq > sub.lastSeq)) {
      sub.lastSeq = msg.to_seq;
      sub.sequenceChecked = true;
    }
  }

  onStatus(msg) {
    const sub = this.subs.get(key(msg.feed, msg.fixture));
    if (!sub) return;
    this.emit({ event: "status", feed: sub.feed, fixture: sub.fixture, state: msg.state, detail: msg.detail ?? "" });
    if (msg.state === "stopped") this.endSubscription(sub, "stopped");
  }

  onError(msg) {
    const request = typeof msg.request === "string" ? msg.request : null;
    for (const sub of this.subs.values()) {
      if (sub.state === "subscribing" && sameRequest(sub.sent, request)) {
        this.emit({ event: "error", message: msg.message, request, feed: sub.feed, fixture: sub.fixture, fatal: false });
        this.endSubscription(sub, msg.message);
        return;
      }
    }
    for (const replay of this.replays.values()) {
      if (sameRequest(replay.sent, request)) {
        // A refused replay: the error says so, and it is over.
        this.replays.delete(key(replay.feed, replay.fixture));
        this.emit({ event: "error", message: msg.message, request, feed: replay.feed, fixture: replay.fixture, fatal: false });
        return;
      }
    }
    // An unsubscribe or stop_replay the gateway refused names its topic; anything else none.
    const other = this.sentOther.find((o) => sameRequest(o.text, request));
    this.emit({ event: "error", message: msg.message, request, feed: other?.feed ?? null, fixture: other?.fixture ?? null, fatal: false });
  }

  onReplay(text, msg) {
    const k = key(msg.feed, msg.fixture);
    const replay = this.replays.get(k);
    if (!replay) return;
    const { type, ...fields } = msg;
    if (type === "replay_end") this.replays.delete(k);
    const event = { event: type, ...fields };
    if (type === "replay_frame") {
      if (typeof msg.seq === "number") replay.lastSeq = msg.seq;
      Object.defineProperty(event, "dataText", { value: dataText(text, msg), enumerable: false });
    }
    this.emit(event);
  }
}
