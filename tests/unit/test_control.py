"""The control socket's listener: it never keeps the port the web process is about to listen on."""
from __future__ import annotations

import socket

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
