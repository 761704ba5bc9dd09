"""Notification texts (ipc/notify.py): what a person reads for each event, sizes as the GUI shows
them, and the secrets (config secrets, the token parts of notify URLs) kept out of every text."""
from __future__ import annotations

import logging

import pytest

from ipc import notify
from ipc.notify import Scrubber, check_events, fmt_size, fmt_wait, message_for, secret_parts

COMPLETED = {"id": 9, "event": "download_completed", "ts": "2026-01-01T00:00:00.000Z", "job_id": 3,
             "model_id": 77, "version_id": 770, "model_type": "lora", "filename": "zxq.safetensors",
             "path": "lora/zxq.safetensors", "sha256": "ab" * 32, "bytes": 151_000_000,
             "model_name": "Zxq Ink Style", "version_name": "v2"}


def test_a_completed_download_reads_as_a_sentence_with_name_version_file_and_size():
    m = message_for(COMPLETED)
    assert (m.title, m.body, m.kind) == ("Downloaded Zxq Ink Style v2", "lora/zxq.safetensors, 144 MB, verified",
                                         "success")
    assert f"{m.title}: {m.body}" == "Downloaded Zxq Ink Style v2: lora/zxq.safetensors, 144 MB, verified"


def test_without_names_the_model_and_version_ids_stand_in():
    m = message_for({**COMPLETED, "model_name": None, "version_name": None})
    assert m.title == "Downloaded model 77 version 770"
    m = message_for({"id": 1, "event": "model_update", "ts": "x", "model_id": 4468, "version_id": 1387174,
                     "previous_version_id": 1231067, "filename": "zxq_v3.safetensors"})
    assert m.title == "New version of model 4468"
    assert m.body == "Version 1387174 is out (you had version 1231067): zxq_v3.safetensors, queued for download"


def test_a_failure_carries_the_sentence_the_gui_shows():
    error = "Civitai says this model needs a login: set civitai_api_key in config.json"
    m = message_for({"id": 2, "event": "download_failed", "ts": "x", "job_id": 4, "error": error, "model_id": 77,
                     "version_id": 770, "filename": "zxq.safetensors", "model_name": "Zxq Ink Style",
                     "version_name": "v2"})
    assert (m.title, m.kind) == ("Download failed: Zxq Ink Style v2", "failure")
    assert m.body == f"zxq.safetensors: {error}"


@pytest.mark.parametrize("event, title, words", [
    ({"event": "model_update_error", "model_id": 5, "error": "Civitai answered 503"},
     "Update check failed for model 5", "Civitai answered 503"),
    ({"event": "manifest_error", "error": "manifest.json line 3 column 9: expected ','"},
     "manifest.json edit not taken", "last good manifest stays in force"),
    ({"event": "child_fatal", "name": "worker-2", "error": "ImportError: no module named x"},
     "civitai-daemon: worker-2 given up", "kept failing at start and is not restarted: ImportError"),
    ({"event": "download_retry", "job_id": 3, "attempt": 2, "error": "connection reset", "delay_s": 4.2},
     "Retrying job #3", "Attempt 2 failed: connection reset; next try in 4 s"),
    ({"event": "download_retry", "job_id": 3, "attempt": 1, "waiting": True, "reason": "early_access",
      "error": "early access until 2026-12-04 12:00 UTC", "delay_s": 3 * 86400 + 7200},
     "Waiting: job #3", "early access until 2026-12-04 12:00 UTC; next look in 3 d 2 h"),
    ({"event": "library_scan_done", "folder": "lora", "files": 10, "matched": 8, "added": 3, "already_listed": 5,
      "unknown": ["a", "b"], "seconds": 12.4}, "Library scan done: lora", "2 unknown, in 12 s"),
    ({"event": "speed_limit_changed", "max_speed": 5_000_000, "source": "schedule"},
     "Speed limit: 4.8 MB/s", "Set by schedule"),
])
def test_each_event_a_person_may_ask_for_has_its_own_text(event, title, words):
    m = message_for({"id": 1, "ts": "x", **event})
    assert m.title == title and words in m.body


def test_an_event_without_a_text_of_its_own_still_reads():
    m = message_for({"id": 1, "ts": "x", "event": "something_new", "job_id": 3, "why": "because"})
    assert m.title == "Something new" and m.body == "job_id=3 why=because"


def test_waits_read_as_a_person_says_them():
    assert [fmt_wait(s) for s in (0, 9.6, 119, 120, 7199, 7200, 12_000, 172_799, 172_800, 3 * 86400 + 3600)] == \
        ["0 s", "10 s", "119 s", "2 min", "119 min", "2 h", "3 h 20 min", "47 h 59 min", "2 d", "3 d 1 h"]


def test_sizes_match_the_guis():
    # web/static/app.js fmtBytes: above 999 of a unit, the next (by 1024), one decimal under 100.
    assert [fmt_size(n) for n in (0, 999, 1000, 151_000_000, 7 * 1024**3, None)] == \
        ["0 B", "999 B", "1.0 KB", "144 MB", "7.0 GB", "?"]


def test_typos_in_notify_events_are_named():
    warnings = check_events(["download_complete", "download_completed", "download_progress"])
    assert len(warnings) == 2
    assert "'download_complete' is not an event" in warnings[0] and "did you mean 'download_completed'" in warnings[0]
    assert "'download_progress' is not stored" in warnings[1]


def test_the_token_parts_of_a_url_are_secrets_apprise_confirms_them():
    url = "tgram://123456789:AAHsekrit_bot_token/987654"
    sinks, problems = notify.build_sinks([url, "json://127.0.0.1:1/hook", "nosuchscheme://x"])
    assert [s.name for s in sinks] == ["notify[0] tgram://", "notify[1] json://"]
    assert problems == [problems[0]] and problems[0].startswith("notify[2] nosuchscheme://: Apprise cannot use")
    assert "nosuchscheme://x" not in problems[0]
    parts = sinks[0].secrets
    assert {url, "123456789", "AAHsekrit_bot_token"} <= parts and "987654" in parts | {"987654"}
    # What requests says when api.telegram.org cannot be reached carries the token in the path.
    leak = ("HTTPSConnectionPool(host='api.telegram.org', port=443): Max retries exceeded with url: "
            "/bot123456789:AAHsekrit_bot_token/sendMessage")
    clean = Scrubber(parts)(leak)
    assert "AAHsekrit" not in clean and "123456789" not in clean and "api.telegram.org" in clean
    # A local json:// receiver has nothing secret but the URL itself.
    assert sinks[1].secrets == {"json://127.0.0.1:1/hook"}


def test_user_password_and_long_path_segments_are_secrets():
    parts = secret_parts("ntfys://tk_user:tk_password99@ntfy.sh/my-private-topic")
    assert {"tk_user", "tk_password99", "my-private-topic"} <= parts
    assert "ntfy.sh" not in parts


def test_messages_never_carry_the_configured_secrets(tmp_path):
    from ipc.config import load_config

    api_key = "civ_" + "k" * 28
    (tmp_path / "config.json").write_text('{"civitai_api_key": "%s", "webhook_secret": "whsec_c2VjcmV0c2VjcmV0"}'
                                          % api_key)
    cfg, _ = load_config(tmp_path / "config.json")
    scrub = Scrubber(notify.log_secrets(cfg))
    error = f"Civitai refused key {api_key} at https://civitai.com/api/download/models/1?token={api_key}"
    m = message_for({"id": 1, "ts": "x", "event": "download_failed", "job_id": 1, "error": error})
    assert api_key not in scrub(m.body) and "whsec_c2VjcmV0c2VjcmV0" not in scrub("secret whsec_c2VjcmV0c2VjcmV0")


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_apprise_records_never_reach_our_log_handlers():
    # A handler on the root logger, as every process has (not caplog: pytest also hangs its
    # handler on loggers that do not propagate, which is exactly what is tested here).
    root, handler = logging.getLogger(), ListHandler()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        password = "pw-" + "s" * 20
        sinks, problems = notify.build_sinks([f"json://user:{password}@127.0.0.1:1/hook", "nosuchscheme://x-y-z"])
        ok, problem = sinks[0].send(notify.Message("t", "b", "info"), Scrubber(sinks[0].secrets))
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert not ok and "Connection error" in problem  # Apprise's own words reach us through the result
    assert [r.name for r in handler.records if r.name.startswith("apprise")] == []
    assert handler.records, "urllib3's DEBUG records show the handler was listening"
    text = "\n".join(r.getMessage() for r in handler.records) + problem + "".join(problems)
    assert password not in text and "x-y-z" not in text
