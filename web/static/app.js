/* Civitai Downloader GUI: REST for actions, one WebSocket for live state. No dependencies. */
"use strict";

const TOKEN_KEY = "civitai-daemon.token";
const ACTIVE = new Set(["queued", "downloading", "verifying", "paused"]);
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
  refetchedAt: new Map(), // job id -> when its JSON was last asked for
  paused: false,          // every download paused (POST /api/pause)
  speed: null,            // GET /api/speed
  layout: null,           // GET /api/layout
  library: null,          // GET /api/library
  libFilter: "all",
  libQuery: "",
  scan: null,             // GET /api/library/scan
};

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

/* ---------- formatting ---------- */

function fmtBytes(n) {
  if (n === null || n === undefined || isNaN(n)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }  // SI, as config.json's "20MB"
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
  if (job.model_name) return job.model_name + (job.version_name ? " " + job.version_name : "");
  if (job.filename) return job.filename;
  if (job.version_id) return "Model " + (job.model_id ?? "?") + " · version " + job.version_id;
  return "Model " + (job.model_id ?? "?");
}
function jobTitle(job) {
  return job.model_name || job.filename || (job.version_id ? "Model " + (job.model_id ?? "?") + " · version " + job.version_id : "Model " + (job.model_id ?? "?"));
}
function jobPath(job) {
  if (job.path) return job.path;
  return job.model_type && job.filename ? job.model_type + "/" + job.filename : null;
}
function initial(text) {
  const m = /[\p{L}\p{N}]/u.exec(text || "");
  return m ? m[0].toUpperCase() : "?";
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

/* ---------- previews ---------- */

// An <img> cannot send the token: previews are fetched with it and shown as blob URLs, so the
// token never goes into a URL. Few at a time, only for rows on screen, each path once.
const thumbs = {
  urls: new Map(),      // path -> blob URL
  misses: new Map(),    // path -> {at, tries}: no preview (yet)
  pending: new Map(),   // path -> Promise
  queue: [],
  running: 0,
  max: 4,
};

function previewFor(path, { retry = false } = {}) {
  if (!path) return Promise.resolve(null);
  if (thumbs.urls.has(path)) return Promise.resolve(thumbs.urls.get(path));
  const miss = thumbs.misses.get(path);
  // A finished download's preview may land a moment after the file: ask again a few times.
  if (miss && !(retry && miss.tries < 4 && Date.now() - miss.at > 3000 * miss.tries)) return Promise.resolve(null);
  if (thumbs.pending.has(path)) return thumbs.pending.get(path);
  const p = new Promise((resolve) => { thumbs.queue.push({ path, resolve }); pumpThumbs(); });
  thumbs.pending.set(path, p);
  return p;
}

function pumpThumbs() {
  while (thumbs.running < thumbs.max && thumbs.queue.length) {
    const { path, resolve } = thumbs.queue.shift();
    thumbs.running++;
    fetch("/api/library/preview?path=" + encodeURIComponent(path), {
      headers: { "Authorization": "Bearer " + state.token }, cache: "default",
    }).then(async (res) => {
      if (!res.ok) throw new Error(String(res.status));
      const url = await thumbnailUrl(await res.blob());
      thumbs.urls.set(path, url);
      thumbs.misses.delete(path);
      resolve(url);
    }).catch(() => {
      const miss = thumbs.misses.get(path) || { tries: 0 };
      thumbs.misses.set(path, { at: Date.now(), tries: miss.tries + 1 });
      resolve(null);
    }).finally(() => {
      thumbs.pending.delete(path);
      thumbs.running--;
      pumpThumbs();
    });
  }
}

// The worker writes the preview just after the file: a job finished a moment ago asks again.
const previewChecks = new Map();  // job id -> tries
function recheckPreview(job) {
  const finished = parseTime(job.updated_at);
  const tries = previewChecks.get(job.id) || 0;
  if (tries >= 3 || finished === null || Date.now() - finished > 120000) return;
  previewChecks.set(job.id, tries + 1);
  setTimeout(() => refetchJob(job.id), 2000 * (tries + 1));
}

// A preview may be megabytes; a thousand of them kept as they came would hold that much memory.
// Each is drawn once onto a small canvas, and only that thumbnail is kept.
const THUMB_PX = 112;
async function thumbnailUrl(blob) {
  try {
    const bmp = await createImageBitmap(blob);
    const scale = Math.max(THUMB_PX / bmp.width, THUMB_PX / bmp.height);
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = THUMB_PX;
    const w = bmp.width * scale, h = bmp.height * scale;
    canvas.getContext("2d").drawImage(bmp, (THUMB_PX - w) / 2, (THUMB_PX - h) / 2, w, h);
    bmp.close();
    const small = await new Promise((resolve) => canvas.toBlob(resolve, "image/webp", 0.85));
    return URL.createObjectURL(small || blob);
  } catch (e) {
    return URL.createObjectURL(blob);
  }
}

function setThumb(box, path, label, opts) {
  const letter = $(".thumb-letter", box);
  letter.textContent = initial(label);
  if (box.dataset.path === (path || "") && box.querySelector("img")) return;
  box.dataset.path = path || "";
  const old = box.querySelector("img");
  if (old && !path) old.remove();
  if (!path) return;
  previewFor(path, opts).then((url) => {
    if (!url || box.dataset.path !== path) return;
    let img = box.querySelector("img");
    if (!img) { img = document.createElement("img"); img.alt = ""; img.decoding = "async"; box.appendChild(img); }
    if (img.src !== url) img.src = url;
  });
}

const thumbObserver = "IntersectionObserver" in window ? new IntersectionObserver((items) => {
  for (const it of items) {
    if (!it.isIntersecting) continue;
    thumbObserver.unobserve(it.target);
    const box = it.target;
    setThumb(box, box.dataset.want, box.dataset.label);
  }
}, { rootMargin: "300px" }) : null;

function lazyThumb(box, path, label) {
  $(".thumb-letter", box).textContent = initial(label);
  box.dataset.label = label || "";
  if (!path) { setThumb(box, null, label); return; }
  if (thumbs.urls.has(path) || !thumbObserver) { setThumb(box, path, label); return; }
  box.dataset.want = path;
  thumbObserver.observe(box);
}

async function copyText(text) {
  try {
    if (navigator.clipboard && window.isSecureContext) { await navigator.clipboard.writeText(text); return true; }
  } catch (e) { /* fall back below */ }
  // Plain http on a LAN address is no secure context: the old way still works there.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  let ok = false;
  try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
  area.remove();
  return ok;
}

/* ---------- jobs ---------- */

function putJob(job) {
  if (!job || job.id === undefined) return;
  const old = state.jobs.get(job.id);
  state.jobs.set(job.id, old ? Object.assign({}, old, job) : job);
  scheduleRender();
}

function refetchJob(id) {
  if (state.refetch.has(id)) return;
  state.refetchedAt.set(id, Date.now());
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
  const rank = { downloading: 0, verifying: 0, queued: 1, paused: 2 };
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
  if (state.tab === "library" && state.library) renderLibraryLive();
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
  const title = jobTitle(job);
  $(".job-name", el).textContent = title;
  $(".job-name", el).title = title;
  const badge = $(".badge", el);
  badge.dataset.state = job.state;
  badge.textContent = job.state === "done" ? "completed" : job.state;
  const sub = [];
  if (job.model_name && job.version_name) sub.push(job.version_name);
  if (job.base_model) sub.push(job.base_model);
  if (job.model_type) sub.push(job.model_type);
  $(".job-sub", el).textContent = sub.join(" · ");
  // The preview exists once the file is verified; until then the row shows the name alone.
  setThumb($(".thumb", el), job.state === "done" && job.preview ? jobPath(job) : null, title);
  if (job.state === "done" && !job.preview) recheckPreview(job);
  const meta = ["#" + job.id];
  if (job.model_name && job.filename) meta.push(job.filename);
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
    detail = done > 0 ? `Waiting · ${fmtBytes(done)} of ${fmtBytes(total)} kept` : state.paused ? "Waiting: all downloads are paused" : "Waiting for a worker";
    if (job.not_before) detail = "Waits until " + fmtAbsolute(job.not_before) + (done > 0 ? ` · ${fmtBytes(done)} kept` : "");
  } else if (job.state === "paused") {
    detail = "Paused" + (done > 0 ? ` · ${fmtBytes(done)}${total ? " of " + fmtBytes(total) : ""} kept` : "");
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
  $('[data-action="pause"]', el).hidden = !["queued", "downloading", "verifying"].includes(job.state);
  $('[data-action="resume"]', el).hidden = job.state !== "paused";
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
    } else if (action === "pause" || action === "resume") {
      putJob((await api("POST", `/api/jobs/${id}/${action}`)).job);
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
  download_paused: "warn", daemon_paused: "warn", library_scan_done: "ok",
};

function describe(ev) {
  const job = ev.job_id !== undefined ? state.jobs.get(ev.job_id) : null;
  const name = ev.model_name ? ev.model_name + (ev.version_name ? " " + ev.version_name : "")
    : ev.filename || (job ? jobName(job) : ev.job_id !== undefined ? "job #" + ev.job_id : "");
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
    case "download_paused": return `Paused ${name}`;
    case "download_resumed": return `Resumed ${name}`;
    case "daemon_paused": return "All downloads paused";
    case "daemon_resumed": return "Downloads resumed";
    case "speed_limit_changed": return "Speed cap " + (ev.max_speed ? fmtSpeed(ev.max_speed) : "off") + (ev.source ? ` (from ${ev.source})` : "");
    case "library_scan_started": return "Library scan started" + (ev.folder ? ` in ${ev.folder}` : "");
    case "library_scan_done": return `Library scan done: ${ev.matched ?? 0} matched, ${ev.added ?? 0} added, ${(ev.unknown || []).length} unknown` + (ev.seconds !== undefined ? ` in ${fmtDuration(ev.seconds)}` : "");
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
  download_paused: "paused", download_resumed: "queued",
};
// What an event may say about its job that the row shows (the lead's events carry the names).
const JOB_FIELDS_IN_EVENTS = ["model_name", "version_name", "base_model", "filename", "model_type", "model_id",
  "version_id", "file_id", "path"];

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
      mergeJobFields(job, ev);
      // Resolution has no event of its own: a running job without its names asks for them.
      if (!job.model_name && Date.now() - (state.refetchedAt.get(job.id) || 0) > 4000) refetchJob(job.id);
      scheduleRender();
    } else {
      refetchJob(ev.job_id);
    }
    return;
  }
  if (ev.event === "library_scan_progress") { onScanProgress(ev); return; }
  addEvent(ev);
  if (ev.job_id !== undefined && ev.job_id !== null) {
    const job = state.jobs.get(ev.job_id);
    const next = JOB_STATE_AFTER[ev.event];
    if (job) mergeJobFields(job, ev);
    if (job && next) {
      job.state = next;
      if (ev.error) job.error = ev.error;
      if (next === "done" && ev.bytes) { job.bytes_total = ev.bytes; job.bytes_done = ev.bytes; }
      if (next !== "downloading") job.speed_bps = 0;
    }
    if (job) scheduleRender();
    refetchJob(ev.job_id);
  }
  if (ev.event === "daemon_paused" || ev.event === "daemon_resumed") setPaused(ev.event === "daemon_paused");
  if (ev.event === "speed_limit_changed") loadSpeed();
  if (ev.event === "library_scan_started") onScanStarted(ev);
  if (ev.event === "library_scan_done") onScanDone(ev);
  if (["download_completed", "download_skipped", "download_failed", "model_update", "library_scan_done",
       "download_queued"].includes(ev.event) && state.tab === "library") libraryReloadSoon();
  if (ev.event === "download_completed" || ev.event === "download_failed") {
    toast(describe(ev), ev.event === "download_failed" ? "bad" : "ok");
  }
  if (["download_completed", "model_update", "manifest_error"].includes(ev.event) && state.tab === "manifest") loadManifest();
  if (["worker_restarted", "daemon_started", "model_update", "model_update_error", "download_started",
       "download_completed", "download_failed", "download_cancelled", "download_skipped"].includes(ev.event)) statusSoon();
}

function mergeJobFields(job, ev) {
  for (const k of JOB_FIELDS_IN_EVENTS) if (ev[k] !== undefined && ev[k] !== null) job[k] = ev[k];
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
  if (typeof s.paused === "boolean") setPaused(s.paused);
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
  const folder = addFolder();
  if (folder) body.model_type = folder;
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
  for (const p of ["downloads", "library", "manifest", "events"]) $("#tab-" + p).hidden = p !== name;
  if (name === "manifest") loadManifest();
  if (name === "events") renderEvents();
  if (name === "library") { loadLibrary(); loadScan(); }
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
  loadSpeed();
  loadLayout();
  if (state.tab === "library") { loadLibrary(); loadScan(); }
}

/* ---------- pause ---------- */

function setPaused(paused) {
  state.paused = !!paused;
  const btn = $("#pause-all");
  btn.dataset.paused = String(state.paused);
  btn.textContent = state.paused ? "Resume all" : "Pause all";
  $("#paused-banner").hidden = !state.paused;
}

async function togglePauseAll() {
  const want = !state.paused;
  try {
    const r = await api("POST", want ? "/api/pause" : "/api/resume");
    setPaused(r && typeof r.paused === "boolean" ? r.paused : want);
    toast(state.paused ? "All downloads paused" : "Downloads resumed");
    scheduleRender();
  } catch (e) { reportError(e); }
}

/* ---------- speed: the cap and the last hour ---------- */

const SPEED_KEY = "civitai-daemon.speed-history";
const HOUR_MS = 3600 * 1000;
const speedHistory = loadSpeedHistory();  // [[ms, bytes/s], …], oldest first, one a second at most

function loadSpeedHistory() {
  // Kept in this tab's session: a reload keeps the hour; a closed tab forgets it.
  try {
    const raw = JSON.parse(sessionStorage.getItem(SPEED_KEY) || "[]");
    const cut = Date.now() - HOUR_MS;
    return Array.isArray(raw) ? raw.filter((p) => Array.isArray(p) && p[0] > cut) : [];
  } catch (e) { return []; }
}

function totalSpeed() {
  let sum = 0;
  for (const j of state.jobs.values()) if (j.state === "downloading") sum += j.speed_bps || 0;
  return sum;
}

function sampleSpeed() {
  const now = Date.now();
  speedHistory.push([now, Math.round(totalSpeed())]);
  const cut = now - HOUR_MS;
  let drop = 0;
  while (drop < speedHistory.length && speedHistory[drop][0] < cut) drop++;
  if (drop) speedHistory.splice(0, drop);
  if (now % 10000 < 1000) {
    try { sessionStorage.setItem(SPEED_KEY, JSON.stringify(speedHistory)); } catch (e) { /* full: keep it in memory */ }
  }
  drawSpeed();
}

function drawSpeed() {
  const canvas = $("#speed-chart");
  if (!canvas || canvas.offsetParent === null) return;
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const now = Date.now();
  const cap = state.speed && state.speed.max_speed ? state.speed.max_speed : 0;
  let peak = cap;
  for (const [, v] of speedHistory) if (v > peak) peak = v;
  const style = getComputedStyle(document.documentElement);
  ctx.strokeStyle = style.getPropertyValue("--border").trim() || "#ddd";
  ctx.lineWidth = 1;
  ctx.beginPath(); ctx.moveTo(0, h - 0.5); ctx.lineTo(w, h - 0.5); ctx.stroke();
  $("#speed-peak").textContent = peak > 0 ? "peak " + fmtSpeed(peak) : "";
  if (peak <= 0 || speedHistory.length === 0) return;
  const x = (t) => w - ((now - t) / HOUR_MS) * w;
  const y = (v) => h - 2 - (v / peak) * (h - 6);
  if (cap > 0) {
    ctx.strokeStyle = style.getPropertyValue("--warn").trim() || "orange";
    ctx.setLineDash([4, 3]);
    ctx.beginPath(); ctx.moveTo(0, y(cap)); ctx.lineTo(w, y(cap)); ctx.stroke();
    ctx.setLineDash([]);
  }
  const accent = style.getPropertyValue("--accent").trim() || "#2563eb";
  ctx.beginPath();
  ctx.moveTo(x(speedHistory[0][0]), h);
  let lastT = null;
  for (const [t, v] of speedHistory) {
    if (lastT !== null && t - lastT > 5000) { ctx.lineTo(x(lastT + 1000), y(0)); ctx.lineTo(x(t - 1000), y(0)); }
    ctx.lineTo(x(t), y(v));
    lastT = t;
  }
  ctx.lineTo(x(lastT), h);
  ctx.closePath();
  ctx.globalAlpha = 0.18; ctx.fillStyle = accent; ctx.fill();
  ctx.globalAlpha = 1; ctx.strokeStyle = accent; ctx.lineWidth = 1.5; ctx.stroke();
}

const MB = 1000 * 1000;

async function loadSpeed() {
  try { state.speed = await api("GET", "/api/speed"); }
  catch (e) { state.speed = null; $("#speed-info").textContent = "The speed cap is not available: " + e.message; return; }
  renderSpeed();
}

function renderSpeed() {
  const s = state.speed || {};
  const where = { config: "from config.json", schedule: "from the schedule", api: "set here" }[s.source] || s.source || "";
  $("#speed-now").textContent = s.max_speed ? "cap " + fmtSpeed(s.max_speed) : "no cap";
  const bits = [s.max_speed ? `Cap in force: ${(s.max_speed / MB).toFixed(1)} MB/s, ${where}.` : `No cap in force${where ? " (" + where + ")" : ""}.`];
  if (s.override !== null && s.override !== undefined) bits.push("Clear goes back to " + (s.config ? (s.config / MB).toFixed(1) + " MB/s" : "no cap") + (s.schedule && s.schedule.length ? " and the schedule" : "") + ".");
  else if (s.schedule && s.schedule.length) bits.push("Schedule: " + s.schedule.map((w) => `${w.from}–${w.to} ${w.max_speed ? (w.max_speed / MB).toFixed(1) + " MB/s" : "no cap"}`).join(", ") + ".");
  $("#speed-info").textContent = bits.join(" ");
  const input = $("#speed-input");
  if (document.activeElement !== input) input.value = s.override ? (s.override / MB).toFixed(1) : "";
  $("#speed-clear").disabled = s.override === null || s.override === undefined;
  drawSpeed();
}

async function setSpeed(ev) {
  ev.preventDefault();
  const raw = $("#speed-input").value.trim();
  const value = raw === "" ? 0 : Number(raw);
  if (!(value >= 0) || !isFinite(value)) { toast("Enter a speed in MB/s, or 0 for no cap.", "bad"); return; }
  try {
    state.speed = await api("PUT", "/api/speed", { max_speed: Math.round(value * MB) });
    renderSpeed();
    toast(value > 0 ? `Speed capped at ${value} MB/s` : "No speed cap");
  } catch (e) { reportError(e); }
}

async function clearSpeed() {
  try { state.speed = await api("PUT", "/api/speed", { max_speed: null }); renderSpeed(); toast("Speed cap back to the config's"); }
  catch (e) { reportError(e); }
}

/* ---------- the add form's folder ---------- */

async function loadLayout() {
  try { state.layout = await api("GET", "/api/layout"); } catch (e) { return; }
  const select = $("#add-kind-type");
  const keep = select.value;
  select.replaceChildren(new Option("From Civitai", ""), ...state.layout.types.map((t) => new Option(t, t)));
  select.value = keep;
  updateFolderHint();
}

function addFolder() {
  const typed = $("#add-type").value.trim();
  if (typed) return typed;
  const kind = $("#add-kind-type").value;
  return kind && state.layout ? state.layout.folders[kind] : "";
}

function updateFolderHint() {
  const hint = $("#add-folder-hint");
  const folder = addFolder();
  const layout = state.layout ? state.layout.layout : "";
  if (folder) {
    hint.textContent = `Goes to ${folder}/ under download_dir.`;
  } else if (state.layout) {
    const f = state.layout.folders;
    hint.textContent = `Goes to the ${layout} layout's folder for its type on Civitai (LORA → ${f.LORA}, Checkpoint → ${f.Checkpoint}).`;
  }
  $("#add-type").placeholder = ($("#add-kind-type").value && state.layout) ? state.layout.folders[$("#add-kind-type").value] : "the layout's folder for its type";
}

/* ---------- library ---------- */

const LIB_STATES = [
  ["all", "All"], ["present", "Present"], ["downloading", "Downloading"], ["queued", "Queued"], ["paused", "Paused"],
  ["update_available", "Update available"], ["failed", "Failed"], ["missing", "Missing"],
];
const LIB_LABEL = { update_available: "update", present: "present" };
let libTimer = null;
const libRows = new Map();  // job id -> [{e, el}]: the rows a job's events update

function libraryReloadSoon() {
  clearTimeout(libTimer);
  libTimer = setTimeout(loadLibrary, 800);
}

async function loadLibrary() {
  const t0 = performance.now();
  let data;
  try { data = await api("GET", "/api/library"); } catch (e) { reportError(e); return; }
  const t1 = performance.now();
  state.library = data;
  renderLibrary();
  const t2 = performance.now();
  // For the browser test and anyone curious: how long the list took to come and to draw.
  window.__libraryTiming = { fetch_ms: t1 - t0, render_ms: t2 - t1, entries: data.entries.length };
  $("#library").dataset.loaded = String(Date.now());
}

function libKey(e) { return `${e.model_id}:${e.file_id ?? ""}:${e.folder ?? ""}:${e.filename ?? ""}`; }

function entryJob(e) {
  if (e.job && e.job.id !== undefined) return state.jobs.get(e.job.id) || null;
  return null;
}

function liveState(e) {
  // The page's own job wins over what the library said a moment ago.
  const job = entryJob(e);
  if (!job) return e.state;
  if (job.state === "downloading" || job.state === "verifying") return "downloading";
  if (job.state === "paused") return "paused";
  if (job.state === "queued") return e.state === "update_available" ? e.state : "queued";
  if (job.state === "failed" && e.state !== "present") return "failed";
  if (job.state === "done") return "present";
  return e.state;
}

function renderLibrary() {
  const lib = state.library;
  renderSpace(lib);
  renderLibFilter();
  const list = $("#library");
  const frag = document.createDocumentFragment();
  const tpl = $("#lib-template").content.firstElementChild;
  libRows.clear();
  for (const e of lib.entries) {
    const el = tpl.cloneNode(true);
    el.dataset.key = libKey(e);
    fillLibItem(el, e);
    frag.appendChild(el);
    if (e.job && e.job.id !== undefined) {
      if (!libRows.has(e.job.id)) libRows.set(e.job.id, []);
      libRows.get(e.job.id).push({ e, el });
    }
  }
  list.replaceChildren(frag);
  applyLibFilter();
}

function fillLibItem(el, e) {
  const name = e.model_name || e.filename || `Model ${e.model_id}`;
  el.dataset.state = liveState(e);
  el.dataset.search = [name, e.version_name, e.base_model, e.type, e.folder, e.filename, ...(e.trigger_words || [])]
    .filter(Boolean).join(" ").toLowerCase();
  $(".lib-name", el).textContent = name;
  $(".lib-name", el).title = e.filename || name;
  $(".lib-version", el).textContent = e.version_name || (e.version_id ? "version " + e.version_id : "");
  const badge = $(".badge", el);
  badge.dataset.state = el.dataset.state;
  badge.textContent = (LIB_LABEL[el.dataset.state] || el.dataset.state).replace("_", " ");
  const meta = [];
  if (e.type) meta.push(e.type);
  if (e.base_model) meta.push(e.base_model);
  if (e.folder) meta.push(e.folder + "/");
  const job = entryJob(e) || e.job;
  if (e.size !== null && e.size !== undefined) meta.push(fmtBytes(e.size));
  else if (job && el.dataset.state === "downloading" && job.bytes_total) meta.push(`${fmtBytes(job.bytes_done)} of ${fmtBytes(job.bytes_total)}`);
  else if (e.expected_size) meta.push(fmtBytes(e.expected_size));
  $(".lib-meta", el).textContent = meta.join(" · ");
  if (job && job.error && el.dataset.state === "failed") $(".lib-meta", el).title = job.error;
  const words = $(".lib-words", el);
  const tw = e.trigger_words || [];
  words.replaceChildren(...tw.slice(0, 12).map((w) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "word";
    b.dataset.copy = w;
    b.title = "Copy “" + w + "”";
    b.textContent = w;
    return b;
  }));
  if (tw.length > 1) {
    const all = document.createElement("button");
    all.type = "button";
    all.className = "btn ghost small copy-all";
    all.dataset.copy = tw.join(", ");
    all.textContent = "Copy all";
    words.appendChild(all);
  }
  words.hidden = tw.length === 0;
  const link = $(".lib-link", el);
  if (e.url) link.href = e.url; else link.hidden = true;
  lazyThumb($(".thumb", el), e.preview ? e.path : null, name);
}

function renderLibraryLive() {
  // State and progress of the entries whose jobs moved, without rebuilding the list: a lookup
  // by job id, no DOM query, so a thousand rows cost nothing per progress event.
  let changed = false;
  for (const [id, rows] of libRows) {
    const job = state.jobs.get(id);
    if (!job) continue;
    for (const { e, el } of rows) {
      const st = liveState(e);
      if (el.dataset.state !== st) { fillLibItemState(el, e); changed = true; }
      if (st === "downloading" && job.bytes_total) {
        const meta = [e.type, e.base_model, e.folder && e.folder + "/"].filter(Boolean);
        meta.push(`${fmtBytes(job.bytes_done)} of ${fmtBytes(job.bytes_total)}`);
        $(".lib-meta", el).textContent = meta.join(" · ");
      }
    }
  }
  if (changed) { renderLibFilter(); applyLibFilter(); }
}

function fillLibItemState(el, e) {
  el.dataset.state = liveState(e);
  const badge = $(".badge", el);
  badge.dataset.state = el.dataset.state;
  badge.textContent = (LIB_LABEL[el.dataset.state] || el.dataset.state).replace("_", " ");
}

function renderLibFilter() {
  const box = $("#lib-filter");
  const counts = { all: state.library.entries.length };
  for (const e of state.library.entries) { const st = liveState(e); counts[st] = (counts[st] || 0) + 1; }
  box.replaceChildren(...LIB_STATES.filter(([k]) => k === "all" || counts[k]).map(([k, label]) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "chip" + (state.libFilter === k ? " active" : "");
    b.dataset.filter = k;
    b.append(label + " ");
    const c = document.createElement("span");
    c.className = "count";
    c.textContent = counts[k] || 0;
    b.appendChild(c);
    return b;
  }));
}

function applyLibFilter() {
  const q = state.libQuery.trim().toLowerCase();
  const words = q ? q.split(/\s+/) : [];
  let shown = 0;
  for (const el of $("#library").children) {
    const ok = (state.libFilter === "all" || el.dataset.state === state.libFilter) &&
      words.every((w) => el.dataset.search.includes(w));
    el.hidden = !ok;
    if (ok) shown++;
  }
  const empty = shown === 0;
  $("#library-empty").hidden = !empty;
  if (empty) {
    $("#library-empty-text").textContent = state.library && state.library.entries.length
      ? "Nothing matches." : "Add a model, or scan the files already under download_dir.";
  }
}

function renderSpace(lib) {
  const box = $("#space");
  const rows = [];
  const disk = lib.disk;
  const bar = (label, used, total, title, kind) => {
    const row = document.createElement("div");
    row.className = "space-row";
    if (kind) row.dataset.kind = kind;
    const name = document.createElement("span");
    name.className = "space-name";
    name.textContent = label;
    name.title = title || label;
    const track = document.createElement("div");
    track.className = "space-track";
    const fill = document.createElement("div");
    fill.className = "space-fill";
    fill.style.width = (total > 0 ? Math.min(100, (100 * used) / total) : 0).toFixed(2) + "%";
    track.appendChild(fill);
    const value = document.createElement("span");
    value.className = "space-value";
    value.textContent = fmtBytes(used);
    row.append(name, track, value);
    return row;
  };
  if (disk) {
    const r = bar("Disk", disk.used, disk.total, "download_dir's disk", "disk");
    $(".space-value", r).textContent = `${fmtBytes(disk.free)} free of ${fmtBytes(disk.total)}`;
    rows.push(r);
  }
  const biggest = Math.max(1, ...lib.folders.map((f) => f.bytes));
  for (const f of lib.folders) {
    const r = bar(f.folder + "/", f.bytes, disk ? disk.total : biggest,
      `${f.folder}: ${f.files} files, ${f.entries} in the manifest${f.exists ? "" : " (the folder does not exist yet)"}`);
    rows.push(r);
  }
  box.replaceChildren(...rows);
  box.hidden = rows.length === 0;
}

/* ---------- library scan ---------- */

let scanPoll = null;

async function loadScan() {
  try { state.scan = (await api("GET", "/api/library/scan")).scan; } catch (e) { state.scan = null; return; }
  renderScan();
}

async function startScan() {
  const btn = $("#scan-start");
  btn.disabled = true;
  try {
    state.scan = (await api("POST", "/api/library/scan", {})).scan;
    renderScan();
  } catch (e) { reportError(e); btn.disabled = false; }
}

function onScanStarted(ev) {
  state.scan = Object.assign({ state: "running", files_done: 0, files_total: 0 }, state.scan && state.scan.state === "running" ? state.scan : {}, { folder: ev.folder });
  renderScan();
}

function onScanProgress(ev) {
  if (state.scan && state.scan.state !== "running") return;  // a late one after the scan's end
  state.scan = Object.assign({}, state.scan || {}, { state: "running" }, ev);
  delete state.scan.event;
  renderScan();
}

function onScanDone() { loadScan(); }

function renderScan() {
  const sc = state.scan;
  const box = $("#scan");
  const btn = $("#scan-start");
  clearTimeout(scanPoll);
  if (!sc) { box.hidden = true; btn.disabled = false; return; }
  box.hidden = false;
  box.dataset.state = sc.state;
  const running = sc.state === "running";
  btn.disabled = running;
  const where = sc.folder ? ` in ${sc.folder}` : "";
  $("#scan-title").textContent = running ? `Scanning${where}…` : sc.state === "failed" ? `Scan${where} failed` : `Scan${where} done` + (sc.dry_run ? " (dry run)" : "");
  const total = sc.bytes_total || 0;
  $("#scan-count").textContent = sc.files_total ? `${sc.files_done || 0} of ${sc.files_total} files` + (total ? ` · ${fmtBytes(sc.bytes_done || 0)} of ${fmtBytes(total)}` : "") : "";
  const pct = total ? (100 * (sc.bytes_done || 0)) / total : sc.files_total ? (100 * (sc.files_done || 0)) / sc.files_total : running ? 0 : 100;
  $("#scan-bar").style.width = Math.min(100, pct).toFixed(1) + "%";
  const res = $("#scan-result");
  if (running) { res.replaceChildren(); scanPoll = setTimeout(loadScan, 2000); return; }
  const lines = [];
  const line = (text, cls) => { const p = document.createElement("p"); p.textContent = text; if (cls) p.className = cls; lines.push(p); };
  if (sc.state === "failed") line(sc.error || "The scan failed.", "bad");
  else {
    line(`${sc.matched || 0} matched on Civitai, ${sc.added || 0} added to the manifest, ${sc.already_listed || 0} already listed` + (sc.seconds !== undefined && sc.seconds !== null ? `, in ${fmtDuration(sc.seconds)}` : "") + ".");
    const list = (label, items) => {
      if (!items || !items.length) return;
      const d = document.createElement("details");
      const sum = document.createElement("summary");
      sum.textContent = `${items.length} ${label}`;
      const ul = document.createElement("ul");
      for (const it of items.slice(0, 200)) { const li = document.createElement("li"); li.textContent = Array.isArray(it) ? `${it[0]}: ${it[1]}` : it; ul.appendChild(li); }
      d.append(sum, ul);
      lines.push(d);
    };
    list("unknown to Civitai (left as they are)", sc.unknown);
    list("differ from their manifest entry", sc.differs);
    list("skipped", sc.skipped);
  }
  res.replaceChildren(...lines);
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
  $("#add-type").addEventListener("input", updateFolderHint);
  $("#add-kind-type").addEventListener("change", updateFolderHint);
  $("#pause-all").addEventListener("click", togglePauseAll);
  $("#resume-all").addEventListener("click", togglePauseAll);
  $("#speed-form").addEventListener("submit", setSpeed);
  $("#speed-clear").addEventListener("click", clearSpeed);
  $("#lib-refresh").addEventListener("click", loadLibrary);
  $("#scan-start").addEventListener("click", startScan);
  $("#lib-search").addEventListener("input", (e) => { state.libQuery = e.target.value; applyLibFilter(); });
  $("#lib-filter").addEventListener("click", (e) => {
    const chip = e.target.closest(".chip");
    if (!chip) return;
    state.libFilter = chip.dataset.filter;
    for (const c of $$("#lib-filter .chip")) c.classList.toggle("active", c === chip);
    applyLibFilter();
  });
  $("#library").addEventListener("click", async (e) => {
    const b = e.target.closest("[data-copy]");
    if (!b) return;
    const ok = await copyText(b.dataset.copy);
    toast(ok ? `Copied “${b.dataset.copy}”` : "The browser did not allow copying", ok ? "ok" : "bad");
  });
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
  setInterval(sampleSpeed, 1000);
  window.addEventListener("resize", drawSpeed);
  setInterval(() => { if (state.status) renderStatus(); }, 30000);
  render();
  if (state.token) start(); else { setConn("offline", "Signed out"); showLogin(); }
});
