"""ipc.childmain.Wake: the sleep of a child's main loop, woken by threads and by signal handlers."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ipc.childmain import Wake

ROOT = Path(__file__).resolve().parents[2]


def test_wait_times_out_without_a_wake_up():
    wake = Wake()
    t = time.monotonic()
    assert wake.wait(0.05) is False
    assert time.monotonic() - t >= 0.04


def test_wake_ups_before_the_wait_count_once():
    wake = Wake()
    for _ in range(5):
        wake.set()
    assert wake.wait(0) is True
    assert wake.wait(0.01) is False  # drained: the five were one


def test_another_thread_wakes_it():
    wake = Wake()
    threading.Timer(0.05, wake.set).start()
    assert wake.wait(10) is True


@pytest.mark.skipif(sys.platform == "win32", reason="setitimer is POSIX; Windows delivers no such signals")
def test_a_signal_handler_can_wake_it_at_any_moment_of_the_main_loop():
    # A timer signal every 1.3 ms lands anywhere in a tight wait loop, also where the main thread
    # holds a lock inside wait(). threading.Event deadlocks here within a second (its set() in the
    # handler waits for the lock the interrupted wait() holds); Wake must not.
    script = textwrap.dedent("""
        import signal, sys, time
        sys.path.insert(0, sys.argv[1])
        from ipc.childmain import Wake
        wake = Wake()
        fired = [0]
        def handler(signum, frame):
            fired[0] += 1
            wake.set()
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.0013, 0.0013)
        woken = 0
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            woken += wake.wait(0.001)
        signal.setitimer(signal.ITIMER_REAL, 0)
        print(fired[0], woken)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    fired, woken = map(int, done.stdout.split())
    assert fired > 100 and woken > 50
