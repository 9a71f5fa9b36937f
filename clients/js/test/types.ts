// Compiled (not run) by tsc --noEmit --strict (tests/test_client_js.py): the declarations are
// consistent and every one of them is used the way docs/clients-js.md shows.
import {
  Backoff,
  BEARER_PREFIX,
  CLIENT_CLOSE,
  Client,
  ClientCore,
  DEFAULTS,
  PROTOCOLS,
  type ClientEvent,
  type ClientOptions,
  type LossEvent,
  type WebSocketConstructor,
} from "../index.js";
import { MAX_MESSAGE_BYTES, NodeWebSocket } from "../node.js";

const options: ClientOptions = {
  token: "t",
  tokenIn: "header",
  WebSocket: NodeWebSocket,
  socketOptions: { ca: "PEM" },
  maxQueue: DEFAULTS.maxQueue,
  backoffMin: 100,
  backoffMax: 10_000,
  heartbeatInterval: 10_000,
  writeDelay: 5,
};

export async function consume(): Promise<number> {
  const client = new Client(["ws://a:8765/v1/stream", "ws://b:8765/v1/stream"], options);
  client.subscribe("tracking", "F1", { backfill: -1 }).subscribe("actions", "F2", { maxRate: 10 });
  client.replay("tracking", "F1", { rate: 40, looped: false, from: { seq: 1 } });
  client.stopReplay("tracking", "F1");
  let frames = 0;
  for await (const event of client) {
    const e: ClientEvent = event;
    switch (e.event) {
      case "frame":
        frames += e.seq > 0 ? 1 : 0;
        e.dataText.length;
        break;
      case "loss": {
        const loss: LossEvent = e;
        const to: number | null = loss.to_seq;
        void to;
        break;
      }
      case "error":
        if (e.fatal) client.close();
        break;
      case "state":
        void e.state.toUpperCase();
        break;
      default:
        break;
    }
  }
  const next: ClientEvent | null = await client.nextEvent();
  void next;
  client.unsubscribe("tracking", "F1");
  const s = client.stats;
  return frames + s.duplicates + s.losses + s.queued + s.pauses + s.queueCloses + client.core.active;
}

export function core(): string[] {
  const c = new ClientCore({ urls: "ws://a/v1/stream", raw: true, random: () => 0.5 });
  c.subscribe("tracking", "F1");
  const url: string = c.connecting();
  c.opened(Date.now());
  c.received('{"type":"heartbeat","time":"x"}');
  const out = c.closed(Date.now(), { code: 1006, httpStatus: null });
  const delay: number = out.fatal ? 0 : out.retryIn;
  void delay;
  c.fail("no");
  c.close();
  const b = new Backoff({ min: 1, max: 2 });
  b.reset();
  return [url, ...c.takeOutgoing(), ...c.takeEvents().map((e) => e.event), String(b.next()), String(c.watchdogMs)];
}

export function constants(): Array<string | number> {
  const ws = new NodeWebSocket("ws://a/v1/stream", [...PROTOCOLS, BEARER_PREFIX + "t"], { headers: {}, handshakeTimeout: 1 });
  ws.onclose = (e) => void e.httpStatus;
  ws.pause();
  ws.resume();
  ws.close(CLIENT_CLOSE, "bye");
  return [MAX_MESSAGE_BYTES, NodeWebSocket.OPEN, ws.readyState, ws.protocol];
}

// A browser's WebSocket (lib "dom") is a WebSocketConstructor as it is.
export const browserSocket: WebSocketConstructor = WebSocket;
