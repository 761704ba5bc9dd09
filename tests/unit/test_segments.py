"""Several connections for one file (workers/segments.py through run_job, against the local fake
Civitai on loopback): ranges assemble to a verified file, every fault of the fake on one range,
the fall-backs to one connection, one new link for all ranges, cancel and resume per range; and
the plan's arithmetic (pieces in order, staggered, split again) and the writer at offsets."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from urllib.parse import parse_qs

import pytest

from tests.fakeciv import running_fake
from tests.unit.test_download import KEY, Runner, add_model, cdn_requests, run_watched, sha
from workers import segments
from workers.civitai import CivitaiError
from workers.segments import ALIGN, PIECE_MAX, Plan, RangeWriter, first_piece_end, first_wave

MiB = 1 << 20
SIZE = 40 * MiB + 4321  # well above segments.SPLIT_MIN_BYTES
PER_CONN_BPS = 20 * MiB  # the fake CDN's cap on each connection: several connections pay off
PART = ".model.safetensors.part"


@pytest.fixture
def fake():
    with running_fake(KEY) as fake:
        fake.cdn_conn_bps = PER_CONN_BPS
        yield fake


@pytest.fixture
def runner(fake, tmp_path):
    return Runner(fake, tmp_path, connections=4)


def big_model(fake, size=SIZE, **kw):
    add_model(fake, size_bytes=size, **kw)


def ranges_of(requests) -> list[tuple[int, int]]:
    """(start, end exclusive) of each CDN request's Range (end None: open)."""
    out = []
    for r in requests:
        value = r.headers.get("Range")
        assert value and value.startswith("bytes="), value
        a, b = value[6:].split("-")
        out.append((int(a), int(b) + 1 if b else None))
    return out


def covered(spans, size) -> bool:
    """Whether (start, end) spans cover [0, size)."""
    pos = 0
    for a, b in sorted((a, size if b is None else b) for a, b in spans):
        if a > pos:
            return False
        pos = max(pos, b)
    return pos >= size


# -- ranges assemble to a verified file --------------------------------------------------------------

def test_ranges_assemble_to_a_verified_file(fake, runner):
    big_model(fake)
    done = runner.run(model_id=1)
    assert (done["sha256"], done["bytes"]) == (sha(fake, 111), SIZE)
    target = runner.folder() / "model.safetensors"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == sha(fake, 111)
    assert runner.listing() == ["model.safetensors"]  # no part, no sidecar
    cdn = cdn_requests(fake)
    spans = ranges_of(cdn)
    assert len(cdn) >= 4 and all(b is not None for _, b in spans), spans  # bounded ranges only
    assert spans[0][0] == 0 and spans[0][1] == first_piece_end([[0, SIZE]], 4)
    assert covered(spans, SIZE)
    assert all(a % ALIGN == 0 for a, _ in spans)
    assert {r.headers.get("If-Range") for r in cdn[1:]} == {cdn[1].headers.get("If-Range")} != {None}
    assert len(fake.requests_to("api", path_re="/api/download/")) == 1  # one link from Civitai for all
    assert all(r.headers.get("Authorization") is None for r in cdn)
    assert fake.bytes_served(111) < SIZE + 4 * MiB  # little fetched twice (a split's overlap at most)
    progress = [m for m in runner.messages if m["type"] == "progress"]
    assert progress[-1]["bytes_done"] == progress[-1]["bytes_total"] == SIZE
    assert [m["bytes_done"] for m in progress] == sorted(m["bytes_done"] for m in progress)
    assert runner.types()[-1] == "verifying"


def test_several_connections_run_at_once(fake, runner):
    big_model(fake)
    runner.run(model_id=1)
    # The fake records when each request came; with every connection capped, the file's
    # pieces were asked for at about the same time, not one after the other.
    cdn = cdn_requests(fake)
    first_four = sorted(r.time for r in cdn)[:4]
    assert first_four[-1] - first_four[0] < 1.0, first_four


def test_one_fast_connection_goes_on_alone(fake, runner):
    fake.cdn_conn_bps = None  # loopback without a cap: one connection has the line
    big_model(fake)
    done = runner.run(model_id=1)
    assert done["sha256"] == sha(fake, 111)
    spans = ranges_of(cdn_requests(fake))
    assert spans == [(0, first_piece_end([[0, SIZE]], 4)), (spans[0][1], SIZE)], spans


def test_a_connection_fast_at_first_then_capped_hands_over_to_several(fake, runner):
    """A host that lets the first megabytes of each answer through at full speed and caps the
    connection after them: the first piece looks like a fast line, the rest is not."""
    size = 72 * MiB
    fake.cdn_conn_bps, fake.cdn_conn_burst = 6 * MiB, 10 * MiB
    big_model(fake, size=size)
    done = runner.run(model_id=1)
    assert done["sha256"] == sha(fake, 111)
    spans = [(a, b or size) for a, b in ranges_of(cdn_requests(fake))]
    first = first_piece_end([[0, size]], 4)
    assert spans[0] == (0, first) and spans[1] == (first, size)  # alone, from the end of the first piece
    later = spans[2:]
    assert len(later) >= 4 and all(b < size or a > first for a, b in later)  # then bounded pieces
    resumed_at = min(a for a, _ in later)
    assert first + 10 * MiB <= resumed_at  # what the lone connection brought was kept


def test_without_a_size_from_civitai_the_first_answer_gives_it(fake, runner):
    big_model(fake)
    fake.set_file_meta(111, size_kb_override=0)  # sizeKB 0: no size from Civitai, the first request is open
    done = runner.run(model_id=1)
    assert (done["sha256"], done["bytes"]) == (sha(fake, 111), SIZE)
    spans = ranges_of(cdn_requests(fake))
    assert spans[0] == (0, None) and len(spans) >= 4  # then pieces, as with a known size
    assert fake.bytes_served(111) < SIZE + 8 * MiB


def test_a_small_file_takes_one_connection(fake, runner):
    add_model(fake, size_bytes=segments.SPLIT_MIN_BYTES - MiB)
    runner.run(model_id=1)
    assert [r.headers.get("Range") for r in cdn_requests(fake)] == [None]


def test_connections_1_never_splits(fake, tmp_path):
    big_model(fake)
    runner = Runner(fake, tmp_path, connections=1)
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)
    assert [r.headers.get("Range") for r in cdn_requests(fake)] == [None]


def test_a_host_without_a_validator_gets_one_connection(fake, runner):
    fake.cdn_validators = False  # no ETag, no Last-Modified: parts could not be told apart safely
    big_model(fake)
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)
    cdn = cdn_requests(fake)
    assert [r.headers.get("Range") for r in cdn][-1] is None  # the whole file over one connection
    assert len(cdn) == 2


def test_a_host_that_ignores_ranges_gets_one_connection(fake, runner):
    big_model(fake)
    fake.set_fault(111, "ignore_range")  # every answer is the whole file (200)
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)
    assert len(cdn_requests(fake)) == 1
    assert fake.bytes_served(111) == SIZE


class CountingThrottle:
    """The client's throttle, counting its turns (API calls and download starts)."""

    def __init__(self):
        self.turns = 0

    def wait(self) -> float:
        self.turns += 1
        return 0.0


def test_only_the_download_start_takes_a_throttle_turn_not_each_range(fake, runner):
    big_model(fake)
    throttle = runner.ctx.client.throttle = CountingThrottle()
    runner.run(model_id=1)
    assert len(cdn_requests(fake)) >= 4
    assert throttle.turns == 2  # the model's metadata, the download start


# -- every fault of the fake, on one range among several ----------------------------------------------

MID = 20 * MiB  # the faults play on a request for a range from here on

RANGE_FAULTS = [
    ("stall", dict(after_bytes=256 << 10)),
    ("stall", dict(after_bytes=0, before_headers=True)),
    ("drip", dict(bps=300_000)),
    ("reset", dict(after_bytes=MiB)),
    ("short", dict(after_bytes=MiB + 77)),
    ("html_login", dict(where="cdn")),
    ("json_error", dict(where="cdn")),
    ("status", dict(code=500, where="cdn")),
    ("status", dict(code=503, where="cdn")),
    ("status", dict(code=429, where="cdn", retry_after=1)),
    ("endless", dict()),
    ("endless", dict(framing="chunked")),
    ("overlong", dict(extra_bytes=2 * MiB)),
    ("overlong", dict(extra_bytes=40 << 10, declared="body")),
    ("redirect_chain", dict(n=3)),
    ("redirect_loop", dict()),
]


@pytest.mark.parametrize("mode,params", RANGE_FAULTS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(RANGE_FAULTS)])
def test_a_fault_on_one_range_is_handled_by_that_range(fake, tmp_path, mode, params):
    big_model(fake)
    runner = Runner(fake, tmp_path, connections=4, read_timeout_s=3)
    fake.set_fault(111, mode, times=1, only_from=MID, **params)
    done, biggest = run_watched(runner, 40, model_id=1)
    assert not isinstance(done, CivitaiError), done  # one attempt: the other ranges went on
    assert (done["sha256"], done["bytes"]) == (sha(fake, 111), SIZE)
    assert fake.faults_left(111) == 0, "the fault never played"
    assert biggest <= SIZE
    assert runner.listing() == ["model.safetensors"]
    assert (runner.folder() / "model.safetensors").stat().st_size == SIZE


FIRST_RANGE_FAULTS = [
    ("reset", dict(after_bytes=MiB)),
    ("short", dict(after_bytes=MiB + 77)),
    ("stall", dict(after_bytes=256 << 10)),
    ("endless", dict()),
    ("overlong", dict(extra_bytes=2 * MiB)),
    ("drip", dict(bps=300_000, after_bytes=MiB)),
]


@pytest.mark.parametrize("mode,params", FIRST_RANGE_FAULTS, ids=[m for m, _ in FIRST_RANGE_FAULTS])
def test_a_fault_on_the_first_range_is_handled_by_that_range(fake, tmp_path, mode, params):
    """The first range is the answer that showed the host serves ranges; it is a range like the others."""
    big_model(fake)
    runner = Runner(fake, tmp_path, connections=4, read_timeout_s=3)
    fake.set_fault(111, mode, times=1, **params)  # the first request to the CDN
    done, biggest = run_watched(runner, 40, model_id=1)
    assert not isinstance(done, CivitaiError), done
    assert done["sha256"] == sha(fake, 111)
    assert cdn_requests(fake)[0].sent > 0 and fake.faults_left(111) == 0
    assert biggest <= SIZE


def test_a_slow_range_is_split_and_the_rest_shared(fake, tmp_path):
    big_model(fake)
    runner = Runner(fake, tmp_path, connections=4)
    fake.set_fault(111, "drip", times=1, only_from=MID, bps=200_000)
    t0 = time.monotonic()
    runner.run(model_id=1)
    elapsed = time.monotonic() - t0
    cdn = cdn_requests(fake)
    spans = ranges_of(cdn)
    slow = next(i for i, (a, _) in enumerate(spans) if a >= MID)
    a, b = spans[slow]
    # Another connection asked for the back of the dripping range: it was split.
    assert any(a < x < b for x, _ in spans[slow + 1:]), spans
    assert elapsed < (b - a) / 200_000, "the file waited for the dripping range"


def test_wrong_bytes_in_one_range_fail_the_hash_and_the_next_attempt_is_clean(fake, runner):
    big_model(fake)
    fake.set_fault(111, "wrong_bytes", times=1, only_from=MID)
    err = runner.fail(model_id=1)
    assert (err.reason, err.retryable) == ("hash_mismatch", True)
    assert runner.listing() == []  # neither a final file nor a part nor its sidecar
    assert runner.run(model_id=1, attempt=2)["sha256"] == sha(fake, 111)


def test_a_200_to_a_later_range_restarts_from_zero_on_one_connection(fake, runner):
    big_model(fake)
    fake.set_fault(111, "ignore_range", times=1, only_from=MID)
    done = runner.run(model_id=1)
    assert done["sha256"] == sha(fake, 111)
    cdn = cdn_requests(fake)
    assert cdn[-1].headers.get("Range") is None  # from zero, over one connection
    assert len(fake.requests_to("api", path_re="/api/download/")) == 2
    assert sum(1 for r in cdn if r.headers.get("Range") is None) == 1


def test_a_file_that_changes_mid_download_restarts_from_zero(fake, runner):
    old, new = os.urandom(SIZE), os.urandom(SIZE)
    new_sha = hashlib.sha256(new).hexdigest()
    big_model(fake, data=old, sha256=new_sha)
    # The new file arrives when the range from the middle is asked for: the ranges before it have
    # old bytes (some still streaming them), that request's If-Range of the old ETag brings the
    # new file whole. (A swap timed by a progress message could come after the last range was
    # asked for: then every byte is old, and only the hash check catches it.)
    fake.set_fault(111, "change", times=1, only_from=MID, data=new, sha256=new_sha)
    done = runner.run(model_id=1)
    assert done["sha256"] == new_sha
    cdn = cdn_requests(fake)
    assert any(r.headers.get("Range") and r.sent > 0 for r in cdn[:-1])  # old bytes had come
    assert cdn[-1].headers.get("Range") is None  # then from zero, whole, on one connection
    assert hashlib.sha256((runner.folder() / "model.safetensors").read_bytes()).hexdigest() == new_sha


def test_a_file_that_changed_after_every_range_was_asked_for_fails_the_hash_and_keeps_nothing(fake, runner):
    old, new = os.urandom(SIZE), os.urandom(SIZE)
    new_sha = hashlib.sha256(new).hexdigest()
    big_model(fake, data=old, sha256=new_sha)  # the API already lists the new file's hash
    err = runner.fail(model_id=1)
    assert err.reason == "hash_mismatch" and err.retryable
    assert runner.listing() == []  # nothing at the final path, no partial file of wrong bytes


# -- one new link for all ranges ----------------------------------------------------------------------

def test_an_expired_link_is_resolved_again_once_for_all_ranges(fake, runner):
    big_model(fake)
    expired = threading.Event()

    def expire(msg):
        # While the first connection is still alone: the others then all start on a dead link.
        if msg["type"] == "progress" and not expired.is_set():
            expired.set()
            fake.expire_cdn_urls()  # every link handed out so far: all ranges see 403 on their next request

    runner.on_message = expire
    throttle = runner.ctx.client.throttle = CountingThrottle()
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)
    assert len(fake.requests_to("api", path_re="/api/download/")) == 2
    assert throttle.turns == 3  # the new link is one more download start, spaced like the first
    sigs = [parse_qs(r.query)["sig"][0] for r in cdn_requests(fake)]
    assert len(set(sigs)) == 2
    refused = [s for s, r in zip(sigs, cdn_requests(fake)) if s == sigs[0] and r.sent == 0]
    assert len(refused) >= 2, "only one range met the expired link"


def test_a_link_refused_again_and_again_fails_the_attempt(fake, runner):
    big_model(fake)
    fake.set_fault(111, "expire_cdn", only_from=MID)  # every request past the middle: 403
    err = runner.fail(model_id=1)
    assert err.retryable and err.reason == "forbidden"
    assert "refused the download link" in str(err)
    assert 2 <= len(fake.requests_to("api", path_re="/api/download/")) <= 4


# -- cancel, resume ---------------------------------------------------------------------------------

def present_spans(missing, size):
    pos, out = 0, []
    for a, b in missing:
        out.append((pos, a))
        pos = b
    out.append((pos, size))
    return [(a, b) for a, b in out if b > a]


def test_cancel_keeps_every_byte_and_the_next_attempt_fetches_only_what_is_missing(fake, runner):
    fake.cdn_conn_bps = 4 * MiB
    big_model(fake)
    stopped = {}

    def stop_later(msg):
        if msg["type"] == "progress" and msg["bytes_done"] > 10 * MiB and not runner.stop.is_set():
            stopped["t"] = time.monotonic()
            runner.stop.set()

    runner.on_message = stop_later
    err = runner.fail(model_id=1)
    assert err.reason == "cancelled" and not err.retryable
    assert time.monotonic() - stopped["t"] < 2.0  # every range stopped within 2 s
    side = json.loads((runner.folder() / (PART + ".json")).read_text())
    assert (side["version_id"], side["file_id"], side["size"]) == (11, 111, SIZE)
    missing = side["missing"]
    assert len(missing) > 1 and sum(b - a for a, b in missing) < SIZE - 10 * MiB
    data = fake.file_bytes(111)
    part = (runner.folder() / PART).read_bytes()
    kept = present_spans(missing, SIZE)
    assert all(part[a:b] == data[a:b] for a, b in kept)  # what the sidecar says is there, is
    # Bytes a range had received when the cancel came are written, not dropped: some range
    # stopped at an offset no write of whole blocks would have reached.
    assert any(a % ALIGN for a, _ in missing[:-1]) or any(b % ALIGN for _, b in kept[1:])

    served_before = fake.bytes_served(111)
    n_before = len(cdn_requests(fake))
    fake.cdn_conn_bps = PER_CONN_BPS
    runner.stop.clear()
    runner.on_message = None
    done = runner.run(model_id=1, attempt=2)
    assert done["sha256"] == sha(fake, 111)
    again = ranges_of(cdn_requests(fake)[n_before:])
    # Each range resumes where it stopped: every request starts inside a missing range (its
    # start aligned down for direct writes), and nothing present is asked for again.
    for a, _ in again:
        assert any(x - ALIGN < a < y for x, y in missing), (a, missing)
    refetched = fake.bytes_served(111) - served_before
    assert refetched < sum(b - a for a, b in missing) + len(missing) * ALIGN + 4 * MiB


def test_resume_rehashes_the_prefix_and_fetches_the_holes(fake, runner):
    """A partial file several connections left: the sidecar's record of missing ranges is what
    counts (its length says nothing: it has its full size from the start)."""
    big_model(fake)
    data = fake.file_bytes(111)
    holes = [[8 * MiB + 100, 12 * MiB], [20 * MiB, 30 * MiB], [36 * MiB, SIZE]]
    part = bytearray(data)
    for a, b in holes:
        part[a:b] = b"\0" * (b - a)
    runner.folder().mkdir(parents=True)
    (runner.folder() / PART).write_bytes(bytes(part))
    etag = fake._files[111].etag
    (runner.folder() / (PART + ".json")).write_text(json.dumps(
        {"version_id": 11, "file_id": 111, "sha256": sha(fake, 111), "etag": etag, "last_modified": None,
         "total": SIZE, "size": SIZE, "missing": holes}))
    done = runner.run(model_id=1)
    assert done["sha256"] == sha(fake, 111)
    spans = ranges_of(cdn_requests(fake))
    assert spans[0][0] == 8 * MiB  # the first hole, aligned down
    assert all(r.headers.get("If-Range") == etag for r in cdn_requests(fake))
    assert covered(spans + present_spans([[8 * MiB, 12 * MiB], [20 * MiB, 30 * MiB], [36 * MiB, SIZE]], SIZE),
                   SIZE)
    assert fake.bytes_served(111) < sum(b - a for a, b in holes) + 3 * ALIGN + 4 * MiB


@pytest.mark.parametrize("ranged", [False, True])
def test_a_host_ignoring_if_range_never_mixes_two_versions(fake, runner, ranged):
    fake.cdn_ignores_if_range = True  # a 206 even though the file changed since the part was written
    big_model(fake)
    runner.folder().mkdir(parents=True)
    (runner.folder() / PART).write_bytes(os.urandom(12 * MiB))  # bytes of an older version
    meta = {"version_id": 11, "file_id": 111, "sha256": sha(fake, 111), "etag": '"older"', "total": SIZE}
    if ranged:
        meta.update(size=SIZE, missing=[[12 * MiB, SIZE]])
    (runner.folder() / (PART + ".json")).write_text(json.dumps(meta))
    done = runner.run(model_id=1)
    assert done["sha256"] == sha(fake, 111)  # from zero, in one attempt
    cdn = cdn_requests(fake)
    assert cdn[0].headers.get("If-Range") == '"older"'
    starts = [int(r.headers["Range"][6:].split("-")[0]) if r.headers.get("Range") else 0 for r in cdn]
    assert starts[0] > 0 and 0 in starts[1:]  # asked to resume, then from zero


def test_a_record_that_does_not_fit_discards_the_part(fake, runner):
    big_model(fake)
    runner.folder().mkdir(parents=True)
    (runner.folder() / PART).write_bytes(b"\0" * SIZE)  # full length, as several connections leave it
    (runner.folder() / (PART + ".json")).write_text(json.dumps(
        {"version_id": 11, "file_id": 111, "sha256": sha(fake, 111), "etag": '"x"', "total": SIZE,
         "size": SIZE, "missing": [[5, 3]]}))
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)
    assert ranges_of(cdn_requests(fake))[0][0] == 0


# -- the plan --------------------------------------------------------------------------------------------

class Owner:
    def __init__(self, name):
        self.name = name
        self.dl = None


def test_pieces_come_in_file_order_staggered_then_shrinking():
    size = 1 << 30
    plan = Plan(size, [[0, size]], width=8, stall_s=2)
    owners = [Owner(i) for i in range(8)]
    pieces = []
    for i in range(1000):
        piece, _ = plan.next_piece(owners[i % 8], now=0.0)
        if piece is None:
            break
        pieces.append(piece)
        piece.pos = piece.end  # fetched at once
        plan.retire(piece, done=True)
    lengths = [p.end - p.start for p in pieces]
    assert [p.start for p in pieces] == sorted(p.start for p in pieces)
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
    assert pieces[0].start == 0 and pieces[-1].end == size
    assert lengths[:8] == first_wave(size, 8) == sorted(lengths[:8])  # 1, 2, ... 8 shares
    assert lengths[0] < lengths[7] <= PIECE_MAX
    assert max(lengths) <= PIECE_MAX and lengths[-1] <= lengths[8]  # smaller towards the end
    assert all(p.start % ALIGN == 0 for p in pieces)
    assert plan.finished() and plan.frontier() == size and plan.missing() == []


def test_an_idle_connection_splits_the_slowest_piece_and_takes_all_of_a_stalled_one():
    size = 64 * MiB
    plan = Plan(size, [[0, size]], width=3, stall_s=2)
    a, b, c = Owner("a"), Owner("b"), Owner("c")
    pa, _ = plan.next_piece(a, now=0.0)
    pb, _ = plan.next_piece(b, now=0.0)
    while plan.unassigned:  # c takes the rest, piece by piece, and finishes them
        pc, _ = plan.next_piece(c, now=0.0)
        plan.written(pc, pc.end, now=0.0)
        plan.retire(pc, done=True)
    assert plan.next_piece(c, now=0.1) == (None, None)  # too young to judge
    old_end = pa.end
    plan.written(pa, pa.start + ALIGN, now=10.0)  # a: 4 KiB in 10 s, slow
    plan.written(pb, pb.start + (pb.end - pb.start) // 2, now=10.0)  # b: half its piece
    stolen, victim = plan.next_piece(c, now=10.0)
    assert victim is None and stolen.owner is c
    assert stolen.end == old_end and pa.end == stolen.start  # the back half of the slowest
    assert stolen.start % ALIGN == 0 and pa.pos < stolen.start < old_end
    assert stolen.start - pa.pos <= (old_end - pa.pos) // 2 + ALIGN
    plan.written(stolen, stolen.end, now=10.0)
    plan.retire(stolen, done=True)
    # Nothing from a or b for 10 s: both stalled; the idle connection takes all of what the one
    # with most left has not written, and that one's connection is dropped.
    taken, victim = plan.next_piece(c, now=20.0)
    assert victim is pb
    assert pb.end == taken.start and pb.pos <= taken.start < pb.pos + ALIGN
    assert plan.missing() == segments.merge([[pa.pos, pa.end], [pb.pos, pb.end], [taken.pos, taken.end]])


def test_first_piece_end_is_the_plans_first_piece():
    for size, width in [(40 * MiB, 4), (1 << 30, 8), (17 * MiB, 16), (5 << 30, 16)]:
        plan = Plan(size, [[0, size]], width=segments.effective_width(size, width), stall_s=2)
        piece, _ = plan.next_piece(Owner(0), now=0.0)
        assert piece.end == first_piece_end([[0, size]], width), (size, width)


def test_frontier_and_missing_follow_the_writes():
    plan = Plan(10 * MiB, [[0, 10 * MiB]], width=2, stall_s=2)
    p1, _ = plan.next_piece(Owner(1), now=0.0)
    p2, _ = plan.next_piece(Owner(2), now=0.0)
    plan.written(p2, p2.start + 8192, now=0.0)
    assert plan.frontier() == 0
    plan.written(p1, p1.end, now=0.0)
    assert plan.frontier() == p2.start + 8192
    assert plan.missing()[0] == [p2.start + 8192, p2.end]
    plan.retire(p2, done=False)  # given back: the rest is for another connection
    assert [p2.start + 8192, p2.end] in plan.unassigned or plan.unassigned[0][0] == p2.start + 8192


# -- the writer at offsets -----------------------------------------------------------------------------

@pytest.mark.parametrize("direct", [True, False])
def test_the_writer_puts_every_piece_at_its_offset_from_several_threads(tmp_path, direct):
    import mmap
    import random

    path = tmp_path / "part"
    size = 8 * MiB + 1234
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    data = os.urandom(size)
    writer = RangeWriter(path, fd, direct=direct)
    cuts = sorted({0, size, *(random.Random(1).randrange(0, size // ALIGN) * ALIGN for _ in range(12))})
    spans = list(zip(cuts, cuts[1:]))

    def write(a, b):
        buf = mmap.mmap(-1, MiB)
        view = memoryview(buf)
        pos = a
        while pos < b:
            n = min(MiB, b - pos, random.randrange(1, MiB))
            if pos + n < b:
                n = max(ALIGN, n - n % ALIGN) if b - pos >= ALIGN else b - pos
            view[:n] = data[pos:pos + n]
            writer.write(view[:n], pos)
            pos += n
        view.release()
        buf.close()

    threads = [threading.Thread(target=write, args=span) for span in spans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    writer.close()
    with pytest.raises(segments.WriterClosed):
        writer.write(memoryview(b"x"), 0)
    os.close(fd)
    assert path.read_bytes() == data
