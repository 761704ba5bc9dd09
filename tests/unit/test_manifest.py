"""manifest.json: validation messages, custom fields kept, atomic writes, edits told apart."""
import json
import os

import pytest

from ipc.manifest import ManifestError, ManifestFile, parse_manifest, render, validate_entry


def test_minimal_and_full_entries_are_valid():
    entries = parse_manifest(json.dumps([
        {"modelId": 1, "model_type": "lora"},
        {"modelId": 2, "modelVersionId": 3, "fileId": 4, "model_type": "checkpoint", "sha256": "AB" * 32,
         "url": "https://x", "filename": "a.safetensors", "priority": 1, "updatedAt": "2025-07-19T12:00:00Z",
         "my_note": {"keep": True}},
    ]))
    assert entries[1]["my_note"] == {"keep": True}


@pytest.mark.parametrize("entry,needle", [
    ({"model_type": "lora"}, "'modelId' is required"),
    ({"modelId": "12", "model_type": "lora"}, "'modelId'"),
    ({"modelId": 0, "model_type": "lora"}, "'modelId'"),
    ({"modelId": 1}, "'model_type' is required"),
    ({"modelId": 1, "model_type": "../etc"}, "'model_type'"),
    ({"modelId": 1, "model_type": "Lora/../x"}, "'model_type': 'Lora/../x'"),
    ({"modelId": 1, "model_type": "con"}, "reserved device name"),
    ({"modelId": 1, "model_type": "Lora\u202e"}, "U+202E"),
    ({"modelId": 1, "model_type": "/abs"}, "absolute"),
    ({"modelId": 1, "model_type": "lora", "fp": ""}, "'fp'"),
    ({"modelId": 1, "model_type": "lora", "sha256": "xyz"}, "'sha256'"),
    ({"modelId": 1, "model_type": "lora", "priority": 0}, "'priority'"),
    ({"modelId": 1, "model_type": "lora", "filename": "../../x.bin"}, "'filename'"),
    ({"modelId": 1, "model_type": "lora", "modelVersionId": -3}, "'modelVersionId'"),
])
def test_bad_entries_name_the_entry_and_field(entry, needle):
    with pytest.raises(ManifestError) as err:
        parse_manifest(json.dumps([{"modelId": 9, "model_type": "vae"}, entry]), "m.json")
    assert "m.json: entry 1" in str(err.value) and needle in str(err.value)


def test_not_an_array_and_syntax_errors():
    with pytest.raises(ManifestError, match="array"):
        parse_manifest('{"modelId": 1}')
    with pytest.raises(ManifestError, match="line 2"):
        parse_manifest('[\n {"modelId": 1,, }]')
    assert parse_manifest("") == [] and parse_manifest("[] // none yet") == []


def test_validate_entry_rejects_non_objects():
    with pytest.raises(ManifestError, match="expected an object"):
        validate_entry([1], "entry")


def test_save_keeps_custom_fields_in_place_and_is_atomic(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text('[{"note": "first", "modelId": 1, "model_type": "lora", "z": 1}]')
    mf = ManifestFile(path, tmp_path / "data" / "manifest.lock")
    entries = mf.load()
    entries[0]["modelVersionId"] = 5
    assert mf.save(entries)
    saved = json.loads(path.read_text())
    assert list(saved[0]) == ["note", "modelId", "model_type", "z", "modelVersionId"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert mf.poll() is None  # our own write is not an edit


def test_a_persons_save_is_noticed_and_a_broken_one_never_overwritten(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("[]")
    mf = ManifestFile(path, tmp_path / "manifest.lock")
    mf.load()
    path.write_text('[{"modelId": 7, "model_type": "vae"}]')
    os.utime(path, ns=(1, 1))  # a different mtime, as a save would give
    assert mf.poll() == "changed" and mf.entries[0]["modelId"] == 7
    broken = '[{"modelId": 7, "model_type": "vae"},'
    path.write_text(broken)
    os.utime(path, ns=(2, 2))
    assert mf.poll() == "invalid" and "manifest.json" in mf.error
    assert mf.entries[0]["modelId"] == 7  # the last good state stays in force
    assert mf.poll() is None  # reported once per save
    assert mf.save([{"modelId": 8, "model_type": "vae"}]) is False
    assert path.read_text() == broken
    path.write_text('[{"modelId": 8, "model_type": "vae"}]')
    os.utime(path, ns=(3, 3))
    assert mf.poll() == "changed" and mf.error is None


def test_save_refuses_when_the_file_changed_underneath(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("[]")
    mf = ManifestFile(path, tmp_path / "manifest.lock")
    mf.load()
    path.write_text('[{"modelId": 1, "model_type": "vae"}]')
    assert mf.save([]) is False
    assert json.loads(path.read_text())[0]["modelId"] == 1


def test_a_lock_held_by_another_program_defers_our_write(tmp_path):
    import fcntl

    path = tmp_path / "manifest.json"
    path.write_text("[]")
    mf = ManifestFile(path, tmp_path / "manifest.lock")
    mf.load()
    with open(path) as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as `flock manifest.json …` would
        assert mf.save([{"modelId": 1, "model_type": "vae"}]) is False
    assert path.read_text() == "[]"
    assert mf.save([{"modelId": 1, "model_type": "vae"}]) is True


def test_a_save_right_after_ours_is_still_seen_and_half_written_saves_wait(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("[]")
    mf = ManifestFile(path, tmp_path / "manifest.lock")
    mf.load()
    assert mf.save([{"modelId": 1, "model_type": "vae"}])
    path.write_text('[{"modelId": 2, "model_type": "vae"}]')
    st = os.stat(path)
    assert mf.poll(now_ns=st.st_mtime_ns + 1000) is None  # too fresh: maybe still being written
    assert mf.poll(now_ns=st.st_mtime_ns + 10**9) == "changed"
    assert mf.entries[0]["modelId"] == 2


@pytest.mark.parametrize("entries", [
    [],
    [{}],
    [{"modelId": 1, "model_type": "lora"}],
    [{"modelId": 1, "model_type": "lora", "note": "ü\n\"x\"", "tags": [], "more": {"a": [1, 2.5, None, True]},
      "empty": {}}, {"modelId": 2, "model_type": "checkpoint", "priority": 1}],
])
def test_render_is_json_dumps_indent_2_byte_for_byte(entries):
    expected = (json.dumps(entries, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    assert render(entries) == expected
    cache: dict = {}
    assert render(entries, cache) == expected
    assert render(entries, cache) == expected  # from the cache


def test_render_cache_follows_changed_entries_and_holds_only_the_current_ones():
    a, b = {"modelId": 1, "model_type": "lora"}, {"modelId": 2, "model_type": "lora"}
    cache: dict = {}
    render([a, b], cache)
    b["filename"] = "b.safetensors"  # changed in place: its text must follow it
    c = {"modelId": 3, "model_type": "vae"}
    out = render([b, c], cache)
    assert out == (json.dumps([b, c], indent=2) + "\n").encode()
    assert len(cache) == 2 and all('"modelId": 1' not in text for *_, text in cache.values())


def test_render_cache_sees_a_change_deep_inside_an_entry_and_a_new_entry_at_an_old_id():
    """Entries are found by identity, then checked against the copy made when rendered: a list
    changed inside an entry, or an equal-looking entry that is a new object, renders right."""
    a = {"modelId": 1, "model_type": "lora", "more": {"tags": ["x"]}}
    cache: dict = {}
    render([a], cache)
    a["more"]["tags"].append("y")
    assert render([a], cache) == (json.dumps([a], indent=2) + "\n").encode()
    entries = [{"modelId": n, "model_type": "lora"} for n in range(50)]
    render(entries, cache)
    entries = [{**e, "priority": 1} for e in entries]  # the old dicts die, their ids may come back
    assert render(entries, cache) == (json.dumps(entries, indent=2) + "\n").encode()
