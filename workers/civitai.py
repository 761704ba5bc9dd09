"""Civitai's REST API and download endpoint: requests, errors a user can act on, and file choice."""
from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import re
import select
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.cookiejar import DefaultCookiePolicy
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from requests.cookies import RequestsCookieJar
from requests.structures import CaseInsensitiveDict
from urllib3.util.retry import Retry

from ipc.config import PLACEHOLDER_RE
from ipc.naming import model_type_from_api, safe_filename
from ipc.throttle import Throttle

log = logging.getLogger(__name__)

USER_AGENT = "civitai-daemon/0.1"
API_KEY_HINT = "set civitai_api_key in config.json or the CIVITAI_API_KEY environment variable"
MAX_REDIRECTS = 5
CDN_RERESOLVES = 2  # fresh links asked of Civitai when the file host refuses one, per open_download
API_GET_TRIES = 3  # one metadata GET, including quick retries of 5xx and connection errors
API_BACKOFF_S = (0.5, 1.0)
CONNECT_TIMEOUT_S = 10.0
ERROR_BODY_LIMIT = 64 * 1024
FILL_WINDOW_S = 0.05  # Download.readinto() returns what arrived within this time
IDS_PER_REQUEST = 100  # GET /models accepts limit <= 100
BY_HASH_MAX = 100  # POST /model-versions/by-hash takes at most this many SHA-256 values
TEXT_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".txt", ".md")
# Civitai's daily download quota answers 429 "We've noticed an unusual amount of downloading
# from your account. Contact support@civitai.com or come back later." (civitai-api.md §3.2).
QUOTA_WORDS = ("unusual amount of download", "come back later", "download limit", "download quota")
QUOTA_WAIT_S = 3600.0  # a rolling 24 h count: an hour is the least worth waiting
EARLY_ACCESS_RECHECK_S = 3600.0  # no end date known, or it passed and Civitai still refuses
METADATA_QUICK_RETRY_S = 2.0  # a lone 404 or web page from the metadata API: ask once more after this
METADATA_RETRY_BASE_S = 15.0  # then the next attempts: 15 s, 1 min, 4 min, 15 min
METADATA_RETRY_MAX_S = 900.0
UNHASHED_RECHECK_S = 900.0  # a file Civitai has not hashed yet: resolve it again this much later
EARLY_ACCESS_MARGIN_S = 60.0  # Civitai's clock and caches: start just after the end, not just before
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.I)


class _RedactQueryFilter(logging.Filter):
    """urllib3 logs each request's URL at DEBUG; a signed file-host URL carries its credentials
    in the query string, which never goes to a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(re.sub(r"\?[^\s\"']*", "", a) if isinstance(a, str) and "?" in a else a
                                for a in record.args)
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_RedactQueryFilter())


class CivitaiError(Exception):
    """str(e) is a sentence a user can act on. Never contains the API key or a URL query string.

    `wait` marks an answer that is no failure of the job: early access, the daily download
    quota, a file Civitai has not hashed yet. Such a job runs again at `wait_until` (unix time)
    without using up an attempt; `retry_after_s` is the same moment as seconds from now.
    `ends_at` (early access) is the end date Civitai gave, None when it gave none.
    """

    def __init__(self, message: str, *, reason: str, retryable: bool = False,
                 retry_after_s: float | None = None, status: int | None = None,
                 wait: bool = False, wait_until: float | None = None, ends_at: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.ends_at = ends_at
        self.retryable = retryable or wait
        self.status = status
        self.wait = wait
        now = time.time()
        if wait and wait_until is None and retry_after_s is not None:
            wait_until = now + float(retry_after_s)
        if wait_until is not None and retry_after_s is None:
            retry_after_s = max(0.0, float(wait_until) - now)
        self.retry_after_s = retry_after_s
        self.wait_until = wait_until

    def __repr__(self) -> str:
        waits = f", wait_until={self.wait_until!r}" if self.wait else ""
        return (f"CivitaiError({str(self)!r}, reason={self.reason!r}, retryable={self.retryable}, "
                f"retry_after_s={self.retry_after_s!r}, status={self.status!r}{waits})")

    def as_message(self, job_id) -> dict:
        """The worker's "error" message to the supervisor (see docs/DESIGN.md)."""
        return {"type": "error", "job_id": job_id, "error": str(self), "reason": self.reason,
                "retryable": self.retryable, "retry_after_s": self.retry_after_s,
                "wait": self.wait, "wait_until": self.wait_until}


def utc_text(ts: float) -> str:
    """A moment as a user reads it in a sentence: "2026-12-03 18:00 UTC"."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def redact_url(url: object) -> str:
    """A URL fit for a log: no query string (signed CDN links carry their credentials there),
    no fragment, no user:password@."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<invalid url>"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def url_origin(url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}:{port}"


class Session(requests.Session):
    """requests.Session reading the environment (HTTP(S)_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE)
    once per host instead of on every request: a daemon's environment does not change, and
    scanning it was a quarter of a small request's CPU (0.18 of 0.70 ms measured)."""

    MAX_HOSTS = 256

    def __init__(self):
        super().__init__()
        self._proxies: dict[tuple, dict] = {}  # (scheme, host, no_proxy) -> the environment's proxies
        self._ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")

    def _environment_proxies(self, url: str, no_proxy) -> dict:
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc, no_proxy)
        found = self._proxies.get(key)
        if found is None:
            if len(self._proxies) >= self.MAX_HOSTS:
                self._proxies.clear()
            found = self._proxies[key] = requests.utils.get_environ_proxies(url, no_proxy=no_proxy)
        return found

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        if not self.trust_env:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        proxies = {} if proxies is None else proxies
        for name, value in self._environment_proxies(url, proxies.get("no_proxy")).items():
            proxies.setdefault(name, value)
        if (verify is True or verify is None) and self._ca_bundle:
            verify = self._ca_bundle
        merge = requests.sessions.merge_setting
        return {"proxies": merge(proxies, self.proxies), "stream": merge(stream, self.stream),
                "verify": merge(verify, self.verify), "cert": merge(cert, self.cert)}

    def request(self, method, url, params=None, data=None, headers=None, cookies=None, files=None, auth=None,
                timeout=None, allow_redirects=True, proxies=None, hooks=None, stream=None, verify=None, cert=None,
                json=None):
        """The daemon's own requests (a GET or HEAD, no body, redirects not followed) prepared
        directly: requests' generic path builds a Request, copies the cookie jar twice, merges
        seven settings and reads ~/.netrc on every call, half of a small request's CPU (1.0 of
        1.5 ms measured against the fake). The headers, cookies, proxies and CA bundle sent
        are the same; credentials go only as the caller sets them (never ~/.netrc's, which
        would replace the API key and go to the file host too). Anything else: requests' own."""
        method = method.upper() if isinstance(method, str) else method
        if (allow_redirects or method not in ("GET", "HEAD") or not isinstance(url, str) or params or data
                or files or json is not None or cookies or auth or proxies or hooks or cert is not None
                or self.auth or self.params or self.proxies or self.cert is not None or not self.trust_env):
            return super().request(method, url, params=params, data=data, headers=headers, cookies=cookies,
                                   files=files, auth=auth, timeout=timeout, allow_redirects=allow_redirects,
                                   proxies=proxies, hooks=hooks, stream=stream, verify=verify, cert=cert, json=json)
        prep = requests.PreparedRequest()
        prep.prepare_method(method)
        prep.prepare_url(url, None)
        merged = CaseInsensitiveDict(self.headers)
        merged.update(headers or {})
        prep.prepare_headers({name: value for name, value in merged.items() if value is not None})
        jar = RequestsCookieJar()
        if len(self.cookies):
            jar.update(self.cookies)
        prep.prepare_cookies(jar)
        prep.prepare_body(None, None)
        prep.prepare_hooks(self.hooks)
        env = self._environment_proxies(prep.url or url, None)
        if (verify is True or verify is None) and self._ca_bundle:
            verify = self._ca_bundle
        return self.send(prep, timeout=timeout, allow_redirects=False, proxies=dict(env),
                         stream=self.stream if stream is None else stream,
                         verify=self.verify if verify is None else verify, cert=None)

    def resolve_redirects(self, resp, req, *args, yield_requests: bool = False, **kwargs):
        """requests prepares a redirect's next request even when it is not followed
        (Response.next, which nothing here reads): a tenth of a small download's requests CPU,
        skipped. Followed redirects are requests' own."""
        if yield_requests:
            return iter(())
        return super().resolve_redirects(resp, req, *args, **kwargs)

    def rebuild_proxies(self, prepared_request, proxies):
        """A redirect's proxies (requests.Session.rebuild_proxies) from the same cache."""
        if not self.trust_env:
            return super().rebuild_proxies(prepared_request, proxies)
        headers = prepared_request.headers
        url = prepared_request.url
        scheme = urlsplit(url).scheme
        new_proxies = dict(proxies or {})
        env = self._environment_proxies(url, new_proxies.get("no_proxy"))
        proxy = env.get(scheme, env.get("all"))
        if proxy:
            new_proxies.setdefault(scheme, proxy)
        headers.pop("Proxy-Authorization", None)
        try:
            username, password = requests.utils.get_auth_from_url(new_proxies[scheme])
        except KeyError:
            username, password = None, None
        # As requests does: never on a TLS tunnel, where it could leak.
        if not scheme.startswith("https") and username and password:
            headers["Proxy-Authorization"] = requests.auth._basic_auth_str(username, password)
        return new_proxies


def new_session(cookies: bool = True) -> requests.Session:
    """A session whose GETs survive a kept-alive connection the server closed (or filled with a
    previous answer's stray bytes) just as the request went out: such a request is sent once more
    on a new connection. Only before any answer arrives; what fails after that is the caller's
    to retry, with its own backoff."""
    session = Session()
    retry = Retry(total=1, connect=1, read=1, status=0, other=0, redirect=0, raise_on_redirect=False,
                  raise_on_status=False, allowed_methods=frozenset({"GET", "HEAD"}))
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    if not cookies:
        session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    return session


REDIRECT_BODY_MAX = 64 * 1024  # a redirect's body up to this is read so its connection is kept


def let_go(resp: requests.Response) -> None:
    """Done with a streamed answer whose body nobody wants (a redirect): a short body with a
    Content-Length is read so the connection goes back to its pool; anything else is closed.
    (requests closes the connection of a streamed answer whose body was not read: a new TCP,
    and against Civitai TLS, handshake for the next request, once per download.)"""
    try:
        length = int(resp.headers.get("Content-Length", ""))
    except ValueError:
        length = -1
    if 0 <= length <= REDIRECT_BODY_MAX:
        try:
            resp.content  # noqa: B018 - reads the body; marks it consumed
        except (requests.RequestException, OSError):
            pass
    resp.close()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def content_disposition_filename(value: str | None) -> str | None:
    """The file name of a Content-Disposition header, reduced to one safe path component."""
    if not value:
        return None
    match = re.search(r"filename\*\s*=\s*([^']*)'[^']*'([^;]+)", value, re.I)
    if match:
        try:
            name = unquote(match.group(2).strip().strip('"'), encoding=match.group(1) or "utf-8")
        except LookupError:
            name = unquote(match.group(2).strip().strip('"'))
    else:
        match = re.search(r'filename\s*=\s*("((?:[^"\\]|\\.)*)"|[^;]+)', value, re.I)
        if not match:
            return None
        name = match.group(2) if match.group(2) is not None else match.group(1).strip()
    return safe_filename(name) if name.strip() else None


def _http_phrase(status: int) -> str:
    try:
        return http.client.responses[status]
    except KeyError:
        return ""


def _status_text(status: int) -> str:
    phrase = _http_phrase(status)
    return f"{status} {phrase}" if phrase else str(status)


def _body_error_text(body: bytes, content_type: str) -> str:
    """The human part of an error body: Civitai's {"error": "..."} or {"message": "..."}."""
    if not body:
        return ""
    try:
        data = json.loads(body.decode("utf-8", "replace"))
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("error", "message", "detail"):
            if isinstance(data.get(key), str):
                return data[key]
        return ""
    if "html" in content_type or body.lstrip()[:1] == b"<":
        return ""  # a web page says nothing useful in one line
    return body.decode("utf-8", "replace").strip().splitlines()[0] if body.strip() else ""


def _json_object(body: bytes) -> dict | None:
    try:
        data = json.loads(body.decode("utf-8", "replace")) if body else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _civitai_says(data: dict | None) -> str:
    """The sentence Civitai put in an error body for people: its `message`, else an `error`
    that says more than the status's own name."""
    if not data:
        return ""
    message = data.get("message")
    if isinstance(message, str) and message.strip():
        return message.strip()
    error = data.get("error")
    if isinstance(error, str) and error.strip().lower() not in _STATUS_NAMES:
        return error.strip()
    return ""


_STATUS_NAMES = {phrase.lower() for phrase in http.client.responses.values()}


def early_access_error(subject: str, ends_at: float | None, said: str = "",
                       now: float | None = None) -> CivitaiError:
    """Early access is a wait, not a failure: the job runs again when it ends (Civitai's
    deadline, else the version's earlyAccessEndsAt, else in EARLY_ACCESS_RECHECK_S). The
    error's `ends_at` is the end date it knew (None: the caller may know a better one)."""
    now = time.time() if now is None else now
    says = f" (Civitai says: {said})" if said and "early access" not in said.lower() else ""
    buy = "; to get it sooner, buy early access on civitai.com with civitai_api_key set"
    if ends_at is None:
        until = now + EARLY_ACCESS_RECHECK_S
        text = (f"{subject} is in early access on Civitai, which gives no end date{says}; the download "
                f"is tried again at {utc_text(until)}{buy}")
    elif ends_at + EARLY_ACCESS_MARGIN_S <= now:
        until = now + EARLY_ACCESS_RECHECK_S
        text = (f"{subject}'s early access on Civitai was to end at {utc_text(ends_at)}, but Civitai still "
                f"refuses the download{says}; it is tried again at {utc_text(until)}")
    else:
        until = ends_at + EARLY_ACCESS_MARGIN_S
        text = f"{subject} is in early access on Civitai until {utc_text(ends_at)}{says}; the download starts then{buy}"
    return CivitaiError(text, reason="early_access", wait=True, wait_until=until, status=403, ends_at=ends_at)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sniff_error_body(content_type: str, head: bytes) -> str | None:
    """"html" or "json" when a response that should be a model file is a web page or an API
    error instead; None when it may be the file."""
    content_type = (content_type or "").split(";")[0].strip().lower()
    if content_type in ("text/html", "application/xhtml+xml"):
        return "html"
    if content_type == "application/json" or content_type.endswith("+json"):
        return "json"
    start = head.lstrip()[:16].lower()
    if start.startswith((b"<!doctype", b"<html", b"<head", b"<body")):
        return "html"
    if start.startswith(b'{"'):
        return "json"
    return None


@dataclass(frozen=True)
class Resolved:
    model_id: int | None
    version_id: int
    file_id: int
    model_type: str
    filename: str
    sha256: str | None
    size_bytes: int | None  # from sizeKB: an estimate; the real size comes from Content-Length
    updated_at: str | None
    published_at: str | None
    unsafe: bool
    file_format: str | None
    fp: str | None
    url: str  # the API download URL (no key in it)
    early_access_ends_at: float | None = None  # unix time, while the version is in early access
    scan: str | None = None  # Civitai's pickle scan of the file: Pending until it is scanned and hashed
    api_type: str | None = None  # Civitai's model type ("Checkpoint", "LORA", …), as it spells it
    file_type: str | None = None  # the file's type within its version ("Model", "VAE", "Pruned Model", …)
    model_name: str | None = None
    version_name: str | None = None
    base_model: str | None = None
    # As Civitai returned them, for sidecars: the version (GET /model-versions/{id}, or the item of
    # /models/{id}'s modelVersions when the job named only the model), and the model (/models/{id}
    # when it was fetched, else the version's own `model` object: name, type, nsfw, poi).
    version_json: dict | None = field(default=None, compare=False, repr=False)
    model_json: dict | None = field(default=None, compare=False, repr=False)


class Download:
    """One open response carrying file bytes (status 200 or 206), or a 416 answer to a Range."""

    def __init__(self, resp: requests.Response, *, url: str, api_url: str, from_api: bool,
                 requested_start: int):
        self._resp = resp
        self.status = resp.status_code
        self.headers = resp.headers
        self.url = redact_url(url)  # where the bytes come from, fit for a log
        self._source_url = url  # the signed link itself, for more ranges of it: never to be logged
        self.api_url = api_url
        self.from_api = from_api
        self.etag = resp.headers.get("ETag")
        self.last_modified = resp.headers.get("Last-Modified")
        self.content_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        self.filename = content_disposition_filename(resp.headers.get("Content-Disposition"))
        self.content_length = _int_or_none(resp.headers.get("Content-Length"))
        self.start = 0
        self.total_size: int | None = None
        rng = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range") or "")
        if self.status == 206:
            if not rng or rng.group(1) is None:
                self.close()
                raise CivitaiError("the file host sent a partial answer without a valid Content-Range; "
                                   "it will be retried", reason="bad_body", retryable=True, status=206)
            self.start = int(rng.group(1))
            end = int(rng.group(2))
            self.total_size = None if rng.group(3) == "*" else int(rng.group(3))
            self.content_length = end - self.start + 1
        elif self.status == 416:
            self.start = requested_start
            if rng and rng.group(3) != "*":
                self.total_size = int(rng.group(3))
        else:
            self.total_size = self.content_length
        self._aborted = False
        self._failure: BaseException | None = None  # raised by the next readinto(), after the bytes before it
        self._raw = resp.raw
        fp = getattr(self._raw, "_fp", None)
        encoding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("", "identity") and self.status in (200, 206):
            self.close()
            raise CivitaiError(f"the file host sent the file compressed (Content-Encoding: {_short(encoding, 30)}) "
                               "although asked not to; it will be retried",
                               reason="bad_body", retryable=True, status=self.status)
        # With a Content-Length body, read straight from the connection's buffered reader into
        # the caller's buffer: urllib3's readinto() copies every chunk, and http.client's fills
        # the whole buffer before returning, which hides a slow trickle from the stall watchdog.
        self._buffered = None
        self._remaining = 0
        if (isinstance(fp, http.client.HTTPResponse) and not fp.chunked and isinstance(fp.length, int)
                and hasattr(getattr(fp, "fp", None), "readinto1")):
            self._buffered = fp.fp
            self._remaining = fp.length
        conn = getattr(self._raw, "connection", None) or getattr(self._raw, "_connection", None)
        self._sock = getattr(conn, "sock", None)
        self._allowed: int | None = None  # body bytes still to hand out (limit_body)
        self.overran = False  # the host had more to send than the limit allowed

    def limit_body(self, n_bytes: int) -> None:
        """Hand out at most `n_bytes` more of the body, whatever the host sends: a host with no
        Content-Length may never end, one with a wrong one may send more than the file."""
        self._allowed = max(0, int(n_bytes))

    def readinto(self, view) -> int:
        """Put the next bytes of the body into `view`: as many as arrive within about
        FILL_WINDOW_S, at least one byte; 0 at the end of the body or of limit_body() (which
        may be early: the caller compares with the expected length). Raises OSError or
        http.client/urllib3 errors when the connection fails, but only once the bytes that
        arrived before the failure were handed over: a line that breaks every few hundred KiB
        still makes progress."""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if self._allowed is None:
            return self._readinto(view)
        if self._allowed <= 0:
            if not self.overran:
                self.overran = self._more_after_limit()
            return 0
        n = self._readinto(view[: self._allowed])
        self._allowed -= n
        return n

    def _readinto(self, view) -> int:
        if self._buffered is None:
            read1 = getattr(self._raw, "read1", None)
            data = read1(len(view)) if read1 is not None else self._raw.read(len(view), decode_content=False)
            n = len(data)
            view[:n] = data
            return n
        limit = min(len(view), self._remaining)
        got = 0
        deadline = time.monotonic() + FILL_WINDOW_S
        while got < limit:
            if got:
                # Only read on when more is already there: a stall must not hold back (and a kill
                # at `timeout` must not lose) what this call has received so far.
                left = deadline - time.monotonic()
                if left <= 0 or not self._readable(left):
                    break
            try:
                n = self._buffered.readinto1(view[got:limit])
            except Exception as exc:
                if not got:
                    raise
                self._failure = exc
                break
            if not n:
                self._remaining = 0  # the connection closed early
                break
            got += n
        self._remaining = max(0, self._remaining - got)
        return got

    def _more_after_limit(self) -> bool:
        """Whether the host sends more past the limit (said in the log and the error only)."""
        if self._buffered is not None:
            return self._remaining > 0
        if not self._readable(0):
            return False
        try:  # readable: one read returns at once, with data or at the end of the body
            read1 = getattr(self._raw, "read1", None)
            return bool(read1(1) if read1 is not None else self._raw.read(1, decode_content=False))
        except Exception:  # noqa: BLE001 - only informs a message
            return False

    def _readable(self, timeout_s: float) -> bool:
        if self._sock is None:
            return True
        try:
            return bool(select.select([self._sock], [], [], timeout_s)[0])
        except (OSError, ValueError):
            return True

    def read_small(self, limit: int = ERROR_BODY_LIMIT) -> bytes:
        try:
            return self._raw.read(limit, decode_content=True) or b""
        except Exception:  # noqa: BLE001 - best effort, for an error message only
            return b""

    @property
    def source_url(self) -> str:
        """The URL the bytes came from, query and signature included (redirects followed): what
        further ranges of the same file are asked of. A secret of sorts: never log it."""
        return self._source_url

    def release(self) -> None:
        """Done with this answer: hand its connection back for the next request when the body
        was read to its end and nothing more is waiting on the socket (a host that sent more
        than its length, or an answer read only in part, would poison the next one), else close
        it. Reading past urllib3 (readinto1 on the socket's reader) leaves its bookkeeping
        behind, so the body's end is told to http.client before the connection goes back."""
        fp = getattr(self._raw, "_fp", None)
        if (self._buffered is not None and self._remaining == 0 and self._failure is None
                and not self._aborted and isinstance(fp, http.client.HTTPResponse) and not fp.will_close
                and not self._readable(0)):
            try:
                fp.length = 0
                fp.read(1)  # http.client sees the body's end and lets go of the socket's reader
                if fp.isclosed():
                    self._raw.release_conn()
                    return
            except Exception:  # noqa: BLE001 - then the connection is simply closed
                pass
        self.close()

    def abort(self) -> None:
        """Unblock a readinto() running in another thread (cancel, stall). Safe to call twice."""
        self._aborted = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def aborted(self) -> bool:
        return self._aborted

    def close(self) -> None:
        try:
            self._resp.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()  # kept for the next download when it was read to its end, else closed

    def __repr__(self) -> str:
        return f"Download(status={self.status}, url={self.url!r}, start={self.start}, total={self.total_size})"


def _int_or_none(value) -> int | None:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


class CdnRefused(Exception):
    """The file host refused a signed link (400, 401, 403, 404, 410): expired, most likely;
    Civitai hands out a fresh one."""

    def __init__(self, status: int, host: str):
        super().__init__(status)
        self.status = status
        self.host = host


class CivitaiClient:
    """Metadata GETs and download starts, each spaced by the shared throttle.

    The API key goes only as `Authorization: Bearer` and only to the origin of `api_url`;
    the signed file-host URL is fetched without it and without cookies.
    """

    def __init__(self, api_url: str, api_key: str = "", throttle: Throttle | None = None,
                 timeout_s: float = 30, session=None):
        self.api_url = str(api_url).rstrip("/")
        parts = urlsplit(self.api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"civitai_url must be an http(s) URL, got {redact_url(api_url)!r}")
        self.origin = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], "", "", ""))
        self._origin_key = url_origin(self.api_url)
        key = (api_key or "").strip()
        self._api_key = "" if PLACEHOLDER_RE.match(key) else key
        self.throttle = throttle
        self.timeout_s = float(timeout_s)
        self.session = session if session is not None else new_session()
        if str(self.session.headers.get("User-Agent", "")).startswith("python-requests"):
            self.session.headers["User-Agent"] = USER_AGENT  # requests' default is always there
        self._cdn_session = new_session(cookies=False)
        self._sleep = time.sleep

    def __repr__(self) -> str:
        return f"CivitaiClient(api_url={redact_url(self.api_url)!r}, api_key={'***' if self._api_key else ''!r})"

    @property
    def has_api_key(self) -> bool:
        return bool(self._api_key)

    # -- plumbing ---------------------------------------------------------------------------

    def _is_api(self, url: str) -> bool:
        try:
            return url_origin(url) == self._origin_key
        except ValueError:
            return False

    def _auth_headers(self, url: str) -> dict:
        if self._api_key and self._is_api(url):
            return {"Authorization": f"Bearer {self._api_key}"}
        return {}

    def _wait_turn(self) -> None:
        if self.throttle is not None:
            self.throttle.wait()

    def scrub(self, text: str) -> str:
        """`text` without the API key and without URL query strings."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return re.sub(r"(https?://[^\s?#'\"<>]*)[?#][^\s'\"<>]*", r"\1", text)

    def _connection_error(self, exc: Exception, url: str, subject: str) -> CivitaiError:
        host = urlsplit(url).hostname or "?"
        if isinstance(exc, requests.Timeout):
            what = "timed out"
        elif isinstance(exc, requests.exceptions.SSLError):
            what = "failed its TLS handshake"
        else:
            what = "failed"
        return CivitaiError(f"the connection to {host} {what} while fetching {subject} "
                            f"({type(exc).__name__}); it will be retried",
                            reason="connection", retryable=True)

    def _status_error(self, resp: requests.Response, subject: str, *, body: bytes | None = None) -> CivitaiError:
        status = resp.status_code
        content_type = (resp.headers.get("Content-Type") or "").lower()
        if body is None:
            body = _read_body(resp)
        data = _json_object(body)
        detail = self.scrub(_short(_body_error_text(body, content_type)))
        said = self.scrub(_short(_civitai_says(data)))  # Civitai's own sentence, if it gave one
        is_page = data is None and ("html" in content_type or body.lstrip()[:1] == b"<")
        if status == 401:
            return self._unauthorized(subject, said)
        if status == 403:
            deadline = (data.get("deadline") or data.get("earlyAccessEndsAt")) if data else None
            if deadline or "early access" in f"{detail} {said}".lower():
                return early_access_error(subject, parse_time(deadline), said)
            if is_page:
                return CivitaiError(f"Civitai answered {subject} with a web page (403 Forbidden): a Cloudflare "
                                    f"check or maintenance; it will be retried", reason="forbidden",
                                    retryable=True, status=403)
            hint = "" if self._api_key else f"; if it needs a login, {API_KEY_HINT}"
            why = f": {said or detail}" if said or detail else ""
            return CivitaiError(f"Civitai refused access to {subject} (403 Forbidden{why}){hint}",
                                reason="forbidden", status=403)
        if status == 404:
            return CivitaiError(f"{subject} was not found on Civitai (deleted or wrong id)",
                                reason="not_found", status=404)
        if status == 410:
            return CivitaiError(f"{subject} is archived on Civitai and can no longer be downloaded",
                                reason="gone", status=410)
        if status == 429:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            text = f"{detail} {said}".lower()
            if any(words in text for words in QUOTA_WORDS):
                wait_s = max(QUOTA_WAIT_S, retry_after or 0.0)
                until = time.time() + wait_s
                who = "account" if self._api_key else "address (no API key is set)"
                return CivitaiError(f"Civitai's download quota for this {who} is used up (429: {said or detail}); "
                                    f"downloads wait until {utc_text(until)} and are tried then",
                                    reason="quota", wait=True, wait_until=until, status=429)
            when = f"; retrying after {retry_after:.0f} s" if retry_after is not None else "; backing off"
            why = f" ({detail})" if detail else ""
            return CivitaiError(f"Civitai is rate limiting requests (429 Too Many Requests){why}{when}",
                                reason="rate_limited", retryable=True, retry_after_s=retry_after, status=429)
        if status >= 500:
            return CivitaiError(f"Civitai had a server error ({_status_text(status)}) for {subject}; "
                                f"it will be retried",
                                reason="server_error", retryable=True, status=status,
                                retry_after_s=parse_retry_after(resp.headers.get("Retry-After")))
        why = f": {detail}" if detail else ""
        return CivitaiError(f"Civitai answered {_status_text(status)} for {subject}{why}",
                            reason="http_error", status=status)

    def _unauthorized(self, subject: str, said: str) -> CivitaiError:
        """A 401: downloads disabled by the creator (no key helps), or a login needed. Civitai
        gives both the same status and tells them apart only in `message`."""
        lower = said.lower()
        if "disabled download" in lower or "disabled the download" in lower:
            return CivitaiError(f"Civitai refuses the download of {subject}: {said} (401); only its creator can "
                                f"change that", reason="downloads_disabled", status=401)
        says = f"; Civitai says: {said}" if said else ""
        if self._api_key:
            return CivitaiError(f"Civitai did not accept the API key for {subject} (401 Unauthorized{says}): "
                                f"check civitai_api_key in config.json or the CIVITAI_API_KEY environment variable",
                                reason="auth_required", status=401)
        return CivitaiError(f"Civitai requires a login or API key for this file ({subject}{says}): {API_KEY_HINT}",
                            reason="auth_required", status=401)

    def _get(self, url: str, *, params=None, subject: str, headers: dict | None = None) -> requests.Response:
        """GET following redirects by hand, so the key only ever goes to the API origin."""
        for _ in range(MAX_REDIRECTS + 1):
            hdrs = {"Accept": "application/json", **(headers or {}), **self._auth_headers(url)}
            try:
                resp = self.session.get(url, params=params, headers=hdrs, allow_redirects=False,
                                        timeout=(min(CONNECT_TIMEOUT_S, self.timeout_s), self.timeout_s))
            except requests.RequestException as exc:
                raise self._connection_error(exc, url, subject) from None
            if resp.is_redirect:
                location = resp.headers.get("Location", "")
                resp.close()
                url = urljoin(resp.url or url, location)
                params = None
                log.debug("%s redirected to %s", subject, redact_url(url))
                continue
            return resp
        raise CivitaiError(f"Civitai redirected too many times while fetching {subject}; it will be retried",
                           reason="http_error", retryable=True)

    def _get_json(self, url: str, *, params=None, subject: str) -> dict:
        for attempt in range(API_GET_TRIES):
            self._wait_turn()
            try:
                resp = self._get(url, params=params, subject=subject)
                if resp.status_code != 200:
                    raise self._status_error(resp, subject)
                return self._parse_json(resp, subject)
            except CivitaiError as exc:
                quick = exc.reason in ("server_error", "connection", "bad_body") and exc.retryable
                if not quick or attempt + 1 >= API_GET_TRIES:
                    raise
                delay = API_BACKOFF_S[min(attempt, len(API_BACKOFF_S) - 1)] * (0.5 + random.random())
                log.info("%s; trying again in %.1f s", exc, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _parse_json(self, resp: requests.Response, subject: str) -> dict:
        body = resp.content
        content_type = (resp.headers.get("Content-Type") or "").lower()
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            kind = "a web page" if "html" in content_type or body.lstrip()[:1] == b"<" else "something that is not JSON"
            raise CivitaiError(f"Civitai answered {subject} with {kind} (maybe maintenance or a "
                               f"Cloudflare check); it will be retried", reason="bad_body", retryable=True,
                               status=resp.status_code) from None
        if not isinstance(data, dict):
            raise CivitaiError(f"Civitai answered {subject} with unexpected JSON; it will be retried",
                               reason="bad_body", retryable=True, status=resp.status_code)
        return data

    # -- metadata ---------------------------------------------------------------------------

    def get_model(self, model_id: int) -> dict:
        model_id = int(model_id)
        return self._get_json(f"{self.api_url}/models/{model_id}", subject=f"model {model_id}")

    def get_version(self, version_id: int) -> dict:
        version_id = int(version_id)
        return self._get_json(f"{self.api_url}/model-versions/{version_id}", subject=f"model version {version_id}")

    def get_models(self, ids: list[int]) -> dict[int, dict]:
        """Models by id, batched (`ids=1,2,3`, at most 100 a request), following
        metadata.nextPage/nextCursor. Ids Civitai does not return are absent: the caller can
        confirm each with get_model(), whose 404 is definite (the list can also hide a model,
        e.g. from a region that only sees SFW content)."""
        wanted = list(dict.fromkeys(int(i) for i in ids))
        found: dict[int, dict] = {}
        for offset in range(0, len(wanted), IDS_PER_REQUEST):
            chunk = wanted[offset: offset + IDS_PER_REQUEST]
            # nsfw=true: without it the list silently drops every model above the public level.
            params: dict | None = {"ids": ",".join(map(str, chunk)), "limit": len(chunk), "nsfw": "true"}
            url = f"{self.api_url}/models"
            seen_pages: set[str] = set()
            while url:
                data = self._get_json(url, params=params, subject=f"models {_id_list(chunk)}")
                for item in data.get("items") or []:
                    if isinstance(item, dict) and isinstance(item.get("id"), int) and item["id"] in chunk:
                        found[item["id"]] = item
                if all(i in found for i in chunk):
                    break
                meta = data.get("metadata") or {}
                next_page = meta.get("nextPage")
                next_cursor = meta.get("nextCursor")
                if isinstance(next_page, str) and next_page and self._is_api(next_page):
                    url, params = next_page, None
                elif next_cursor not in (None, "") and params is not None:
                    url, params = f"{self.api_url}/models", {**params, "cursor": str(next_cursor)}
                else:
                    break
                page_key = url + json.dumps(params, sort_keys=True)
                if page_key in seen_pages or len(seen_pages) >= 50:
                    break
                seen_pages.add(page_key)
        return found

    # -- download ---------------------------------------------------------------------------

    def download_url(self, version_id: int, file_id: int | None = None) -> str:
        url = f"{self.origin}/api/download/models/{int(version_id)}"
        return url if file_id is None else f"{url}?fileId={int(file_id)}"

    def open_download(self, version_id: int, file_id: int | None, start: int = 0, etag: str | None = None,
                      *, read_timeout_s: float | None = None, filename: str | None = None,
                      probe: bool = False, end: int | None = None, link: str | None = None) -> Download:
        """Ask Civitai for the file and open the signed link it redirects to.

        Returns a Download with status 200 (whole file), 206 (from `start`) or 416 (the Range
        was past the end). `etag` goes in If-Range so a changed file comes back whole (200).
        `filename` (the expected name) only relaxes the JSON-body check for JSON files.
        `probe`: ask for a Range even from byte 0, so the answer says whether the host serves
        ranges (206 with Content-Range) and the file's exact length; `end`: only up to there
        (exclusive), the first piece of a download over several connections. `link`: a signed
        link fresh_link() gave moments ago, tried first (a refused one means asking Civitai).
        """
        subject = f"model version {int(version_id)}"
        api_url = self.download_url(version_id, file_id)
        headers = {"Accept": "*/*", "Accept-Encoding": "identity"}
        if start > 0 or probe or end is not None:
            headers["Range"] = f"bytes={int(start)}-" + (f"{int(end) - 1}" if end is not None else "")
            if etag:
                headers["If-Range"] = etag
        read_timeout = self.timeout_s if read_timeout_s is None else float(read_timeout_s)
        refused: CdnRefused | None = None
        if link is not None and not self._is_api(link):  # the file host's: no turn of Civitai's to wait for
            try:
                resp, url = self._open_once(link, subject, headers, read_timeout)
            except CdnRefused as exc:  # it expired meanwhile: as if it had never been asked for
                log.debug("%s refused the early link for %s (%s)", exc.host, subject, exc.status)
            else:
                return self._opened(resp, url, api_url, start, subject, filename)
        for _ in range(1 + CDN_RERESOLVES):
            self._wait_turn()
            try:
                resp, url = self._open_once(api_url, subject, headers, read_timeout)
            except CdnRefused as exc:
                refused = exc
                log.info("%s refused the download link for %s (%s); asking Civitai for a new one",
                         exc.host, subject, exc.status)
                continue
            return self._opened(resp, url, api_url, start, subject, filename)
        assert refused is not None
        reason = "not_found" if refused.status in (404, 410) else "forbidden"
        raise CivitaiError(f"the file host {refused.host} refused the download link from Civitai for {subject} "
                           f"({_status_text(refused.status)}) {1 + CDN_RERESOLVES} times; it will be retried",
                           reason=reason, retryable=True, status=refused.status)

    def _opened(self, resp, url: str, api_url: str, start: int, subject: str, filename: str | None) -> Download:
        download = Download(resp, url=url, api_url=api_url, from_api=self._is_api(url), requested_start=start)
        if download.status in (200, 206):
            self._refuse_non_file(download, subject, filename)
        return download

    def _open_once(self, api_url: str, subject: str, headers: dict, read_timeout_s: float):
        url = api_url
        for _ in range(MAX_REDIRECTS + 1):
            on_api = self._is_api(url)
            hdrs = dict(headers)
            if on_api:
                # Civitai answers 401/403 as JSON for this content type instead of redirecting to
                # its login page (src/pages/api/download/models/[modelVersionId].ts).
                hdrs["Content-Type"] = "application/json"
                hdrs.update(self._auth_headers(url))
            session = self.session if on_api else self._cdn_session
            try:
                resp = session.get(url, headers=hdrs, stream=True, allow_redirects=False,
                                   timeout=(min(CONNECT_TIMEOUT_S, self.timeout_s), read_timeout_s))
            except requests.RequestException as exc:
                raise self._connection_error(exc, url, subject) from None
            if resp.is_redirect:
                location = resp.headers.get("Location", "")
                let_go(resp)
                nxt = urljoin(url, location)
                if self._is_api(nxt):
                    self._refuse_site_redirect(nxt, subject)
                log.debug("download of %s redirected to %s", subject, redact_url(nxt))
                url = nxt
                continue
            if resp.status_code in (200, 206, 416):
                return resp, url
            if not on_api and resp.status_code in (400, 401, 403, 404, 410):
                resp.close()
                raise CdnRefused(resp.status_code, urlsplit(url).hostname or "?")
            error = self._status_error(resp, subject)
            resp.close()
            if error.status == 404:
                # The metadata just listed the file: a 404 here is a storage failure that passes
                # (Civitai sends it with no-store), or a file deleted this minute.
                error = CivitaiError(f"the file of {subject} was not found on Civitai's download endpoint "
                                     f"(404: deleted just now, or a passing storage failure)",
                                     reason="not_found", retryable=True, status=404)
            raise error
        raise CivitaiError(f"the download of {subject} was redirected too many times; it will be retried",
                           reason="http_error", retryable=True)

    def cdn_session(self) -> requests.Session:
        """A session of its own for one connection to the file host: no key, no cookies."""
        return new_session(cookies=False)

    def fresh_link(self, version_id: int, file_id: int | None) -> str:
        """A new signed link to the file (the old one expired): Civitai's download endpoint's
        redirect, not followed to the file host. One download start, spaced by the throttle."""
        subject = f"model version {int(version_id)}"
        url = self.download_url(version_id, file_id)
        self._wait_turn()
        for _ in range(MAX_REDIRECTS + 1):
            hdrs = {"Accept": "*/*", "Accept-Encoding": "identity", "Content-Type": "application/json",
                    **self._auth_headers(url)}
            try:
                resp = self.session.get(url, headers=hdrs, stream=True, allow_redirects=False,
                                        timeout=(min(CONNECT_TIMEOUT_S, self.timeout_s), self.timeout_s))
            except requests.RequestException as exc:
                raise self._connection_error(exc, url, subject) from None
            if resp.is_redirect:
                nxt = urljoin(url, resp.headers.get("Location", ""))
                let_go(resp)
                if not self._is_api(nxt):
                    return nxt
                self._refuse_site_redirect(nxt, subject)
                url = nxt
                continue
            if resp.status_code in (200, 206):
                resp.close()
                return url  # Civitai serves the bytes itself
            error = self._status_error(resp, subject)
            resp.close()
            if error.status == 404:  # as in _open_once: the file was listed moments ago
                error = CivitaiError(f"the file of {subject} was not found on Civitai's download endpoint "
                                     f"(404: deleted just now, or a passing storage failure)",
                                     reason="not_found", retryable=True, status=404)
            raise error
        raise CivitaiError(f"the download of {subject} was redirected too many times; it will be retried",
                           reason="http_error", retryable=True)

    def open_range(self, session: requests.Session, url: str, start: int, end: int, validator: str | None,
                   *, read_timeout_s: float, subject: str, filename: str | None = None) -> Download:
        """Open bytes [start, end) of a signed file-host link (`Range` with `If-Range`), following
        the host's own redirects. Raises CdnRefused when the host refuses the link (expired),
        CivitaiError for anything else; the caller judges the Download's status (206 expected;
        200: the host ignored the Range or the file changed)."""
        headers = {"Accept": "*/*", "Accept-Encoding": "identity", "Range": f"bytes={int(start)}-{int(end) - 1}"}
        if validator:
            headers["If-Range"] = validator
        for _ in range(MAX_REDIRECTS + 1):
            if self._is_api(url):
                # Only links away from Civitai are fetched this way: the key never rides along.
                raise CivitaiError(f"the file host sent the download of {subject} back to Civitai; it will be "
                                   f"retried", reason="http_error", retryable=True)
            try:
                resp = session.get(url, headers=headers, stream=True, allow_redirects=False,
                                   timeout=(min(CONNECT_TIMEOUT_S, self.timeout_s), read_timeout_s))
            except requests.RequestException as exc:
                raise self._connection_error(exc, url, subject) from None
            if resp.is_redirect:
                nxt = urljoin(url, resp.headers.get("Location", ""))
                let_go(resp)
                if self._is_api(nxt):
                    self._refuse_site_redirect(nxt, subject)
                url = nxt
                continue
            if resp.status_code in (200, 206, 416):
                download = Download(resp, url=url, api_url=url, from_api=False, requested_start=start)
                if download.status in (200, 206):
                    self._refuse_non_file(download, subject, filename)
                return download
            if resp.status_code in (400, 401, 403, 404, 410):
                resp.close()
                raise CdnRefused(resp.status_code, urlsplit(url).hostname or "?")
            status, retry_after = resp.status_code, parse_retry_after(resp.headers.get("Retry-After"))
            resp.close()
            raise CivitaiError(f"the file host answered {_status_text(status)} for a part of {subject}; "
                               f"it will be retried", reason="server_error" if status >= 500 else "http_error",
                               retryable=True, status=status, retry_after_s=retry_after)
        raise CivitaiError(f"the file host redirected a part of {subject} too many times; it will be retried",
                           reason="http_error", retryable=True)

    def _refuse_site_redirect(self, url: str, subject: str) -> None:
        """Civitai sends browsers to its login or membership page instead of answering 401/403."""
        parts = urlsplit(url)
        path = parts.path.lower()
        if path.startswith("/login"):
            raise CivitaiError(f"Civitai requires a login or API key for this file ({subject}): {API_KEY_HINT}",
                               reason="auth_required", status=401)
        if path.startswith(("/join", "/pricing", "/purchase")) or "early-access" in parts.query.lower():
            raise early_access_error(subject, None)

    def _refuse_non_file(self, download: Download, subject: str, filename: str | None) -> None:
        json_ok = filename is not None and filename.lower().endswith(TEXT_FILE_SUFFIXES)
        kind = sniff_error_body(download.content_type, b"")
        if kind == "json" and json_ok:
            return
        if kind is not None:
            body = download.read_small()
            download.close()
            raise self.bad_body_error(kind, subject, body)

    def bad_body_error(self, kind: str, subject: str, body: bytes = b"") -> CivitaiError:
        """The error for a web page or an API answer where the model file was expected."""
        if kind == "html":
            hint = (f"; this usually means a login is required: {API_KEY_HINT}" if not self._api_key
                    else "; Civitai may be in maintenance or asking for a browser check")
            return CivitaiError(f"Civitai sent a web page instead of the file of {subject}{hint}",
                                reason="bad_body", retryable=bool(self._api_key))
        detail = self.scrub(_short(_body_error_text(body, "application/json")))
        why = f": {detail}" if detail else ""
        return CivitaiError(f"Civitai sent an error message instead of the file of {subject}{why}; it will be retried",
                            reason="bad_body", retryable=True)


    # -- identifying files on disk ------------------------------------------------------------

    def versions_by_hash(self, sha256s: list[str]) -> list[dict]:
        """`POST /model-versions/by-hash`: the version objects (as /model-versions/{id} shows
        them) whose files have these SHA-256 values. At most BY_HASH_MAX hashes go in one
        request, each request waits its turn; unmatched hashes are simply absent. Raises
        CivitaiError (5xx and connection errors are retried quickly first)."""
        wanted = list(dict.fromkeys(str(h).strip().upper() for h in sha256s))
        bad = next((h for h in wanted if not re.fullmatch(r"[0-9A-F]{64}", h)), None)
        if bad is not None:
            raise ValueError(f"not a SHA-256 value: {bad[:80]!r}")
        url = f"{self.api_url}/model-versions/by-hash"
        found: list[dict] = []
        for offset in range(0, len(wanted), BY_HASH_MAX):
            chunk = wanted[offset: offset + BY_HASH_MAX]
            found.extend(self._post_json_list(url, chunk, subject=f"the lookup of {len(chunk)} file hash(es)"))
        return found

    def _post_json_list(self, url: str, payload: list, *, subject: str) -> list[dict]:
        for attempt in range(API_GET_TRIES):
            self._wait_turn()
            try:
                try:
                    resp = self.session.post(url, json=payload, allow_redirects=False,
                                             headers={"Accept": "application/json", **self._auth_headers(url)},
                                             timeout=(min(CONNECT_TIMEOUT_S, self.timeout_s), self.timeout_s))
                except requests.RequestException as exc:
                    raise self._connection_error(exc, url, subject) from None
                if resp.is_redirect:  # a POST is not followed: the key and the body stay with the API
                    resp.close()
                    raise CivitaiError(f"Civitai redirected {subject} elsewhere ({resp.status_code}); it will be "
                                       "retried", reason="http_error", retryable=True, status=resp.status_code)
                if resp.status_code != 200:
                    raise self._status_error(resp, subject)
                try:
                    data = json.loads(resp.content.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    data = None
                if not isinstance(data, list):
                    raise CivitaiError(f"Civitai answered {subject} with something that is not a list of versions "
                                       "(maybe maintenance or a Cloudflare check); it will be retried",
                                       reason="bad_body", retryable=True, status=resp.status_code)
                return [v for v in data if isinstance(v, dict)]
            except CivitaiError as exc:
                quick = exc.reason in ("server_error", "connection", "bad_body") and exc.retryable
                if not quick or attempt + 1 >= API_GET_TRIES:
                    raise
                delay = API_BACKOFF_S[min(attempt, len(API_BACKOFF_S) - 1)] * (0.5 + random.random())
                log.info("%s; trying again in %.1f s", exc, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")

def _read_body(resp: requests.Response, limit: int = ERROR_BODY_LIMIT) -> bytes:
    try:
        if resp.raw is not None and not resp._content_consumed:  # streamed: read a bounded amount
            return resp.raw.read(limit, decode_content=True) or b""
        return (resp.content or b"")[:limit]
    except Exception:  # noqa: BLE001 - only feeds an error message
        return b""


def _id_list(ids: list[int]) -> str:
    text = ",".join(map(str, ids[:5]))
    return text + (f",… ({len(ids)} ids)" if len(ids) > 5 else "")


# -- choosing a version and a file ------------------------------------------------------------

def parse_time(value) -> float | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:  # older responses have no zone; Civitai's clock is UTC
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


parse_time = parse_time  # public name: seconds since the epoch of a Civitai timestamp, or None


def newest_published_version(model: dict) -> dict:
    """The newest published version by publishedAt (createdAt if missing), not array order."""
    versions = [v for v in (model.get("modelVersions") or []) if isinstance(v, dict)]
    # The list endpoint strips `status` (it only lists published versions); /models/{id} keeps it.
    published = [v for v in versions if v.get("status") in (None, "Published")]
    if not published:
        raise CivitaiError(f"model {model.get('id', '?')} has no published version on Civitai",
                           reason="no_file")

    def key(version: dict):
        when = parse_time(version.get("publishedAt"))
        if when is None:
            when = parse_time(version.get("createdAt"))
        vid = version.get("id") if isinstance(version.get("id"), int) else 0
        return (when is not None, when or 0.0, vid)

    return max(published, key=key)


def _meta(f: dict) -> dict:
    meta = f.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _lower(value) -> str | None:
    return str(value).strip().lower() if value not in (None, "") else None


def describe_file(f: dict) -> str:
    """A file as a user picks it: type, format, precision and name ("VAE SafeTensor fp16 (x.safetensors)")."""
    meta = _meta(f)
    words = [str(w) for w in (f.get("type"), meta.get("format"), meta.get("fp")) if w not in (None, "")]
    return f"{' '.join(words) or 'a file'} ({f.get('name') or f.get('id')})"


def _server_score(f: dict) -> int:
    """Civitai's own preference among files (getPrimaryFile in src/server/utils/model-helpers.ts)."""
    meta = _meta(f)
    return ((1000 if f.get("type") in ("Model", "Pruned Model") else 0) + (100 if meta.get("format") == "SafeTensor"
            else 0) + (10 if meta.get("size") == "pruned" else 0) + (1 if meta.get("fp") == "fp16" else 0))


def _best(files: list[dict]) -> dict:
    """The primary among `files` if it is one of them, else the one Civitai would prefer."""
    for f in files:
        if f.get("primary") is True:
            return f
    return max(files, key=_server_score)  # max() keeps the first of equals: Civitai's order


def pick_file(version: dict, file_id=None, like: dict | None = None, *, file_type=None, format=None,  # noqa: A002
              fp=None) -> dict:
    """The file to fetch: by id; else the one the selectors name (file_type, format, fp, without
    case; refused, naming what the version offers, when none matches); else the one of the same
    type, format and precision (and size) as `like`; else the primary; else the first of type
    Model; else the first."""
    files = [f for f in (version.get("files") or []) if isinstance(f, dict)]
    vid = version.get("id", "?")
    if file_id is not None:
        for f in files:
            if f.get("id") == int(file_id):
                return f
        raise CivitaiError(f"file {file_id} is not part of model version {vid} on Civitai (deleted or wrong id)",
                           reason="no_file")
    if not files:
        raise CivitaiError(f"model version {vid} has no downloadable file on Civitai", reason="no_file")
    wanted = {"type": _lower(file_type), "format": _lower(format), "fp": _lower(fp)}
    if any(wanted.values()):
        def fits(f: dict) -> bool:
            have = {"type": _lower(f.get("type")), "format": _lower(_meta(f).get("format")),
                    "fp": _lower(_meta(f).get("fp"))}
            return all(v is None or have[k] == v for k, v in wanted.items())

        matching = [f for f in files if fits(f)]
        if matching:
            return _best(matching)
        asked = ", ".join(f"{k} {v!r}" for k, v in (("file_type", file_type), ("format", format), ("fp", fp))
                          if _lower(v))
        raise CivitaiError(f"model version {vid} has no file with {asked}; it offers: "
                           f"{'; '.join(describe_file(f) for f in files)}: change the selectors in the manifest "
                           f"entry (or name its fileId)", reason="no_file")
    if like:
        want = _meta(like)
        same_type = [f for f in files if f.get("type") == like.get("type")]
        if want.get("format") is not None or want.get("fp") is not None:
            for keys in (("format", "fp", "size"), ("format", "fp")):
                for candidates in (same_type, files):
                    for f in candidates:
                        if all(_meta(f).get(k) == want.get(k) for k in keys):
                            return f
        primary = next((f for f in files if f.get("primary") is True), None)
        if same_type and (primary is None or primary.get("type") != like.get("type")):
            return _best(same_type)  # a checkpoint's VAE follows the new VAE, not the new checkpoint
    for f in files:
        if f.get("primary") is True:
            return f
    for f in files:
        if f.get("type") == "Model":
            return f
    return files[0]


def file_sha256(f: dict) -> str | None:
    hashes = f.get("hashes")
    value = hashes.get("SHA256") if isinstance(hashes, dict) else None
    if isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{64}", value.strip()):
        return value.strip().lower()
    return None


def is_unsafe(f: dict) -> bool:
    return f.get("pickleScanResult") == "Danger" or f.get("virusScanResult") == "Danger"


def _transient_metadata(exc: CivitaiError) -> bool:
    """An answer of the metadata API that says nothing yet: a 404 moments after publishing (its
    caches take minutes), a web page (Cloudflare, maintenance), a 5xx, JSON that is not."""
    return exc.status == 404 or (exc.reason == "forbidden" and exc.retryable) or exc.reason in (
        "server_error", "bad_body")


def metadata_retry_s(attempt: int) -> float:
    """The wait before the next attempt after a transient metadata answer (15 s, 1, 4, 15 min)."""
    return min(METADATA_RETRY_MAX_S, METADATA_RETRY_BASE_S * 4 ** max(0, int(attempt or 1) - 1))


def _get_metadata(client: CivitaiClient, fetch, subject: str, attempt: int) -> dict:
    """One metadata GET for a job. A 404 or a web page is asked once more after a moment (the
    client already retried 5xx); a transient answer then becomes "metadata_unavailable",
    retryable after metadata_retry_s(attempt), so the job fails only after its attempts."""
    for tries in (1, 2):
        try:
            return fetch()
        except CivitaiError as exc:
            if not _transient_metadata(exc):
                raise
            quick = exc.status in (403, 404) and tries == 1
            if quick:
                log.info("%s; asking again in %.0f s", exc, METADATA_QUICK_RETRY_S)
                client._sleep(METADATA_QUICK_RETRY_S)
                continue
            if exc.status == 404:
                text = (f"{subject} was not found on Civitai (deleted, a wrong id, or published moments ago: "
                        f"Civitai's caches take some minutes to show it)")
            else:
                text = str(exc)
            raise CivitaiError(text, reason="metadata_unavailable", retryable=True, status=exc.status,
                               retry_after_s=metadata_retry_s(attempt)) from None
    raise AssertionError("unreachable")


def _early_access_ends(version: dict) -> float | None:
    """When the version's early access ends, if it is in early access (earlyAccessEndsAt on
    /model-versions, earlyAccessDeadline in /models lists)."""
    for key in ("earlyAccessEndsAt", "earlyAccessDeadline"):
        when = parse_time(version.get(key))
        if when is not None:
            return when if version.get("availability") in (None, "EarlyAccess") or when > time.time() else None
    return None


def _text(value) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def resolve(client: CivitaiClient, *, model_id=None, version_id=None, file_id=None, attempt: int = 1,
            file_type=None, format=None, fp=None) -> Resolved:  # noqa: A002
    """What to download for a job: the given version (or the model's newest published one)
    and its file (given; else the one the selectors file_type/format/fp name; else primary).
    `attempt` (1, 2, …) spaces out transient answers."""
    if version_id is not None:
        subject = f"model version {int(version_id)}"
        version = _get_metadata(client, lambda: client.get_version(int(version_id)), subject, attempt)
        api_model_id = version.get("modelId")
        if model_id is not None and isinstance(api_model_id, int) and api_model_id != int(model_id):
            raise CivitaiError(f"model version {version_id} belongs to model {api_model_id} on Civitai, "
                               f"not to model {model_id}: fix the ids", reason="not_found")
        embedded = version.get("model")
        model = embedded if isinstance(embedded, dict) else {}
        model_id = api_model_id if isinstance(api_model_id, int) else model_id
    elif model_id is not None:
        model = _get_metadata(client, lambda: client.get_model(int(model_id)), f"model {int(model_id)}", attempt)
        version = newest_published_version(model)
    else:
        raise ValueError("resolve() needs model_id or version_id")
    api_type = _text(model.get("type"))
    usage = version.get("usageControl")
    if isinstance(usage, str) and usage and usage != "Download":
        raise CivitaiError(f"the creator of model version {version.get('id', version_id)} has disabled downloads "
                           f"on Civitai (usageControl: {_short(usage, 40)}); only its creator can change that",
                           reason="downloads_disabled")
    f = pick_file(version, file_id, file_type=file_type, format=format, fp=fp)
    size_kb = f.get("sizeKB")
    size_bytes = int(round(float(size_kb) * 1024)) if isinstance(size_kb, (int, float)) and size_kb > 0 else None
    vid = int(version["id"])
    fid = int(f["id"])
    meta = _meta(f)
    return Resolved(
        model_id=int(model_id) if model_id is not None else None,
        version_id=vid,
        file_id=fid,
        model_type=model_type_from_api(api_type),
        filename=safe_filename(f.get("name"), fallback=f"model_{vid}_{fid}.bin"),
        sha256=file_sha256(f),
        size_bytes=size_bytes,
        updated_at=version.get("updatedAt") or version.get("publishedAt"),
        published_at=version.get("publishedAt"),
        unsafe=is_unsafe(f),
        file_format=meta.get("format"),
        fp=meta.get("fp"),
        url=client.download_url(vid, fid),
        early_access_ends_at=_early_access_ends(version),
        scan=f.get("pickleScanResult") if isinstance(f.get("pickleScanResult"), str) else None,
        api_type=api_type,
        file_type=_text(f.get("type")),
        model_name=_text(model.get("name")),
        version_name=_text(version.get("name")),
        base_model=_text(version.get("baseModel")),
        version_json=version,
        model_json=model or None,
    )
