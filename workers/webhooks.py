"""The webhook delivery process: `python -m workers.webhooks --config PATH`.

A fresh interpreter started by the supervisor, not a thread inside it: an HTTP client (TLS,
DNS, SQLite) running in the supervisor's threads could hold a C-level lock at the moment a
worker is forked, and the worker would inherit it locked. Here a slow or dead receiver costs
only this process. It owns the delivery marks of the event log; the supervisor owns the events.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

POLL_S = 0.5  # how often the event log is looked at for new events
READY_LINE = "@ready"  # tells the supervisor (reading our stderr) that we booted


def main(argv=None) -> int:
    from ipc.config import EX_CONFIG, ConfigError, load_config
    from ipc.logsetup import RedactingFilter
    from ipc.webhooks import WebhookSender

    parser = argparse.ArgumentParser(prog="python -m workers.webhooks")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    try:
        cfg, _ = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter((cfg.webhook_secret, cfg.civitai_api_key, cfg.jwt_secret)))
    logging.basicConfig(level=logging.INFO, handlers=[handler])

    finish = threading.Event()

    def on_signal(signum, frame):
        finish.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle

    def watch_parent():
        # The supervisor holds our stdin open; EOF means it is gone, even after kill -9.
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        finish.set()

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    sender = WebhookSender(cfg, cfg.db_path)
    sender.start()
    print(READY_LINE, file=sys.stderr, flush=True)
    while not finish.wait(POLL_S):
        sender.notify()
    sender.stop(timeout_s=2.0)  # what is queued (daemon_stopping too) goes out first
    return 0


if __name__ == "__main__":
    sys.exit(main())
