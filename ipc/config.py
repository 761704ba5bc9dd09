"""config.json: defaults, validation, environment overrides and the paths derived from it."""
from __future__ import annotations

import dataclasses
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
SECRET_KEYS = ("civitai_api_key", "jwt_secret", "webhook_secret")


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
    # Where the file was; every relative path resolves against its folder.
    config_path: Path = field(default=Path("config.json"), compare=False)

    @property
    def base_dir(self) -> Path:
        return self.config_path.parent

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def download_path(self) -> Path:
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
            if f.name in SECRET_KEYS:
                value = "***" if value else ""
            elif isinstance(value, tuple):
                value = list(value)
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
    "download_dir": lambda v: _check("download_dir", v, "a non-empty path", isinstance(v, str) and v.strip()) or v.strip(),
    "active_port": lambda v: _number("active_port", v, 1, 65535, integer=True),
    "bind": lambda v: _bind(v),
    "allowed_hosts": lambda v: _hosts(v),
    "civitai_api_key": lambda v: _string("civitai_api_key", v),
    "jwt_secret": lambda v: _string("jwt_secret", v),
    "civitai_url": lambda v: _url("civitai_url", v, allow_empty=False),
    "manifest_mode": lambda v: _check("manifest_mode", v, '"replace" or "append"', v in ("replace", "append")) or v,
    "update_time": lambda v: _update_time(v),
    "allow_unsafe": lambda v: _check("allow_unsafe", v, "true or false", isinstance(v, bool)) or v,
}


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
    environ = os.environ if environ is None else environ
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
            problem = f"key '{key}': expected a string" if key in SECRET_KEYS else str(exc)
            raise ConfigError(f"{path}: {problem}") from None
    for key in ("civitai_api_key", "jwt_secret", "webhook_secret"):
        if _is_placeholder(values.get(key, "")):
            values[key] = ""
    env_key = environ.get("CIVITAI_API_KEY", "")
    if env_key and not _is_placeholder(env_key):
        values["civitai_api_key"] = env_key.strip()
    env_secret = environ.get("CIVITAI_JWT_SECRET", "")
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
    return Config(config_path=path, **values), warnings


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
