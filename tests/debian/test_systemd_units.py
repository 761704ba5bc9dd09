"""install.py's systemd units as systemd itself judges them (`systemd-analyze verify` and
`security`): needs Debian's systemd package, which .ci/run installs. A missing tool fails."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

import install
from tests.unit.test_install import make_checkout, unit_settings, write_unit

pytestmark = pytest.mark.debian


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: these tests need Debian's systemd package "
                    "(.ci/run installs it: apt-get install systemd)")
    return path


@pytest.mark.parametrize("download", ["data/models", "/srv/civitai-models"])
def test_systemd_analyze_verify_is_silent_and_security_within_3(tmp_path, download, systemd_analyze):
    checkout = make_checkout(tmp_path, config=f'{{"download_dir": "{download}"}}')
    layout = install.load_layout(str(checkout), None, "linux")
    unit = write_unit(tmp_path, layout)
    verify = subprocess.run([systemd_analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout == "" and verify.stderr == "", verify.stdout + verify.stderr
    security = subprocess.run([systemd_analyze, "security", "--offline=true", "--threshold=30", str(unit)],
                              capture_output=True, text=True, timeout=60)
    assert security.returncode == 0, security.stdout + security.stderr
    exposure = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout).group(1))
    assert exposure <= 3.0


def test_systemd_analyze_accepts_the_user_unit(tmp_path, systemd_analyze):
    checkout = make_checkout(tmp_path)
    layout = install.load_layout(str(checkout), None, "linux")
    unit = write_unit(tmp_path, layout, user_unit=True)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    verify = subprocess.run([systemd_analyze, "--user", "verify", str(unit)], capture_output=True, text=True,
                            timeout=60, env=env)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
    security = subprocess.run([systemd_analyze, "--user", "security", "--offline=true", "--threshold=30", str(unit)],
                              capture_output=True, text=True, timeout=60, env=env)
    assert security.returncode == 0, security.stdout + security.stderr
    s = unit_settings(unit.read_text())
    assert "User" not in s and s["WantedBy"] == ["default.target"]
