/* Civitai Downloader GUI: REST for actions, one WebSocket for live state. No dependencies. */
"use strict";

const TOKEN_KEY = "civitai-daemon.token";
const ACTIVE = new Set(["queued", "downloading", "verifying"]);
const FINISHED = new Set(["done", "cancelled"]);
const MAX_EVENTS = 300;

const state = {
  token: null,
  jobs: new Map(),        // id -> job
  lastEventId: 0,
  snapshotId: 0,
  filter: "active",
  tab: "downloads",
  events: [],             // newest first
  status: null,
  manifest: null,
  ws: null,
  wsRetry: 0,
  wsTimer: null,
  refetch: new Map(),     // job id -> timer
};

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

/* ---------- formatting ---------- */

function fmtBytes(n) {
  if (n === null || n === undefined || isNaN(n)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1000 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(v >= 100 ? 0 : 1)) + " " + units[i];
}
function fmtSpeed(bps) { return bps > 0 ? fmtBytes(bps) + "/s" : "–"; }
function fmtDuration(s) {
  if (!isFinite(s) || s < 0) return "";
  if (s < 60) return Math.ceil(s) + " s";
  if (s < 3600) return Math.round(s / 60) + " min";
  const h = Math.floor(s / 3600);
  return h + " h " + Math.round((s - h * 3600) / 60) + " min";
}
function parseTime(iso) { const t = Date.parse(iso); return isNaN(t) ? null : t; }
function fmtRelative(iso) {
  const t = parseTime(iso);
  if (t === null) return "never";
  const d = (t - Date.now()) / 1000;
  const abs = Math.abs(d);
  const text = abs < 45 ? "a moment" : fmtDuration(abs);
  return d >= 0 ? "in " + text : text + " ago";
}
function fmtClock(iso) {
  const t = parseTime(iso);
  if (t === null) return "";
  const dt = new Date(t);
  const today = new Date();
  const sameDay = dt.toDateString() === today.toDateString();
  const time = dt.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return sameDay ? time : dt.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + time;
}
function fmtWhen(iso) {
  if (!iso) return "never";
  const t = parseTime(iso);
  if (t === null) return String(iso);
  return fmtRelative(iso);
}
function fmtAbsolute(iso) {
  const t = parseTime(iso);
  if (t === null) return "";
  return new Date(t).toLocaleString([], { weekday: "short", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}
function fmtDate(iso) {
  const t = parseTime(iso);
  return t === null ? String(iso) : new Date(t).toLocaleDateString([], { year: "numeric", month: "short", day: "numeric" });
}
function setWhen(el, iso, fallback) {
  el.textContent = fallback || fmtWhen(iso);
  const abs = fallback ? "" : fmtAbsolute(iso);
  if (abs) {
    const small = document.createElement("small");
    small.textContent = abs;
    el.appendChild(small);
  }
  el.title = iso || "";
}
function jobName(job) {
  if (job.filename) return job.filename;
  if (job.version_id) return "Model " + (job.model_id ?? "?") + " · version " + job.version_id;
  return "Model " + (job.model_id ?? "?");
}

/* ---------- token ---------- */

function takeTokenFromUrl() {
  const hash = location.hash.replace(/^#/, "");
  if (!hash) return;
  const params = new URLSearchParams(hash);
  const token = params.get("token");
  if (token) {
    try { localStorage.setItem(TOKEN_KEY, token); } catch (e) { sessionStorage.setItem(TOKEN_KEY, token); }
  }
  // The token must not stay in the address bar, the history or a bookmark.
  history.replaceState(null, "", location.pathname + location.search);
}
function loadToken() {
  try { return localStorage.getItem(TOKEN_KEY) || sessionStorage.getItem(TOKEN_KEY); } catch (e) { return null; }
}
function forgetToken() {
  try { localStorage.removeItem(TOKEN_KEY); sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* ignore */ }
  state.token = null;
}
function showLogin(reason) {
  $("#signout").hidden = true;
  $("#login-why").textContent = reason || "Paste an API token. The daemon prints a login link when it starts, or run:";
  $("#login").hidden = false;
  setTimeout(() => $("#login-token").focus(), 0);
}

/* ---------- REST ---------- */

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = { "Authorization": "Bearer " + state.token };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  let res;
  try { res = await fetch(path, init); } catch (e) { throw new ApiError(0, "The daemon is not reachable."); }
  let data = null;
  try { data = await res.json(); } catch (e) { /* not JSON */ }
  if (res.status === 401) {
    forgetToken();
    disconnect();
    showLogin("The token was refused (" + ((data && data.error) || "unauthorized") + "). Paste a new one:");
    throw new ApiError(401, "Not signed in.");
  }
  if (!res.ok) throw new ApiError(res.status, (data && data.error) || res.statusText);
  return data;
}

function toast(message, level) {
  const el = document.createElement("div");
  el.className = "toast";
  if (level) el.dataset.level = level;
  el.textContent = message;
  $("#toasts").appendChild(el);
  setTimeout(() => el.remove(), level === "bad" ? 7000 : 4000);
}
function reportError(e) { if (!(e instanceof ApiError && e.status === 401)) toast(e.message, "bad"); }

/* ---------- jobs ---------- */

function putJob(job) {
  if (!job || job.id === undefined) return;
  const old = state.jobs.get(job.id);
  state.jobs.set(job.id, old ? Object.assign({}, old, job) : job);
  scheduleRender();
}

function refetchJob(id) {
  if (state.refetch.has(id)) return;
  state.refetch.set(id, setTimeout(async () => {
    state.refetch.delete(id);
    try { putJob((await api("GET", "/api/jobs/" + id)).job); } catch (e) { /* next event fixes it */ }
  }, 120));
}

function visibleJobs() {
  const all = Array.from(state.jobs.values());
  const f = state.filter;
  const pick = all.filter((j) =>
    f === "all" ? true : f === "active" ? ACTIVE.has(j.state) : f === "failed" ? j.state === "failed" : FINISHED.has(j.state));
  const rank = { downloading: 0, verifying: 0, queued: 1 };
  if (f === "active") {
    pick.sort((a, b) => (rank[a.state] - rank[b.state]) || (a.priority - b.priority) || (a.id - b.id));
  } else {
    pick.sort((a, b) => b.id - a.id);
  }
  return pick;
}

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => { renderPending = false; render(); });
}

function render() {
  renderJobs();
  renderCounts();
}

function renderCounts() {
  const all = Array.from(state.jobs.values());
  const n = (pred) => all.filter(pred).length;
  $("#count-active").textContent = n((j) => ACTIVE.has(j.state));
  $("#count-failed").textContent = n((j) => j.state === "failed");
  $("#count-finished").textContent = n((j) => FINISHED.has(j.state));
  $("#count-all").textContent = all.length;
  // Every active job is in the page (the snapshot has them all); finished ones may be older
  // than what was loaded, so those counts come from the supervisor when it has told us more.
  const q = (state.status && state.status.queue) || {};
  const count = (s) => (ACTIVE.has(s) ? n((j) => j.state === s) : Math.max(q[s] || 0, n((j) => j.state === s)));
  $("#stat-queued").textContent = count("queued");
  $("#stat-downloading").textContent = count("downloading") + count("verifying");
  $("#stat-done").textContent = count("done");
  const failed = count("failed");
  $("#stat-failed").textContent = failed;
  $("#stat-failed").classList.toggle("nonzero", failed > 0);
  const speed = all.filter((j) => j.state === "downloading").reduce((s, j) => s + (j.speed_bps || 0), 0);
  $("#stat-speed").textContent = speed > 0 ? fmtSpeed(speed) : "idle";
}

function renderJobs() {
  const list = $("#jobs");
  const jobs = visibleJobs();
  const keep = new Set(jobs.map((j) => String(j.id)));
  for (const el of $$(".job", list)) if (!keep.has(el.dataset.jobId)) el.remove();
  let prev = null;
  for (const job of jobs) {
    let el = list.querySelector(`.job[data-job-id="${job.id}"]`);
    if (!el) {
      el = $("#job-template").content.firstElementChild.cloneNode(true);
      el.dataset.jobId = job.id;
    }
    updateJobRow(el, job);
    const want = prev ? prev.nextElementSibling : list.firstElementChild;
    if (want !== el) list.insertBefore(el, want);
    prev = el;
  }
  const empty = jobs.length === 0;
  $("#jobs-empty").hidden = !empty;
  if (empty) {
    $("#jobs-empty-text").textContent = {
      active: "No downloads running or waiting. Add a model on the right, or list it in manifest.json.",
      failed: "No failed downloads.",
      finished: "Nothing finished yet.",
      all: "No jobs yet.",
    }[state.filter];
  }
}

function updateJobRow(el, job) {
  el.dataset.state = job.state;
  $(".job-name", el).textContent = jobName(job);
  $(".job-name", el).title = jobName(job);
  const badge = $(".badge", el);
  badge.dataset.state = job.state;
  badge.textContent = job.state === "done" ? "completed" : job.state;
  const meta = ["#" + job.id];
  if (job.model_type) meta.push(job.model_type);
  if (job.model_id) meta.push("model " + job.model_id);
  if (job.version_id) meta.push("version " + job.version_id);
  if (job.attempts > 1 || (job.attempts && job.state === "failed")) meta.push("attempt " + job.attempts + (job.max_attempts ? "/" + job.max_attempts : ""));
  $(".job-meta", el).textContent = meta.join(" · ");

  const total = job.bytes_total || 0;
  const done = job.state === "done" ? total : (job.bytes_done || 0);
  const pct = total > 0 ? Math.min(100, (100 * done) / total) : (job.state === "done" ? 100 : 0);
  $(".bar", el).style.width = pct.toFixed(1) + "%";
  $(".progress", el).hidden = job.state === "cancelled" && !done;

  let detail = "";
  if (job.state === "downloading") {
    const parts = [total ? `${fmtBytes(done)} of ${fmtBytes(total)} (${pct.toFixed(0)}%)` : fmtBytes(done)];
    if (job.speed_bps > 0) {
      parts.push(fmtSpeed(job.speed_bps));
      if (total > done) parts.push(fmtDuration((total - done) / job.speed_bps) + " left");
    }
    detail = parts.join(" · ");
  } else if (job.state === "verifying") {
    detail = "Checking SHA-256…";
  } else if (job.state === "queued") {
    detail = done > 0 ? `Waiting · ${fmtBytes(done)} of ${fmtBytes(total)} kept` : "Waiting for a worker";
  } else if (job.state === "done") {
    detail = "Completed" + (total ? " · " + fmtBytes(total) : "") + " · " + fmtClock(job.updated_at);
  } else if (job.state === "failed") {
    detail = "Failed " + fmtClock(job.updated_at);
  } else if (job.state === "cancelled") {
    detail = "Cancelled " + fmtClock(job.updated_at);
  }
  $(".job-detail", el).textContent = detail;
  $(".job-error", el).textContent = job.state === "failed" || (job.state === "queued" && job.error) ? (job.error || "Unknown error") : "";

  const prio = $('input[data-action="priority"]', el);
  prio.disabled = !ACTIVE.has(job.state);
  if (document.activeElement !== prio) prio.value = job.priority;
  $('[data-action="retry"]', el).hidden = !(job.state === "failed" || job.state === "cancelled");
  $('[data-action="cancel"]', el).hidden = !ACTIVE.has(job.state);
}

async function jobAction(el, action) {
  const id = Number(el.dataset.jobId);
  try {
    if (action === "cancel") {
      putJob((await api("DELETE", "/api/jobs/" + id)).job);
      toast("Cancelled " + jobName(state.jobs.get(id) || { id }));
    } else if (action === "retry") {
      putJob((await api("POST", `/api/jobs/${id}/retry`)).job);
      toast("Queued again");
    }
  } catch (e) { reportError(e); }
}

async function setPriority(input) {
  const el = input.closest(".job");
  const id = Number(el.dataset.jobId);
  const value = parseInt(input.value, 10);
  if (!(value >= 1)) { input.value = (state.jobs.get(id) || {}).priority || 10; return; }
  try { putJob((await api("PATCH", "/api/jobs/" + id, { priority: value })).job); }
  catch (e) { reportError(e); input.value = (state.jobs.get(id) || {}).priority || 10; }
}

/* ---------- events ---------- */

const EVENT_LEVEL = {
  download_completed: "ok", download_skipped: "ok", model_update: "ok",
  download_failed: "bad", model_update_error: "bad", manifest_error: "bad",
  download_retry: "warn", download_timeout: "warn", worker_restarted: "warn", download_cancelled: "warn",
};

function describe(ev) {
  const job = ev.job_id !== undefined ? state.jobs.get(ev.job_id) : null;
  const name = ev.filename || (job ? jobName(job) : ev.job_id !== undefined ? "job #" + ev.job_id : "");
  switch (ev.event) {
    case "daemon_started": return "Daemon started" + (ev.version ? " (version " + ev.version + ")" : "");
    case "daemon_stopping": return "Daemon stopping";
    case "download_queued": return `Queued ${name}` + (ev.priority !== undefined ? ` with priority ${ev.priority}` : "");
    case "download_started": return `Started ${name}` + (ev.attempt > 1 ? ` (attempt ${ev.attempt})` : "");
    case "download_retry": return `${name}: retrying in ${Math.round(ev.delay_s || 0)} s after: ${ev.error || "an error"}`;
    case "download_timeout": return `${name} ran past the ${ev.timeout_s} s time limit`;
    case "download_completed": return `Downloaded ${name}` + (ev.bytes ? ` (${fmtBytes(ev.bytes)})` : "");
    case "download_skipped": return `${name} was already present and verified`;
    case "download_failed": return `${name} failed: ${ev.error || "unknown error"}`;
    case "download_cancelled": return `Cancelled ${name}`;
    case "worker_restarted": return `${ev.worker || "A worker"} restarted after a ${ev.reason || "crash"}` + (ev.exitcode !== undefined && ev.exitcode !== null ? ` (exit code ${ev.exitcode})` : "");
    case "model_update": return `Model ${ev.model_id} has a new version ${ev.version_id}` + (ev.filename ? ` (${ev.filename})` : "");
    case "model_update_error": return `Update check for model ${ev.model_id} failed: ${ev.error}`;
    case "manifest_error": return `manifest.json: ${ev.error}`;
    default: return Object.entries(ev).filter(([k]) => !["id", "event", "ts"].includes(k)).map(([k, v]) => `${k}=${v}`).join(" ");
  }
}

function eventItem(ev) {
  const li = document.createElement("li");
  li.dataset.level = EVENT_LEVEL[ev.event] || "";
  const time = document.createElement("time");
  time.textContent = fmtClock(ev.ts);
  time.title = ev.ts || "";
  const name = document.createElement("span");
  name.className = "ev-name";
  name.textContent = ev.event;
  const text = document.createElement("span");
  text.textContent = describe(ev);
  li.append(time, name, text);
  return li;
}

function addEvent(ev) {
  if (typeof ev.id === "number" && state.events.some((e) => e.id === ev.id)) return;
  state.events.unshift(ev);
  if (typeof ev.id === "number" && state.events.length > 1 && typeof state.events[1].id === "number" && state.events[1].id > ev.id) {
    state.events.sort((a, b) => (b.id || 0) - (a.id || 0));
    renderEvents();
  } else {
    const list = $("#events");
    list.insertBefore(eventItem(ev), list.firstChild);
  }
  while (state.events.length > MAX_EVENTS) { state.events.pop(); const last = $("#events").lastChild; if (last) last.remove(); }
}

function renderEvents() {
  const list = $("#events");
  list.replaceChildren(...state.events.map(eventItem));
}

async function loadEvents() {
  try {
    const data = await api("GET", "/api/events?limit=200");
    const byId = new Map();
    for (const e of data.events.concat(state.events)) byId.set(e.id, e);
    state.events = Array.from(byId.values()).sort((a, b) => (b.id || 0) - (a.id || 0)).slice(0, MAX_EVENTS);
    renderEvents();
  } catch (e) { /* shown elsewhere */ }
}

const JOB_STATE_AFTER = {
  download_queued: "queued", download_started: "downloading", download_completed: "done",
  download_skipped: "done", download_failed: "failed", download_cancelled: "cancelled", download_retry: "queued",
};

function onEvent(ev) {
  if (ev.event === "snapshot") {
    const fresh = new Map();
    for (const job of ev.jobs || []) fresh.set(job.id, job);
    // Keep older finished jobs this page already knows about; the snapshot is authoritative for the rest.
    for (const [id, job] of state.jobs) if (!fresh.has(id) && !ACTIVE.has(job.state)) fresh.set(id, job);
    state.jobs = fresh;
    // On a first connection nothing is replayed; on a reconnection the events missed since
    // lastEventId follow the snapshot (for the log only: the snapshot already has their effect).
    state.snapshotId = typeof ev.last_id === "number" ? ev.last_id : 0;
    if (state.lastEventId === 0 || state.lastEventId > state.snapshotId) state.lastEventId = state.snapshotId;
    scheduleRender();
    renderEvents();  // the log names jobs by their files, which the snapshot brings
    return;
  }
  if (typeof ev.id === "number") {
    if (ev.id <= state.lastEventId) return;
    state.lastEventId = ev.id;
    if (ev.id <= state.snapshotId) { addEvent(ev); return; }
  }
  if (ev.event === "download_progress") {
    const job = state.jobs.get(ev.job_id);
    if (job) {
      job.bytes_done = ev.bytes_done;
      if (ev.bytes_total) job.bytes_total = ev.bytes_total;
      job.speed_bps = ev.speed_bps;
      if (job.state === "queued") job.state = "downloading";
      scheduleRender();
    } else {
      refetchJob(ev.job_id);
    }
    return;
  }
  addEvent(ev);
  if (ev.job_id !== undefined && ev.job_id !== null) {
    const job = state.jobs.get(ev.job_id);
    const next = JOB_STATE_AFTER[ev.event];
    if (job && next) {
      job.state = next;
      if (ev.error) job.error = ev.error;
      if (next === "done" && ev.bytes) { job.bytes_total = ev.bytes; job.bytes_done = ev.bytes; }
      scheduleRender();
    }
    refetchJob(ev.job_id);
  }
  if (ev.event === "download_completed" || ev.event === "download_failed") {
    toast(describe(ev), ev.event === "download_failed" ? "bad" : "ok");
  }
  if (["download_completed", "model_update", "manifest_error"].includes(ev.event) && state.tab === "manifest") loadManifest();
  if (["worker_restarted", "daemon_started", "model_update", "model_update_error", "download_started",
       "download_completed", "download_failed", "download_cancelled", "download_skipped"].includes(ev.event)) statusSoon();
}

/* ---------- WebSocket ---------- */

function setConn(kind, text) {
  const el = $("#conn");
  el.dataset.state = kind;
  $(".conn-text", el).textContent = text;
}

function connect() {
  if (!state.token) return;
  clearTimeout(state.wsTimer);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const after = state.lastEventId > 0 ? "?after=" + state.lastEventId : "";
  let ws;
  try {
    ws = new WebSocket(`${scheme}://${location.host}/ws${after}`, ["bearer", state.token]);
  } catch (e) {
    scheduleReconnect();
    return;
  }
  state.ws = ws;
  let opened = false;
  ws.onopen = () => { opened = true; state.wsRetry = 0; setConn("live", "Live"); };
  ws.onmessage = (msg) => {
    let ev;
    try { ev = JSON.parse(msg.data); } catch (e) { return; }
    onEvent(ev);
  };
  ws.onclose = () => {
    if (state.ws !== ws) return;
    state.ws = null;
    if (!state.token) return;
    if (!opened) checkAuth();
    scheduleReconnect();
  };
}

function scheduleReconnect() {
  const delay = Math.min(15000, 1000 * Math.pow(2, state.wsRetry));
  state.wsRetry++;
  setConn(state.wsRetry > 3 ? "offline" : "reconnecting", "Reconnecting…");
  state.wsTimer = setTimeout(connect, delay);
}

function disconnect() {
  clearTimeout(state.wsTimer);
  if (state.ws) { const ws = state.ws; state.ws = null; ws.close(); }
  setConn("offline", "Signed out");
}

async function checkAuth() {
  // A refused handshake looks like any network error to a page; ask the REST API why.
  try { await api("GET", "/api/jobs?limit=1"); } catch (e) { /* api() shows the login on 401 */ }
}

/* ---------- status, updater, processes ---------- */

let statusTimer = null;
function statusSoon() {
  if (statusTimer) return;
  statusTimer = setTimeout(() => { statusTimer = null; loadStatus(); }, 300);
}

async function loadStatus() {
  try {
    state.status = await api("GET", "/api/status");
  } catch (e) {
    if (e.status === 503) renderProcsUnavailable(e.message);
    return;
  }
  renderStatus();
  renderCounts();
}

function renderProcsUnavailable(message) {
  const list = $("#procs");
  const li = document.createElement("li");
  li.className = "muted";
  li.textContent = message;
  list.replaceChildren(li);
}

function renderStatus() {
  const s = state.status || {};
  $("#version").textContent = s.version ? "v" + s.version : "";
  $("#uptime").textContent = s.uptime_s !== undefined ? "up " + fmtDuration(s.uptime_s) : "";
  const u = s.updater || {};
  setWhen($("#upd-last"), u.last_check);
  setWhen($("#upd-success"), u.last_success);
  setWhen($("#upd-next"), u.next_check, u.running ? "running now…" : "");
  $("#check-now").disabled = !!u.running;
  const list = $("#procs");
  const items = (s.children || []).map((c) => {
    const li = document.createElement("li");
    li.dataset.name = c.name;
    const dot = document.createElement("span");
    dot.className = "dot";
    dot.dataset.state = c.state;
    const mid = document.createElement("div");
    const name = document.createElement("div");
    name.className = "proc-name";
    name.textContent = c.name;
    const sub = document.createElement("div");
    sub.className = "proc-sub";
    const bits = [];
    if (c.pid) bits.push("pid " + c.pid);
    if (c.job_id) { const j = state.jobs.get(c.job_id); bits.push("job #" + c.job_id + (j && j.filename ? " " + j.filename : "")); }
    else if (c.kind === "worker" && c.state === "running") bits.push("idle");
    if (c.restarts) bits.push(c.restarts + " restart" + (c.restarts === 1 ? "" : "s"));
    sub.textContent = bits.join(" · ");
    mid.append(name, sub);
    const st = document.createElement("span");
    st.className = "proc-state";
    st.textContent = c.state;
    li.append(dot, mid, st);
    return li;
  });
  if (items.length) list.replaceChildren(...items);
}

/* ---------- manifest ---------- */

async function loadManifest() {
  try {
    state.manifest = (await api("GET", "/api/manifest")).entries || [];
  } catch (e) { reportError(e); return; }
  const body = $("#manifest tbody");
  const rows = state.manifest.map((entry) => {
    const tr = document.createElement("tr");
    const cell = (text, cls) => { const td = document.createElement("td"); td.textContent = text ?? "–"; if (cls) td.className = cls; if (cls === "file") td.title = text || ""; return td; };
    const del = document.createElement("td");
    del.className = "num";
    const btn = document.createElement("button");
    btn.type = "button";
    btn.className = "btn small danger-ghost";
    btn.textContent = "Remove";
    btn.addEventListener("click", () => removeManifestModel(entry.modelId));
    del.append(btn);
    tr.append(cell(entry.modelId), cell(entry.modelVersionId), cell(entry.model_type), cell(entry.filename, "file"),
      cell(entry.priority ?? 10, "num"), cell(entry.updatedAt ? fmtDate(entry.updatedAt) : "–"), del);
    return tr;
  });
  body.replaceChildren(...rows);
  $("#manifest").hidden = rows.length === 0;
  $("#manifest-empty").hidden = rows.length !== 0;
}

async function removeManifestModel(modelId) {
  if (!confirm(`Remove model ${modelId} from the manifest? Its files stay on disk.`)) return;
  try {
    const r = await api("DELETE", "/api/manifest/" + modelId);
    toast(`Removed ${r.removed} entr${r.removed === 1 ? "y" : "ies"}`);
    loadManifest();
  } catch (e) { reportError(e); }
}

/* ---------- add form ---------- */

async function addModel(ev) {
  ev.preventDefault();
  const raw = $("#add-input").value.trim();
  const body = {};
  if (/^https?:\/\//i.test(raw) || /civitai\./i.test(raw)) {
    body.url = /^https?:\/\//i.test(raw) ? raw : "https://" + raw;
  } else if (/^\d+$/.test(raw)) {
    const kind = $('input[name="kind"]:checked').value;
    body[kind === "version" ? "version_id" : "model_id"] = Number(raw);
  } else {
    toast("Enter a number or a civitai.com URL.", "bad");
    return;
  }
  const prio = parseInt($("#add-priority").value, 10);
  if (prio >= 1) body.priority = prio;
  const type = $("#add-type").value.trim();
  if (type) body.model_type = type;
  const submit = $("#add-submit");
  submit.disabled = true;
  try {
    const res = await fetchAdd(body);
    putJob(res.job);
    toast(res.created ? `Queued ${jobName(res.job)}` : `Already queued as job #${res.job.id}`, "ok");
    $("#add-input").value = "";
    if (state.filter !== "active" && state.filter !== "all") selectFilter("active");
  } catch (e) { reportError(e); }
  finally { submit.disabled = false; }
}

async function fetchAdd(body) {
  const headers = { "Authorization": "Bearer " + state.token, "Content-Type": "application/json" };
  const res = await fetch("/api/jobs", { method: "POST", headers, body: JSON.stringify(body) });
  const data = await res.json().catch(() => null);
  if (res.status === 401) { forgetToken(); disconnect(); showLogin("The token was refused. Paste a new one:"); throw new ApiError(401, ""); }
  if (!res.ok) throw new ApiError(res.status, (data && data.error) || res.statusText);
  return { job: data.job, created: res.status === 201 };
}

/* ---------- navigation ---------- */

function selectTab(name) {
  state.tab = name;
  for (const b of $$(".tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of ["downloads", "manifest", "events"]) $("#tab-" + p).hidden = p !== name;
  if (name === "manifest") loadManifest();
  if (name === "events") renderEvents();
}
function selectFilter(name) {
  state.filter = name;
  for (const c of $$("#job-filter .chip")) c.classList.toggle("active", c.dataset.filter === name);
  render();
}

async function loadJobs() {
  // The snapshot brings active and recent jobs; failed ones may be older.
  try {
    for (const job of (await api("GET", "/api/jobs?state=failed&limit=200")).jobs) if (!state.jobs.has(job.id)) putJob(job);
  } catch (e) { /* shown elsewhere */ }
}

function start() {
  $("#login").hidden = true;
  $("#signout").hidden = false;
  connect();
  loadStatus();
  loadEvents();
  loadJobs();
}

document.addEventListener("DOMContentLoaded", () => {
  takeTokenFromUrl();
  state.token = loadToken();

  $("#jobs").addEventListener("click", (e) => {
    const btn = e.target.closest("button[data-action]");
    if (btn) jobAction(btn.closest(".job"), btn.dataset.action);
  });
  $("#jobs").addEventListener("change", (e) => {
    if (e.target.matches('input[data-action="priority"]')) setPriority(e.target);
  });
  for (const b of $$(".tab")) b.addEventListener("click", () => selectTab(b.dataset.tab));
  for (const c of $$("#job-filter .chip")) c.addEventListener("click", () => selectFilter(c.dataset.filter));
  $("#add-form").addEventListener("submit", addModel);
  $("#manifest-refresh").addEventListener("click", loadManifest);
  $("#check-now").addEventListener("click", async () => {
    try {
      await api("POST", "/api/updates/check");
      toast("Update check started");
      setTimeout(loadStatus, 500);
    } catch (e) { reportError(e); }
  });
  $("#signout").addEventListener("click", () => { forgetToken(); disconnect(); showLogin(); });
  $("#login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = $("#login-token").value.trim().replace(/^bearer\s+/i, "");
    if (!token) return;
    try { localStorage.setItem(TOKEN_KEY, token); } catch (err) { sessionStorage.setItem(TOKEN_KEY, token); }
    state.token = token;
    $("#login-token").value = "";
    start();
  });

  setInterval(() => { if (state.token) loadStatus(); }, 5000);
  setInterval(() => { if (state.status) renderStatus(); }, 30000);
  render();
  if (state.token) start(); else { setConn("offline", "Signed out"); showLogin(); }
});
