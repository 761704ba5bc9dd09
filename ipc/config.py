"""config.json: defaults, validation, environment overrides and the paths derived from it."""
from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ipc import jsonc

EX_CONFIG = 78
PLACEHOLDER_RE = re.compile(r"^\s*<[^>]*>\s*$")
JWT_SECRET_MIN_BYTES = 32
SECRET_KEYS = ("civitai_api_key", "jwt_secret", "webhook_secret", "notify")
# What SIGHUP cannot change in a running daemon (SPEC §2): the log names them.
RESTART_KEYS = ("workers", "active_port", "bind", "download_dir", "tls_cert", "tls_key")
DEFAULT_NOTIFY_EVENTS = ("download_completed", "download_failed", "model_update", "model_update_error",
                         "manifest_error", "child_fatal")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b(?:/s|ps)?)?\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$", re.IGNORECASE)


class ConfigError(Exception):
    """A problem the user must fix in a file; str() is one line naming file, place and key."""


def _is_placeholder(value: str) -> bool:
    return not value.strip() or bool(PLACEHOLDER_RE.match(value))


@dataclass(frozen=True)
class Config:
    webhook_url: str = ""
    webhook_secret: str = field(default="", repr=False)
    throttle: float = 2.0
    retries: int = 3
    workers: int = 2
    timeout: float = 60.0
    download_dir: str = "data/models"
    active_port: int = 8000
    bind: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    civitai_api_key: str = field(default="", repr=False)
    jwt_secret: str = field(default="", repr=False)
    civitai_url: str = "https://civitai.com/api/v1"
    manifest_mode: str = "replace"
    update_time: str = "04:00"
    allow_unsafe: bool = False
    layout: str = "plain"
    folders: dict = field(default_factory=dict)  # Civitai type -> folder (relative to download_dir)
    sidecars: bool = True
    preview_nsfw: bool = False
    connections: int = 4
    max_speed: int = 0  # bytes per second across all workers; 0: no cap
    speed_schedule: tuple = ()  # (from_minute, to_minute, bytes_per_s) windows, local time
    notify: tuple[str, ...] = field(default=(), repr=False)  # Apprise URLs: they hold tokens
    notify_events: tuple[str, ...] = DEFAULT_NOTIFY_EVENTS
    tls_cert: str = ""
    tls_key: str = ""
    update_every: float = 0.0  # seconds between update checks instead of the daily update_time; 0: daily
    # Where the file was; every relative path resolves against its folder.
    config_path: Path = field(default=Path("config.json"), compare=False)

    @property
    def base_dir(self) -> Path:
        return self.config_path.parent

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @functools.cached_property
    def download_path(self) -> Path:
        """Resolved once (the supervisor asks for it per finished file)."""
        path = Path(self.download_dir)
        return (path if path.is_absolute() else self.base_dir / path).resolve()

    @property
    def manifest_path(self) -> Path:
        return self.base_dir / "manifest.json"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "daemon.db"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / "daemon.log"

    @property
    def locks_dir(self) -> Path:
        return self.data_dir / "locks"

    @property
    def tls_cert_path(self) -> Path:
        return self.base_dir / self.tls_cert if self.tls_cert else Path()

    @property
    def tls_key_path(self) -> Path:
        return self.base_dir / self.tls_key if self.tls_key else Path()

    @property
    def jwt_secret_path(self) -> Path:
        return self.data_dir / "jwt_secret"

    @property
    def max_attempts(self) -> int:
        return self.retries + 1

    @property
    def civitai_origin(self) -> str:
        parts = urlsplit(self.civitai_url)
        return f"{parts.scheme}://{parts.netloc}"

    def public_dict(self) -> dict:
        """The config as the API shows it: secrets that are set become "***"."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "config_path":
                continue
            value = getattr(self, f.name)
            if f.name == "notify":
                value = ["***"] * len(value)
            elif f.name in SECRET_KEYS:
                value = "***" if value else ""
            elif f.name == "speed_schedule":
                value = [{"from": _hhmm(a), "to": _hhmm(b), "max_speed": bps} for a, b, bps in value]
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out


def _check(name: str, value, expect: str, ok: bool):
    if not ok:
        raise ValueError(f"key '{name}': expected {expect}, got {value!r}")


def _number(name, value, lo, hi, integer=False):
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        is_num = is_num and float(value).is_integer()
    kind = "an integer" if integer else "a number"
    _check(name, value, f"{kind} from {lo} to {hi}", is_num and lo <= value <= hi)
    return int(value) if integer else float(value)


def _string(name, value):
    _check(name, value, "a string", isinstance(value, str))
    return value


def _url(name, value, allow_empty):
    _string(name, value)
    if allow_empty and not value.strip():
        return ""
    parts = urlsplit(value.strip())
    _check(name, value, "an http:// or https:// URL", parts.scheme in ("http", "https") and bool(parts.netloc))
    return value.strip().rstrip("/")


_VALIDATORS = {
    "webhook_url": lambda v: _url("webhook_url", v, allow_empty=True),
    "webhook_secret": lambda v: _string("webhook_secret", v),
    "throttle": lambda v: _number("throttle", v, 0, 3600),
    "retries": lambda v: _number("retries", v, 0, 100, integer=True),
    "workers": lambda v: _number("workers", v, 1, 32, integer=True),
    "timeout": lambda v: _number("timeout", v, 1, 7 * 24 * 3600),
    "download_dir": lambda v: _check("download_dir", v, "a non-empty path", isinstance(v, str) and bool(v.strip()))
    or v.strip(),
    "active_port": lambda v: _number("active_port", v, 1, 65535, integer=True),
    "bind": lambda v: _bind(v),
    "allowed_hosts": lambda v: _hosts(v),
    "civitai_api_key": lambda v: _string("civitai_api_key", v),
    "jwt_secret": lambda v: _string("jwt_secret", v),
    "civitai_url": lambda v: _url("civitai_url", v, allow_empty=False),
    "manifest_mode": lambda v: _check("manifest_mode", v, '"replace" or "append"', v in ("replace", "append")) or v,
    "update_time": lambda v: _update_time(v),
    "allow_unsafe": lambda v: _bool("allow_unsafe", v),
    "layout": lambda v: _check("layout", v, '"plain", "comfyui" or "a1111"', v in ("plain", "comfyui", "a1111")) or v,
    "folders": lambda v: _folders(v),
    "sidecars": lambda v: _bool("sidecars", v),
    "preview_nsfw": lambda v: _bool("preview_nsfw", v),
    "connections": lambda v: _number("connections", v, 1, 16, integer=True),
    "max_speed": lambda v: parse_rate("max_speed", v),
    "speed_schedule": lambda v: _speed_schedule(v),
    "notify": lambda v: _notify(v),
    "notify_events": lambda v: _strings("notify_events", v),
    "tls_cert": lambda v: _string("tls_cert", v).strip(),
    "tls_key": lambda v: _string("tls_key", v).strip(),
    "update_every": lambda v: _update_every(v),
}


def _bool(name, value):
    _check(name, value, "true or false", isinstance(value, bool))
    return value


def _strings(name, value):
    ok = isinstance(value, list) and all(isinstance(x, str) and x.strip() for x in value)
    _check(name, value, "a list of strings", ok)
    return tuple(x.strip() for x in value)


def _notify(value):
    if isinstance(value, str):  # one URL is a list of one
        value = [value] if value.strip() else []
    ok = isinstance(value, list) and all(isinstance(x, str) and "://" in x for x in value)
    if not ok:
        # The URLs hold tokens: say what is wrong without echoing them.
        raise ValueError("key 'notify': expected a list of Apprise URLs such as \"tgram://…\" or \"json://…\"")
    return tuple(x.strip() for x in value)


def _folders(value):
    from ipc.naming import FolderError, check_folder

    _check("folders", value, 'an object such as {"LORA": "loras/civitai"}', isinstance(value, dict))
    out = {}
    for key, folder in value.items():
        if not key.strip():
            raise ValueError("key 'folders': a Civitai model type (such as \"LORA\") is empty")
        try:
            out[key.strip()] = check_folder(folder)
        except FolderError as exc:
            raise ValueError(f"key 'folders.{key}': {exc}") from None
    return out


def parse_rate(name: str, value) -> int:
    """Bytes per second from a number or a string such as "20MB", "5 MiB", "800k", "2.5 MB/s"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check(name, value, "0 or more bytes per second", value >= 0)
        return int(value)
    m = _RATE_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"key '{name}': expected bytes per second or a size such as \"20MB\" or \"5 MiB\", "
                         f"got {value!r}")
    number, prefix, binary = float(m.group(1)), m.group(2).lower(), bool(m.group(3))
    if binary and not prefix:
        raise ValueError(f"key '{name}': expected a size such as \"20MB\" or \"5 MiB\", got {value!r}")
    power = "kmgt".index(prefix) + 1 if prefix else 0
    return int(number * (1024 if binary else 1000) ** power)


def _minutes(name, value) -> int:
    ok = isinstance(value, str) and re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value) is not None
    _check(name, value, 'a 24-hour time "HH:MM"', ok)
    return int(value[:2]) * 60 + int(value[3:5])


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _speed_schedule(value):
    _check("speed_schedule", value, 'a list of {"from": "HH:MM", "to": "HH:MM", "max_speed": …}',
           isinstance(value, list))
    out = []
    for i, window in enumerate(value):
        where = f"speed_schedule[{i}]"
        _check(where, window, 'an object {"from": "HH:MM", "to": "HH:MM", "max_speed": …}',
               isinstance(window, dict) and {"from", "to", "max_speed"} <= set(window))
        start, end = _minutes(f"{where}.from", window["from"]), _minutes(f"{where}.to", window["to"])
        _check(f"{where}.to", window["to"], "a time other than its 'from'", start != end)
        out.append((start, end, parse_rate(f"{where}.max_speed", window["max_speed"])))
    return tuple(out)


def parse_duration(name: str, value) -> float:
    """Seconds from a string such as "6h", "90m", "1d" or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = _DURATION_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"key '{name}': expected a duration such as \"6h\", \"90m\" or \"1d\", got {value!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2).lower()]


def _update_every(value):
    if isinstance(value, str) and not value.strip():
        return 0.0
    seconds = parse_duration("update_every", value)
    _check("update_every", value, 'at least "1h" (or "" for the daily update_time)', seconds >= 3600)
    return seconds


def config_changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """What a reload changes: (keys that take effect live, keys that need a restart)."""
    live: list[str] = []
    restart: list[str] = []
    for f in dataclasses.fields(Config):
        if f.name == "config_path" or getattr(old, f.name) == getattr(new, f.name):
            continue
        (restart if f.name in RESTART_KEYS else live).append(f.name)
    return live, restart


def _bind(value):
    _string("bind", value)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        _check("bind", value, "an IP address such as 127.0.0.1 or 0.0.0.0", value == "localhost")
    return value


def _hosts(value):
    ok = isinstance(value, list) and all(isinstance(h, str) and h.strip() for h in value)
    _check("allowed_hosts", value, "a list of host names", ok)
    return tuple(h.strip().lower() for h in value)


def _update_time(value):
    ok = isinstance(value, str) and re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?", value) is not None
    _check("update_time", value, 'a 24-hour time "HH:MM"', ok)
    return value


def load_config(path: str | os.PathLike, environ: dict | None = None) -> tuple[Config, list[str]]:
    """Read and validate config.json. Returns the config and warnings (unknown keys).

    A missing file means all defaults. Raises ConfigError naming the file and the key."""
    env: dict | os._Environ = os.environ if environ is None else environ
    path = Path(path).absolute()
    raw: dict = {}
    if path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        try:
            raw = jsonc.loads(text) if text.strip() else {}
        except jsonc.JsoncError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object {{...}} at the top, got {type(raw).__name__}")
    warnings = []
    values = {}
    known = {f.name for f in dataclasses.fields(Config)} - {"config_path"}
    for key, value in raw.items():
        if key not in known:
            close = [k for k in known if _similar(k, key)]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            warnings.append(f"{path}: unknown key '{key}' ignored{hint}")
            continue
        try:
            values[key] = _VALIDATORS[key](value)
        except ValueError as exc:
            # Never echo a secret back, even a malformed one.
            problem = f"key '{key}': expected a string" if key in SECRET_KEYS and key != "notify" else str(exc)
            raise ConfigError(f"{path}: {problem}") from None
    for key in ("civitai_api_key", "jwt_secret", "webhook_secret"):
        if _is_placeholder(values.get(key, "")):
            values[key] = ""
    env_key = env.get("CIVITAI_API_KEY", "")
    if env_key and not _is_placeholder(env_key):
        values["civitai_api_key"] = env_key.strip()
    env_secret = env.get("CIVITAI_JWT_SECRET", "")
    if env_secret and not _is_placeholder(env_secret):
        values["jwt_secret"] = env_secret
    secret = values.get("jwt_secret", "")
    if secret and len(secret.encode("utf-8")) < JWT_SECRET_MIN_BYTES:
        source = "CIVITAI_JWT_SECRET" if env_secret else "key 'jwt_secret'"
        raise ConfigError(
            f"{path}: {source}: the secret is shorter than {JWT_SECRET_MIN_BYTES} bytes; "
            "use a longer one or leave it empty to have one generated in data/jwt_secret"
        )
    values["civitai_api_key"] = values.get("civitai_api_key", "").strip()
    cfg = Config(config_path=path, **values)
    if cfg.tls_cert or cfg.tls_key:
        from ipc.tlsconf import check_config

        check_config(cfg)  # an unreadable or mismatched pair: exit 78 before any child starts
    return cfg, warnings


def _similar(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower().replace("-", "_")
    if a == b:
        return True
    if abs(len(a) - len(b)) > 2:
        return False
    # Cheap edit distance for typo hints.
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1] <= 2


def ensure_jwt_secret(cfg: Config) -> str:
    """The JWT secret in force: the configured one, else data/jwt_secret, generated once (0600)."""
    if cfg.jwt_secret:
        return cfg.jwt_secret
    path = cfg.jwt_secret_path
    existing = read_generated_secret(cfg)
    if existing:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secret.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return secret


def read_generated_secret(cfg: Config) -> str:
    try:
        value = cfg.jwt_secret_path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return value if len(value.encode()) >= JWT_SECRET_MIN_BYTES else ""


def jwt_secret(cfg: Config) -> str:
    """The secret for signing and checking tokens, without creating anything."""
    return cfg.jwt_secret or read_generated_secret(cfg)
