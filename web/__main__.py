"""`python -m web --config PATH`: the web process, a fresh interpreter the supervisor starts.
With tls_cert/tls_key it serves HTTPS only (GUI, REST and WebSocket alike).

gevent must patch the standard library before anything else imports it (sockets, threading,
logging's locks), so the patch comes first and every other import waits until after it.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

EX_CONFIG = 78
CERT_CHECK_S = 60.0  # how often the certificate's files are looked at for a renewal
EXPIRY_CHECK_S = 86400.0  # how often its end date is looked at


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m web", description="Civitai daemon web process")
    parser.add_argument("--config", default="config.json", help="path to config.json")
    # How often the certificate's files are looked at (tests set a second).
    parser.add_argument("--cert-check-s", type=float, default=CERT_CHECK_S, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def log_secrets(cfg, control_token: str) -> tuple[str, ...]:
    """What the log filter must never let through: every secret this process can see."""
    from ipc.config import jwt_secret

    return (cfg.civitai_api_key, jwt_secret(cfg), cfg.webhook_secret, control_token, *cfg.notify)


def open_store(path, deadline_s: float = 10.0):
    """The job store, read-only; the supervisor creates it before starting us, but wait a little."""
    from ipc.store import JobStore

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return JobStore(path, readonly=True)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def watch_parent(on_gone) -> None:
    """The supervisor holds our stdin pipe open; EOF means it died (even by kill -9), and a web
    process left behind would keep the port from the next start."""
    import stat

    import gevent
    from gevent.socket import wait_read

    try:
        fd = sys.stdin.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
    except (OSError, ValueError, AttributeError):
        return

    def watch():
        while True:
            try:
                wait_read(fd)
                if not os.read(fd, 4096):
                    break
            except OSError:
                break
        on_gone()

    gevent.spawn(watch)


def watch_certificate(cfg, ssl_context, every_s: float = CERT_CHECK_S) -> None:
    """A renewed certificate (certbot, a cron job) is taken without a restart: when the PEM files
    change and the new pair is good, new connections get it; a bad pair is reported and the old
    one stays. A daemon runs for months, a certificate often for 90 days."""
    import gevent

    from ipc import tlsconf
    from ipc.config import ConfigError

    log = logging.getLogger("web.tls")
    files = [cfg.tls_cert_path] + ([cfg.tls_key_path] if cfg.tls_key else [])

    def stamp() -> list:
        out: list = []
        for path in files:
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return out

    def report_expiry():
        problem = tlsconf.expiry_problem(cfg)
        if problem:
            log.warning("%s", problem)

    def watch():
        seen = stamp()
        next_expiry_check = time.monotonic() + EXPIRY_CHECK_S
        while True:
            gevent.sleep(every_s)
            if time.monotonic() >= next_expiry_check:  # a daemon runs for months: say it in time
                next_expiry_check = time.monotonic() + EXPIRY_CHECK_S
                report_expiry()
            now = stamp()
            if now == seen:
                continue
            seen = now
            try:
                tlsconf.server_context(cfg)  # the whole check first: a half-written file is not taken
                key = cfg.tls_key_path if cfg.tls_key else cfg.tls_cert_path
                ssl_context.load_cert_chain(str(cfg.tls_cert_path), str(key))
            except (ConfigError, OSError, ValueError) as exc:
                log.warning("the changed certificate is not taken (the one in use stays): %s", exc)
                continue
            log.info("certificate %s reloaded", cfg.tls_cert_path)
            report_expiry()

    report_expiry()
    gevent.spawn(watch)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = logging.getLogger("web")

    import gevent

    from ipc import tlsconf
    from ipc.config import ConfigError, load_config
    from ipc.control import ENV_ADDR, ENV_TOKEN, ControlClient
    from ipc.logsetup import setup_relayed_logging
    from web.app import make_app
    from web.hub import Hub
    from web.ws import make_server

    try:
        cfg, _warnings = load_config(args.config)  # the supervisor already reported the warnings
        ssl_context = tlsconf.server_context(cfg)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)  # before logging: the secrets to filter are not known yet
        return EX_CONFIG
    addr, token = os.environ.get(ENV_ADDR, ""), os.environ.get(ENV_TOKEN, "")
    # Each record a relay line on stderr: the supervisor writes it to the log at its own level.
    setup_relayed_logging(log_secrets(cfg, token))
    if not addr or not token:
        log.error("%s and %s must be set (the supervisor starts this process)", ENV_ADDR, ENV_TOKEN)
        return 1
    try:
        store = open_store(cfg.db_path)
    except Exception as exc:
        log.error("cannot open the job store %s: %s", cfg.db_path, exc)
        return 1
    control = ControlClient(addr, token)
    hub = Hub(store, control.subscribe)
    app = make_app(cfg, store, control, hub)
    try:
        server = make_server(cfg, app, ssl_context=ssl_context)
        server.init_socket()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", cfg.bind, cfg.active_port, exc)
        return 1
    if ssl_context is not None:
        watch_certificate(cfg, ssl_context, args.cert_check_s)

    def stop(signame: str) -> None:
        log.info("%s received; stopping", signame)
        hub.stop()
        gevent.spawn(server.stop, timeout=3)

    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            gevent.signal_handler(signum, stop, signum.name)
        except (AttributeError, ValueError):  # Windows: no libev signal watchers
            signal.signal(signum, lambda num, _frame: stop(signal.Signals(num).name))

    watch_parent(lambda: stop("end of stdin (the supervisor is gone)"))
    hub.start()
    log.info("listening on %s://%s:%s", "https" if ssl_context else "http", cfg.bind, cfg.active_port)
    server.serve_forever()
    store.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
