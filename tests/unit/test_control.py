"""The control socket's listener: it never keeps the port the web process is about to listen on."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from ipc import control


def _kernel_picks(monkeypatch, ports):
    """Make bind(port 0) report `ports` in turn, as the kernel's ephemeral picks would."""
    picks = iter(ports)
    made = []

    class Picked(socket.socket):
        def bind(self, address):
            super().bind(address)
            self._pick = next(picks)
            made.append(self)

        def getsockname(self):
            return ("127.0.0.1", self._pick)

    monkeypatch.setattr(control.socket, "socket", Picked)
    return made


def test_a_pick_of_the_web_port_is_given_back_and_another_taken(monkeypatch):
    made = _kernel_picks(monkeypatch, [52049, 52049, 40001])
    server = control.ControlServer("t", lambda op, args: None, avoid=52049)
    try:
        assert server.address == "127.0.0.1:40001"
        assert [s.fileno() for s in made[:2]] == [-1, -1]  # the two picks of the web port were closed
    finally:
        server.close()


def test_without_a_port_to_avoid_the_first_pick_is_kept(monkeypatch):
    _kernel_picks(monkeypatch, [52049])
    server = control.ControlServer("t", lambda op, args: None)
    try:
        assert server.address == "127.0.0.1:52049"
    finally:
        server.close()


def test_a_kernel_that_only_gives_the_web_port_is_an_error_not_a_loop(monkeypatch):
    made = _kernel_picks(monkeypatch, [8000] * 8)
    with pytest.raises(OSError, match="web port"):
        control.ControlServer("t", lambda op, args: None, avoid=8000)
    assert all(s.fileno() == -1 for s in made)


def test_a_transactions_events_reach_a_subscriber_whole_and_in_order():
    server = control.ControlServer("tok", lambda op, args: None).start()
    try:
        stream = control.ControlClient(server.address, "tok", timeout_s=5).subscribe()
        assert next(stream) == {"event": control.SUBSCRIBED}
        server.publish_many([{"event": "a", "n": 1}, {"event": "b", "n": 2}])
        server.publish_many([])
        server.publish({"event": "c", "n": 3})
        assert [next(stream) for _ in range(3)] == [{"event": "a", "n": 1}, {"event": "b", "n": 2},
                                                    {"event": "c", "n": 3}]
        stream.close()
    finally:
        server.close()


def _subscribed(server):
    stream = control.ControlClient(server.address, "tok", timeout_s=5).subscribe()
    assert next(stream) == {"event": control.SUBSCRIBED}
    deadline = time.monotonic() + 5
    while not server._subscribers:
        assert time.monotonic() < deadline, "the subscriber was never registered"
        time.sleep(0.005)
    return stream


def test_lines_the_socket_cannot_take_at_once_queue_behind_and_keep_their_order():
    """A reader slower than the publisher: the socket's buffer fills, later lines wait in the
    backlog (sent by the stream's thread) and none overtakes another."""
    server = control.ControlServer("tok", lambda op, args: None, publish_every_s=0).start()
    try:
        stream = _subscribed(server)
        pad = "x" * 20_000
        started = time.monotonic()
        for n in range(300):  # ~6 MB: far more than a loopback socket buffers
            server.publish({"event": "e", "n": n, "pad": pad})
        assert time.monotonic() - started < 5, "publishing waited for the reader"
        assert server._subscribers[0].backlog or server._subscribers[0].sending, "nothing was ever held back"
        assert [next(stream)["n"] for _ in range(300)] == list(range(300))
        stream.close()
    finally:
        server.close()


def test_the_confirmation_comes_before_any_event_and_then_every_event_in_order():
    """Events published all the while a client subscribes: its first line is the subscribe
    answer (the answer waits in the backlog, so a direct write cannot overtake it), and what
    follows has no gap and no reordering."""
    server = control.ControlServer("tok", lambda op, args: None, publish_every_s=0).start()
    stop = threading.Event()

    def publisher():
        n = 0
        while not stop.is_set():
            server.publish({"event": "e", "n": n})
            n += 1

    thread = threading.Thread(target=publisher, daemon=True)
    thread.start()
    try:
        for _ in range(20):
            stream = control.ControlClient(server.address, "tok", timeout_s=5).subscribe()
            assert next(stream) == {"event": control.SUBSCRIBED}
            first = next(stream)["n"]
            assert [next(stream)["n"] for _ in range(50)] == list(range(first + 1, first + 51))
            stream.close()
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_a_subscriber_too_far_behind_is_dropped_and_the_publisher_never_blocks(monkeypatch):
    monkeypatch.setattr(control, "SUBSCRIBER_BACKLOG_BYTES", 1_000_000)
    server = control.ControlServer("tok", lambda op, args: None, publish_every_s=0).start()
    try:
        stream = _subscribed(server)  # never read from here on
        pad = "x" * 50_000
        started = time.monotonic()
        for n in range(200):  # 10 MB: past the socket buffers and the backlog
            server.publish({"event": "e", "n": n, "pad": pad})
        assert time.monotonic() - started < 5, "publishing waited for the reader"
        assert server._subscribers == [], "the subscriber that fell behind was kept"
        received = []
        try:
            for event in stream:
                received.append(event["n"])
        except (OSError, ValueError):
            pass
        assert received == list(range(len(received))) and len(received) < 200
    finally:
        server.close()


def test_a_burst_of_events_goes_out_gathered_in_one_write_and_in_order(monkeypatch):
    """Events published close together reach a subscriber as one write (one wake-up of the web
    process), not one write each."""
    writes = []
    real_offer = control._Subscriber.offer

    def counting_offer(self, line):
        writes.append(line.count(b"\n"))
        return real_offer(self, line)

    monkeypatch.setattr(control._Subscriber, "offer", counting_offer)
    server = control.ControlServer("tok", lambda op, args: None, publish_every_s=0.5).start()
    try:
        stream = _subscribed(server)
        for n in range(100):
            server.publish({"event": "e", "n": n})
        assert [next(stream)["n"] for _ in range(100)] == list(range(100))
        assert sum(writes) == 100 and len(writes) <= 2, writes  # a burst may straddle two gatherings
        stream.close()
    finally:
        server.close()


@pytest.mark.parametrize("settle_s", [0, 0.05])
def test_what_is_gathered_at_close_is_still_sent(settle_s):
    """close() cuts a gathering's wait short and sends it, whether the sending thread is already
    waiting out the gathering (settle_s) or has not woken yet."""
    server = control.ControlServer("tok", lambda op, args: None, publish_every_s=30).start()
    try:
        stream = _subscribed(server)
        server.publish({"event": "last"})
        time.sleep(settle_s)  # lets the sending thread reach its wait: the case that lost the event
        started = time.monotonic()
    finally:
        server.close()
    assert next(stream) == {"event": "last"}
    assert time.monotonic() - started < 5, "close() waited out the gathering"


@pytest.mark.parametrize("every_s", [0, 0.01])
def test_without_a_per_call_non_blocking_send_every_line_goes_through_the_thread_in_order(monkeypatch, every_s):
    """Windows has no MSG_DONTWAIT: the publisher never writes, the stream's thread sends all."""
    monkeypatch.setattr(control, "_DONTWAIT", 0)
    server = control.ControlServer("tok", lambda op, args: None, publish_every_s=every_s).start()
    try:
        stream = _subscribed(server)
        for n in range(500):
            server.publish({"event": "e", "n": n})
        assert [next(stream)["n"] for _ in range(500)] == list(range(500))
        stream.close()
    finally:
        server.close()
