"""Notifications a person reads: the events `notify_events` names, each as a title and a line or
two, sent to every Apprise URL of `notify` (Telegram, Discord, ntfy, e-mail, json://, …).

Each URL (a sink) has a thread and a place in the event log of its own (kv `notify.sinks`), so a
dead service delays neither the other sinks nor the webhooks, and what it missed at a stop goes
out after the next start. The URLs hold tokens: a sink is only ever named by its place in the
list and its scheme (`notify[1] tgram://`), Apprise's own log records never reach the log (it
prints URLs at DEBUG), and every text we send or log is scrubbed of the secrets we know.

Apprise is imported only where sinks are built (the webhook process's main thread, the
notify-test command), so that the supervisor can import this module for `prepare_sinks`.
"""
from __future__ import annotations

import hashlib
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from ipc.logsetup import redact
from ipc.retry import WEBHOOK_RETRY

log = logging.getLogger("notify")

SINKS_KEY = "notify.sinks"  # kv: {sink id: {"scheme", "last_event_id", "sent", "gave_up", ...}}
RETRY = WEBHOOK_RETRY  # "retried like webhooks": 3 tries, 1 s then 4 s between them
POLL_S = (0.5, 5.0)  # looks at the event log without a wake-up, as the webhook thread does
MAX_AGE_S = 24 * 3600.0  # older events are not announced, whatever a cursor says
APP_ID = "civitai-daemon"

# Every stored event (SPEC §7) and the supervisor's child_fatal; progress is never stored.
EVENTS = frozenset({
    "daemon_started", "daemon_stopping", "download_queued", "download_started", "download_retry",
    "download_timeout", "download_completed", "download_skipped", "download_failed", "download_cancelled",
    "worker_restarted", "model_update", "model_update_error", "manifest_error", "download_paused",
    "download_resumed", "daemon_paused", "daemon_resumed", "speed_limit_changed", "library_scan_started",
    "library_scan_done", "child_fatal"})
NOT_STORED = frozenset({"download_progress", "library_scan_progress"})


# --- naming sinks without their tokens ------------------------------------------------------------


def scheme_of(url: str) -> str:
    """`tgram://`: all of a URL that may be shown."""
    scheme = url.split("://", 1)[0].strip().lower()
    return f"{scheme}://" if re.fullmatch(r"[a-z][a-z0-9+.-]{0,31}", scheme) else "?://"


def sink_name(index: int, url: str) -> str:
    return f"notify[{index}] {scheme_of(url)}"


def sink_id(url: str) -> str:
    """A stable key for a URL's place in the event log that does not reveal the URL."""
    return hashlib.sha256(url.strip().encode("utf-8")).hexdigest()[:16]


def _pieces(url: str) -> set[str]:
    parts = urlsplit(url)
    out: set[str] = set()
    for piece in re.split(r"[/@?&=#]", f"{parts.netloc}/{parts.path}&{parts.query}"):
        for form in (piece, unquote(piece)):
            out.add(form)
            out.update(form.split(":"))
    return {p for p in out if p}


def secret_parts(url: str, forms: tuple[str, str] | None = None) -> set[str]:
    """The pieces of `url` a log line or a message must never show: the whole URL, its user and
    password, long path segments (an ntfy topic is a password), and what Apprise itself hides:
    `forms` is Apprise's (privacy, full) rendering of the URL, and what the full one has that the
    privacy one lacks is a secret (bot tokens, webhook ids, keys in the query)."""
    url = url.strip()
    parts = urlsplit(url)
    found = {url}
    try:
        found.update(p for p in (parts.username, parts.password) if p)
    except ValueError:
        pass
    found.update(seg for seg in (unquote(s) for s in parts.path.split("/")) if len(seg) >= 8)
    if forms is not None:
        found.update(_pieces(forms[1]) - _pieces(forms[0]))
    return {s for s in found if len(s) >= 6}


class Scrubber:
    """Takes the secrets out of a text: logsetup.redact's patterns (URL queries, bearer tokens,
    JWTs) and every known secret string, longest first so a token's parts go with it."""

    def __init__(self, secrets):
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = redact(str(text))
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


# --- the texts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    title: str
    body: str
    kind: str  # Apprise's notify type: info, success, warning, failure


def fmt_size(n) -> str:
    """Sizes as the GUI shows them (web/static/app.js fmtBytes), so the two agree."""
    if n is None:
        return "?"
    units = ("B", "KB", "MB", "GB", "TB")
    value, i = float(n), 0
    while value >= 1000 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{value:.0f} {units[i]}" if i == 0 or value >= 100 else f"{value:.1f} {units[i]}"


def fmt_wait(seconds) -> str:
    """A wait as a person reads it: 10 s, 5 min, 3 h 20 min, 2 d 4 h."""
    s = max(0, round(float(seconds or 0)))
    if s < 120:
        return f"{s} s"
    minutes = s // 60
    if minutes < 120:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def fmt_rate(bps) -> str:
    return "no limit" if not bps else f"{fmt_size(bps)}/s"


def model_label(ev: dict) -> str:
    """"Zxq Ink Style v2", else "model 77 version 770", else "model 77"."""
    model, version = ev.get("model_name"), ev.get("version_name")
    if model:
        return f"{model} {version}" if version else str(model)
    if ev.get("model_id") is None:
        return f"job #{ev['job_id']}" if ev.get("job_id") is not None else "a model"
    label = f"model {ev['model_id']}"
    if version:
        return f"{label} {version}"
    return f"{label} version {ev['version_id']}" if ev.get("version_id") else label


def _file(ev: dict) -> str:
    if ev.get("path"):
        return str(ev["path"])
    if ev.get("model_type") and ev.get("filename"):
        return f"{ev['model_type']}/{ev['filename']}"
    return str(ev.get("filename") or "")


def _join(*parts) -> str:
    return ", ".join(str(p) for p in parts if p)


def _generic(ev: dict) -> Message:
    fields = {k: v for k, v in ev.items() if k not in ("id", "event", "ts")}
    return Message(str(ev["event"]).replace("_", " ").capitalize(),
                   " ".join(f"{k}={v}" for k, v in fields.items()), "info")


def message_for(ev: dict) -> Message:
    """The notification of an event. `ev` may carry names looked up for it (see NotifySender)."""
    name, kind = model_label(ev), ev.get("event")
    if kind == "download_completed":
        return Message(f"Downloaded {name}", _join(_file(ev), fmt_size(ev.get("bytes")), "verified"), "success")
    if kind == "download_skipped":
        return Message(f"Already there: {name}", _join(_file(ev), fmt_size(ev.get("bytes")),
                                                       "verified, nothing downloaded"), "success")
    if kind == "download_failed":
        error = ev.get("error") or "unknown error"
        return Message(f"Download failed: {name}", f"{ev['filename']}: {error}" if ev.get("filename") else error,
                       "failure")
    if kind == "download_queued":
        return Message(f"Queued {name}", _join(_file(ev), f"priority {ev['priority']}"
                                               if ev.get("priority") is not None else ""), "info")
    if kind == "download_started":
        attempt = ev.get("attempt") or 1
        return Message(f"Downloading {name}", _join(_file(ev), f"attempt {attempt}" if attempt > 1 else ""), "info")
    if kind == "download_retry" and ev.get("waiting"):
        return Message(f"Waiting: {name}", f"{ev.get('error') or 'waiting'}; next look in "
                       f"{fmt_wait(ev.get('delay_s'))}", "info")
    if kind == "download_retry":
        return Message(f"Retrying {name}", f"Attempt {ev.get('attempt')} failed: {ev.get('error') or 'an error'}; "
                       f"next try in {fmt_wait(ev.get('delay_s'))}", "warning")
    if kind == "download_timeout":
        return Message(f"Timed out: {name}", f"One attempt ran past the {ev.get('timeout_s')} s limit (timeout "
                       "in config.json); it is retried while attempts remain", "warning")
    if kind == "download_cancelled":
        return Message(f"Cancelled {name}", _file(ev) or "The download was cancelled", "info")
    if kind in ("download_paused", "download_resumed"):
        verb = "Paused" if kind == "download_paused" else "Resumed"
        return Message(f"{verb} {name}", _file(ev) or f"{verb} by request", "info")
    if kind == "model_update":
        new = ev.get("version_name") or f"Version {ev.get('version_id')}"
        had = f" (you had version {ev['previous_version_id']})" if ev.get("previous_version_id") else ""
        label = ev.get("model_name") or f"model {ev.get('model_id')}"
        return Message(f"New version of {label}", f"{new} is out{had}: {ev.get('filename') or 'its file'}, "
                       "queued for download", "success")
    if kind == "model_update_error":
        label = ev.get("model_name") or f"model {ev.get('model_id')}"
        return Message(f"Update check failed for {label}", str(ev.get("error") or "unknown error"), "failure")
    if kind == "manifest_error":
        return Message("manifest.json edit not taken", f"{ev.get('error')}\nThe last good manifest stays in force; "
                       "fix the file and save it again.", "failure")
    if kind == "child_fatal":
        child = ev.get("name") or "a process"
        return Message(f"civitai-daemon: {child} given up", f"{child} kept failing at start and is not restarted: "
                       f"{ev.get('error') or 'no cause known'}", "failure")
    if kind == "worker_restarted":
        code = f" (exit code {ev['exitcode']})" if ev.get("exitcode") is not None else ""
        return Message(f"{ev.get('worker') or 'A worker'} restarted", f"After a {ev.get('reason') or 'crash'}{code}; "
                       "its job is retried", "warning")
    if kind == "daemon_started":
        return Message("civitai-daemon started", f"Version {ev.get('version')}", "info")
    if kind == "daemon_stopping":
        return Message("civitai-daemon stopping", "Running downloads keep their partial files and resume at "
                       "the next start", "info")
    if kind == "daemon_paused":
        return Message("All downloads paused", "Nothing starts until they are resumed", "info")
    if kind == "daemon_resumed":
        return Message("Downloads resumed", "Queued downloads start again", "info")
    if kind == "speed_limit_changed":
        return Message(f"Speed limit: {fmt_rate(ev.get('max_speed'))}", f"Set by {ev.get('source') or 'config'}",
                       "info")
    if kind == "library_scan_started":
        return Message("Library scan started", str(ev.get("folder") or "the whole download folder"), "info")
    if kind == "library_scan_done":
        unknown = ev.get("unknown") or []
        return Message(f"Library scan done: {ev.get('folder') or 'the whole download folder'}",
                       f"{ev.get('files', 0)} files, {ev.get('matched', 0)} matched on Civitai, {ev.get('added', 0)} "
                       f"added to manifest.json, {len(unknown)} unknown, in {round(float(ev.get('seconds') or 0))} s",
                       "success")
    return _generic(ev)


def test_message(cfg) -> Message:
    events = ", ".join(e.replace("_", " ") for e in cfg.notify_events) or "nothing (notify_events is empty)"
    return Message("civitai-daemon: test notification",
                   f"Notifications from civitai-daemon on {socket.gethostname()} reach you here. It sends: {events}.",
                   "info")


def check_events(names) -> list[str]:
    """Warnings about `notify_events` (a typo is silence, not an error)."""
    out = []
    for name in names:
        if name in NOT_STORED:
            out.append(f"notify_events: '{name}' is not stored (WebSocket only), so it is never sent")
        elif name not in EVENTS:
            close = [e for e in sorted(EVENTS) if _close(e, name)]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            out.append(f"notify_events: '{name}' is not an event the daemon emits{hint}")
    return out


def _close(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    return a.startswith(b) or b.startswith(a) or sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b)) <= 2


# --- sending -------------------------------------------------------------------------------------


def silence_apprise_logging() -> None:
    """Apprise logs URLs with their tokens at DEBUG and names services at INFO; its records stay
    inside it. What a failed send said is taken from the send's own result instead."""
    logger = logging.getLogger("apprise")
    logger.propagate = False
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    logger.setLevel(logging.WARNING)  # the level a send's result keeps its log entries at


class Sink:
    """One notify URL, loaded into Apprise."""

    def __init__(self, index: int, url: str, apprise_obj, secrets: set[str]):
        self.index = index
        self.url = url
        self.id = sink_id(url)
        self.name = sink_name(index, url)
        self.scheme = scheme_of(url)
        self._apprise = apprise_obj
        self.secrets = secrets

    def send(self, message: Message, scrub) -> tuple[bool, str]:
        """One try: (sent, what went wrong). Never raises."""
        try:
            result = self._apprise.notify(body=scrub(message.body), title=scrub(message.title),
                                          notify_type=message.kind)
        except Exception as exc:  # a plugin's bug must not end the thread
            return False, scrub(f"{type(exc).__name__}: {exc}")
        if result:
            return True, ""
        problems = []
        try:
            problems = [e.message for e in result.logs() if e.level in ("WARNING", "ERROR", "CRITICAL")]
        except Exception:
            pass
        return False, scrub(problems[-1] if problems else "the service did not accept it")


def build_sinks(urls) -> tuple[list[Sink], list[str]]:
    """Sinks for the URLs Apprise knows, and a sentence for each it does not (naming the URL by
    its place and scheme only)."""
    silence_apprise_logging()  # first: the import itself logs
    import apprise

    asset = apprise.AppriseAsset(app_id=APP_ID, app_desc="Civitai download daemon",
                                 async_mode=False)  # one service per object: sent in our own thread
    sinks, problems = [], []
    for index, url in enumerate(urls):
        obj = apprise.Apprise(asset=asset)
        if not obj.add(url) or len(obj) != 1:
            problems.append(f"{sink_name(index, url)}: Apprise cannot use this URL (unknown scheme, or a part "
                            "missing: see https://github.com/caronc/apprise/wiki for the form of each service)")
            continue
        plugin = obj[0]
        try:
            forms = (plugin.url(privacy=True), plugin.url(privacy=False))
        except Exception:
            forms = None
        sinks.append(Sink(index, url, obj, secret_parts(url, forms)))
    return sinks, problems


def config_secrets(cfg) -> set[str]:
    from ipc.config import jwt_secret

    return {s for s in (cfg.civitai_api_key, jwt_secret(cfg), cfg.webhook_secret) if s}


def log_secrets(cfg, sinks=()) -> tuple[str, ...]:
    """For logsetup's RedactingFilter: the config's secrets, the URLs and their token parts."""
    out = set(config_secrets(cfg)) | set(cfg.notify)
    for sink in sinks:
        out |= sink.secrets
    return tuple(sorted(out, key=len, reverse=True))


def send_test(cfg) -> list[dict]:
    """One try of the test message to every URL: [{"index", "scheme", "ok", "error"}]. The
    GUI's "Send a test notification" and `supervisor.py notify-test`."""
    sinks, _ = build_sinks(cfg.notify)
    by_index = {s.index: s for s in sinks}
    scrub = Scrubber(log_secrets(cfg, sinks))
    message = test_message(cfg)
    out = []
    for index, url in enumerate(cfg.notify):
        sink = by_index.get(index)
        if sink is None:
            out.append({"index": index, "scheme": scheme_of(url), "ok": False,
                        "error": "Apprise cannot use this URL (unknown scheme, or a part missing)"})
            continue
        ok, problem = sink.send(message, scrub)
        out.append({"index": index, "scheme": sink.scheme, "ok": ok, "error": None if ok else problem})
    return out


def cmd_notify_test(config_path, out, err) -> int:
    """`supervisor.py notify-test`: 0 when every URL took the message, 1 otherwise, 78 for a bad
    config.json. Runs Apprise in this process from the config: no daemon needed."""
    from ipc.config import EX_CONFIG, ConfigError, load_config

    try:
        cfg, _ = load_config(config_path)
    except ConfigError as exc:
        print(exc, file=err)
        return EX_CONFIG
    if not cfg.notify:
        print(f"{cfg.config_path}: 'notify' has no URLs; add some, e.g. \"notify\": [\"tgram://<bot token>/<chat "
              "id>\"] (https://github.com/caronc/apprise/wiki)", file=err)
        return 1
    results = send_test(cfg)
    for r in results:
        line = f"notify[{r['index']}] {r['scheme']}: " + ("sent" if r["ok"] else f"FAILED: {r['error']}")
        print(line, file=out if r["ok"] else err)
    sent = sum(r["ok"] for r in results)
    print(f"{sent} of {len(results)} sent", file=out)
    return 0 if sent == len(results) else 1


def prepare_sinks(store, urls) -> None:
    """The supervisor's part, at its start (before daemon_started is stored) and when a SIGHUP
    changes `notify` (before the webhook process is started again): each URL new to the event
    log gets its place at the end of it, so it is sent what happens from now on and none of the
    history; a URL no longer configured loses its place (added again later, it starts afresh).
    A URL the webhook process finds without a place starts where the log ends at its own start."""
    with store.transaction():
        saved = store.get_kv(SINKS_KEY, {}) or {}
        end = store.last_event_id()
        ids = [sink_id(url) for url in urls]
        store.set_kv(SINKS_KEY, {i: saved.get(i) or {"last_event_id": end} for i in ids})


def _event_age_s(ev: dict, now: float) -> float:
    try:
        ts = datetime.strptime(str(ev["ts"])[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    except (KeyError, ValueError):
        return 0.0
    return now - ts


class NotifySender:
    """The notify threads of the webhook process: one per sink, each reading the event log from
    its own place. The same life as WebhookSender: start, notify() per wake-up, stop."""

    def __init__(self, cfg, db_path, poll_s: tuple[float, float] = POLL_S, clock=time.time):
        self.cfg = cfg
        self.db_path = db_path
        self.events = frozenset(cfg.notify_events)
        self.poll_min_s, self.poll_max_s = poll_s
        self.clock = clock
        self.sinks: list[Sink] = []
        self.problems: list[str] = []
        self.scrub = Scrubber(())
        self._threads: list[threading.Thread] = []
        self._wakes: list[threading.Event] = []
        self._finish = threading.Event()
        self._stop = threading.Event()
        self._state_lock = threading.Lock()
        self._state: dict = {}
        self._store: Any = None  # a JobStore from start() on

    def load(self) -> list[Sink]:
        """Build the sinks (imports Apprise: call it in the main thread). Returns them."""
        if self.cfg.notify:
            self.sinks, self.problems = build_sinks(self.cfg.notify)
        self.scrub = Scrubber(log_secrets(self.cfg, self.sinks))
        return self.sinks

    def start(self) -> None:
        from ipc.store import JobStore

        for problem in self.problems:
            log.error("%s", problem)
        for warning in check_events(self.events) if self.sinks else ():
            log.warning("%s", warning)
        store = JobStore(self.db_path)
        self._store = store
        saved = store.get_kv(SINKS_KEY, {}) or {}
        self._state = {s.id: dict(saved.get(s.id) or {}) for s in self.sinks}
        for sink in self.sinks:
            state = self._state[sink.id]
            state.update(scheme=sink.scheme, index=sink.index)
            if "last_event_id" not in state:
                state["last_event_id"] = store.last_event_id()
        self._save()
        if self.sinks:
            log.info("notifications to %s for %s", ", ".join(s.name for s in self.sinks),
                     ", ".join(sorted(self.events)) or "no events (notify_events is empty)")
        for sink in self.sinks:
            wake = threading.Event()
            thread = threading.Thread(target=self._run, args=(sink, wake), name=f"notify-{sink.index}", daemon=True)
            self._wakes.append(wake)
            self._threads.append(thread)
            thread.start()

    def notify(self) -> None:
        for wake in self._wakes:
            wake.set()

    def begin_stop(self) -> None:
        """Send what is queued, then end (stop() waits for it)."""
        self._finish.set()
        self.notify()

    def stop(self, timeout_s: float = 2.0) -> None:
        """What is queued goes out for most of `timeout_s`; what is left (a dead service) goes out
        after the next start."""
        deadline = time.monotonic() + timeout_s
        self.begin_stop()
        for thread in self._threads:
            thread.join(max(0.0, deadline - 0.3 - time.monotonic()))
        self._stop.set()
        self.notify()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._store is not None and not any(t.is_alive() for t in self._threads):
            self._store.close()
            self._store = None

    # --- one sink's thread ---

    def _run(self, sink: Sink, wake: threading.Event) -> None:
        interval = self.poll_min_s
        while not self._stop.is_set():
            finishing = self._finish.is_set()
            wake.clear()
            try:
                sent = self._drain(sink)
            except Exception:  # the database busy past its timeout, say: try again shortly
                log.exception("%s: notification delivery failed; trying again in 5 s", sink.name)
                self._stop.wait(5.0)
                sent = 0
            if finishing:
                return
            interval = self.poll_min_s if sent else min(interval * 2, self.poll_max_s)
            wake.wait(interval)

    def _drain(self, sink: Sink) -> int:
        handled = 0
        store = self._store
        while not self._stop.is_set():
            cursor = int(self._state[sink.id]["last_event_id"])
            batch = store.events_after(cursor, limit=100)
            if not batch:
                return handled
            now = self.clock()
            for ev in batch:
                if self._stop.is_set():
                    return handled
                if ev["event"] in self.events and _event_age_s(ev, now) <= MAX_AGE_S:
                    outcome = self._deliver(sink, ev)
                    if outcome is None:
                        return handled  # stopping between tries: this event goes out after the next start
                    handled += 1
                    self._advance(sink, ev["id"], outcome)
                else:
                    self._advance(sink, ev["id"], None, save=False)
            self._save()
        return handled

    def _deliver(self, sink: Sink, ev: dict) -> str | None:
        """"sent", "gave_up", or None when a stop came between tries."""
        message = message_for(self._with_names(ev))
        problem = ""
        for attempt in range(1, RETRY.max_tries + 1):
            ok, problem = sink.send(message, self.scrub)
            if ok:
                return "sent"
            if attempt < RETRY.max_tries and self._stop.wait(RETRY.delay(attempt)):
                return None
        log.warning("%s: gave up on event %s (%s) after %d tries: %s", sink.name, ev["id"], ev["event"],
                    RETRY.max_tries, problem)
        with self._state_lock:
            self._state[sink.id].update(last_error=problem, last_error_ts=self.clock())
        return "gave_up"

    def _with_names(self, ev: dict) -> dict:
        """Events that name only a job or a model get the names the job store knows."""
        if ev.get("model_name"):
            return ev
        try:
            if ev.get("job_id") is not None:
                job = self._store.get_job(int(ev["job_id"]))
                same_version = True
            elif ev.get("model_id") is not None:
                candidates = (self._store.find_active(model_id=ev["model_id"]),
                              self._store.latest_finished(model_id=ev["model_id"]))
                job = next((j for j in candidates if j and j.get("model_name")), None)
                same_version = job is not None and job.get("version_id") == ev.get("version_id")
            else:
                return ev
        except Exception:
            return ev
        if not job:
            return ev
        extra = {"model_name": job.get("model_name"), "model_id": job.get("model_id")}
        if same_version:
            extra["version_name"] = job.get("version_name")
            if ev.get("event") != "model_update":
                extra.update(filename=job.get("filename"), model_type=job.get("model_type"))
        return {**{k: v for k, v in extra.items() if v is not None}, **{k: v for k, v in ev.items() if v is not None}}

    def _advance(self, sink: Sink, event_id: int, outcome: str | None, save: bool = True) -> None:
        with self._state_lock:
            state = self._state[sink.id]
            state["last_event_id"] = max(int(state["last_event_id"]), int(event_id))
            if outcome == "sent":
                state["sent"] = int(state.get("sent", 0)) + 1
                state["last_sent_ts"] = self.clock()
            elif outcome == "gave_up":
                state["gave_up"] = int(state.get("gave_up", 0)) + 1
        if save:
            self._save()

    def _save(self) -> None:
        """Our sinks' places into kv, leaving the others' (prepare_sinks owns which URLs have one;
        a process stopping after a reload may write after it). Under the lock: two threads'
        writes must not land out of order."""
        with self._state_lock, self._store.transaction():
            saved = self._store.get_kv(SINKS_KEY, {}) or {}
            saved.update({k: dict(v) for k, v in self._state.items()})
            self._store.set_kv(SINKS_KEY, saved)
