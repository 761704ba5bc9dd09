"""`python launch.py` outside uv's environment: one line saying what to run, exit 1."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO

HINT = "uv run python launch.py"


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=str(REPO), capture_output=True, text=True, timeout=60)


def test_a_python_without_the_dependencies_gets_one_line_and_exit_1():
    # This very interpreter without its site-packages (-S) or PYTHON* variables (-E): the standard
    # library alone, whatever the machine's other Pythons have installed.
    out = run(sys.executable, "-E", "-S", "launch.py")
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and HINT in lines[0] and "uv run python supervisor.py" in lines[0], out.stderr
    assert "requests" in lines[0] and "Traceback" not in out.stderr


def test_the_same_for_every_subcommand(tmp_path):
    out = run(sys.executable, "-E", "-S", "launch.py", "check", "--config", str(tmp_path / "config.json"))
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and HINT in out.stderr, out.stderr


def test_in_the_environment_it_runs_the_daemon(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"workers": 1}))
    out = run(sys.executable, "launch.py", "check", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert f"{config}: ok" in out.stdout and HINT not in out.stderr
