"""The download worker's end of its Pipe: messages that say nothing urgent wait for the next one
and go with it as one Pipe message (so the supervisor wakes and reads once a small file, not four
or five times), in order, and never longer than lazy_s."""
from __future__ import annotations

import multiprocessing
import threading
import time

from ipc.messages import unpack
from workers.worker import LAZY_TYPES, Channel


def pipe():
    here, there = multiprocessing.Pipe(duplex=True)
    return here, there


def drain(conn, timeout: float = 5.0, reads: list | None = None) -> list[dict]:
    """The messages waiting, unpacked; `reads` gets how many each recv() held."""
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while conn.poll(max(0.0, deadline - time.monotonic()) if not out else 0):
        got = unpack(conn.recv())
        if reads is not None:
            reads.append(len(got))
        out.extend(got)
    return out


def test_lazy_messages_go_with_the_next_one_in_order():
    supervisor, worker = pipe()
    channel = Channel(worker, lazy=LAZY_TYPES, lazy_s=30.0)  # no late send within this test
    channel.send({"type": "ack", "job_id": 1})
    channel.send({"type": "resolved", "job_id": 1})
    channel.send({"type": "progress", "job_id": 1, "bytes_done": 5})
    channel.send({"type": "verifying", "job_id": 1})
    assert not supervisor.poll(0.2)  # held: nothing woke the supervisor
    channel.send({"type": "done", "job_id": 1})
    reads: list[int] = []
    assert [m["type"] for m in drain(supervisor, reads=reads)] == ["ack", "resolved", "progress", "verifying", "done"]
    assert reads == [5]  # one read for all five
    channel.send({"type": "ack", "job_id": 2})
    channel.send({"type": "error", "job_id": 2, "reason": "not_found"})
    assert [m["type"] for m in drain(supervisor)] == ["ack", "error"]


def test_a_lazy_message_with_nothing_after_it_goes_within_lazy_s():
    supervisor, worker = pipe()
    channel = Channel(worker, lazy=LAZY_TYPES, lazy_s=0.05)
    for size in (1, 2):
        sent = time.monotonic()
        channel.send({"type": "progress", "job_id": 7, "bytes_done": size})
        assert supervisor.poll(5.0)
        waited = time.monotonic() - sent
        assert unpack(supervisor.recv())[0]["bytes_done"] == size
        assert waited >= 0.04  # held, not sent at once (a generous bound below 0.05: clocks differ)
    assert not supervisor.poll(0.1)  # each went once


def test_flush_sends_what_waits_and_a_channel_without_lazy_types_holds_nothing():
    supervisor, worker = pipe()
    channel = Channel(worker, lazy=LAZY_TYPES, lazy_s=30.0)
    channel.send({"type": "ack", "job_id": 3})
    channel.flush()
    assert [m["type"] for m in drain(supervisor)] == ["ack"]
    plain = Channel(worker)  # the updater's and the library scan's channels
    plain.send({"type": "progress", "job_id": 3})
    assert isinstance(supervisor.recv(), dict)  # alone: a plain message, not a list of one


def test_sends_from_two_threads_keep_each_threads_order():
    supervisor, worker = pipe()
    channel = Channel(worker, lazy=LAZY_TYPES, lazy_s=0.01)

    def sender(job_id: int):
        for i in range(200):
            channel.send({"type": "progress" if i % 3 else "resolved", "job_id": job_id, "i": i})

    threads = [threading.Thread(target=sender, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    got: list[dict] = []
    deadline = time.monotonic() + 10
    while len(got) < 400 and time.monotonic() < deadline:  # read as they come: a full pipe blocks a send
        if supervisor.poll(0.5):
            got.extend(unpack(supervisor.recv()))
    for thread in threads:
        thread.join(10)
    for job_id in (1, 2):
        assert [m["i"] for m in got if m["job_id"] == job_id] == list(range(200))
