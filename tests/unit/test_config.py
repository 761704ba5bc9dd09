"""config.json: defaults, comments, typos, types and ranges, env overrides, secrets."""
import json
import os
import stat
import subprocess
import sys

import pytest

from ipc.config import ConfigError, ensure_jwt_secret, jwt_secret, load_config
from tests.helpers import REPO


def write(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    return path


def test_missing_file_gives_every_default(tmp_path):
    cfg, warnings = load_config(tmp_path / "config.json", environ={})
    assert warnings == []
    assert (cfg.throttle, cfg.retries, cfg.workers, cfg.timeout) == (2, 3, 2, 60)
    assert cfg.download_path == (tmp_path / "data" / "models").resolve()
    assert (cfg.active_port, cfg.bind, cfg.manifest_mode, cfg.update_time) == (8000, "127.0.0.1", "replace", "04:00")
    assert cfg.civitai_url == "https://civitai.com/api/v1" and cfg.civitai_origin == "https://civitai.com"
    assert cfg.allow_unsafe is False and cfg.allowed_hosts == ()


def test_shipped_config_loads_without_warnings():
    cfg, warnings = load_config(REPO / "config.json", environ={})
    assert warnings == []
    assert cfg.civitai_api_key == "" and cfg.jwt_secret == ""  # placeholders count as empty


def test_comments_and_trailing_commas(tmp_path):
    path = write(tmp_path, '{\n  // workers\n  "workers": 4, /* more */\n  "download_dir": "/x//y",\n}\n')
    cfg, _ = load_config(path, environ={})
    assert cfg.workers == 4
    assert cfg.download_dir == "/x//y"  # "//" inside a string is not a comment


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    sub = tmp_path / "etc"
    sub.mkdir()
    write(sub, '{"download_dir": "models"}')
    monkeypatch.chdir(tmp_path)
    cfg, _ = load_config("etc/config.json", environ={})
    assert cfg.download_path == (sub / "models").resolve()
    assert cfg.manifest_path == sub / "manifest.json"
    assert cfg.db_path == sub / "data" / "daemon.db"


def test_unknown_key_is_a_warning_naming_it(tmp_path):
    cfg, warnings = load_config(write(tmp_path, '{"wrokers": 3}'), environ={})
    assert cfg.workers == 2
    assert len(warnings) == 1 and "'wrokers'" in warnings[0] and "'workers'" in warnings[0]


@pytest.mark.parametrize("key,value,needle", [
    ("workers", 0, "from 1 to 32"),
    ("workers", 33, "from 1 to 32"),
    ("workers", "2", "integer"),
    ("workers", 1.5, "integer"),
    ("throttle", -1, "number"),
    ("retries", True, "integer"),
    ("timeout", 0, "number"),
    ("active_port", 70000, "65535"),
    ("manifest_mode", "merge", "replace"),
    ("update_time", "4am", "HH:MM"),
    ("update_time", "24:00", "HH:MM"),
    ("civitai_url", "civitai.com", "URL"),
    ("webhook_url", "ftp://x", "URL"),
    ("allow_unsafe", "yes", "true or false"),
    ("allowed_hosts", "nas.local", "list"),
    ("bind", "my host", "IP address"),
    ("layout", "ComfyUI", '"comfyui"'),
    ("folders", ["loras"], "object"),
    ("folders", {"LORA": "../x"}, "'..'"),
    ("folders", {"LORA": "CON"}, "reserved"),
    ("connections", 17, "from 1 to 16"),
    ("connections", 0, "from 1 to 16"),
    ("max_speed", "fast", "20MB"),
    ("max_speed", -5, "0 or more"),
    ("max_speed", "5 i", "20MB"),
    ("speed_schedule", {"from": "08:00"}, "list"),
    ("speed_schedule", [{"from": "8am", "to": "23:00", "max_speed": 1}], "HH:MM"),
    ("speed_schedule", [{"from": "08:00", "to": "08:00", "max_speed": 1}], "other than"),
    ("speed_schedule", [{"from": "08:00", "to": "09:00"}], "max_speed"),
    ("sidecars", "on", "true or false"),
    ("preview_nsfw", 1, "true or false"),
    ("update_every", "30m", "at least"),
    ("update_every", "often", "duration"),
    ("notify_events", "download_failed", "list"),
])
def test_wrong_type_or_range_names_file_and_key(tmp_path, key, value, needle):
    path = write(tmp_path, json.dumps({key: value}))
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    message = str(err.value)
    assert str(path) in message and f"'{key}" in message and needle in message
    assert "\n" not in message


def test_new_keys_parse_rates_windows_and_durations(tmp_path):
    path = write(tmp_path, json.dumps({
        "layout": "a1111", "folders": {"LORA": "models/Lora/civitai"}, "connections": 8, "max_speed": "20MB",
        "speed_schedule": [{"from": "08:00", "to": "23:00", "max_speed": "5 MiB"},
                           {"from": "23:00", "to": "08:00", "max_speed": 0}],
        "update_every": "6h", "notify": ["json://127.0.0.1:9/x?token=abc"], "sidecars": False}))
    cfg, warnings = load_config(path, environ={})
    assert warnings == []
    assert cfg.layout == "a1111" and cfg.folders == {"LORA": "models/Lora/civitai"} and cfg.connections == 8
    assert cfg.max_speed == 20_000_000
    assert cfg.speed_schedule == ((480, 1380, 5 * 1024 * 1024), (1380, 480, 0))
    assert cfg.update_every == 6 * 3600 and cfg.sidecars is False
    public = cfg.public_dict()
    assert public["notify"] == ["***"] and "abc" not in json.dumps(public)
    assert public["speed_schedule"][0] == {"from": "08:00", "to": "23:00", "max_speed": 5 * 1024 * 1024}


def test_a_bad_notify_url_is_named_without_echoing_it(tmp_path):
    path = write(tmp_path, json.dumps({"notify": ["tgram-bot-token-123"]}))
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert "'notify'" in str(err.value) and "tgram-bot-token-123" not in str(err.value)


def test_config_changes_tell_live_keys_from_restart_keys(tmp_path):
    from ipc.config import config_changes

    old, _ = load_config(write(tmp_path, '{"throttle": 2, "workers": 2}'), environ={})
    new, _ = load_config(write(tmp_path, '{"throttle": 5, "workers": 3, "max_speed": "1MB"}'), environ={})
    live, restart = config_changes(old, new)
    assert sorted(live) == ["max_speed", "throttle"] and restart == ["workers"]


def test_syntax_error_gives_line_and_column(tmp_path):
    path = write(tmp_path, '{\n  "workers": 2\n  "retries": 1\n}')
    with pytest.raises(ConfigError, match=r"line 3, column 3"):
        load_config(path, environ={})


def test_env_overrides_and_short_secret_refused(tmp_path):
    path = write(tmp_path, '{"civitai_api_key": "file-key", "jwt_secret": ""}')
    cfg, _ = load_config(path, environ={"CIVITAI_API_KEY": "env-key", "CIVITAI_JWT_SECRET": "s" * 40})
    assert cfg.civitai_api_key == "env-key" and cfg.jwt_secret == "s" * 40
    with pytest.raises(ConfigError, match="shorter than 32 bytes") as err:
        load_config(path, environ={"CIVITAI_JWT_SECRET": "short-secret-value"})
    assert "short-secret-value" not in str(err.value)


def test_secrets_never_in_repr_or_public_dict(tmp_path):
    path = write(tmp_path, json.dumps({"civitai_api_key": "k" * 40, "jwt_secret": "j" * 40, "webhook_secret": "w" * 12}))
    cfg, _ = load_config(path, environ={})
    text = repr(cfg) + json.dumps(cfg.public_dict())
    assert "k" * 40 not in text and "j" * 40 not in text and "w" * 12 not in text
    assert cfg.public_dict()["civitai_api_key"] == "***"


def test_generated_jwt_secret_is_created_once_with_mode_0600(tmp_path):
    cfg, _ = load_config(tmp_path / "config.json", environ={})
    assert jwt_secret(cfg) == ""
    first = ensure_jwt_secret(cfg)
    assert len(first) >= 32 and ensure_jwt_secret(cfg) == first == jwt_secret(cfg)
    assert stat.S_IMODE(os.stat(cfg.jwt_secret_path).st_mode) == 0o600


def run_check(tmp_path, config_text, manifest_text="[]"):
    (tmp_path / "config.json").write_text(config_text)
    (tmp_path / "manifest.json").write_text(manifest_text)
    return subprocess.run([sys.executable, str(REPO / "supervisor.py"), "check", "--config", str(tmp_path / "config.json")],
                          capture_output=True, text=True, timeout=60)


def test_check_command_exit_codes(tmp_path):
    ok = run_check(tmp_path, '{"workers": 2, // fine\n}')
    assert ok.returncode == 0, ok.stderr
    bad = run_check(tmp_path, '{"workers": "many"}')
    assert bad.returncode == 78
    assert "config.json" in bad.stderr and "'workers'" in bad.stderr and "many" in bad.stderr
    broken = run_check(tmp_path, "{}", '[{"modelId": 1, "model_type": "Check/../Point"}]')
    assert broken.returncode == 78
    assert "manifest.json" in broken.stderr and "entry 0" in broken.stderr and "'model_type'" in broken.stderr
