"""The README's openssl one-liner for a LAN certificate, run as written (it needs the openssl
command, which .ci/run installs): the daemon accepts the pair it makes, for the names it says.
The other TLS tests make their certificates in-process (tests/integration/tlskit.py)."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from ipc import tlsconf

pytestmark = pytest.mark.debian
README = Path(__file__).resolve().parent.parent.parent / "README.md"


def readme_one_liner() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if "openssl req" in b and "data/tls" in b]
    assert len(found) == 1, "the README should have one bash block with the certificate's openssl one-liner"
    return found[0]


def test_the_readmes_certificate_one_liner_makes_a_pair_the_daemon_serves(tmp_path):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing: this test needs Debian's openssl package (.ci/run installs it)")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_one_liner()], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    cert, key = tmp_path / "data/tls/cert.pem", tmp_path / "data/tls/key.pem"
    tlsconf.check_pair(cert, key)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    san = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["nas.lan"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"192.168.1.10", "127.0.0.1"}
