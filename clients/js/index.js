// @dde/gateway-client: the DDE gateway's /v1/stream client for browsers and Node
// (docs/clients-js.md). No runtime dependency. Node's own WebSocket with headers, a private CA
// and backpressure: import { NodeWebSocket } from "@dde/gateway-client/node".
export { Client, CLIENT_CLOSE } from "./src/client.js";
export { Backoff, BEARER_PREFIX, ClientCore, DEFAULTS, PROTOCOLS } from "./src/core.js";
