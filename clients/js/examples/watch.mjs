#!/usr/bin/env node
// watch.mjs: the JavaScript client's equivalent of `dde-gateway watch` (docs/clients-js.md).
//
//   node clients/js/examples/watch.mjs --url ws://A:8765/v1/stream --url ws://B:8765/v1/stream tracking/<id>
//
// Subscribes to each FEED/FIXTURE and prints one line per frame (seq, the vendor's ix or
// fixtureSeqNum, size); `--events` prints every client event as one JSON object per line,
// `--raw` every message the gateway sent, verbatim. It moves to the next --url when one dies
// and resumes without a gap (or says what was lost). Plain Node 18 or later, no flag, no package:
// the WebSocket is the client's own NodeWebSocket (node:http/https).
//
// `--replay PPS` replays the topics from their first frame instead (ends when every replay has).
// Exit status: 0 on a normal end (SIGINT/SIGTERM, or every subscription ended), 2 for bad
// arguments, 3 for a fatal error (the token refused).

import { readFileSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { parseArgs } from "node:util";

import { Client } from "../index.js";
import { NodeWebSocket } from "../node.js";

const DEFAULT_URL = "ws://127.0.0.1:8765/v1/stream";
const USAGE = `usage: watch.mjs [--url URL]... [--token-file PATH] [--ca-file PATH] [--backfill N]
                 [--events | --raw] [--replay PPS] [--max-queue N] [--heartbeat-interval S]
                 [--slow-ms MS] [--count N]
                 FEED/FIXTURE...`;

class Usage extends Error {}

function integer(name, text, min, max = Number.MAX_SAFE_INTEGER) {
  if (!/^-?\d+$/.test(text)) throw new Usage(`--${name} must be an integer, got ${JSON.stringify(text)}`);
  const n = Number(text);
  if (n < min || n > max) throw new Usage(`--${name} must be ${min} to ${max}, got ${n}`);
  return n;
}

function number(name, text, min, max = Number.MAX_VALUE) {
  const n = Number(text);
  if (text.trim() === "" || !Number.isFinite(n)) throw new Usage(`--${name} must be a number, got ${JSON.stringify(text)}`);
  if (n < min || n > max) throw new Usage(`--${name} must be ${min} to ${max}, got ${n}`);
  return n;
}

function readSecret(name, path) {
  let text;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw new Usage(`--${name} ${path}: ${err.code ?? err.message}`);
  }
  const value = text.trim();
  if (!value) throw new Usage(`--${name} ${path}: the file is empty`);
  return value;
}

const VALUED = new Set([
  "--url", "--token-file", "--ca-file", "--backfill", "--replay", "--max-queue",
  "--heartbeat-interval", "--slow-ms", "--count",
]);

function parse(argv) {
  // `--backfill -1` as argparse reads it (parseArgs takes "-1" for an option otherwise).
  const args = [];
  for (let i = 0; i < argv.length; i++) {
    if (VALUED.has(argv[i]) && /^-\d+$/.test(argv[i + 1] ?? "")) args.push(`${argv[i]}=${argv[++i]}`);
    else args.push(argv[i]);
  }
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: {
        url: { type: "string", multiple: true },
        "token-file": { type: "string" },
        "ca-file": { type: "string" },
        backfill: { type: "string" },
        events: { type: "boolean" },
        raw: { type: "boolean" },
        replay: { type: "string" },
        "max-queue": { type: "string" },
        "heartbeat-interval": { type: "string" },
        "slow-ms": { type: "string" },
        count: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (err) {
    throw new Usage(err.message);
  }
  const v = parsed.values;
  if (v.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  if (v.events && v.raw) throw new Usage("use either --events or --raw");
  if (!parsed.positionals.length) throw new Usage("at least one FEED/FIXTURE is required");
  const topics = parsed.positionals.map((t) => {
    const i = t.indexOf("/");
    if (i <= 0 || i === t.length - 1) throw new Usage(`expected FEED/FIXTURE, got ${JSON.stringify(t)}`);
    return [t.slice(0, i), t.slice(i + 1)];
  });
  const urls = v.url ?? [DEFAULT_URL];
  for (const url of urls) {
    if (!/^wss?:\/\/[^/]/.test(url)) throw new Usage(`--url must be ws:// or wss://, got ${JSON.stringify(url)}`);
  }
  return {
    urls,
    topics,
    token: v["token-file"] ? readSecret("token-file", v["token-file"]) : null,
    ca: v["ca-file"] ? readSecret("ca-file", v["ca-file"]) : null,
    backfill: v.backfill === undefined ? 0 : integer("backfill", v.backfill, -1),
    mode: v.events ? "events" : v.raw ? "raw" : "human",
    replay: v.replay === undefined ? null : integer("replay", v.replay, 1, 1000),
    maxQueue: v["max-queue"] === undefined ? undefined : integer("max-queue", v["max-queue"], 1),
    heartbeatMs: v["heartbeat-interval"] === undefined ? undefined : number("heartbeat-interval", v["heartbeat-interval"], 0.001) * 1000,
    slowMs: v["slow-ms"] === undefined ? 0 : number("slow-ms", v["slow-ms"], 0, 60_000),
    count: v.count === undefined ? 0 : integer("count", v.count, 1),
  };
}

// One line for a frame (`replay` for a replayed one), as `dde-gateway watch` prints it.
function summarise(e) {
  const data = e.data;
  let mark = "";
  if (data && typeof data === "object") {
    if ("ix" in data) mark = ` ix=${data.ix}`;
    else if (data.fixtureAction && typeof data.fixtureAction === "object") {
      mark = ` fixtureSeqNum=${data.fixtureAction.fixtureSeqNum}`;
    } else if ("eventElementType" in data) mark = ` ${data.eventElementType}=${data.state}`;
  }
  const size = Buffer.byteLength(e.dataText ?? JSON.stringify(data));
  const kind = e.event === "frame" ? "frame" : "replay";
  return `${kind} ${e.feed}/${e.fixture} seq=${e.seq}${mark} (${size} bytes)`;
}

// The --events line: keys as docs/clients-js.md lists them; a frame's data verbatim.
function eventLine(e) {
  if (e.event === "frame" || e.event === "replay_frame") {
    const { data, ...head } = e;
    return `${JSON.stringify(head).slice(0, -1)},"data":${e.dataText}}`;
  }
  return JSON.stringify(e);
}

async function write(line) {
  if (!process.stdout.write(`${line}\n`)) {
    await new Promise((resolve) => process.stdout.once("drain", resolve));
  }
}

async function main() {
  let args;
  try {
    args = parse(process.argv.slice(2));
  } catch (err) {
    if (!(err instanceof Usage)) throw err;
    process.stderr.write(`${USAGE}\nwatch.mjs: error: ${err.message}\n`);
    return 2;
  }
  const client = new Client(args.urls, {
    token: args.token ?? undefined,
    WebSocket: NodeWebSocket,
    tokenIn: "header",
    socketOptions: args.ca ? { ca: args.ca } : {},
    maxQueue: args.maxQueue,
    heartbeatInterval: args.heartbeatMs,
    raw: args.mode === "raw",
  });
  for (const [feed, fixture] of args.topics) {
    // --replay: from the fixture's first frame at PPS frames a second, instead of live.
    if (args.replay !== null) client.replay(feed, fixture, { rate: args.replay });
    else client.subscribe(feed, fixture, { backfill: args.backfill });
  }
  const stop = () => client.close();
  process.once("SIGINT", stop);
  process.once("SIGTERM", stop);
  let fatal = false;
  let frames = 0;
  for await (const e of client) {
    if (e.event === "error" && e.fatal) {
      fatal = true;
      process.stderr.write(`# ${e.message}\n`);
    }
    if (args.mode === "events") await write(eventLine(e));
    else if (e.event === "state") {
      process.stderr.write(`# ${e.state} ${e.url}${e.reason ? ` (${e.reason})` : ""}\n`);
    } else if (e.event === "raw") await write(e.text);
    else if (args.mode === "raw" || (e.event === "error" && e.fatal)) {
      // --raw: the gateway's messages only (a fatal error went to stderr above)
    } else if (e.event === "frame" || e.event === "replay_frame") await write(summarise(e));
    else await write(JSON.stringify(e));
    if (e.event === "frame" || e.event === "replay_frame") {
      frames += 1;
      if (args.count && frames >= args.count) {
        client.close();
        break; // what was queued after it stays unprinted, as with dde-gateway watch
      }
    }
    if ((e.event === "unsubscribed" || e.event === "replay_end") && client.core.active === 0) client.close();
    if (args.slowMs) await sleep(args.slowMs);
  }
  process.stderr.write(`watch.mjs: stats ${JSON.stringify(client.stats)}\n`);
  return fatal ? 3 : 0;
}

process.exitCode = await main();
