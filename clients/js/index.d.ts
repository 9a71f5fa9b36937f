// Types of @dde/gateway-client (docs/clients-js.md). Hand-written; checked by tsc in
// test/types.ts (tests/test_client_js.py).

/** Connection state: `disconnected` -> `connecting` -> `connected` -> ... -> `closed`. */
export type ClientState = "disconnected" | "connecting" | "connected" | "closed";

export interface StateEvent {
  event: "state";
  state: ClientState;
  url: string | null;
  reason: string;
}

export interface SubscribedEvent {
  event: "subscribed";
  feed: string;
  fixture: string;
  epoch: string;
  /** The topic's last seq when the gateway answered (0: none yet). */
  seq: number;
  recovered: boolean;
  /** This subscribe was a resume (after + epoch) on a new connection. */
  resumed: boolean;
}

export interface FrameEvent {
  event: "frame";
  feed: string;
  fixture: string;
  epoch: string;
  seq: number;
  /** The vendor's frame, parsed. */
  data: unknown;
  /** The vendor's frame text, byte for byte (not enumerable). */
  readonly dataText: string;
}

export type LossReason = "not_recovered" | "epoch_changed" | "slow_consumer" | "sequence_gap";

export interface LossEvent {
  event: "loss";
  feed: string;
  fixture: string;
  from_seq: number;
  /** null when the gateway did not say how far. */
  to_seq: number | null;
  epoch_before: string | null;
  epoch_after: string | null;
  reason: LossReason;
}

export interface StatusEvent {
  event: "status";
  feed: string;
  fixture: string;
  state: "live" | "connecting" | "backoff" | "unauthorized" | "not_found" | "stopped" | string;
  detail: string;
}

export interface ErrorEvent {
  event: "error";
  /** The gateway's text, verbatim (or the client's, for a fatal error). */
  message: string;
  request: string | null;
  feed: string | null;
  fixture: string | null;
  /** true: the client is closed (token refused, unusable URL or token). */
  fatal: boolean;
}

export interface UnsubscribedEvent {
  event: "unsubscribed";
  feed: string;
  fixture: string;
  reason: string;
}

export interface RawEvent {
  event: "raw";
  /** A message exactly as the gateway sent it (options.raw); never a frame dropped as a duplicate. */
  text: string;
}

export interface ReplayStartedEvent {
  event: "replay_started";
  feed: string;
  fixture: string;
  epoch: string;
  from_seq: number;
  rate: number;
  looped: boolean;
}

export interface ReplayFrameEvent {
  event: "replay_frame";
  feed: string;
  fixture: string;
  seq: number;
  data: unknown;
  /** The frame's text, byte for byte (not enumerable). */
  readonly dataText: string;
}

export interface ReplayLoopEvent {
  event: "replay_loop";
  feed: string;
  fixture: string;
  pass: number;
}

export interface ReplayEndEvent {
  event: "replay_end";
  feed: string;
  fixture: string;
  /** The gateway's reason, or "disconnected" (the connection was lost: not asked again). */
  reason: "end" | "stopped" | "slow_consumer" | "source_lost" | "disconnected" | string;
  last_seq: number | null;
}

export type ClientEvent =
  | StateEvent
  | SubscribedEvent
  | FrameEvent
  | LossEvent
  | StatusEvent
  | ErrorEvent
  | UnsubscribedEvent
  | RawEvent
  | ReplayStartedEvent
  | ReplayFrameEvent
  | ReplayLoopEvent
  | ReplayEndEvent;

/**
 * What the client needs of a WebSocket (the browser's, Node's, NodeWebSocket, `ws`). The client
 * sets the four handlers; it reads `data` of a message, `code`, `reason` and `httpStatus` (when
 * the socket knows the status of a refused upgrade) of a close.
 */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((event: never) => void) | null;
  onmessage: ((event: never) => void) | null;
  onerror: ((event: never) => void) | null;
  onclose: ((event: never) => void) | null;
  send(text: string): void;
  close(code?: number, reason?: string): void;
  /** Optional: stop / restart reading (backpressure). */
  pause?(): void;
  resume?(): void;
}

export type WebSocketConstructor = new (
  url: string,
  protocols: string[],
  init?: { headers?: Record<string, string>; [option: string]: unknown },
) => WebSocketLike;

export interface Timing {
  /** Backoff floor, ms (default 100). */
  backoffMin?: number;
  /** Backoff ceiling, ms (default 10000). */
  backoffMax?: number;
  /** A connection that lived this long (ms) resets the backoff (default 10000). */
  backoffResetAfter?: number;
  /** The gateway's heartbeat_interval, ms (default 10000). */
  heartbeatInterval?: number;
  /** No message for watchdogFactor x heartbeatInterval = a dead connection (default 3). */
  watchdogFactor?: number;
  /** For tests: a random() in [0, 1). */
  random?: () => number;
}

export interface ClientOptions extends Timing {
  /** A subscriber token ([subscribers] tokens_file). */
  token?: string;
  /** Default "subprotocol" with the global WebSocket, "header" with an injected one. */
  tokenIn?: "header" | "subprotocol";
  /** Default globalThis.WebSocket. */
  WebSocket?: WebSocketConstructor;
  /** Passed to an injected WebSocket's constructor (e.g. {ca} for NodeWebSocket). */
  socketOptions?: Record<string, unknown>;
  /** Events waiting for the application at most (default 10000); then the client stops reading. */
  maxQueue?: number;
  /** Also queue every message as it came ({event: "raw", text}). */
  raw?: boolean;
  /** The connection option ?write_delay=MS (0 to 1000), added to every URL; null: the gateway's. */
  writeDelay?: number | null;
  /** Deliver events to this callback as they come instead of queueing them. */
  onEvent?: (event: ClientEvent) => void;
  /** For tests: the clock, ms. */
  now?: () => number;
}

export interface SubscribeOptions {
  /** null / -1: everything held; 0: live only (default); n: the last n. */
  backfill?: number | null;
  /** At most this many frames a second, always the latest (no resume, no loss events). */
  maxRate?: number | null;
}

export type ReplayFrom = { seq: number } | { phase: string | number; mt: number } | { ut: number };

export interface ReplayOptions {
  /** 1 to 1000 frames a second. */
  rate: number;
  looped?: boolean;
  from?: ReplayFrom;
}

export interface ClientStats {
  duplicates: number;
  reconnects: number;
  connects: number;
  losses: number;
  pauses: number;
  queueCloses: number;
  queued: number;
}

export const CLIENT_CLOSE: 4000;
export const PROTOCOLS: readonly string[];
export const BEARER_PREFIX: "dde.bearer.";
export const DEFAULTS: Readonly<{
  backoffMin: number;
  backoffMax: number;
  backoffResetAfter: number;
  heartbeatInterval: number;
  watchdogFactor: number;
  maxQueue: number;
}>;

export class Client implements AsyncIterable<ClientEvent> {
  constructor(urls: string | string[], options?: ClientOptions);
  readonly state: ClientState;
  readonly stats: ClientStats;
  readonly core: ClientCore;
  subscribe(feed: string, fixture: string, options?: SubscribeOptions): this;
  unsubscribe(feed: string, fixture: string): void;
  replay(feed: string, fixture: string, options: ReplayOptions): this;
  stopReplay(feed: string, fixture: string): void;
  close(): void;
  events(): AsyncGenerator<ClientEvent, void, undefined>;
  nextEvent(): Promise<ClientEvent | null>;
  [Symbol.asyncIterator](): AsyncGenerator<ClientEvent, void, undefined>;
}

export class Backoff {
  constructor(options?: { min?: number; max?: number; random?: () => number });
  next(): number;
  reset(): void;
}

export interface CoreOptions extends Timing {
  urls: string | string[];
  raw?: boolean;
  writeDelay?: number | null;
}

/** The sans-I/O core: no socket, no timer, no clock. */
export class ClientCore {
  constructor(options: CoreOptions);
  readonly state: ClientState;
  readonly url: string | null;
  readonly watchdogMs: number;
  readonly active: number;
  readonly stats: Omit<ClientStats, "queued">;
  connecting(): string;
  opened(now: number): void;
  closed(
    now: number,
    info?: { code?: number; reason?: string; httpStatus?: number | null },
  ): { retryIn: number; fatal?: undefined } | { fatal: true; retryIn?: undefined };
  received(text: string): void;
  fail(message: string): void;
  close(reason?: string): void;
  subscribe(feed: string, fixture: string, options?: SubscribeOptions): unknown;
  unsubscribe(feed: string, fixture: string): void;
  replay(feed: string, fixture: string, options: ReplayOptions): unknown;
  stopReplay(feed: string, fixture: string): void;
  takeOutgoing(): string[];
  takeEvents(): ClientEvent[];
}
