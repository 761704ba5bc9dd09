"""`python -m web` as the supervisor starts it: what it writes on stderr is relay lines the
supervisor reads back at each record's own level."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from ipc.control import ENV_ADDR, ENV_TOKEN
from ipc.logsetup import RELAY_PREFIX, parse_relayed_line
from tests.helpers import REPO
from tests.web.appkit import SECRET


def run_web(tmp_path, env_update: dict) -> subprocess.CompletedProcess:
    (tmp_path / "config.json").write_text(json.dumps({"jwt_secret": SECRET, "civitai_api_key": "k" * 24}))
    env = {k: v for k, v in os.environ.items() if k not in (ENV_ADDR, ENV_TOKEN)}
    env.update(env_update)
    return subprocess.run([sys.executable, "-m", "web", "--config", str(tmp_path / "config.json")], cwd=str(REPO),
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_an_error_at_boot_is_a_relay_line_at_error_level(tmp_path):
    out = run_web(tmp_path, {ENV_TOKEN: "t" * 64})
    assert out.returncode == 1, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith(RELAY_PREFIX) for line in lines), out.stderr
    records = [parse_relayed_line(line) for line in lines]
    level, name, message = records[-1]
    assert (level, name) == (logging.ERROR, "web") and ENV_ADDR in message
    assert "t" * 64 not in out.stderr and SECRET not in out.stderr


def test_a_config_error_is_one_plain_sentence(tmp_path):
    (tmp_path / "config.json").write_text('{"workers": "many"}')
    out = subprocess.run([sys.executable, "-m", "web", "--config", str(tmp_path / "config.json")], cwd=str(REPO),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert out.returncode == 78
    assert "workers" in out.stderr and not out.stderr.startswith(RELAY_PREFIX)
