"""The bootstrap every forked child (worker, updater) runs first, on Linux and Windows alike."""
from __future__ import annotations

import logging
import os


def child_entry(target, name, conn, config_path, log_channel, inherited_fds=()):
    """Runs in the child: drop what fork copied of the supervisor's own pipes and sockets (a
    copy held here would hide a sibling's or the supervisor's death from the other end), then
    run, reporting a crash at boot through the pipe so the supervisor can name it."""
    for fd in inherited_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    if inherited_fds:  # forked: the supervisor's log file is its own (the child logs through its queue)
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
                handler.close()  # through its object: a descriptor closed by number could be reused
    try:
        target(name, conn, config_path, log_channel)
    except BaseException as exc:
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        logging.getLogger(name).exception("%s crashed", name)
        try:
            conn.send({"type": "fatal", "error": f"{type(exc).__name__}: {exc}"})
        except Exception:
            pass
        raise
