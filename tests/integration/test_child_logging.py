"""child_log_handler (ipc/logsetup.py) with real forked children, as the supervisor uses it:
records arrive, the receive thread sleeps while nothing comes, and close() is prompt."""
from __future__ import annotations

import logging
import multiprocessing
import sys
import threading
import time

import pytest

from ipc.logsetup import child_log_handler, use_handler_in_child
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="children are forked only on Linux; /proc")

ctx = multiprocessing.get_context("fork")


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def collected():
    """The supervisor's root handlers, as child_log_handler finds them."""
    root = logging.getLogger()
    saved, saved_level = list(root.handlers), root.level
    for handler in saved:
        root.removeHandler(handler)
    collect = Collect()
    root.addHandler(collect)
    root.setLevel(logging.INFO)
    yield collect
    root.removeHandler(collect)
    for handler in saved:
        root.addHandler(handler)
    root.setLevel(saved_level)


def child_logs(handler, go=None):
    use_handler_in_child(handler, secrets=("sk-child-secret-123",))
    if go is not None:
        go.wait(10)
    log = logging.getLogger("worker-1")
    log.info("job %d started with sk-child-secret-123", 7)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("job 7 failed")


def close_as_the_supervisor_does(handler) -> threading.Thread:
    """supervisor.py close_log_handler: our copy of the write end, then close() on a thread."""
    handler.queue._writer.close()
    closer = threading.Thread(target=handler.close, daemon=True)
    closer.start()
    return closer


def test_a_childs_records_arrive_with_their_traceback(collected):
    handler = child_log_handler("worker-1")
    child = ctx.Process(target=child_logs, args=(handler,))
    child.start()
    child.join(10)
    assert child.exitcode == 0
    wait_until(lambda: len(collected.records) == 2, 5, message="the child's two records")
    assert collected.messages()[0] == "job 7 started with ***"
    failed = collected.records[1]
    assert failed.levelno == logging.ERROR and "ValueError: boom" in (failed.exc_text or "")
    closer = close_as_the_supervisor_does(handler)
    closer.join(1.0)
    assert not closer.is_alive(), "close() took more than a second"
    assert not handler._receive_thread.is_alive()


def test_close_is_prompt_while_a_sibling_still_holds_the_write_end(collected):
    """A child forked later inherits the queue: the reading thread never sees EOF."""
    handler = child_log_handler("worker-1")
    go, sibling_done = ctx.Event(), ctx.Event()
    sibling = ctx.Process(target=sibling_done.wait, args=(30,))
    sibling.start()
    try:
        child = ctx.Process(target=child_logs, args=(handler, go))
        child.start()
        go.set()
        child.join(10)
        wait_until(lambda: len(collected.records) == 2, 5, message="the child's two records")
        closer = close_as_the_supervisor_does(handler)
        closer.join(1.0)
        assert not closer.is_alive(), "close() took more than a second"
        assert not handler._receive_thread.is_alive()
    finally:
        sibling_done.set()
        sibling.join(10)


def sibling_closing(fds, done):
    """_child_entry's first step: drop what fork copied of the other children's pipes."""
    import os

    for fd in fds:
        os.close(fd)
    done.wait(30)


def test_with_its_fds_closed_in_siblings_the_thread_ends_when_the_child_dies(collected):
    handler = child_log_handler("worker-1")
    sibling_done = ctx.Event()
    sibling = ctx.Process(target=sibling_closing, args=(handler.inherited_fds(), sibling_done))
    sibling.start()
    try:
        child = ctx.Process(target=child_logs, args=(handler,))
        child.start()
        child.join(10)
        handler.queue._writer.close()  # close_log_handler's first step, before close()
        wait_until(lambda: not handler._receive_thread.is_alive(), 5, message="EOF to end the thread")
        assert len(collected.records) == 2  # the last records were read before the EOF
    finally:
        sibling_done.set()
        sibling.join(10)
        handler.close()


def context_switches(thread: threading.Thread) -> int:
    total = 0
    with open(f"/proc/self/task/{thread.native_id}/status") as fh:
        for line in fh:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def test_an_idle_receive_thread_does_not_wake(collected):
    """The library's thread polls every 0.2 s (15 wake-ups in 3 s, measured); ours sleeps."""
    handler = child_log_handler("worker-1")
    try:
        wait_until(lambda: handler._receive_thread.native_id, 5, message="the receive thread")
        before = context_switches(handler._receive_thread)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            time.sleep(0.5)  # the idle spell under test: nothing to poll for
        woke = context_switches(handler._receive_thread) - before
        assert woke <= 2, f"the idle receive thread woke {woke} times in 3 s"
        # Asleep is not deaf: a record after the idle spell still arrives.
        child = ctx.Process(target=child_logs, args=(handler,))
        child.start()
        child.join(10)
        wait_until(lambda: len(collected.records) == 2, 5, message="the child's two records")
    finally:
        handler.close()
