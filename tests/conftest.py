"""Shared fixtures: the fake Civitai and the daemon harness."""
from __future__ import annotations

import pytest

from tests.helpers import Daemon


@pytest.fixture
def daemon_factory(tmp_path):
    """Make daemons in tmp_path; every one is stopped (and its whole tree killed) afterwards."""
    made: list[Daemon] = []

    def make(config, manifest=None, folder=None, env=None) -> Daemon:
        daemon = Daemon(folder or tmp_path / f"d{len(made)}", config, [] if manifest is None else manifest, env=env)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.cleanup()


from tests.fakeciv import fake_civitai  # noqa: E402,F401  (fixture)
