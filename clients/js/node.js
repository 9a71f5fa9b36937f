// @dde/gateway-client/node: a WebSocket for Node on node:http/https (headers, CA, pause).
export { MAX_MESSAGE_BYTES, NodeWebSocket } from "./src/node.js";
