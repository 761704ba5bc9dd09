"""The webhook and notification process: `python -m workers.webhooks --config PATH`.

A fresh interpreter started by the supervisor, not a thread inside it: an HTTP client (TLS,
DNS, SQLite) running in the supervisor's threads could hold a C-level lock at the moment a
worker is forked, and the worker would inherit it locked. Here a slow or dead receiver costs
only this process. It owns the delivery marks of the event log (the `delivered` column for the
webhook, kv `notify.sinks` for each notify URL: ipc/notify.py); the supervisor owns the events.
It runs when webhook_url or notify is set; webhooks and each notify URL have threads of their
own, so one that fails or hangs holds up none of the others.

Its stdin is the supervisor's line to it, both ends of which are here (the supervisor's is
EventAnnouncer): the supervisor writes one byte (WAKE_BYTE; any byte counts, none carries data)
after it stores an event, and we look at the event log at once; bytes are never counted, so a
burst is one look. EOF means the supervisor is gone (even after kill -9) or wants a stop: what
is queued goes out and we exit 0, as on SIGTERM. Without a byte the event log is still looked at,
less and less often (ipc/webhooks.py POLL_S). The module imports only the standard library at
its top, so that the supervisor can import EventAnnouncer.

Nothing ever reads stdin through sys.stdin: a thread blocked inside sys.stdin's buffered reader
holds that reader's lock, and the interpreter, which closes sys.stdin at exit, then aborts
("Fatal Python error: _enter_buffered_busy", SIGABRT) on every clean stop. On POSIX the main
thread itself waits on stdin and on the signal wake-up pipe, so no thread reads at all; on
Windows, whose select() takes only sockets, a thread reads the raw descriptor with os.read,
which holds no lock the interpreter's shutdown needs.
"""
from __future__ import annotations

import argparse
import os
import selectors
import signal
import sys
import threading
import time

READY_LINE = "@ready"  # tells the supervisor (reading our stderr) that we booted
WAKE_BYTE = b"\n"  # "\n": run by hand in a terminal, Enter asks for a look


def main(argv=None) -> int:
    from ipc.config import EX_CONFIG, ConfigError, load_config
    from ipc.logsetup import setup_relayed_logging
    from ipc.notify import NotifySender, log_secrets
    from ipc.webhooks import POLL_S, WebhookSender

    parser = argparse.ArgumentParser(prog="python -m workers.webhooks")
    parser.add_argument("--config", required=True)
    # How often the event log is looked at without a wake-up byte (tests set an hour, so that
    # only the byte can explain a delivery).
    parser.add_argument("--poll-min-s", type=float, default=POLL_S[0], help=argparse.SUPPRESS)
    parser.add_argument("--poll-max-s", type=float, default=POLL_S[1], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        cfg, _ = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    poll_s = (args.poll_min_s, args.poll_max_s)
    notifier = NotifySender(cfg, cfg.db_path, poll_s=poll_s)
    # Apprise is loaded first (here, in the main thread): the token parts of each notify URL
    # are only known once Apprise has parsed it, and the log filter must have them all.
    sinks = notifier.load()
    setup_relayed_logging(log_secrets(cfg, sinks))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle

    sender = WebhookSender(cfg, cfg.db_path, poll_s=poll_s)
    sender.start()
    notifier.start()

    def wake():
        sender.notify()
        notifier.notify()

    print(READY_LINE, file=sys.stderr, flush=True)
    stdin_fd = _stdin_fd()
    if os.name == "nt":
        wait_threaded(stdin_fd, wake)
    else:
        wait_in_main_thread(stdin_fd, wake)
    # What is queued (daemon_stopping too) goes out first, webhooks and notifications side by
    # side, each within the same 2 s.
    deadline = time.monotonic() + 2.0
    notifier.begin_stop()
    sender.stop(timeout_s=2.0)
    notifier.stop(timeout_s=max(0.3, deadline - time.monotonic()))
    return 0


def _stdin_fd() -> int | None:
    try:
        return sys.stdin.fileno() if sys.stdin is not None else None
    except (OSError, ValueError):
        return None


def wait_in_main_thread(stdin_fd: int | None, on_byte) -> None:
    """Until SIGTERM or EOF on stdin, calling `on_byte` for what arrives. Blocks without a
    timeout: an idle process does not wake at all."""
    stopping = False

    def on_sigterm(signum, frame):
        nonlocal stopping
        stopping = True

    # The C-level handler writes to this pipe, so a SIGTERM that lands just before select()
    # still wakes it (a Python handler alone would run only after select() returned).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    previous_fd = signal.set_wakeup_fd(wake_w)
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(wake_r, selectors.EVENT_READ)
            if stdin_fd is None:
                return  # no supervisor to watch, so nobody to deliver for
            selector.register(stdin_fd, selectors.EVENT_READ)
            while not stopping:
                for key, _ in selector.select():
                    if key.fd == wake_r:
                        _drain(wake_r)
                        continue
                    try:
                        data = os.read(stdin_fd, 4096)
                    except OSError:
                        data = b""
                    if not data:
                        return
                    on_byte()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(wake_r)
        os.close(wake_w)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, OSError):
        pass


def wait_threaded(stdin_fd: int | None, on_byte) -> None:
    """The same with a reading thread, where select() cannot wait on a pipe (Windows)."""
    from ipc.childmain import Wake

    finish = Wake()  # not an Event: the SIGTERM handler sets it while the main thread waits on it

    def watch_parent():
        try:
            while stdin_fd is not None and os.read(stdin_fd, 4096):
                on_byte()
        except OSError:
            pass
        finish.set()

    signal.signal(signal.SIGTERM, lambda signum, frame: finish.set())
    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    finish.wait()


class EventAnnouncer:
    """The supervisor's end of the webhook process's stdin (`pipe`, Popen's stdin): `announce()`
    after each stored event. It never blocks the caller and never raises."""

    def __init__(self, pipe):
        self._pipe = pipe
        self._closed = False
        self._pending = threading.Event()
        self._thread: threading.Thread | None = None
        if os.name == "nt":
            # Windows has no non-blocking pipes before Python 3.12: a thread of its own writes,
            # so a frozen webhook process could only ever block that thread.
            self._thread = threading.Thread(target=self._write_loop, name="webhooks-wake", daemon=True)
            self._thread.start()
        else:
            os.set_blocking(pipe.fileno(), False)

    def announce(self) -> None:
        if self._thread is not None:
            self._pending.set()
        else:
            self._write()

    def close(self) -> None:
        """Stop announcing (the pipe itself is Popen's: closing it is EOF, a stop)."""
        self._closed = True
        self._pending.set()

    def _write(self) -> bool:
        if self._closed or self._pipe.closed:
            return False
        try:
            os.write(self._pipe.fileno(), WAKE_BYTE)
        except BlockingIOError:
            pass  # the pipe is full of bytes not read yet: a look is already due
        except (OSError, ValueError):
            return False  # the process is gone; the supervisor reaps it on its own
        return True

    def _write_loop(self) -> None:
        while True:
            self._pending.wait()
            self._pending.clear()
            if not self._write():
                return


if __name__ == "__main__":
    sys.exit(main())
