// Types of @dde/gateway-client/node (docs/clients-js.md).
import type { WebSocketLike } from "./index.js";

/** Messages larger than this close the connection (1009). */
export const MAX_MESSAGE_BYTES: number;

export interface NodeWebSocketInit {
  /** Extra request headers (the client puts `Authorization: Bearer <token>` here). */
  headers?: Record<string, string>;
  /** PEM CA certificate(s) to trust for wss:// (default: Node's). */
  ca?: string | Uint8Array | Array<string | Uint8Array>;
  /** ms for the upgrade to complete (default 30000). */
  handshakeTimeout?: number;
}

/** A WebSocket on node:http/https: headers, a private CA, the 401 of a refused upgrade,
 * pause()/resume() for backpressure. */
export class NodeWebSocket implements WebSocketLike {
  static readonly CONNECTING: 0;
  static readonly OPEN: 1;
  static readonly CLOSING: 2;
  static readonly CLOSED: 3;
  constructor(url: string, protocols?: string[], init?: NodeWebSocketInit);
  readonly url: string;
  readonly readyState: number;
  readonly protocol: string;
  onopen: ((event: { type: "open" }) => void) | null;
  onmessage: ((event: { type: "message"; data: string | Uint8Array }) => void) | null;
  onerror: ((event: { type: "error"; message: string; httpStatus?: number }) => void) | null;
  onclose:
    | ((event: { type: "close"; code: number; reason: string; wasClean: boolean; httpStatus?: number }) => void)
    | null;
  send(text: string): void;
  close(code?: number, reason?: string): void;
  pause(): void;
  resume(): void;
}
