// One subscription on the gateway's subscriber stream (/v1/stream, docs/protocol.md), kept
// open while a fixture view is: it reconnects after a lost connection.
//
// Browsers cannot set headers on a WebSocket, so a subscriber token travels the way the
// stream endpoint documents for them: the subprotocol "dde.bearer.<token>", offered next to
// "dde.v1" (the gateway answers "dde.v1" and never echoes the token's protocol).

const RETRY_MIN = 1000; // ms
const RETRY_MAX = 10000;

// The stream's URL from /v1/status's `stream` object; null host = the host of this page.
export function streamUrl(stream, pageHost = location.hostname) {
  let host = stream.host ?? pageHost;
  if (host.includes(":") && !host.startsWith("[")) host = `[${host}]`; // an IPv6 literal
  return `${stream.scheme}://${host}:${stream.port}${stream.path}`;
}

export class Subscription {
  // request: the subscribe message's fields ({feed, fixture, max_rate, backfill, ...}).
  // on: {message(msg), state(text, ok)} callbacks.
  constructor(url, token, request, on) {
    this.url = url;
    this.token = token;
    this.request = request;
    this.on = on;
    this.ws = null;
    this.closed = false;
    this.retry = RETRY_MIN;
    this.timer = null;
    this.connect();
  }

  connect() {
    if (this.closed) return;
    const protocols = ["dde.v1"];
    if (this.token) protocols.push(`dde.bearer.${this.token}`);
    let ws;
    try {
      ws = new WebSocket(this.url, protocols);
    } catch (err) {
      // A token with characters a subprotocol name cannot hold (SyntaxError).
      this.on.state(`cannot open the stream: ${err.message}`, false);
      return;
    }
    this.ws = ws;
    this.on.state("connecting to the stream", false);
    ws.onopen = () => {
      this.retry = RETRY_MIN;
      this.on.state("stream connected", true);
      ws.send(JSON.stringify({ op: "subscribe", ...this.request }));
    };
    ws.onmessage = (event) => {
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch {
        return;
      }
      this.on.message(msg);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws || this.closed) return;
      this.ws = null;
      // A refused upgrade (no or wrong subscriber token: HTTP 401) looks like 1006 here.
      const why = event.code === 1006 ? "connection failed (stream token?)" : `closed (${event.code})`;
      this.on.state(`stream ${why}; retrying in ${Math.round(this.retry / 1000)} s`, false);
      this.timer = setTimeout(() => this.connect(), this.retry);
      this.retry = Math.min(this.retry * 2, RETRY_MAX);
    };
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    const ws = this.ws;
    this.ws = null;
    if (!ws) return;
    if (ws.readyState === WebSocket.CONNECTING) {
      // Closing now would log an error in the console: close once it is open.
      ws.onopen = () => ws.close(1000);
      ws.onmessage = null;
    } else {
      ws.close(1000);
    }
  }
}
