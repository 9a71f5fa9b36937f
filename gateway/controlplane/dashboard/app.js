// The dashboard (docs/dashboard.md): polls the HTTP API every second for the fixtures, the
// subscribers and the totals, and opens the subscriber stream for the fixture being viewed
// with the gateway's JavaScript client (client.js and core.js: copies of clients/js/src,
// docs/clients-js.md). No framework and no build step; everything is written with textContent
// (vendor texts and error messages are data, never HTML).

import { Client } from "./client.js";
import { Pitch } from "./pitch.js";

const POLL_MS = 1000;
const PITCH_MAX_RATE = 10; // frames a second the pitch asks for (max_rate, docs/protocol.md)
const ACTIONS_SHOWN = 30;
const SUBSCRIBERS_SHOWN = 100; // one page of GET /v1/subscribers
const SLOW_QUEUED_BYTES = 256 * 1024;
// degraded: a cluster relay that cannot read the fixture's stream (Redis unreachable).
const FAILING = new Set(["unauthorized", "not_found", "backoff", "degraded"]);
const PENDING = new Set(["connecting"]);
const STATUS_KEYS = new Set([
  "version", "started_at", "uptime_s", "ready", "draining", "feeds", "fixtures",
  "fixtures_total", "subscribers", "frames_in_per_second", "frames_out_per_second",
  "frames_in", "frames_out", "drops", "slow_disconnects", "stream", "degraded", "cluster",
]);
const TOKEN_KEYS = { api: "dde-dashboard.api-token", stream: "dde-dashboard.stream-token" };

const $ = (selector) => document.querySelector(selector);
const num = new Intl.NumberFormat("en");
const dec = new Intl.NumberFormat("en", { maximumFractionDigits: 1 });

const app = {
  apiToken: sessionStorage.getItem(TOKEN_KEYS.api) || "",
  streamToken: sessionStorage.getItem(TOKEN_KEYS.stream) || "",
  status: null,
  fixtures: [],
  clockOffset: 0, // server UNIX time minus this browser's
  timer: null,
  lastDropped: new Map(), // subscriber id -> frames_dropped at the previous poll
  // The subscribers panel: its filters and order (query parameters of GET /v1/subscribers),
  // the page shown (pages[i]: the query string of page i, from the previous page's Link).
  subscriberPages: [""],
  subscriberPage: 0,
  view: null,
};

class AuthError extends Error {}

// -- formatting ------------------------------------------------------------------------------

// The stream's URL from /v1/status's `stream` object; null host = the host of this page.
export function streamUrl(stream, pageHost = location.hostname) {
  let host = stream.host ?? pageHost;
  if (host.includes(":") && !host.startsWith("[")) host = `[${host}]`; // an IPv6 literal
  return `${stream.scheme}://${host}:${stream.port}${stream.path}`;
}

function age(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor(s / 3600) % 24}h`;
}

// Match time in ms -> "mm:ss".
function matchClock(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  return `${String(Math.floor(s / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${dec.format(n / 1024)} KiB`;
  return `${dec.format(n / 1024 / 1024)} MiB`;
}

function serverNow() {
  return Date.now() / 1000 + app.clockOffset;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function stateClass(state) {
  if (FAILING.has(state)) return "failing";
  if (PENDING.has(state)) return "pending";
  return state === "live" ? "live" : "";
}

// -- the API ---------------------------------------------------------------------------------

async function fetchApi(path) {
  const headers = {};
  if (app.apiToken) headers.Authorization = `Bearer ${app.apiToken}`;
  // Relative: the page works behind a proxy that serves the gateway under a sub-path.
  const resp = await fetch(path, { headers, cache: "no-store" });
  if (resp.status === 401) throw new AuthError();
  if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
  return resp;
}

async function api(path) {
  return (await fetchApi(path)).json();
}

// The subscribers panel's query: the filters and order from its form.
function subscriberQuery() {
  const query = new URLSearchParams({ limit: String(SUBSCRIBERS_SHOWN), sort: $("#sf-sort").value });
  for (const name of ["feed", "fixture"]) {
    const value = $(`#sf-${name}`).value.trim();
    if (value) query.set(name, value);
  }
  if ($("#sf-slow").checked) query.set("slow", "true");
  return query.toString();
}

// One page of subscribers: the items, how many match the filters, the next page's query.
async function subscriberPage() {
  const query = app.subscriberPages[app.subscriberPage] || subscriberQuery();
  const resp = await fetchApi(`v1/subscribers?${query}`);
  const items = await resp.json();
  const next = /<[^>?]*\?([^>]*)>;\s*rel="next"/.exec(resp.headers.get("link") || "");
  return { items, total: Number(resp.headers.get("x-total-count") || items.length), next: next ? next[1] : null };
}

function onSubscriberFilter() {
  app.subscriberPages = [""];
  app.subscriberPage = 0;
  poll();
}

function onSubscriberPage(step) {
  const target = app.subscriberPage + step;
  if (target < 0 || target >= app.subscriberPages.length) return;
  app.subscriberPage = target;
  poll();
}

// Every item of a paged list route (docs/api.md#paged-lists): each page's `Link: <...>;
// rel="next"` is relative to the page's own URL.
async function apiAll(path) {
  const items = [];
  let url = path;
  while (url) {
    const resp = await fetchApi(url);
    items.push(...(await resp.json()));
    const next = /<([^>]*)>;\s*rel="next"/.exec(resp.headers.get("link") || "");
    url = next ? new URL(next[1], resp.url).href : null;
  }
  return items;
}

function setApiState(text, ok) {
  const pill = $("#api-state");
  pill.textContent = text;
  pill.className = `pill ${ok ? "ok" : "bad"}`;
}

async function poll() {
  clearTimeout(app.timer);
  try {
    // /v1/status first: without a valid token it is the only request refused (one 401).
    const status = await api("v1/status");
    const [fixtures, subscribers] = await Promise.all([apiAll("v1/fixtures"), subscriberPage()]);
    app.clockOffset = status.started_at + status.uptime_s - Date.now() / 1000;
    app.status = status;
    app.fixtures = fixtures;
    $("#token-form").classList.remove("needed");
    setApiState("live", true);
    renderTotals(status, subscribers.items);
    renderFixtures(fixtures);
    renderSubscribers(subscribers);
    renderInstance(status);
    openViewFromHash();
  } catch (err) {
    if (err instanceof AuthError) {
      // Polling stops until a token is given: no stream of refused requests.
      setApiState(app.apiToken ? "token refused" : "token required", false);
      $("#token-form").classList.add("needed");
      $("#api-token").focus();
      return;
    }
    setApiState(`API unreachable: ${err.message}`, false);
  }
  app.timer = setTimeout(poll, POLL_MS);
}

// -- panels ----------------------------------------------------------------------------------

function card(label, value, bad = false, title = "") {
  const node = el("div", null, bad ? "card bad" : "card");
  node.append(el("div", value, "value"), el("div", label, "label"));
  if (title) node.title = title;
  return node;
}

function renderTotals(status, subscribers) {
  const by = status.fixtures;
  const failing = [...FAILING].reduce((n, s) => n + (by[s] || 0), 0);
  const conflated = subscribers.reduce((n, s) => n + (s.conflated || 0), 0);
  $("#totals").replaceChildren(
    card("fixtures live", `${by.live} / ${status.fixtures_total}`),
    card("fixtures failing", failing, failing > 0, "backoff, unauthorized, not_found or degraded"),
    card("subscribers", num.format(status.subscribers), false, "connections now"),
    card("deliveries/s", dec.format(status.frames_out_per_second), false, "frames written to subscribers, last ~10 s"),
    card("frames in/s", dec.format(status.frames_in_per_second), false, "upstream frames accepted, last ~10 s"),
    card("drops", num.format(status.drops), status.drops > 0, "since start"),
    card("slow disconnects", num.format(status.slow_disconnects), status.slow_disconnects > 0, "since start"),
    card("conflated", num.format(conflated), false, "frames skipped by max_rate, the subscribers of the page shown"),
  );
  const name = status.cluster ? ` · ${status.cluster.instance}` : "";
  $("#instance").textContent = `v${status.version}${name} · up ${age(status.uptime_s)}`;
}

function renderFixtures(fixtures) {
  const body = $("#fixtures tbody");
  const now = serverNow();
  // The role and owner columns only in a cluster (both are null on a single node).
  $("#fixtures").classList.toggle("clustered", fixtures.some((f) => f.role));
  const rows = fixtures.map((f) => {
    const tr = el("tr");
    tr.dataset.fixture = f.fixture;
    tr.dataset.feed = f.feed;
    tr.dataset.state = f.state;
    if (f.role) tr.dataset.role = f.role;
    tr.tabIndex = 0;
    const cls = stateClass(f.state);
    tr.className = cls === "live" ? "" : cls;
    if (app.view && app.view.feed === f.feed && app.view.fixture === f.fixture) {
      tr.classList.add("selected");
    }
    const state = el("td", null, "state");
    state.append(el("span", f.state, `badge ${cls}`), ` ${age(now - f.state_since)}`);
    if (f.detail) {
      const detail = el("span", f.detail, "detail");
      detail.title = f.detail;
      state.append(detail);
    }
    const id = el("td", f.fixture, "fixture mono");
    id.title = f.fixture;
    const lastError = f.upstream.last_error || "";
    const err = el("td", lastError, "error");
    err.title = lastError;
    // In a cluster: this instance's role, and the owner (none while the lease is free).
    const role = el("td", f.role || "", f.role === "relay" ? "cluster-col muted" : "cluster-col");
    const owner = el("td", f.owner ?? (f.role ? "none" : ""), f.owner ? "cluster-col mono" : "cluster-col muted");
    if (f.role) {
      role.title = f.role === "owner" ? "this instance follows the vendor" : "relayed from the owner through Redis";
      owner.title = f.owner ? "the instance holding the lease" : "the lease is free: no owner now";
    }
    tr.append(
      el("td", f.feed),
      id,
      state,
      role,
      owner,
      el("td", dec.format(f.frames_per_second), "num"),
      el("td", num.format(f.subscribers), "num"),
      el("td", num.format(f.drops), "num"),
      err,
    );
    return tr;
  });
  body.replaceChildren(...rows);
  $("#fixtures-count").textContent = `(${fixtures.length})`;
  $("#fixtures-empty").hidden = fixtures.length > 0;
}

function renderSubscribers({ items: subscribers, total, next }) {
  const now = serverNow();
  const slow = (s) =>
    s.slow ||
    s.queued_bytes >= SLOW_QUEUED_BYTES ||
    s.frames_dropped > (app.lastDropped.get(s.id) ?? s.frames_dropped);
  // In the gateway's order (the form's sort; ties by id).
  const marked = subscribers.map((s) => ({ s, slow: slow(s) }));
  app.lastDropped = new Map(subscribers.map((s) => [s.id, s.frames_dropped]));
  app.subscriberPages.length = app.subscriberPage + 1;
  if (next) app.subscriberPages.push(next);
  const rows = marked.map(({ s, slow: isSlow }) => {
    const tr = el("tr", null, isSlow ? "slow" : "");
    tr.dataset.subscriber = s.id;
    tr.dataset.batched = String(Boolean(s.batched));
    const subs = el("td", s.subscriptions.join(", "), "subs mono");
    subs.title = s.subscriptions.join("\n");
    tr.append(
      el("td", s.id),
      el("td", s.peer, "mono"),
      el("td", s.endpoint, "mono"),
      subs,
      el("td", bytes(s.queued_bytes), "num"),
      el("td", num.format(s.frames_sent), "num"),
      el("td", num.format(s.frames_dropped), "num"),
      el("td", num.format(s.conflated || 0), "num"),
      el("td", s.write_delay_ms ? `${s.write_delay_ms} ms${s.batched ? ", shared" : ""}` : "-", "num delay"),
      el("td", age(now - s.connected_at), "num"),
    );
    return tr;
  });
  $("#subscribers tbody").replaceChildren(...rows);
  const first = app.subscriberPage * SUBSCRIBERS_SHOWN;
  const shown = subscribers.length ? `, ${num.format(first + 1)}-${num.format(first + subscribers.length)} shown` : "";
  $("#subscribers-count").textContent = `(${num.format(total)}${shown})`;
  $("#sf-prev").disabled = app.subscriberPage === 0;
  $("#sf-next").disabled = !next;
}

function renderInstance(status) {
  const cluster = status.cluster;
  const items = [
    ["version", status.version],
    ["started", new Date(status.started_at * 1000).toISOString()],
    ["uptime", age(status.uptime_s)],
    ["ready", status.ready ? "yes" : "no"],
    ["draining", status.draining ? "yes" : "no"],
    ["feeds", status.feeds.join(", ")],
    ["frames in / out", `${num.format(status.frames_in)} / ${num.format(status.frames_out)}`],
    ["stream", status.stream ? streamUrl(status.stream) : "not bound yet"],
  ];
  // In a cluster: this instance's name and state, with the reason when degraded.
  let reasonShown = false;
  if (cluster) {
    const bad = cluster.state !== "ok";
    reasonShown = bad && Boolean(status.degraded);
    const why = reasonShown ? `: ${status.degraded}` : "";
    items.push(["cluster", `${cluster.instance} · ${cluster.state}${why}`, bad]);
  }
  if (status.degraded && !reasonShown) items.push(["degraded", status.degraded, true]);
  // Instance or cluster information a newer gateway adds to /v1/status: shown as it comes.
  for (const [key, value] of Object.entries(status)) {
    if (!STATUS_KEYS.has(key)) items.push([key, typeof value === "string" ? value : JSON.stringify(value)]);
  }
  $("#instance-info").replaceChildren(
    ...items.flatMap(([k, v, bad]) => [el("dt", k), el("dd", v, bad ? "bad" : "")]),
  );
}

// -- the fixture view ------------------------------------------------------------------------

function viewFromHash() {
  const m = /^#fixture\/([^/]+)\/([^/]+)$/.exec(location.hash);
  return m ? { feed: decodeURIComponent(m[1]), fixture: decodeURIComponent(m[2]) } : null;
}

function openViewFromHash() {
  const want = viewFromHash();
  const v = app.view;
  if (!want) {
    if (v) closeView();
    return;
  }
  if (v && v.feed === want.feed && v.fixture === want.fixture) return;
  const fx = app.fixtures.find((f) => f.feed === want.feed && f.fixture === want.fixture);
  if (!fx || !app.status) return; // opened once the fixture is known (next poll)
  openView(fx);
}

function openView(fx) {
  closeView();
  const v = {
    feed: fx.feed,
    fixture: fx.fixture,
    kind: fx.kind,
    lastSeq: 0,
    frames: 0,
    skipped: 0,
    streamText: "",
    pitch: null,
    client: null,
  };
  app.view = v;
  document.querySelector("main").classList.remove("no-view");
  $("#fixture-view").hidden = false;
  $("#fv-title").textContent = `${fx.feed} / ${fx.fixture}`;
  setViewState(fx.state);
  const tracking = fx.kind === "tracking";
  $("#fv-tracking").hidden = !tracking;
  $("#fv-fastpath").hidden = tracking;
  if (tracking) {
    v.pitch = new Pitch($("#pitch"));
  } else {
    $("#score").textContent = "-";
    $("#actions").replaceChildren();
  }
  for (const tr of document.querySelectorAll("#fixtures tbody tr")) {
    tr.classList.toggle("selected", tr.dataset.feed === fx.feed && tr.dataset.fixture === fx.fixture);
  }
  if (!app.status.stream) {
    setViewInfo("the stream address is not known yet");
    return;
  }
  // Browsers cannot set headers on a WebSocket: the client offers the token as the subprotocol
  // "dde.bearer.<token>" next to "dde.v1". Events come as they arrive (onEvent): the page draws
  // at most PITCH_MAX_RATE frames a second, so nothing queues.
  const token = app.streamToken || app.apiToken;
  try {
    v.client = new Client(streamUrl(app.status.stream), {
      token: token || undefined,
      onEvent: (event) => onStreamEvent(v, event),
    });
    v.client.subscribe(fx.feed, fx.fixture, tracking ? { maxRate: PITCH_MAX_RATE } : { backfill: ACTIONS_SHOWN });
  } catch (err) {
    v.streamText = `cannot open the stream: ${err.message}`;
    showViewInfo(v);
  }
}

function closeView() {
  const v = app.view;
  if (v && v.client) v.client.close();
  app.view = null;
  $("#fixture-view").hidden = true;
  document.querySelector("main").classList.add("no-view");
  for (const tr of document.querySelectorAll("#fixtures tbody tr.selected")) tr.classList.remove("selected");
}

function setViewState(state) {
  const badge = $("#fv-state");
  badge.textContent = state;
  badge.className = `badge ${stateClass(state)}`;
}

function setViewInfo(text) {
  $("#fv-info").textContent = text;
}

function showViewInfo(v, extra = "") {
  const parts = [v.streamText];
  if (v.lastSeq) parts.push(`seq ${num.format(v.lastSeq)}`);
  if (v.kind === "tracking" && v.frames) {
    parts.push(`at most ${PITCH_MAX_RATE} frames/s (max_rate): ${num.format(v.frames)} drawn, ${num.format(v.skipped)} skipped`);
  }
  if (extra) parts.push(extra);
  setViewInfo(parts.filter(Boolean).join(" · "));
}

// The client's events (docs/clients-js.md): each frame once, in order, or a `loss` event.
function onStreamEvent(v, e) {
  if (app.view !== v) return;
  switch (e.event) {
    case "state":
      if (e.state === "connecting") v.streamText = "connecting to the stream";
      else if (e.state === "connected") v.streamText = "stream connected";
      else if (e.state === "disconnected") {
        // A refused upgrade (no or wrong subscriber token: HTTP 401) looks like any failed
        // connection to a browser.
        const why = e.reason === "cannot connect" ? "connection failed (stream token?)" : e.reason;
        v.streamText = `stream ${why}; retrying`;
      } else if (v.streamText === "stream connected") v.streamText = "stream closed";
      showViewInfo(v);
      break;
    case "status":
      setViewState(e.state);
      break;
    case "frame":
      // max_rate skips frames on purpose: seq jumps count what was skipped.
      if (v.lastSeq && e.seq > v.lastSeq + 1) v.skipped += e.seq - v.lastSeq - 1;
      v.lastSeq = e.seq;
      v.frames += 1;
      if (v.kind === "tracking") drawTracking(v, e.data);
      else addAction(e.data);
      break;
    case "loss":
      showViewInfo(v, `lost ${e.from_seq}-${e.to_seq ?? "?"} (${e.reason})`);
      break;
    case "error":
      if (e.fatal) v.streamText = `cannot open the stream: ${e.message}`;
      showViewInfo(v, e.fatal ? "" : `error: ${e.message}`);
      break;
    default:
      break; // subscribed, unsubscribed
  }
}

function drawTracking(v, frame) {
  if (!frame || typeof frame !== "object") return;
  v.pitch.draw(frame);
  const parts = [];
  if (frame.ph) parts.push(`phase ${frame.ph}`);
  if (typeof frame.mt === "number") parts.push(matchClock(frame.mt));
  showViewInfo(v, parts.join(" "));
}

function addAction(doc) {
  if (!doc || typeof doc !== "object") return;
  const summary = doc.fixtureSummary;
  if (summary && typeof summary === "object") {
    const score = $("#score");
    score.replaceChildren(
      el("span", "home", "team"),
      `${summary.homeTeamScore ?? "-"} : ${summary.awayTeamScore ?? "-"}`,
      el("span", "away", "team"),
    );
    if (summary.currentStatus) score.append(el("span", summary.currentStatus, "team"));
  }
  const action = doc.fixtureAction;
  let li;
  if (action && typeof action === "object") {
    const when = typeof action.timestamp === "string" ? action.timestamp.slice(11, 19) : "";
    li = el("li", `${when}  ${action.fixtureActionType ?? "?"}  #${action.fixtureSeqNum ?? "?"}`);
    if (action.fixtureActionType === "Goal") li.className = "goal";
  } else if (typeof doc.eventElementType === "string") {
    li = el("li", `${doc.eventElementType}${doc.state ? `: ${doc.state}` : ""}`, "muted");
  } else {
    return;
  }
  const list = $("#actions");
  list.prepend(li);
  while (list.children.length > ACTIONS_SHOWN) list.lastElementChild.remove();
}

// -- tokens and events -----------------------------------------------------------------------

function useTokens(event) {
  event.preventDefault();
  app.apiToken = $("#api-token").value.trim();
  app.streamToken = $("#stream-token").value.trim();
  for (const [key, value] of [[TOKEN_KEYS.api, app.apiToken], [TOKEN_KEYS.stream, app.streamToken]]) {
    if (value) sessionStorage.setItem(key, value);
    else sessionStorage.removeItem(key);
  }
  // A view open with the old token reconnects with the new one.
  if (app.view) {
    const fx = app.fixtures.find((f) => f.feed === app.view.feed && f.fixture === app.view.fixture);
    closeView();
    if (fx) openView(fx);
  }
  poll();
}

function forgetTokens() {
  $("#api-token").value = "";
  $("#stream-token").value = "";
  useTokens(new Event("submit"));
}

function onRowActivate(event) {
  if (event.type === "keydown" && event.key !== "Enter") return;
  const tr = event.target.closest("tr");
  if (!tr || !tr.dataset.fixture) return;
  location.hash = `#fixture/${encodeURIComponent(tr.dataset.feed)}/${encodeURIComponent(tr.dataset.fixture)}`;
}

function start() {
  $("#api-token").value = app.apiToken;
  $("#stream-token").value = app.streamToken;
  $("#token-form").addEventListener("submit", useTokens);
  $("#token-forget").addEventListener("click", forgetTokens);
  $("#fixtures tbody").addEventListener("click", onRowActivate);
  $("#subscribers-filter").addEventListener("submit", (event) => event.preventDefault());
  $("#subscribers-filter").addEventListener("change", onSubscriberFilter);
  $("#sf-prev").addEventListener("click", () => onSubscriberPage(-1));
  $("#sf-next").addEventListener("click", () => onSubscriberPage(1));
  $("#fixtures tbody").addEventListener("keydown", onRowActivate);
  $("#fv-close").addEventListener("click", () => {
    history.replaceState(null, "", location.pathname + location.search);
    closeView();
  });
  window.addEventListener("hashchange", openViewFromHash);
  document.querySelector("main").classList.add("no-view");
  poll();
}

start();
