// A WebSocket for Node built on node:http / node:https only (no dependency), with what the
// browser's WebSocket cannot do and the client needs on a server: an `Authorization` header,
// a private CA for wss://, the HTTP status of a refused upgrade (401: the token was refused),
// and pause()/resume() - the client stops reading the socket while its queue is full, so a
// slow application pushes back on the gateway instead of growing memory (docs/clients-js.md).
//
// It speaks RFC 6455 as a client: text messages (fragmented or not), ping/pong, close; no
// extension is offered (the gateway then never compresses). Interface: the browser's
// (onopen, onmessage, onerror, onclose, send, close, readyState), so the client uses either.

import { createHash, randomBytes } from "node:crypto";
import http from "node:http";
import https from "node:https";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const CONNECTING = 0;
const OPEN = 1;
const CLOSING = 2;
const CLOSED = 3;
/** A message larger than this closes the connection (1009); the gateway's frames are far smaller. */
export const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

export class NodeWebSocket {
  static CONNECTING = CONNECTING;
  static OPEN = OPEN;
  static CLOSING = CLOSING;
  static CLOSED = CLOSED;

  /**
   * @param {string} url ws:// or wss://
   * @param {string[]} protocols subprotocols to offer
   * @param {{headers?: Record<string,string>, ca?: string|Buffer, handshakeTimeout?: number}} init
   */
  constructor(url, protocols = [], init = {}) {
    this.url = url;
    this.readyState = CONNECTING;
    this.protocol = "";
    this.onopen = null;
    this.onmessage = null;
    this.onerror = null;
    this.onclose = null;
    this._socket = null;
    this._buffer = Buffer.alloc(0);
    this._fragments = [];
    this._fragmentBytes = 0;
    this._closeSent = false;
    this._closeEvent = null;
    this._decoder = new TextDecoder("utf-8", { fatal: true });
    const target = new URL(url);
    const secure = target.protocol === "wss:";
    if (!secure && target.protocol !== "ws:") throw new SyntaxError(`not a ws:// or wss:// URL: ${url}`);
    const key = randomBytes(16).toString("base64");
    this._accept = createHash("sha1").update(key + GUID).digest("base64");
    const headers = {
      ...init.headers,
      Connection: "Upgrade",
      Upgrade: "websocket",
      "Sec-WebSocket-Key": key,
      "Sec-WebSocket-Version": "13",
    };
    if (protocols.length) headers["Sec-WebSocket-Protocol"] = protocols.join(", ");
    const request = (secure ? https : http).request({
      host: target.hostname.replace(/^\[|\]$/g, ""),
      port: target.port || (secure ? 443 : 80),
      path: target.pathname + target.search,
      headers,
      ca: init.ca,
      timeout: init.handshakeTimeout ?? 30_000,
    });
    request.on("upgrade", (res, socket, head) => this._upgraded(res, socket, head));
    request.on("response", (res) => {
      res.resume();
      this._fail(`HTTP ${res.statusCode} at the upgrade`, res.statusCode);
    });
    request.on("timeout", () => request.destroy(new Error("handshake timed out")));
    request.on("error", (err) => this._fail(err.message));
    request.end();
    this._request = request;
  }

  send(text) {
    if (this.readyState !== OPEN) throw new Error("the WebSocket is not open");
    this._write(0x1, Buffer.from(String(text), "utf8"));
  }

  close(code = 1000, reason = "") {
    if (this.readyState === CLOSED || this.readyState === CLOSING) return;
    if (this.readyState === CONNECTING) {
      this._request.destroy();
      this._finish(1006, "closed before it opened");
      return;
    }
    this.readyState = CLOSING;
    this._sendClose(code, reason);
    // The gateway answers with its close and ends the TCP connection; never wait forever.
    this._closeTimer = setTimeout(() => this._socket.destroy(), 5_000);
    this._closeTimer.unref?.();
  }

  /** Stop reading the socket (backpressure: TCP fills, the gateway sees a slow consumer). */
  pause() {
    this._socket?.pause();
  }

  resume() {
    this._socket?.resume();
  }

  // -- internals -------------------------------------------------------------------------------

  _upgraded(res, socket, head) {
    if (res.headers["sec-websocket-accept"] !== this._accept) {
      socket.destroy();
      this._fail("the server's Sec-WebSocket-Accept is wrong");
      return;
    }
    this.protocol = res.headers["sec-websocket-protocol"] || "";
    this._socket = socket;
    socket.setNoDelay(true);
    socket.setTimeout(0);
    socket.on("data", (chunk) => this._data(chunk));
    socket.on("error", () => {}); // 'close' follows
    socket.on("close", () => {
      clearTimeout(this._closeTimer);
      const ev = this._closeEvent ?? { code: 1006, reason: "connection lost" };
      this._finish(ev.code, ev.reason);
    });
    this.readyState = OPEN;
    this.onopen?.({ type: "open" });
    if (head && head.length) this._data(head);
  }

  _fail(message, httpStatus) {
    if (this.readyState === CLOSED) return;
    this.onerror?.({ type: "error", message, httpStatus });
    this._finish(1006, message, httpStatus);
  }

  _finish(code, reason, httpStatus) {
    if (this.readyState === CLOSED) return;
    this.readyState = CLOSED;
    this.onclose?.({ type: "close", code, reason, wasClean: code !== 1006, httpStatus });
  }

  _write(opcode, payload) {
    const mask = randomBytes(4);
    const len = payload.length;
    let header;
    if (len < 126) {
      header = Buffer.alloc(6);
      header[1] = 0x80 | len;
    } else if (len < 65536) {
      header = Buffer.alloc(8);
      header[1] = 0x80 | 126;
      header.writeUInt16BE(len, 2);
    } else {
      header = Buffer.alloc(14);
      header[1] = 0x80 | 127;
      header.writeBigUInt64BE(BigInt(len), 2);
    }
    header[0] = 0x80 | opcode;
    mask.copy(header, header.length - 4);
    const body = Buffer.allocUnsafe(len);
    for (let i = 0; i < len; i++) body[i] = payload[i] ^ mask[i & 3];
    this._socket.write(Buffer.concat([header, body]));
  }

  _sendClose(code, reason) {
    if (this._closeSent || !this._socket) return;
    this._closeSent = true;
    const why = Buffer.from(reason, "utf8").subarray(0, 123);
    const payload = Buffer.alloc(2 + why.length);
    payload.writeUInt16BE(code, 0);
    why.copy(payload, 2);
    this._write(0x8, payload);
  }

  _protocolError(code, reason) {
    this._closeEvent = { code, reason };
    this._sendClose(code, reason);
    this._socket.end();
    this._buffer = Buffer.alloc(0);
  }

  _data(chunk) {
    this._buffer = this._buffer.length ? Buffer.concat([this._buffer, chunk]) : chunk;
    while (this._socket && this._buffer.length >= 2) {
      const b = this._buffer;
      const fin = (b[0] & 0x80) !== 0;
      const opcode = b[0] & 0x0f;
      if (b[0] & 0x70) return this._protocolError(1002, "reserved bits set");
      if (b[1] & 0x80) return this._protocolError(1002, "masked frame from the server");
      let len = b[1] & 0x7f;
      let offset = 2;
      if (len === 126) {
        if (b.length < 4) return;
        len = b.readUInt16BE(2);
        offset = 4;
      } else if (len === 127) {
        if (b.length < 10) return;
        const big = b.readBigUInt64BE(2);
        if (big > BigInt(MAX_MESSAGE_BYTES)) return this._protocolError(1009, "message too big");
        len = Number(big);
        offset = 10;
      }
      if (b.length < offset + len) return;
      const payload = b.subarray(offset, offset + len);
      this._buffer = b.subarray(offset + len);
      this._frame(fin, opcode, payload);
    }
  }

  _frame(fin, opcode, payload) {
    if (opcode === 0x8) {
      const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
      const reason = payload.length > 2 ? payload.subarray(2).toString("utf8") : "";
      this._closeEvent = { code, reason };
      this.readyState = CLOSING;
      this._sendClose(code === 1005 ? 1000 : code, "");
      this._socket.end();
      return;
    }
    if (opcode === 0x9) {
      if (this.readyState === OPEN) this._write(0xa, payload);
      return;
    }
    if (opcode === 0xa) return;
    if (opcode === 0x1 || opcode === 0x2) {
      if (this._fragments.length) return this._protocolError(1002, "a new message inside a fragmented one");
    } else if (opcode !== 0x0 || !this._fragments.length) {
      return this._protocolError(1002, `unexpected opcode ${opcode}`);
    }
    this._fragmentBytes += payload.length;
    if (this._fragmentBytes > MAX_MESSAGE_BYTES) return this._protocolError(1009, "message too big");
    this._fragments.push(Buffer.from(payload));
    if (opcode !== 0x0) this._binary = opcode === 0x2;
    if (!fin) return;
    const whole = this._fragments.length === 1 ? this._fragments[0] : Buffer.concat(this._fragments);
    this._fragments = [];
    this._fragmentBytes = 0;
    if (this.readyState !== OPEN) return;
    let data;
    if (this._binary) {
      data = whole;
    } else {
      try {
        data = this._decoder.decode(whole);
      } catch {
        return this._protocolError(1007, "invalid UTF-8");
      }
    }
    this.onmessage?.({ type: "message", data });
  }
}
