"""HTTPS for the web process: the configured certificate and key checked as a pair (a bad one is
a config error naming the file), the server's TLS context, the context our own clients (the
supervisor's /health probe) trust the daemon with, and the address of the GUI."""
from __future__ import annotations

import http.client
import ssl
from pathlib import Path

from ipc.config import Config, ConfigError

MIN_VERSION = ssl.TLSVersion.TLSv1_2
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class _Problem(Exception):
    def __init__(self, key: str, path: Path, text: str):
        super().__init__(text)
        self.key, self.path, self.text = key, path, text


def enabled(cfg: Config) -> bool:
    return bool(cfg.tls_cert or cfg.tls_key)


def _read(key: str, path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _Problem(key, path, "no such file") from None
    except OSError as exc:
        raise _Problem(key, path, f"cannot read it: {exc.strerror or exc}") from None
    return data.decode("ascii", "replace")


def _no_passphrase():
    # OpenSSL would otherwise ask on the terminal, and a service has none.
    raise _Problem("tls_key", Path(), "encrypted")


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    cert_text = _read("tls_cert", cert)
    key_text = cert_text if key == cert else _read("tls_key", key)
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise _Problem("tls_cert", cert, "not a PEM certificate (no '-----BEGIN CERTIFICATE-----' block)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert_text)
    except ssl.SSLError as exc:
        raise _Problem("tls_cert", cert, f"not a readable PEM certificate ({exc.reason or exc})") from None
    if "PRIVATE KEY-----" not in key_text:
        where = "the certificate's file holds no private key; set tls_key" if key == cert else \
            "not a PEM private key (no '-----BEGIN PRIVATE KEY-----' block)"
        raise _Problem("tls_key", key, where)
    if "ENCRYPTED" in key_text:
        raise _Problem("tls_key", key, "the key is encrypted with a passphrase, which a service cannot type; "
                                       "write it out without one: openssl pkey -in KEY -out KEY.plain")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_no_passphrase)
    except _Problem as exc:
        raise _Problem("tls_key", key, "the key is encrypted with a passphrase; write it out without one: "
                                       "openssl pkey -in KEY -out KEY.plain") from exc
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(exc) or "mismatch" in reason.lower():
            raise _Problem("tls_key", key, f"this key does not belong to the certificate {cert}") from None
        raise _Problem("tls_key", key, f"cannot be used as the certificate's key ({reason})") from None
    except OSError as exc:
        raise _Problem("tls_key", key, f"cannot read it: {exc.strerror or exc}") from None
    try:
        ctx.set_alpn_protocols(["http/1.1"])
    except (NotImplementedError, AttributeError):
        pass
    return ctx


def check_pair(cert: str | Path, key: str | Path | None = None) -> ssl.SSLContext:
    """A server context (TLS 1.2 at least) for a PEM certificate and its key; `key` None: the key
    is in the certificate's file. ConfigError naming the file that is wrong and why."""
    cert = Path(cert)
    try:
        return _server_context(cert, Path(key) if key else cert)
    except _Problem as exc:
        raise ConfigError(f"{exc.path}: {exc.text}") from None


def server_context(cfg: Config) -> ssl.SSLContext | None:
    """The web process's TLS context, None without tls_cert/tls_key. ConfigError names
    config.json, the key and the PEM file: the daemon exits 78 with it before any child starts
    (call it from load_config, or from the supervisor's start)."""
    if not enabled(cfg):
        return None
    if not cfg.tls_cert:
        raise ConfigError(f"{cfg.config_path}: key 'tls_cert': empty, but tls_key is set; give the certificate's "
                          "PEM file too (or leave both empty for plain HTTP)")
    key = cfg.tls_key_path if cfg.tls_key else cfg.tls_cert_path
    try:
        return _server_context(cfg.tls_cert_path, key)
    except _Problem as exc:
        raise ConfigError(f"{cfg.config_path}: key '{exc.key}': {exc.path}: {exc.text}") from None


def check_config(cfg: Config) -> None:
    """Raise ConfigError when the configured pair cannot serve HTTPS (see server_context)."""
    server_context(cfg)


def client_context(cfg: Config) -> ssl.SSLContext:
    """How our own clients trust the daemon: exactly the configured certificate (and the chain in
    its file), whatever host name it carries; we connect to 127.0.0.1, it names the LAN host."""
    ctx = ssl.create_default_context(cafile=str(cfg.tls_cert_path))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    # A CA-issued leaf with its intermediate (Let's Encrypt's fullchain.pem) has no root in the
    # file: the certificate itself is the anchor.
    ctx.verify_flags |= getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0)
    return ctx


def local_host(cfg: Config) -> str:
    """Where a client on this machine reaches the web process."""
    host = "127.0.0.1" if cfg.bind in ("0.0.0.0", "::", "localhost") else cfg.bind
    return host.strip("[]")


def health_connection(cfg: Config, timeout_s: float = 1.0) -> http.client.HTTPConnection:
    """A connection for the supervisor's /health probe: HTTPS trusting our certificate when TLS is
    configured. http.client, not urllib: an http_proxy in the environment must not see it."""
    if enabled(cfg):
        return http.client.HTTPSConnection(local_host(cfg), cfg.active_port, timeout=timeout_s,
                                           context=client_context(cfg))
    return http.client.HTTPConnection(local_host(cfg), cfg.active_port, timeout=timeout_s)


def _decode_cert(path: Path) -> dict:
    """A PEM certificate's fields as getpeercert() gives them, by the ssl module's own decoder
    (private, but there since Python 2.7; the `cryptography` package is not a dependency)."""
    import _ssl

    return _ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]


def cert_names(path: Path) -> list[str]:
    """The DNS names and addresses a certificate is for (subjectAltName), [] if unknown."""
    try:
        decoded = _decode_cert(path)
    except Exception:
        return []
    return [value for kind, value in decoded.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]


def gui_url(cfg: Config) -> str:
    """The GUI's address for the login link: https:// with TLS, and then, when the daemon listens
    on every interface, the certificate's own name, so the link opens without a name warning."""
    host = "127.0.0.1" if cfg.bind in ("0.0.0.0", "::") else cfg.bind
    if not enabled(cfg):
        return f"http://{_bracket(host)}:{cfg.active_port}/gui"
    if cfg.bind in ("0.0.0.0", "::"):
        names = [n for n in cert_names(cfg.tls_cert_path) if "*" not in n and n not in _LOOPBACK]
        if names:
            host = names[0]
    return f"https://{_bracket(host)}:{cfg.active_port}/gui"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def expiry_problem(cfg: Config, now: float | None = None, soon_s: float = 14 * 86400) -> str | None:
    """A sentence when the certificate has expired or expires within two weeks, else None."""
    import time

    try:
        decoded = _decode_cert(cfg.tls_cert_path)
        not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    except Exception:
        return None
    now = time.time() if now is None else now
    when = time.strftime("%Y-%m-%d", time.gmtime(not_after))
    if not_after <= now:
        return (f"{cfg.tls_cert_path}: the certificate expired on {when}; browsers and `supervisor.py status` "
                "refuse it: make a new one (README: HTTPS on the LAN)")
    if not_after - now <= soon_s:
        return f"{cfg.tls_cert_path}: the certificate expires on {when}; renew it (it is reloaded without a restart)"
    return None
