"""The command line for scripts and shells (`supervisor.py add`, `status`): they talk to the running
daemon's REST API with a short-lived token made on the spot from the configured secret."""
from __future__ import annotations

import sys
import time
from datetime import UTC, datetime

from ipc.config import Config, jwt_secret
from ipc.links import parse_model_ref

TOKEN_DAYS = 5 / 1440  # five minutes: enough for one command


class CliError(Exception):
    """One sentence for stderr; the command exits 1."""


class DaemonAPI:
    def __init__(self, cfg: Config, timeout_s: float = 10.0):
        import requests

        self.cfg = cfg
        host = "127.0.0.1" if cfg.bind in ("0.0.0.0", "::", "localhost") else cfg.bind
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if cfg.tls_cert else "http"
        self.base = f"{scheme}://{host}:{cfg.active_port}"
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.session.trust_env = False  # an http_proxy must never see our token
        self.last_status = 0
        if cfg.tls_cert:
            # Our own certificate is the trust anchor; its name is the LAN name, not 127.0.0.1.
            # requests hands `verify` to every connection pool (certifi's CAs when it is True), so
            # the pin must be there as well as in the adapter.
            self.session.verify = str(cfg.tls_cert_path)
            self.session.mount("https://", _PinnedCertAdapter(cfg))

    def _token(self) -> str:
        from ipc.tokens import mint_token

        secret = jwt_secret(self.cfg)
        if not secret:
            raise CliError(f"no daemon has run with {self.cfg.config_path} yet (no JWT secret in "
                           f"{self.cfg.jwt_secret_path}); start it with `uv run python supervisor.py`")
        return mint_token(secret, days=TOKEN_DAYS)

    def call(self, method: str, path: str, **kw) -> dict:
        import requests

        headers = {"Authorization": f"Bearer {self._token()}"}
        try:
            resp = self.session.request(method, self.base + path, headers=headers, timeout=self.timeout_s, **kw)
        except requests.ConnectionError:
            raise CliError(f"no daemon is running on {self.base} (start it with `uv run python supervisor.py`)") from None
        except requests.RequestException as exc:
            raise CliError(f"the daemon on {self.base} did not answer: {type(exc).__name__}") from None
        try:
            body = resp.json()
        except ValueError:
            body = {}
        self.last_status = resp.status_code
        if resp.status_code >= 400:
            raise CliError(f"the daemon refused: {body.get('error') or f'HTTP {resp.status_code}'}")
        return body


def _PinnedCertAdapter(cfg: Config):
    """An HTTPS adapter that trusts exactly the daemon's certificate (and the chain in its file),
    whatever name it carries."""
    from requests.adapters import HTTPAdapter

    from ipc.tlsconf import client_context

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            kwargs["ssl_context"] = client_context(cfg)
            kwargs["assert_hostname"] = False
            return super().init_poolmanager(*args, **kwargs)

    return Adapter()


def fmt_bytes(n) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def job_line(job: dict) -> str:
    name = job.get("model_name") or f"model {job.get('model_id') or '?'}"
    if job.get("version_name"):
        name += f" {job['version_name']}"
    where = f"{job['model_type']}/{job['filename']}" if job.get("model_type") and job.get("filename") else \
        job.get("model_type") or "folder not known yet"
    line = f"#{job['id']} {name} ({where}) {job['state']}"
    done, total, speed = job.get("bytes_done") or 0, job.get("bytes_total"), job.get("speed_bps") or 0
    if job["state"] in ("downloading", "verifying") and total:
        line += f" {100 * done / total:.0f}% of {fmt_bytes(total)}"
        if speed:
            line += f" · {fmt_bytes(speed)}/s · {fmt_duration((total - done) / speed)} left"
    if job.get("not_before"):
        line += f" · waits until {job['not_before']}"
    if job.get("error") and job["state"] in ("failed", "queued"):
        line += f"\n    {job['error']}"
    return line


def _when(iso: str | None, now: float) -> str:
    if not iso:
        return "never"
    try:
        ts = datetime.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return iso
    delta = ts - now
    return f"{iso[:16].replace('T', ' ')} UTC ({'in ' + fmt_duration(delta) if delta > 0 else fmt_duration(-delta) + ' ago'})"


def cmd_status(cfg: Config, out=sys.stdout) -> int:
    api = DaemonAPI(cfg)
    status = api.call("GET", "/api/status")
    now = time.time()
    health = status.get("health", "ok")
    print(f"civitai-daemon {status.get('version')} on {api.base}: up {fmt_duration(status.get('uptime_s') or 0)}, "
          f"{health}{' (' + status['degraded'] + ')' if status.get('degraded') else ''}"
          f"{', all downloads paused' if status.get('paused') else ''}", file=out)
    parts = []
    for c in status.get("children", []):
        extra = f", job {c['job_id']}" if c.get("job_id") else ""
        parts.append(f"{c['name']} {c['state']}" + (f" (pid {c['pid']}{extra})" if c.get("pid") else ""))
    print("children: " + " · ".join(parts), file=out)
    queue = status.get("queue", {})
    print("jobs: " + ", ".join(f"{n} {state}" for state, n in queue.items() if n) if any(queue.values())
          else "jobs: none", file=out)
    active = api.call("GET", "/api/jobs?state=downloading,verifying,queued,paused&limit=50").get("jobs", [])
    total_speed = sum(j.get("speed_bps") or 0 for j in active if j["state"] in ("downloading", "verifying"))
    for job in sorted(active, key=lambda j: (j["state"] not in ("downloading", "verifying"), j["priority"], j["id"])):
        print("  " + job_line(job), file=out)
    if total_speed:
        print(f"speed: {fmt_bytes(total_speed)}/s", file=out)
    updater = status.get("updater", {})
    print(f"updates: last check {_when(updater.get('last_check'), now)}, next {_when(updater.get('next_check'), now)}"
          + (" (checking now)" if updater.get("running") else ""), file=out)
    if status.get("manifest_error"):
        print(f"manifest.json: {status['manifest_error']}", file=out)
    return 0


def cmd_add(cfg: Config, ref: str, folder: str | None, priority: int | None, out=sys.stdout) -> int:
    from ipc.naming import FolderError, check_folder

    try:
        parsed = parse_model_ref(ref)
    except ValueError as exc:
        raise CliError(str(exc).replace("'url'", "the link")) from None
    body: dict = dict(parsed)
    if folder:
        try:
            body["model_type"] = check_folder(folder)
        except FolderError as exc:
            raise CliError(f"--folder {exc}") from None
    if priority is not None:
        body["priority"] = priority
    api = DaemonAPI(cfg)
    job = api.call("POST", "/api/jobs", json=body)["job"]
    print(("queued " if api.last_status == 201 else "already queued: ") + job_line(job), file=out)
    return 0


# --- `supervisor.py import [FOLDER] [--dry-run]` ------------------------------------------------

EX_CONFIG = 78
SCAN_POLL_S = 0.25
PLAIN_LINE_EVERY_S = 5.0  # not a terminal (a log, a pipe): one progress line this often


def _gb(n) -> str:
    return f"{(n or 0) / 1e9:.2f} GB"


class ScanProgress:
    """The progress of a scan on stderr: one line redrawn with \\r on a terminal, a line every
    few seconds otherwise. Speed and time left come from the bytes hashed over the last seconds."""

    def __init__(self, stream=None, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock = clock
        self.samples: list[tuple[float, int]] = []
        self.last_plain = clock()  # a scan shorter than PLAIN_LINE_EVERY_S prints only its summary
        self.width = 0

    def line(self, scan: dict) -> str:
        now = self.clock()
        done, total = int(scan.get("bytes_done") or 0), int(scan.get("bytes_total") or 0)
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > 5:
            self.samples.pop(0)
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        rate = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        files = f"{scan.get('files_done', 0)}/{scan.get('files_total', 0)} files"
        if scan.get("files_total") and scan.get("files_done") == scan.get("files_total") and total == done:
            return f"{files} hashed · asking Civitai which files these are…"
        text = f"hashing {files} · {_gb(done)} of {_gb(total)}"
        if rate > 0:
            text += f" · {rate / 1e9:.2f} GB/s · {fmt_duration((total - done) / rate)} left"
        return text

    def update(self, scan: dict) -> None:
        text = self.line(scan)
        if self.tty:
            pad = max(0, self.width - len(text))
            self.width = len(text)
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
        elif self.clock() - self.last_plain >= PLAIN_LINE_EVERY_S:
            self.last_plain = self.clock()
            print(text, file=self.stream, flush=True)

    def finish(self) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def scan_summary(scan: dict, where: str) -> str:
    """What an import did, for a person: matched and added, already listed, each unknown and
    differing file, what was skipped."""
    dry = bool(scan.get("dry_run"))
    added = scan.get("added", 0)
    lines = [f"{where}: {scan.get('files_total', 0)} model file(s); {scan.get('matched', 0)} known on Civitai; "
             f"{added} {'would be added' if dry else 'added'} to manifest.json; "
             f"{scan.get('already_listed', 0)} already listed"]
    unknown, differs, skipped = scan.get("unknown") or [], scan.get("differs") or [], scan.get("skipped") or []
    if unknown:
        lines.append(f"unknown on Civitai ({len(unknown)}), left as they are:")
        lines += [f"  {p}" for p in unknown]
    if differs:
        lines.append(f"different from the file their manifest entry names ({len(differs)}), left as they are:")
        lines += [f"  {p}" for p in differs]
    if skipped:
        lines.append(f"skipped ({len(skipped)}):")
        lines += [f"  {p}: {why}" for p, why in skipped]
    if dry:
        lines.append("dry run: manifest.json was not changed")
    lines.append(f"took {float(scan.get('seconds') or 0):.1f} s")
    return "\n".join(lines)


def _scan_through_daemon(api: DaemonAPI, folder: str | None, dry_run: bool, progress: ScanProgress,
                         sleep=time.sleep) -> dict:
    """POST /api/library/scan, then GET it every SCAN_POLL_S until it is done or failed. A scan
    already running (409) is followed instead."""
    try:
        api.call("POST", "/api/library/scan", json={"folder": folder, "dry_run": dry_run})
    except CliError:
        if api.last_status != 409:
            raise
        print("a scan is already running in the daemon; showing it", file=progress.stream)
    while True:
        scan = api.call("GET", "/api/library/scan").get("scan") or {}
        if scan.get("state") in ("done", "failed"):
            return scan
        progress.update(scan)
        sleep(SCAN_POLL_S)


def cmd_import(config_path: str, folder: str | None, dry_run: bool, *, run_here, out=sys.stdout,
               err=sys.stderr, cwd=None) -> int:
    """With no daemon running (data/daemon.pid not locked), the import runs in this process
    (`run_here`, workers.library.import_here) holding that lock, so no daemon starts meanwhile;
    with one, through its API (the supervisor stays the only writer of manifest.json)."""
    from pathlib import Path

    from ipc.config import ConfigError, load_config
    from ipc.files import PidLock
    from ipc.library import LibraryError, scan_folder
    from ipc.manifest import ManifestError
    from ipc.store import StoreOpenError, StoreUnavailable

    try:
        cfg, warnings = load_config(config_path)
    except ConfigError as exc:
        print(exc, file=err)
        return EX_CONFIG
    for warning in warnings:
        print(f"warning: {warning}", file=err)
    cwd = Path.cwd() if cwd is None else Path(cwd)
    progress = ScanProgress(err)
    lock = PidLock(cfg.data_dir / "daemon.pid")
    try:
        holder = lock.acquire()
    except OSError as exc:
        print(f"civitai-daemon: cannot use the data folder {cfg.data_dir}: {exc.strerror or exc}", file=err)
        return 1
    try:
        if holder is None:
            scan = run_here(cfg, folder, dry_run, progress=progress.update, cwd=cwd)
        else:
            rel = scan_folder(cfg.download_path, folder, cwd)
            api = DaemonAPI(cfg)
            try:
                scan = _scan_through_daemon(api, rel, dry_run, progress)
            except CliError as exc:
                if api.last_status:
                    raise
                raise CliError(f"{exc}; yet {cfg.data_dir / 'daemon.pid'} is held by pid {holder} (a daemon that "
                               f"is starting or stopping, or another import): try again when it is done") from None
    except LibraryError as exc:
        progress.finish()
        print(f"civitai-daemon: {exc}", file=err)
        return 1
    except ManifestError as exc:
        progress.finish()
        print(f"civitai-daemon: {exc}; manifest.json is never overwritten while it is broken: fix it (see "
              f"`supervisor.py check`), then run the import again; nothing was imported", file=err)
        return EX_CONFIG
    except (StoreOpenError, StoreUnavailable) as exc:
        progress.finish()
        print(f"civitai-daemon: {exc}", file=err)
        return 1
    except CliError as exc:
        progress.finish()
        print(f"civitai-daemon: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        progress.finish()
        where = ("the scan goes on in the daemon" if holder is not None
                 else "the hashes so far are kept: the next import goes on from there")
        print(f"civitai-daemon: interrupted; {where}", file=err)
        return 130
    finally:
        lock.release()
    progress.finish()
    where = str(cfg.download_path / scan["folder"]) if scan.get("folder") else str(cfg.download_path)
    if scan.get("state") != "done":
        print(f"civitai-daemon: the import of {where} failed: {scan.get('error') or 'unknown error'}", file=err)
        return 1
    print(scan_summary(scan, where), file=out)
    return 0
