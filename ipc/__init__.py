"""What the daemon's processes agree on: config, states, messages, job store, control socket.

Nothing here imports supervisor.py, workers/, web/, gevent or bottle.
"""
from __future__ import annotations

import tomllib
from pathlib import Path


def _read_version() -> str:
    """pyproject.toml is the one place the version is written."""
    try:
        data = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
        return str(data["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


VERSION = _read_version()
