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
