"""The `env` fixture: the web app in-process over a real job store (see tests/web/appkit.py)."""
from __future__ import annotations

import pytest

from tests.web.appkit import make_env


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path)
    yield e
    e.close()
