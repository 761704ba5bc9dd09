"""The bootstrap every forked child (worker, updater) runs first, on Linux and Windows alike."""
from __future__ import annotations

import logging
import os
import queue


def child_entry(target, name, conn, config_path, log_channel, inherited_fds=()):
    """Runs in the child: drop what fork copied of the supervisor's own pipes and sockets (a
    copy held here would hide a sibling's or the supervisor's death from the other end), then
    run, reporting a crash at boot through the pipe so the supervisor can name it."""
    for fd in inherited_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    if inherited_fds:  # forked: the supervisor's log file is its own (the child logs through its queue)
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
                handler.close()  # through its object: a descriptor closed by number could be reused
    try:
        target(name, conn, config_path, log_channel)
    except BaseException as exc:
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        logging.getLogger(name).exception("%s crashed", name)
        try:
            conn.send({"type": "fatal", "error": f"{type(exc).__name__}: {exc}"})
        except Exception:
            pass
        raise


class Wake:
    """What a child's main thread sleeps on, and what other threads and a signal handler wake it
    with. Not a `threading.Event`: a Python signal handler runs on the main thread between two
    bytecodes, possibly while that thread holds the Event's lock inside `wait()` or `clear()`, and
    the handler's `set()` then waits for that lock forever (seen: an updater that never ended
    after SIGTERM). `SimpleQueue.put` takes no lock a handler can meet; it is made to be called
    from one. One thread waits on it; any number wake it."""

    def __init__(self) -> None:
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()

    def set(self) -> None:
        self._tokens.put(None)

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until woken (True) or `timeout` seconds pass (False); every wake-up that came
        before or while sleeping counts as this one."""
        try:
            self._tokens.get(timeout=timeout)
        except queue.Empty:
            return False
        while True:
            try:
                self._tokens.get_nowait()
            except queue.Empty:
                return True
