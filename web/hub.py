"""Live events for WebSocket clients: one supervisor subscription fanned out to bounded per-client queues.

Ordering rules that make `?after=<id>` exact: the hub publishes stored events in id order and
fills any gap from the job store's event log, so `last_id` is a watermark: every stored event up
to it has been offered to every registered client, and every later one will be.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable

import gevent
import gevent.event
import gevent.queue

from ipc.control import SUBSCRIBED
from ipc.store import public_job

log = logging.getLogger("web.hub")

PROGRESS_INTERVAL_S = 0.25  # download_progress: at most 4 a second a job; library_scan_progress: 4 a second
PROGRESS_EVENTS = ("download_progress", "library_scan_progress")
SCAN_KEY = "library_scan"  # the one scan's progress, keyed apart from every job
CLIENT_QUEUE_MAX = 2000  # messages a client may lag behind before it is dropped
SEND_TIMEOUT_S = 10.0  # one message that takes longer than this to send drops the client
SNAPSHOT_RECENT_JOBS = 100
REPLAY_PAGE = 500
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0
CATCH_UP_POLL_S = 1.0  # while the supervisor is away, events still arrive through the store

_CLOSE = object()


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)


class Client:
    """One WebSocket client's queue. The hub never waits on it: a full queue drops the client."""

    def __init__(self, maxsize: int | None = None):
        self.queue: gevent.queue.Queue = gevent.queue.Queue(maxsize or CLIENT_QUEUE_MAX)
        self.dropped: str | None = None  # why the hub gave up on it
        self.closed = False

    def offer(self, text: str) -> bool:
        if self.dropped or self.closed:
            return False
        try:
            self.queue.put_nowait(text)
            return True
        except gevent.queue.Full:
            self.dropped = "too slow: it fell more than %d messages behind" % self.queue.maxsize
            return False

    def close(self) -> None:
        self.closed = True
        try:
            self.queue.put_nowait(_CLOSE)
        except gevent.queue.Full:
            pass


class Hub:
    def __init__(self, store, subscribe: Callable[[], Iterable[dict]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self._subscribe = subscribe
        self._clock = clock
        self.last_id = store.last_event_id() if store is not None else 0
        self.clients: set[Client] = set()
        self.connected = False
        self.dropped_total = 0
        self._progress_sent: dict[object, float] = {}
        self._progress_pending: dict[object, dict] = {}
        self._flush_timer = None
        self._greenlets: list = []
        self._stopping = False
        self._lost = gevent.event.Event()  # set while the supervisor's stream is away
        self._lost.set()
        self.job_view: Callable[[dict], dict] = public_job  # the app sets its own (jobs with `preview`)

    # --- feeding events in --------------------------------------------------------------

    def publish(self, event: dict) -> None:
        """Take one event from the supervisor and offer it to every client. Never blocks."""
        event_id = event.get("id")
        if event_id is not None:
            event_id = int(event_id)
            if event_id <= self.last_id:
                return  # already published (from the store while the subscription was away)
            if event_id > self.last_id + 1:
                self.catch_up(until_id=event_id - 1)
            self._forget_progress(self._progress_key(event))
            self._broadcast(event)
            self.last_id = max(self.last_id, event_id)
        elif event.get("event") in PROGRESS_EVENTS:
            self._progress(event)
        else:
            self._broadcast(event)

    def catch_up(self, until_id: int | None = None) -> int:
        """Publish stored events past the watermark (up to `until_id`); returns how many."""
        if self.store is None:
            return 0
        count = 0
        while True:
            page = self.store.events_after(self.last_id, limit=REPLAY_PAGE)
            page = [e for e in page if until_id is None or e["id"] <= until_id]
            if not page:
                return count
            for event in page:
                self._forget_progress(self._progress_key(event))
                self._broadcast(event)
                self.last_id = max(self.last_id, int(event["id"]))
                count += 1

    @staticmethod
    def _progress_key(event: dict):
        return SCAN_KEY if str(event.get("event", "")).startswith("library_scan") else event.get("job_id")

    def _progress(self, event: dict) -> None:
        job_id = self._progress_key(event)
        now = self._clock()
        last = self._progress_sent.get(job_id)
        if last is None or now - last >= PROGRESS_INTERVAL_S:
            self._progress_pending.pop(job_id, None)
            self._progress_sent[job_id] = now
            self._broadcast(event)
            return
        # Too soon: keep only the newest and send it when the interval is over.
        self._progress_pending[job_id] = event
        if self._flush_timer is None:
            self._flush_timer = gevent.spawn_later(max(0.0, last + PROGRESS_INTERVAL_S - now), self._flush_progress)

    def _flush_progress(self) -> None:
        self._flush_timer = None
        now = self._clock()
        for job_id, event in list(self._progress_pending.items()):
            if now - self._progress_sent.get(job_id, 0.0) >= PROGRESS_INTERVAL_S:
                del self._progress_pending[job_id]
                self._progress_sent[job_id] = now
                self._broadcast(event)
        if self._progress_pending and self._flush_timer is None:
            self._flush_timer = gevent.spawn_later(PROGRESS_INTERVAL_S / 2, self._flush_progress)

    def _forget_progress(self, job_id) -> None:
        # A stored event (started, completed, failed…) makes a pending progress update stale.
        if job_id is not None:
            self._progress_pending.pop(job_id, None)
            self._progress_sent.pop(job_id, None)

    def _broadcast(self, event: dict) -> None:
        if not self.clients:
            return  # no page open: nothing to encode (every event of every download comes here)
        text = _dumps(event)
        for client in list(self.clients):
            if not client.offer(text) and client.dropped:
                self.unregister(client)
                self.dropped_total += 1
                log.warning("websocket client dropped: %s", client.dropped)

    # --- clients ------------------------------------------------------------------------

    def register(self) -> Client:
        client = Client()
        self.clients.add(client)
        return client

    def unregister(self, client: Client) -> None:
        self.clients.discard(client)

    def snapshot_jobs(self) -> list[dict]:
        jobs = {j["id"]: j for j in self.store.list_jobs(limit=SNAPSHOT_RECENT_JOBS)}
        for job in self.store.active_jobs():
            jobs[job["id"]] = job
        return [self.job_view(j) for j in sorted(jobs.values(), key=lambda j: j["id"], reverse=True)]

    def run_session(self, ws, after: int | None = None) -> None:
        """Serve one connected WebSocket until it closes or is dropped: the snapshot, the events
        it missed since `after`, then live events, with no gap and no duplicate."""
        client = self.register()
        # No greenlet switch from here to the first send: the watermark and the snapshot are
        # taken in the same instant the client starts receiving what is published after it.
        watermark = self.last_id
        snapshot = {"event": "snapshot", "jobs": self.snapshot_jobs(), "last_id": watermark}
        reader = gevent.spawn(self._read_until_closed, ws, client)
        try:
            if not self._send(ws, client, _dumps(snapshot)):
                return
            if after is not None and 0 <= after < watermark:
                cursor = after
                while cursor < watermark:
                    page = self.store.events_after(cursor, limit=REPLAY_PAGE)
                    page = [e for e in page if e["id"] <= watermark]
                    if not page:
                        break
                    for event in page:
                        if not self._send(ws, client, _dumps(event)):
                            return
                    cursor = page[-1]["id"]
            while True:
                text = client.queue.get()
                if text is _CLOSE or client.dropped:
                    break
                if not self._send(ws, client, text):
                    return
        finally:
            self.unregister(client)
            reader.kill(block=False)
            self._close(ws, client)

    def _send(self, ws, client: Client, text: str) -> bool:
        if client.dropped or client.closed:
            return False
        try:
            with gevent.Timeout(SEND_TIMEOUT_S):
                ws.send(text)
            return True
        except gevent.Timeout:
            client.dropped = "too slow: one message took more than %.0f s to send" % SEND_TIMEOUT_S
            self.dropped_total += 1
            log.warning("websocket client dropped: %s", client.dropped)
        except Exception:  # the peer went away
            client.closed = True
        return False

    @staticmethod
    def _read_until_closed(ws, client: Client) -> None:
        try:
            while True:
                if ws.receive() is None:
                    break
        except Exception:
            pass
        client.close()

    def _close(self, ws, client: Client) -> None:
        if getattr(ws, "closed", False):
            return
        code, message = (1000, "")
        if client.dropped:
            code, message = (1013, "too slow; reconnect with ?after=<last id>")
        elif self._stopping:
            code, message = (1001, "server stopping")
        try:
            with gevent.Timeout(2.0, False):
                ws.close(code, message)
        except Exception:
            pass

    # --- the supervisor subscription ----------------------------------------------------

    def start(self) -> None:
        if self._subscribe is not None:  # without one (tests), events come in only through publish()
            self._greenlets.append(gevent.spawn(self._subscription_loop, self._subscribe))
        self._greenlets.append(gevent.spawn(self._catch_up_loop))

    def stop(self) -> None:
        self._stopping = True
        self._lost.set()
        for client in list(self.clients):
            client.close()
        for g in self._greenlets:
            g.kill(block=False)

    def _subscription_loop(self, subscribe: Callable[[], Iterable[dict]]) -> None:
        delay = RECONNECT_MIN_S
        while not self._stopping:
            try:
                for event in subscribe():
                    if not self.connected:
                        self.connected = True
                        self._lost.clear()
                        delay = RECONNECT_MIN_S
                        log.info("subscribed to supervisor events")
                        self.catch_up()  # what was stored before the stream opened
                    if event.get("event") != SUBSCRIBED:
                        self.publish(event)
                log.info("supervisor event stream ended; reconnecting")
            except gevent.GreenletExit:
                raise
            except Exception as exc:
                if self.connected:
                    log.warning("supervisor event stream lost (%s); reconnecting", exc)
            self.connected = False
            self._lost.set()
            gevent.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _catch_up_loop(self) -> None:
        # ControlClient.subscribe() only yields once an event arrives, so "connected" means "has
        # delivered at least one event"; until then, and while it is away, read the store.
        while not self._stopping:
            if self.connected:
                self._lost.wait()  # an idle web process sleeps while the stream is open
                continue
            gevent.sleep(CATCH_UP_POLL_S)
            if not self.connected:
                try:
                    self.catch_up()
                except Exception as exc:
                    log.warning("reading the event log failed: %s", exc)
