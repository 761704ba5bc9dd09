"""The shared file primitives: folders made inside download_dir only, the data folder's pid lock,
atomic writes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipc import files
from ipc.files import OutsideError, PidLock, atomic_write, make_folder_inside


def test_folders_are_made_one_component_at_a_time_inside_the_base(tmp_path):
    base = tmp_path / "models"
    made = make_folder_inside(base, "models/Stable-diffusion/SDXL")
    assert made == (base / "models" / "Stable-diffusion" / "SDXL").resolve() and made.is_dir()
    assert make_folder_inside(base, "models/Stable-diffusion/SDXL") == made


def test_a_symlinked_folder_is_never_followed(tmp_path):
    base, outside = tmp_path / "models", tmp_path / "elsewhere"
    base.mkdir()
    outside.mkdir()
    (base / "Lora").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutsideError, match="is a symlink"):
        make_folder_inside(base, "Lora/SDXL")
    assert not (outside / "SDXL").exists()


def test_a_file_where_a_folder_goes_is_named(tmp_path):
    base = tmp_path / "models"
    base.mkdir()
    (base / "Lora").write_text("x")
    with pytest.raises(OutsideError, match="not a folder"):
        make_folder_inside(base, "Lora/SDXL")


def test_the_pid_lock_names_its_holder_and_dies_with_it(tmp_path):
    path = tmp_path / "data" / "daemon.pid"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from ipc.files import PidLock\n"
        "assert PidLock(%r).acquire() is None\n"
        "print('held', flush=True); time.sleep(60)") % (os.getcwd(), str(path))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert PidLock(path).acquire() == holder.pid
    finally:
        holder.kill()
        holder.wait(10)
    lock = PidLock(path)
    assert lock.acquire() is None, "the kernel dropped the dead holder's lock"
    assert path.read_text().split()[0] == str(os.getpid())
    lock.release()


def test_atomic_write_keeps_the_mode_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("[]")
    os.chmod(target, 0o640)
    atomic_write(target, b'[{"modelId": 1}]')
    assert target.read_bytes() == b'[{"modelId": 1}]' and (os.stat(target).st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_temp_file_of_a_killed_writer_is_removed_at_the_next_write(tmp_path):
    target = tmp_path / "m.civitai.info"
    stale = tmp_path / ".m.civitai.info.4242.tmp"
    fresh = tmp_path / ".m.civitai.info.4243.tmp"  # another writer, right now
    other = tmp_path / ".notes.txt.4242.tmp"
    for p in (stale, fresh, other):
        p.write_text("half")
    os.utime(stale, (1, 1))
    os.utime(other, (1, 1))
    atomic_write(target, b"{}")
    assert not stale.exists() and fresh.exists() and other.exists() and target.read_bytes() == b"{}"


def test_a_folder_is_looked_through_for_stale_temps_once_per_sweep_not_once_per_write(tmp_path, monkeypatch):
    """A model folder of thousands of files gets a sidecar per download: one scan per write made
    an import quadratic. The scan is per folder and TEMP_SWEEP_S; a temp is only ever removed by
    a write of its own target."""
    clock = [1000.0]
    sweeps = files._TempSweeps(clock=lambda: clock[0])
    scans = []
    real_scan = sweeps._scan
    monkeypatch.setattr(sweeps, "_scan", lambda folder: scans.append(folder) or real_scan(folder))
    for i in range(50):
        (tmp_path / f"m{i}.civitai.info").write_text("{}")
    stale = tmp_path / ".m7.civitai.info.4242.tmp"
    stale.write_text("half")
    os.utime(stale, (1, 1))
    for i in range(50):
        files.remove_stale_temps(tmp_path / f"m{i}.civitai.info", sweeps=sweeps)
    assert len(scans) == 1 and not stale.exists()
    late = tmp_path / ".m8.civitai.info.4243.tmp"  # left after the scan: found by the next one
    late.write_text("half")
    os.utime(late, (1, 1))
    assert files.remove_stale_temps(tmp_path / "m8.civitai.info", sweeps=sweeps) == 0 and late.exists()
    clock[0] += files.TEMP_SWEEP_S
    assert files.remove_stale_temps(tmp_path / "m8.civitai.info", sweeps=sweeps) == 1 and not late.exists()
    assert len(scans) == 2


def test_dir_syncs_in_a_batch_are_one_per_folder_at_its_end_even_when_it_raises(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(files.OS, "fsync_dir", lambda folder: synced.append(Path(folder)))
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
    with pytest.raises(RuntimeError), files.dir_syncs_batched() as pending:
        atomic_write(a / "x.civitai.info", b"{}")
        with files.dir_syncs_batched():  # nested: the outer block's
            atomic_write(a / "y.civitai.info", b"{}")
            files.fsync_dir(b)
        pending[a] = None
        assert synced == []  # nothing before the end
        raise RuntimeError("the job failed after its renames")
    assert synced == [a, b]
    files.fsync_dir(a)  # outside a batch: at once again
    assert synced == [a, b, a]
