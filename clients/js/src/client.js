// The DDE gateway client (docs/clients-js.md): the sans-I/O core (core.js) driven over a
// WebSocket - the browser's, Node's global one, or an injected constructor (NodeWebSocket from
// node.js, or the `ws` package) - with timers for the backoff and the heartbeat watchdog, and
// a bounded queue of events for the application.
//
// Slow application: at most `maxQueue` events wait for it. When the queue is full the client
// stops reading: with a WebSocket that can pause (NodeWebSocket, `ws`) it pauses the socket, so
// the gateway sees a slow consumer and applies its own policy; with one that cannot (browsers)
// it closes the connection and, once the application has caught up, resumes with `after` from
// the last frame it queued. Either way the gateway backfills what it still holds, and anything
// it no longer holds arrives as a `loss` event: memory stays bounded, nothing is lost silently.

import { BEARER_PREFIX, ClientCore, DEFAULTS, PROTOCOLS } from "./core.js";

// The characters of a subprotocol name (RFC 6455: an HTTP token).
const SUBPROTOCOL_TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

/** The close code the client uses when it leaves on its own (queue full, watchdog). */
export const CLIENT_CLOSE = 4000;

export class Client {
  /**
   * @param {string | string[]} urls one gateway, or the instances of one cluster
   * @param {object} [options] see index.d.ts (ClientOptions)
   */
  constructor(urls, options = {}) {
    this.core = new ClientCore({ ...options, urls });
    this.token = options.token ?? null;
    if (this.token !== null && (typeof this.token !== "string" || this.token === "")) {
      throw new TypeError("token must be a non-empty string");
    }
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new TypeError(
        "no WebSocket here: pass options.WebSocket (NodeWebSocket, exported by @dde/gateway-client/node, or the ws package)",
      );
    }
    this.tokenIn = options.tokenIn ?? (options.WebSocket ? "header" : "subprotocol");
    if (this.tokenIn !== "header" && this.tokenIn !== "subprotocol") {
      throw new TypeError('tokenIn must be "header" or "subprotocol"');
    }
    // Said here, without the token: a browser's own error would quote it.
    if (this.token !== null && this.tokenIn === "subprotocol" && !SUBPROTOCOL_TOKEN.test(this.token)) {
      throw new TypeError(
        "the token cannot travel as a subprotocol: only letters, digits and !#$%&'*+-.^_`|~ can (use tokenIn: \"header\")",
      );
    }
    this.socketOptions = options.socketOptions ?? {};
    this.maxQueue = options.maxQueue ?? DEFAULTS.maxQueue;
    if (!Number.isInteger(this.maxQueue) || this.maxQueue < 1) {
      throw new RangeError("maxQueue must be an integer >= 1");
    }
    this.onEvent = options.onEvent ?? null;
    this.now = options.now ?? (() => Date.now());
    this.queue = [];
    this.head = 0;
    this.waiters = [];
    this.ws = null;
    this.paused = false; // stopped reading: the queue is full
    this.leftForQueue = false; // closed by us because the queue was full (cannot pause)
    this.retryTimer = null;
    this.watchdog = null;
    this.lastSeen = 0;
    this.started = false;
  }

  /** `disconnected`, `connecting`, `connected` or `closed`. */
  get state() {
    return this.core.state;
  }

  /** Counters: duplicates dropped, reconnects, connects, losses, pauses. */
  get stats() {
    return { ...this.core.stats, queued: this.queue.length - this.head };
  }

  subscribe(feed, fixture, options = {}) {
    this.core.subscribe(feed, fixture, options);
    this.flush();
    this.start();
    return this;
  }

  unsubscribe(feed, fixture) {
    this.core.unsubscribe(feed, fixture);
    this.flush();
  }

  replay(feed, fixture, options) {
    this.core.replay(feed, fixture, options);
    this.flush();
    this.start();
    return this;
  }

  stopReplay(feed, fixture) {
    this.core.stopReplay(feed, fixture);
    this.flush();
  }

  /** Close for good (state `closed`); events already queued can still be read. */
  close() {
    if (this.core.state === "closed") return;
    this.core.close();
    this.teardown(1000, "client closed");
    this.flush();
  }

  /** The events, in order: `for await (const event of client) ...`. Ends once closed. */
  async *events() {
    for (;;) {
      const event = await this.nextEvent();
      if (event === null) return;
      yield event;
    }
  }

  [Symbol.asyncIterator]() {
    return this.events();
  }

  /** The next event, or null once the client is closed and every event was read. */
  nextEvent() {
    if (this.head < this.queue.length) {
      const event = this.queue[this.head];
      this.queue[this.head] = undefined;
      this.head += 1;
      if (this.head > 1024 && this.head * 2 > this.queue.length) {
        this.queue = this.queue.slice(this.head);
        this.head = 0;
      }
      this.drained();
      return Promise.resolve(event);
    }
    if (this.core.state === "closed") return Promise.resolve(null);
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  // -- I/O -------------------------------------------------------------------------------------

  start() {
    if (this.started || this.core.state === "closed") return;
    this.started = true;
    this.connect();
  }

  connect() {
    this.retryTimer = null;
    if (this.core.state === "closed") return;
    const url = this.core.connecting();
    const protocols = [...PROTOCOLS];
    const init = { ...this.socketOptions };
    if (this.token !== null) {
      if (this.tokenIn === "header") {
        init.headers = { ...init.headers, Authorization: `Bearer ${this.token}` };
      } else {
        protocols.push(BEARER_PREFIX + this.token);
      }
    }
    let ws;
    try {
      ws = this.tokenIn === "header" || Object.keys(init).length
        ? new this.WebSocket(url, protocols, init)
        : new this.WebSocket(url, protocols);
    } catch (err) {
      // A URL or a token a WebSocket refuses (a token with characters a subprotocol cannot
      // hold throws a SyntaxError): no connection can ever work.
      const why = this.token === null ? err.message : err.message.split(this.token).join("<token>");
      this.core.fail(`cannot open ${url}: ${why}`);
      this.flush();
      return;
    }
    this.ws = ws;
    let status = null;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.lastSeen = this.now();
      this.core.opened(this.now());
      this.armWatchdog();
      this.flush();
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws || this.leftForQueue) return;
      this.lastSeen = this.now();
      if (typeof event.data !== "string") return; // the gateway sends text only
      this.core.received(event.data);
      this.flush();
    };
    ws.onerror = (event) => {
      // NodeWebSocket reports the status of a refused upgrade; `ws` says it in its message.
      status = event?.httpStatus ?? status;
      const m = /Unexpected server response: (\d+)/.exec(event?.message ?? event?.error?.message ?? "");
      if (m) status = Number(m[1]);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.clearWatchdog();
      this.paused = false;
      const leftForQueue = this.leftForQueue;
      this.leftForQueue = false;
      const outcome = this.core.closed(this.now(), {
        code: leftForQueue ? undefined : event?.code,
        reason: leftForQueue ? "the application's queue is full" : event?.reason,
        httpStatus: event?.httpStatus ?? status,
      });
      this.flush();
      if (outcome.fatal) return;
      if (leftForQueue && this.queued > this.maxQueue / 2) {
        this.waitingForDrain = true; // drained() reconnects
        return;
      }
      this.retryTimer = setTimeout(() => this.connect(), outcome.retryIn);
    };
  }

  get queued() {
    return this.queue.length - this.head;
  }

  // Move what the core produced out: texts to the socket, events to the application.
  flush() {
    const ws = this.ws;
    for (const text of this.core.takeOutgoing()) {
      if (ws && ws.readyState === 1) ws.send(text);
    }
    const events = this.core.takeEvents();
    if (this.onEvent) {
      for (const event of events) this.onEvent(event);
    } else {
      for (const event of events) {
        const waiter = this.waiters.shift();
        if (waiter) waiter(event);
        else this.queue.push(event);
      }
      if (this.queued >= this.maxQueue) this.full();
    }
    if (this.core.state === "closed") {
      for (const waiter of this.waiters.splice(0)) waiter(null);
    }
  }

  // The queue is full: stop reading.
  full() {
    const ws = this.ws;
    if (!ws || this.paused || this.leftForQueue) return;
    if (typeof ws.pause === "function" && typeof ws.resume === "function") {
      this.paused = true;
      this.core.stats.pauses += 1;
      ws.pause();
    } else {
      this.leftForQueue = true;
      this.core.stats.queueCloses += 1;
      ws.close(CLIENT_CLOSE, "client queue full");
    }
  }

  // The application read an event: read the socket again below half the queue.
  drained() {
    if (this.queued > this.maxQueue / 2) return;
    if (this.paused && this.ws) {
      this.paused = false;
      this.lastSeen = this.now();
      this.ws.resume();
    }
    if (this.waitingForDrain) {
      this.waitingForDrain = false;
      this.connect();
    }
  }

  armWatchdog() {
    this.clearWatchdog();
    const limit = this.core.watchdogMs;
    this.watchdog = setInterval(() => {
      if (!this.ws || this.paused) return;
      if (this.now() - this.lastSeen > limit) {
        const ws = this.ws;
        this.ws = null;
        this.clearWatchdog();
        try {
          ws.close(CLIENT_CLOSE, "no message from the gateway");
        } catch {
          // already closing
        }
        const outcome = this.core.closed(this.now(), {
          reason: `no message for ${Math.round(limit / 1000)} s (heartbeat watchdog)`,
        });
        this.flush();
        if (!outcome.fatal) this.retryTimer = setTimeout(() => this.connect(), outcome.retryIn);
      }
    }, Math.max(50, Math.min(1000, limit / 4)));
  }

  clearWatchdog() {
    if (this.watchdog !== null) clearInterval(this.watchdog);
    this.watchdog = null;
  }

  teardown(code, reason) {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.waitingForDrain = false;
    this.clearWatchdog();
    const ws = this.ws;
    this.ws = null;
    if (!ws) return;
    if (ws.readyState === 0 && typeof ws.pause !== "function") {
      // A browser logs an error for a close before the open: close once it is open.
      ws.onopen = () => ws.close(code, reason);
      ws.onmessage = null;
    } else {
      ws.close(code, reason);
    }
  }
}
