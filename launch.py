"""The seed's name for the daemon's entry point (the same as `python supervisor.py`), and the
check, before anything of the daemon is imported, that this Python can run it at all.

A plain `python launch.py` runs outside the project's environment: it gets one line saying what
to run instead of an ImportError's traceback. supervisor.py imports this module first for the
same reason. Written for old Pythons too (no syntax newer than 3.6), so that they can say it.
"""
import sys

HINT = "run it with `uv run python launch.py` (or `uv run python supervisor.py`), in the project's folder"


def environment_problem():
    """Why this interpreter cannot run the daemon, as a clause; None when it can."""
    if sys.version_info < (3, 11):  # noqa: UP036 - the point: an older Python must say so
        return "Python %d.%d is too old (the daemon needs 3.11 or later)" % sys.version_info[:2]
    import importlib.metadata
    import re
    import tomllib
    from pathlib import Path

    try:
        with open(Path(__file__).resolve().with_name("pyproject.toml"), "rb") as fh:
            requirements = tomllib.load(fh)["project"]["dependencies"]
    except (OSError, KeyError, ValueError):
        return None  # not a checkout: nothing to compare with, the imports will tell
    missing = []
    for requirement in requirements:
        name = re.split(r"[^A-Za-z0-9._-]", requirement.strip(), maxsplit=1)[0]  # "requests>=2.32"
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        return "%s lacks the project's dependencies (%s)" % (sys.executable, ", ".join(missing))
    return None


def require_environment():
    problem = environment_problem()
    if problem:
        sys.stderr.write("civitai-daemon: %s; %s\n" % (problem, HINT))
        sys.exit(1)


if __name__ == "__main__":
    # supervisor.py's own `import launch` finds this module instead of checking a second time.
    sys.modules.setdefault("launch", sys.modules[__name__])
    require_environment()
    from supervisor import main

    sys.exit(main())
else:
    require_environment()  # imported first by supervisor.py
