"""A local fake of Civitai for integration tests: the REST API, the download endpoint and a CDN.

Standard library only. Two ``ThreadingHTTPServer``s on 127.0.0.1 (ephemeral ports), each in a
daemon thread:

* the API origin (``fake.origin``): ``/api/v1/models/{id}``, ``/api/v1/model-versions/{id}``,
  ``GET /api/v1/model-versions/by-hash/{hash}`` (any of a file's hashes), ``POST
  /api/v1/model-versions/by-hash`` (a JSON array of up to 100 SHA-256 values),
  ``/api/v1/models?ids=1,2``, the download endpoint
  ``/api/download/models/{versionId}[?fileId=F | ?type=&format=&size=&fp=]`` (307 to the CDN) and
  a ``/login`` HTML page;
* the CDN origin (``fake.cdn_origin``, another port): ``/files/{fileId}/{name}?sig=..&exp=..``
  with signed, expiring URLs, Range / If-Range / 416, HEAD, ETag, Last-Modified; and the images
  of versions (``add_image``: ``/images/{key}/width=450/{name}``, as image.civitai.com serves them).

Shapes follow the real responses in /work/shared/civitai-samples/ and the behaviour of Civitai's
download endpoint (civitai/civitai ``src/pages/api/download/models/[modelVersionId].ts``): 401
``{"error": "Unauthorized", "message": "The creator of this asset requires you to be logged in
to download it"}`` (or "... has disabled downloads on this file"), 403 ``{"error": "Early Access",
"deadline": ..., "message": ...}``, 404 ``{"error": "File not found"}``, 410 ``{"error": "Model
archived, not available for download"}``, 429 with the daily quota's message (``download_quota``).
The CDN answers like S3 / Cloudflare R2 (XML ``<Error><Code>AccessDenied</Code>...``). Faults
(``set_fault``, ``set_api_fault``, ``metadata_fault``) play what goes wrong: stalls, drips, resets,
bodies without end or longer than their length, wrong bytes, expired links, login pages,
transient metadata answers (404, a Cloudflare page, 5xx); ``only_from`` aims one at a single range
of a download over several connections. ``cdn_conn_bps`` paces every CDN body like a CDN that
caps each connection; ``cdn_validators = False`` drops ETag and Last-Modified.

Sockets use TCP_NODELAY and an answer's headers go with a small body in one write: http.server's
two writes meet delayed ACKs on a kept-alive connection (44 ms a metadata GET, now under 1 ms).

Big files are generated on the fly from (seed, offset): a 1 MiB pseudo-random block per seed,
with the block index mixed into its first 8 bytes; nothing big is ever held in memory. Hashes
(SHA256, CRC32 are real; AutoV1/AutoV3/BLAKE3 are stand-ins derived from the SHA256) are computed
once, lazily, and cached per content generation.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import http.server
import json
import random
import re
import secrets
import socket
import struct
import threading
import time
import traceback
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

__all__ = ["FakeCivitai", "RecordedRequest", "fake_civitai", "BLOCK_SIZE"]

BLOCK_SIZE = 1 << 20  # generation block and write chunk size (1 MiB)
SMALL_BODY = 256 << 10  # a file up to this size goes out with its headers in one write
MAX_POST_BODY = 1 << 20
BY_HASH_MAX = 100  # POST /model-versions/by-hash takes at most this many hashes
_MASK64 = (1 << 64) - 1

LOGIN_MESSAGE = "The creator of this asset requires you to be logged in to download it"
RATE_LIMIT_MESSAGE = "Rate limit exceeded, please retry shortly."
DISABLED_MESSAGE = "The creator of this asset has disabled downloads on this file"
EARLY_ACCESS_MESSAGE = "This asset is in Early Access. You can use Buzz access it now!"

FILE_FAULT_MODES = {
    "stall", "drip", "reset", "ignore_range", "wrong_bytes", "short", "html_login", "json_error",
    "status", "expire_cdn", "redirect_loop", "redirect_chain", "endless", "overlong", "change",
}
_API_SIDE_DEFAULT = {"status", "html_login", "json_error"}
_API_SIDE_ALLOWED = _API_SIDE_DEFAULT | {"stall", "reset", "redirect_loop", "expire_cdn"}
_STATUS_CODES = {400, 401, 403, 404, 410, 429, 500, 502, 503, 504}


# --------------------------------------------------------------------------- small helpers


def _iso_now(delta_s: float = 0.0) -> str:
    t = datetime.now(UTC) + timedelta(seconds=delta_s)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _parse_iso(s: str | None) -> datetime | None:
    if not s:
        return None
    try:
        d = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return d


_HASH_CACHE: dict[tuple[int, int], tuple[str, int]] = {}  # generated content: (seed, size)


@functools.lru_cache(maxsize=64)
def _base_block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK_SIZE)


def _gen_block(seed: int, index: int) -> bytes | bytearray:
    """Block ``index`` of the generated stream for ``seed`` (always BLOCK_SIZE bytes)."""
    base = _base_block(seed)
    b = bytearray(base)
    x = int.from_bytes(base[:8], "little") ^ (((index + 1) * 0x9E3779B97F4A7C15) & _MASK64)
    b[:8] = x.to_bytes(8, "little")
    return b


class CIHeaders(dict):
    """A dict of headers (original names as keys) with case-insensitive lookups."""

    def __init__(self, items=()):
        super().__init__()
        self._lower: dict[str, str] = {}
        for k, v in items:
            if k.lower() in self._lower:  # repeated header: join like HTTP does
                ok = self._lower[k.lower()]
                super().__setitem__(ok, super().__getitem__(ok) + ", " + v)
            else:
                self._lower[k.lower()] = k
                super().__setitem__(k, v)

    def __getitem__(self, key):
        return super().__getitem__(self._lower.get(key.lower(), key))

    def __contains__(self, key):
        return isinstance(key, str) and key.lower() in self._lower

    def get(self, key, default=None):
        k = self._lower.get(key.lower()) if isinstance(key, str) else None
        return super().__getitem__(k) if k is not None else default


@dataclass
class RecordedRequest:
    server: str  # "api" | "cdn"
    method: str
    path: str  # without the query string
    query: str  # raw query string ("" if none)
    headers: CIHeaders
    time: float  # time.time() when the request line was parsed
    body: bytes = b""  # of a POST
    sent: int = 0  # file bytes sent in answer to it (CDN bodies)

    @property
    def url_path(self) -> str:
        return self.path + ("?" + self.query if self.query else "")


@dataclass
class _Fault:
    mode: str
    where: str  # "api" | "cdn"
    times: int | None
    params: dict = field(default_factory=dict)


@dataclass
class _ApiFault:
    pattern: re.Pattern
    status: int | str
    body: Any
    headers: dict | None
    times: int | None
    delay_s: float


class _Abort(Exception):
    """Raised inside a handler to drop the connection without further writes."""


class _File:
    def __init__(self, fid: int, version_id: int, spec: dict):
        self.id = fid
        self.version_id = version_id
        self.name: str = spec.get("name", f"file_{fid}.safetensors")
        self.cd_name: str | None = spec.get("cd_name")
        self.primary: bool = bool(spec.get("primary", False))
        self.format = spec.get("format", "SafeTensor")
        self.fp = spec.get("fp", "fp16")
        self.size_label = spec.get("size", "pruned")
        self.type = spec.get("type", "Model")
        self.pickle_scan = spec.get("pickle_scan", "Success")
        self.virus_scan = spec.get("virus_scan", "Success")
        self.pickle_scan_message = spec.get(
            "pickle_scan_message",
            "No Pickle imports" if self.pickle_scan == "Success" else "Dangerous imports detected",
        )
        self.virus_scan_message = spec.get("virus_scan_message")
        # hashed=False: freshly uploaded, not scanned yet: no hashes, scans Pending (hash_file()).
        self.hashed: bool = bool(spec.get("hashed", True))
        self.extra: dict = dict(spec.get("extra") or {})
        self.gen = 0
        self._lock = threading.Lock()
        self._hashes: tuple[int, str, int] | None = None
        seed = spec.get("seed")
        size_bytes = spec.get("size_bytes")
        self.set_content(spec.get("data"), fid if seed is None else seed,
                         1024 if size_bytes is None else size_bytes,
                         spec.get("sha256"), spec.get("size_kb"))

    def set_content(self, data, seed, size_bytes, sha256_override=None, size_kb_override=None):
        with self._lock:
            self.data: bytes | None = bytes(data) if data is not None else None
            self.seed = int(seed)
            self.size = len(self.data) if self.data is not None else int(size_bytes)
            self.sha256_override = sha256_override.upper() if sha256_override else None
            self.size_kb_override = size_kb_override
            self.gen += 1
            self.mtime = time.time()
            self._hashes = None
            if self.data is not None:
                h = hashlib.md5(self.data).hexdigest()
            else:
                key = f"{self.id}:{self.gen}:{self.seed}:{self.size}"
                h = hashlib.md5(key.encode()).hexdigest()
            self.etag = f'"{h}"'

    def snapshot(self) -> _File:
        """The file as it is now, for one answer: a replace_file while its body is sent does not
        reach it (a CDN serves one object per answer; reading the live file once mixed old and
        new bytes under the old ETag)."""
        with self._lock:
            return copy.copy(self)

    @property
    def last_modified(self) -> str:
        return formatdate(self.mtime, usegmt=True)

    def chunks(self, start: int, end: int) -> Iterator[tuple[int, memoryview]]:
        """Yield (absolute offset, view) covering [start, end), each at most one block."""
        data = self.data
        off = start
        while off < end:
            if data is not None:
                n = min(BLOCK_SIZE, end - off)
                yield off, memoryview(data)[off:off + n]
            else:
                idx, within = divmod(off, BLOCK_SIZE)
                n = min(BLOCK_SIZE - within, end - off)
                yield off, memoryview(_gen_block(self.seed, idx))[within:within + n]
            off += n

    def content(self) -> bytes:
        return b"".join(bytes(c) for _, c in self.chunks(0, self.size))

    def real_hashes(self) -> tuple[str, int]:
        """(SHA256 upper hex, CRC32) of the content actually served; cached per generation."""
        with self._lock:
            if self._hashes is not None and self._hashes[0] == self.gen:
                return self._hashes[1], self._hashes[2]
            gen = self.gen
            key = (self.seed, self.size) if self.data is None else None
        cached = _HASH_CACHE.get(key) if key else None
        if cached:
            sha, crc = cached
        else:
            h = hashlib.sha256()
            crc = 0
            for _, c in self.chunks(0, self.size):
                h.update(c)
                crc = zlib.crc32(c, crc)
            sha = h.hexdigest().upper()
            if key:
                _HASH_CACHE[key] = (sha, crc)
        with self._lock:
            if self.gen == gen:
                self._hashes = (gen, sha, crc)
        return sha, crc

    def advertised_sha256(self) -> str:
        return self.sha256_override or self.real_hashes()[0]

    def hashes_json(self) -> dict:
        sha = self.advertised_sha256()
        crc = self.real_hashes()[1] if self.sha256_override is None else zlib.crc32(sha.encode())
        derived = hashlib.sha256(("derived:" + sha).encode()).hexdigest().upper()
        h = {
            "AutoV1": derived[:8],
            "AutoV2": sha[:10],
            "SHA256": sha,
            "CRC32": f"{crc:08X}",
            "BLAKE3": hashlib.sha256(("blake3:" + sha).encode()).hexdigest().upper(),
        }
        if self.format == "SafeTensor":
            h["AutoV3"] = derived[8:20]
        return h


# --------------------------------------------------------------------------- HTTP plumbing


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr, handler, fake: FakeCivitai, kind: str):
        self.fake = fake
        self.kind = kind
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        # http.server writes headers and body in two sends; with Nagle on, the second waits for
        # the client's delayed ACK (40 ms a small answer on a kept-alive connection), and a
        # benchmark against the fake would measure that instead of the daemon.
        try:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.conns_lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):  # keep test output quiet
        pass

    def kill_connections(self):
        with self.conns_lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # socket timeout: idle keep-alive and blocked sends
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - silence
        pass

    def version_string(self):
        return "cloudflare" if self.server.kind == "cdn" else "Civitai-Fake"

    def handle(self):
        try:
            super().handle()
        except (_Abort, OSError, ValueError):
            self.close_connection = True

    def end_headers_with(self, body=b"") -> None:
        """End the headers and send them together with ``body`` in one write (see
        _Server.process_request)."""
        self._headers_buffer.append(b"\r\n")
        if body and self.command != "HEAD":
            self._headers_buffer.append(bytes(body))
        self.flush_headers()

    def _dispatch(self):
        fake = self.server.fake
        if fake._closing.is_set():
            raise _Abort()
        try:
            fake._handle(self, self.server.kind)
        except (_Abort, OSError):
            self.close_connection = True
            raise _Abort() from None
        except Exception as e:  # a bug in the fake: say so loudly instead of hanging up
            tb = traceback.format_exc()
            fake.errors.append(tb)
            self.close_connection = True
            body = json.dumps({"error": f"FakeCivitai internal error: {e!r}", "trace": tb}).encode()
            try:
                self.send_response(500)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass
            raise _Abort() from None

    do_GET = _dispatch
    do_HEAD = _dispatch

    def _not_allowed(self):
        self.close_connection = True
        body = b'{"error":"Method not allowed"}'
        self.send_response(405)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _dispatch_post(self):
        """POST exists on the API only (by-hash); the body is read before dispatching."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if self.server.kind != "api" or not 0 <= length <= MAX_POST_BODY:
            return self._not_allowed()
        self.request_body = self.rfile.read(length) if length else b""
        self._dispatch()

    do_POST = _dispatch_post
    do_PUT = do_DELETE = do_PATCH = _not_allowed


def _s3_error(code: str, message: str, extra: str = "") -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>{extra}</Error>"
    ).encode()


_NO_SUCH_KEY = _s3_error("NoSuchKey", "The specified key does not exist.")

_CLOUDFLARE_5XX = (
    "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {reason}</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
    "</body>\r\n</html>\r\n"
)

_CLOUDFLARE_CHALLENGE = """<!DOCTYPE html><html lang="en-US"><head><title>Just a moment...</title>
<meta http-equiv="Content-Type" content="text/html; charset=UTF-8"></head>
<body><div class="main-wrapper" role="main"><div class="main-content">
<h1 class="zone-name-title h1">civitai.com</h1>
<h2 class="h2" id="challenge-running">Checking if the site connection is secure</h2>
</div></div><script src="/cdn-cgi/challenge-platform/h/b/orchestrate/chl_page/v1"></script>
</body></html>
"""

_LOGIN_HTML = """<!DOCTYPE html><html lang="en"><head><meta charSet="utf-8"/>
<meta name="viewport" content="width=device-width, initial-scale=1"/>
<title>Sign in | Civitai</title></head>
<body><div id="__next"><main><h1>Sign in to Civitai</h1>
<p>{message}</p>
<form method="post" action="/api/auth/signin/email"><input type="email" name="email"/>
<button type="submit">Continue</button></form></main></div>
<script id="__NEXT_DATA__" type="application/json">{{"page":"/login","query":{{"reason":"download-auth"}}}}</script>
</body></html>
"""


# --------------------------------------------------------------------------- the fake


class FakeCivitai:
    """Fake Civitai API + download endpoint + CDN on loopback. See module docstring."""

    def __init__(self, host: str = "127.0.0.1", cdn_host: str = "127.0.0.1"):
        self.api_key: str | None = None
        self.cdn_url_ttl_s: float = 3600
        self.enforce_early_access = True  # versions with a future early_access_ends_at answer 403
        self.cdn_expired_status = 403  # what the CDN answers to an expired signature (S3/R2: 403)
        # A CDN that caps each connection (bytes/s, None: no cap): every file body the CDN sends
        # is paced to this rate, as many CDNs pace each TCP connection.
        self.cdn_conn_bps: float | None = None
        self.cdn_conn_burst = 0  # bytes of each answer sent at full speed before the cap applies
        self.cdn_validators = True  # False: a CDN that sends neither ETag nor Last-Modified
        self.cdn_ignores_if_range = False  # True: a Range is honoured even when If-Range does not match
        # Civitai's rolling daily download count: after this many download links, the download
        # endpoint answers 429 with the quota message (None: no quota).
        self.download_quota: int | None = None
        self.downloads_resolved = 0  # download links handed out (307s)
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []  # tracebacks of bugs inside the fake (should stay empty)

        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._closed = False
        self._models: dict[int, dict] = {}
        self._versions: dict[int, dict] = {}
        self._files: dict[int, _File] = {}
        self._faults: dict[int, list[_Fault]] = {}
        self._api_faults: list[_ApiFault] = []
        self._sigs: dict[str, tuple[int, float]] = {}
        self._served: dict[int, int] = {}
        self._images: dict[str, dict] = {}  # the CDN's /images/{key}/{name}: body, type, faults
        self._current = threading.local()

        self._api = _Server((host, 0), _Handler, self, "api")
        self._cdn = _Server((cdn_host, 0), _Handler, self, "cdn")
        self.origin = f"http://{host}:{self._api.server_address[1]}"
        self.cdn_origin = f"http://{cdn_host}:{self._cdn.server_address[1]}"
        self.api_url = self.origin + "/api/v1"
        self._threads = []
        for srv in (self._api, self._cdn):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                 name=f"fakeciv-{srv.kind}", daemon=True)
            t.start()
            self._threads.append(t)

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop both servers; stalled / dripping / blocked handlers are released at once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._closing.set()
        for srv in (self._api, self._cdn):
            srv.shutdown()
            srv.kill_connections()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self) -> FakeCivitai:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- catalogue

    def add_model(self, model_id: int, name: str = "Model", type: str = "Checkpoint",  # noqa: A002
                  versions: list[dict] | None = None, nsfw: bool = False, poi: bool = False,
                  extra: dict | None = None) -> dict:
        """Add (or replace) a model; versions are listed in the given order. Returns its JSON.

        Version dict keys: id, name, published_at, created_at, updated_at, status, base_model,
        early_access_ends_at (ISO; while in the future the download answers 403 Early Access),
        usage_control ("Download"; anything else: the download answers 401 "disabled downloads"),
        extra (merged into the version JSON), files=[file dicts].
        File dict keys: id, name, size_bytes, data, seed (default: the file id), primary,
        type ("Model", "VAE", "Pruned Model", "Config", …), format ("SafeTensor", "PickleTensor",
        "GGUF", …; None: null), fp ("fp16", "fp32", "bf16", …; None: null), size ("pruned",
        "full"; None: null), pickle_scan, virus_scan, pickle_scan_message, virus_scan_message,
        hashed (False: not scanned yet, no hashes; see hash_file), sha256 (advertise this instead
        of the real hash), size_kb (advertise this size), cd_name (filename in the CDN's
        Content-Disposition; default: name), extra.
        A checkpoint with its VAE, fp16 and fp32::

            files=[dict(id=1, name="m.safetensors", primary=True, fp="fp16"),
                   dict(id=2, name="m_fp32.safetensors", fp="fp32", size="full"),
                   dict(id=3, name="m.vae.safetensors", type="VAE", fp=None, size=None)]
        """
        with self._lock:
            old = self._models.get(model_id)
            if old:
                for vid in old["versions"]:
                    self._drop_version(vid)
            self._models[model_id] = dict(id=model_id, name=name, type=type, nsfw=nsfw, poi=poi,
                                          extra=dict(extra or {}), versions=[])
            for v in versions or []:
                self._add_version(model_id, v, None)
        return self.model_json(model_id)

    def add_version(self, model_id: int, version: dict, index: int | None = None) -> dict:
        """Publish another version (appended to modelVersions unless ``index`` is given)."""
        with self._lock:
            self._add_version(model_id, version, index)
        return self.version_json(version["id"])

    def add_image(self, data: bytes, content_type: str = "image/png", *, name: str = "preview.png",
                  nsfw_level: int = 1, type: str = "image", fail_times: int = 0,  # noqa: A002
                  fail_status: int = 503, stall_times: int = 0) -> dict:
        """Host an image on the CDN origin (as image.civitai.com hosts a version's images) and
        return its entry for a version's ``images`` list, shaped like the real ones (url,
        nsfwLevel, width, height, hash, type); pass it through ``extra={"images": [...]}``. The
        first ``fail_times`` GETs of it answer ``fail_status``, as a passing image host fault; the
        first ``stall_times`` never answer (until the fake closes), as a host that hangs."""
        key = secrets.token_hex(8)
        with self._lock:
            self._images[key] = {"data": bytes(data), "ctype": content_type, "fail": int(fail_times),
                                 "status": int(fail_status), "stall": int(stall_times)}
        url = f"{self.cdn_origin}/images/{key}/width=450/{urllib.parse.quote(name, safe='')}"
        return {"url": url, "nsfwLevel": nsfw_level, "width": 450, "height": 450,
                "hash": "U5IiO6s-4Vn+0~EO^5xa00VsL#IU_O?E7yWC", "type": type,
                "metadata": {"size": len(data), "width": 450, "height": 450}}

    def remove_version(self, version_id: int) -> None:
        with self._lock:
            v = self._versions[version_id]
            self._models[v["model_id"]]["versions"].remove(version_id)
            self._drop_version(version_id)

    def _drop_version(self, vid: int) -> None:
        v = self._versions.pop(vid, None)
        if v:
            for fid in v["files"]:
                self._files.pop(fid, None)

    def _add_version(self, model_id: int, spec: dict, index: int | None) -> None:
        m = self._models[model_id]
        vid = int(spec["id"])
        if vid in self._versions:
            raise ValueError(f"version {vid} already exists")
        published = spec.get("published_at") or _iso_now()
        v = dict(
            id=vid, model_id=model_id, name=spec.get("name", f"v{vid}"),
            published_at=published,
            created_at=spec.get("created_at") or published,
            updated_at=spec.get("updated_at") or published,
            status=spec.get("status", "Published"),
            base_model=spec.get("base_model", "SDXL 1.0"),
            early_access_ends_at=spec.get("early_access_ends_at"),
            usage_control=spec.get("usage_control", "Download"),
            trained_words=list(spec.get("trained_words") or []),
            extra=dict(spec.get("extra") or {}),
            files=[],
        )
        files = spec.get("files")
        if files is None:
            files = [dict(id=vid * 10, name=f"model_{vid}.safetensors", primary=True)]
        for fs in files:
            fid = int(fs["id"])
            if fid in self._files:
                raise ValueError(f"file {fid} already exists")
            self._files[fid] = _File(fid, vid, fs)
            v["files"].append(fid)
        self._versions[vid] = v
        if index is None:
            m["versions"].append(vid)
        else:
            m["versions"].insert(index, vid)

    def replace_file(self, file_id: int, data: bytes | None = None, seed: int | None = None,
                     size_bytes: int | None = None, sha256: str | None = None,
                     size_kb: float | None = None) -> None:
        """Give a file new content under the same id; bumps its version's updatedAt.

        With neither data nor seed, the seed is bumped so the content (and hash) changes.
        """
        with self._lock:
            f = self._files[file_id]
            if data is None and seed is None:
                seed = f.seed + 1
            f.set_content(data, f.seed if seed is None else seed,
                          f.size if size_bytes is None else size_bytes, sha256, size_kb)
            self._versions[f.version_id]["updated_at"] = _iso_now()

    def set_file_meta(self, file_id: int, **kw) -> None:
        """Change a file's listed attributes (name, cd_name, primary, format, fp, size,
        pickle_scan, virus_scan, ...)."""
        with self._lock:
            f = self._files[file_id]
            key_map = {"size": "size_label"}
            for k, val in kw.items():
                attr = key_map.get(k, k)
                if not hasattr(f, attr):
                    raise AttributeError(k)
                setattr(f, attr, val)

    def hash_file(self, file_id: int) -> None:
        """Civitai finished scanning a file: its hashes (and scan results) appear."""
        with self._lock:
            self._files[file_id].hashed = True

    def file_bytes(self, file_id: int) -> bytes:
        return self._files[file_id].content()

    def file_sha256(self, file_id: int) -> str:
        """The real SHA-256 of the served content, upper-case hex."""
        return self._files[file_id].real_hashes()[0]

    def file_size(self, file_id: int) -> int:
        return self._files[file_id].size

    def file_name(self, file_id: int) -> str:
        return self._files[file_id].name

    def read_range(self, file_id: int, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file's content."""
        return b"".join(bytes(c) for _, c in self._files[file_id].chunks(start, end))

    # ----------------------------------------------------------------- JSON builders

    def _download_url(self, vid: int, f: _File | None = None) -> str:
        url = f"{self.origin}/api/download/models/{vid}"
        if f is not None and not f.primary:
            q = {"type": f.type, "format": f.format}
            if f.size_label:
                q["size"] = f.size_label
            if f.fp:
                q["fp"] = f.fp
            url += "?" + urllib.parse.urlencode(q)
        return url

    def _file_json(self, f: _File, listing: bool = False) -> dict:
        """A file as the version endpoints show it; ``listing``: as /models does, which drops
        null metadata keys and shows ``primary`` only when true (civitai-api.md §1.2)."""
        size_kb = f.size_kb_override if f.size_kb_override is not None else f.size / 1024
        meta = {"format": f.format, "size": f.size_label, "fp": f.fp}
        j = {
            "id": f.id,
            "sizeKB": size_kb,
            "name": f.name,
            "type": f.type,
            "pickleScanResult": f.pickle_scan if f.hashed else "Pending",
            "pickleScanMessage": f.pickle_scan_message if f.hashed else None,
            "virusScanResult": f.virus_scan if f.hashed else "Pending",
            "virusScanMessage": f.virus_scan_message,
            "scannedAt": _iso_of(f.mtime) if f.hashed else None,
            "metadata": {k: v for k, v in meta.items() if v is not None} if listing else meta,
            "hashes": f.hashes_json() if f.hashed else {},
            "primary": f.primary,
            "downloadUrl": self._download_url(f.version_id, f),
        }
        if listing and not f.primary:
            del j["primary"]
        j.update(f.extra)
        return j

    def _availability(self, v: dict) -> str:
        ends = _parse_iso(v["early_access_ends_at"])
        return "EarlyAccess" if ends and ends > datetime.now(UTC) else "Public"

    def _version_core(self, v: dict, listing: bool = False) -> dict:
        m = self._models[v["model_id"]]
        j = {
            "id": v["id"],
            "modelId": v["model_id"],
            "name": v["name"],
            "createdAt": v["created_at"],
            "updatedAt": v["updated_at"],
            "status": v["status"],
            "publishedAt": v["published_at"],
            "trainedWords": list(v["trained_words"]),
            "baseModel": v["base_model"],
            "baseModelType": "Standard",
            "earlyAccessEndsAt": v["early_access_ends_at"],
            "availability": self._availability(v),
            "nsfwLevel": 1,
            "description": None,
            "uploadType": "Created",
            "usageControl": v["usage_control"],
            "air": f"urn:air:sdxl:{m['type'].lower()}:civitai:{m['id']}@{v['id']}",
            "stats": {"downloadCount": 0, "ratingCount": 0, "rating": 0, "thumbsUpCount": 0,
                      "thumbsDownCount": 0},
            "files": [self._file_json(self._files[fid], listing) for fid in v["files"]],
            "images": [],
            "downloadUrl": self._download_url(v["id"]),
        }
        if listing and j["availability"] == "EarlyAccess":
            j["earlyAccessDeadline"] = v["early_access_ends_at"]  # the list's name for it
        return j

    def version_json(self, version_id: int) -> dict:
        """As ``GET /api/v1/model-versions/{id}`` answers (with ``model: {...}``)."""
        with self._lock:
            v = self._versions[version_id]
            m = self._models[v["model_id"]]
            j = self._version_core(v)
            j["earlyAccessConfig"] = None
            j["trainingStatus"] = None
            j["trainingDetails"] = None
            j["model"] = {"name": m["name"], "type": m["type"], "nsfw": m["nsfw"], "poi": m["poi"]}
            j.update(v["extra"])
            return j

    def model_json(self, model_id: int) -> dict:
        """As ``GET /api/v1/models/{id}`` answers."""
        with self._lock:
            m = self._models[model_id]
            mvs = []
            for i, vid in enumerate(m["versions"]):
                v = self._versions[vid]
                j = self._version_core(v, listing=True)
                j["index"] = i
                j["covered"] = True
                j.update(v["extra"])
                mvs.append(j)
            j = {
                "id": m["id"],
                "name": m["name"],
                "description": f"<p>{m['name']}</p>",
                "allowNoCredit": True,
                "allowCommercialUse": ["Image", "RentCivit"],
                "allowDerivatives": True,
                "allowDifferentLicense": True,
                "type": m["type"],
                "minor": False,
                "sfwOnly": False,
                "poi": m["poi"],
                "nsfw": m["nsfw"],
                "nsfwLevel": 1,
                "availability": "Public",
                "cosmetic": None,
                "supportsGeneration": False,
                "stats": {"downloadCount": 0, "favoriteCount": 0, "thumbsUpCount": 0,
                          "thumbsDownCount": 0, "commentCount": 0, "ratingCount": 0, "rating": 0,
                          "tippedAmountCount": 0},
                "creator": {"username": "fake-creator", "image": None},
                "tags": [],
                "modelVersions": mvs,
            }
            j.update(m["extra"])
            return j

    # ----------------------------------------------------------------- CDN URLs

    def cdn_url(self, file_id: int, ttl_s: float | None = None) -> str:
        """Mint a signed CDN URL for a file (what the download endpoint redirects to)."""
        f = self._files[file_id]
        sig = secrets.token_hex(16)
        exp = time.time() + (self.cdn_url_ttl_s if ttl_s is None else ttl_s)
        with self._lock:
            self._sigs[sig] = (file_id, exp)
        return (f"{self.cdn_origin}/files/{file_id}/{urllib.parse.quote(f.name, safe='')}"
                f"?sig={sig}&exp={int(exp)}")

    def expire_cdn_urls(self) -> None:
        """Make every CDN URL handed out so far expired."""
        with self._lock:
            past = time.time() - 1
            self._sigs = {s: (fid, past) for s, (fid, _) in self._sigs.items()}

    def download_url(self, version_id: int, file_id: int | None = None) -> str:
        url = f"{self.origin}/api/download/models/{version_id}"
        return url + (f"?fileId={file_id}" if file_id is not None else "")

    # ----------------------------------------------------------------- faults

    def set_fault(self, file_id: int, mode: str, times: int | None = None, **params) -> None:
        """Add a fault for downloads of ``file_id``. Several faults stack (first added first).

        ``where="api"|"cdn"`` picks the side: default "api" (the download endpoint) for status,
        html_login and json_error, "cdn" for the rest. ``times=N``: the next N matching GET
        requests on that side, then normal; None: always. HEAD requests are never faulted.
        Params: stall(after_bytes, seconds=None->until close, resume=False, before_headers=False),
        drip(bps, after_bytes=0), reset(after_bytes, before_headers=False), short(after_bytes),
        wrong_bytes(offset | offsets=[..]; default: middle of the served range),
        status(code, retry_after, body, headers, deadline, message, quota: a 429 with the daily
        quota's message instead of a plain rate limit), html_login(via_redirect),
        json_error(body), redirect_chain(n=3: n extra 302 hops on the CDN), redirect_loop (302 to
        itself forever), expire_cdn(code=403), ignore_range,
        endless(framing="close"|"chunked", extra_bytes=None, bps=None): no Content-Length, the
        file's bytes and then more without end (None) or ``extra_bytes`` more,
        overlong(extra_bytes=1 MiB, declared="file"|"body", extra_after_s=0): ``extra_bytes`` past
        the end of the file (``extra_after_s`` after it), with a Content-Length of the file's range
        ("file": the body is longer than it claims) or of the whole body ("body": the host claims
        more than the file).
        change(data, sha256): the file gets this content (a new ETag) just before the request is
        answered, as when its owner uploads a new file while a download runs; requests answered
        before keep streaming the old content.
        after_bytes defaults to half of the response body.
        Any fault with ``only_from=N`` plays only on a CDN request whose Range starts at byte N or
        later (one range among several connections' ranges).
        """
        if mode not in FILE_FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}")
        if file_id not in self._files:
            raise KeyError(f"no file {file_id}")
        if mode == "status":
            code = params.get("code")
            if code not in _STATUS_CODES:
                raise ValueError(f"status fault needs code in {sorted(_STATUS_CODES)}")
        if mode == "drip" and not params.get("bps"):
            raise ValueError("drip needs bps")
        where = params.pop("where", "api" if mode in _API_SIDE_DEFAULT else "cdn")
        if where not in ("api", "cdn"):
            raise ValueError("where must be 'api' or 'cdn'")
        if where == "api" and mode not in _API_SIDE_ALLOWED:
            raise ValueError(f"fault {mode!r} only works on the CDN")
        with self._lock:
            self._faults.setdefault(file_id, []).append(_Fault(mode, where, times, params))

    def clear_faults(self, file_id: int | None = None) -> None:
        """Clear one file's faults; with no file id, clear all file faults and API faults."""
        with self._lock:
            if file_id is None:
                self._faults.clear()
                self._api_faults.clear()
            else:
                self._faults.pop(file_id, None)

    def set_api_fault(self, pattern: str, status: int | str, body: Any = None,
                      headers: dict | None = None, times: int | None = None,
                      delay_s: float = 0.0) -> None:
        """Answer API-server requests whose path+query matches ``pattern`` (re.search) with
        ``status``. Also applies to the download endpoint and /login. ``status`` may be
        "reset" (RST, no answer) or "stall" (no answer until ``delay_s`` or close()).
        ``body``: dict/list -> JSON; str/bytes as is; None -> {"error": ...} like Civitai."""
        with self._lock:
            self._api_faults.append(_ApiFault(re.compile(pattern), status, body, headers, times,
                                              delay_s))

    def _take_fault(self, file_id: int, where: str, range_start: int | None = None) -> _Fault | None:
        with self._lock:
            lst = self._faults.get(file_id) or []
            for i, flt in enumerate(lst):
                if flt.where != where:
                    continue
                only_from = flt.params.get("only_from")
                if only_from is not None and (range_start or 0) < int(only_from):
                    continue
                if flt.times is not None:
                    flt.times -= 1
                    if flt.times <= 0:
                        lst.pop(i)
                return flt
        return None

    def _take_api_fault(self, target: str) -> _ApiFault | None:
        with self._lock:
            for i, flt in enumerate(self._api_faults):
                if flt.pattern.search(target):
                    if flt.times is not None:
                        flt.times -= 1
                        if flt.times <= 0:
                            self._api_faults.pop(i)
                    return flt
        return None

    # ----------------------------------------------------------------- inspection

    def faults_left(self, file_id: int) -> int:
        """How many faults of a file are still waiting to be played (times=None counts once)."""
        with self._lock:
            return len(self._faults.get(file_id) or [])

    def bytes_served(self, file_id: int) -> int:
        with self._lock:
            return self._served.get(file_id, 0)

    def requests_to(self, server: str | None = None, path_re: str | None = None,
                    method: str | None = None) -> list[RecordedRequest]:
        rx = re.compile(path_re) if path_re else None
        return [r for r in list(self.requests)
                if (server is None or r.server == server)
                and (method is None or r.method == method)
                and (rx is None or rx.search(r.url_path))]

    def clear_requests(self) -> None:
        self.requests.clear()

    # ----------------------------------------------------------------- request handling

    def _handle(self, h: _Handler, kind: str) -> None:
        parts = urllib.parse.urlsplit(h.path)
        rec = RecordedRequest(kind, h.command, parts.path, parts.query,
                              CIHeaders(h.headers.items()), time.time(),
                              getattr(h, "request_body", b""))
        with self._lock:
            self.requests.append(rec)
        self._current.rec = rec  # one handler thread per connection: the bytes it sends are this request's
        if kind == "api":
            self._handle_api(h, parts)
        else:
            self._handle_cdn(h, parts)

    # -- responses

    def _respond(self, h: _Handler, code: int, body: bytes = b"",
                 ctype: str | None = "application/json; charset=utf-8",
                 headers: dict | None = None) -> None:
        h.send_response(code)
        hdrs = {}
        if ctype:
            hdrs["Content-Type"] = ctype
        hdrs.update(headers or {})
        hdrs["Content-Length"] = str(len(body))
        for k, v in hdrs.items():
            h.send_header(k, str(v))
        h.end_headers_with(body)

    def _json(self, h: _Handler, code: int, obj: Any, headers: dict | None = None) -> None:
        self._respond(h, code, json.dumps(obj).encode(), headers=headers)

    def _reset(self, h: _Handler) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0)."""
        sock = h.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            fd = sock.detach()
            socket.close(fd)
        except OSError:
            pass
        raise _Abort()

    def _wait(self, seconds: float | None) -> None:
        self._closing.wait(seconds)
        if self._closing.is_set():
            raise _Abort()

    # -- API server

    def _handle_api(self, h: _Handler, parts) -> None:
        path, query = parts.path, parts.query
        target = path + ("?" + query if query else "")
        af = self._take_api_fault(target)
        if af is not None:
            self._apply_api_fault(h, af)
            return
        if h.command == "POST":
            if re.fullmatch(r"/api/v1/model-versions/by-hash/?", path):
                return self._by_hashes(h)
            return self._json(h, 405, {"error": "Method not allowed"})
        qs = urllib.parse.parse_qs(query)
        m = re.fullmatch(r"/api/v1/models/([^/]+)/?", path)
        if m:
            mid = _int(m.group(1))
            if mid is None:
                return self._json(h, 400, {"error": f"Invalid id: {m.group(1)}"})
            with self._lock:
                known = mid in self._models
            if not known:
                return self._json(h, 404, {"error": f"No model with id {mid}"})
            return self._json(h, 200, self.model_json(mid))
        m = re.fullmatch(r"/api/v1/model-versions/by-hash/([^/]+)/?", path)
        if m:
            # Any of the file's hashes, in any case (the real handler upper-cases it).
            want = urllib.parse.unquote(m.group(1)).upper()
            found = self._files_by_hash(lambda hashes: want in hashes.values())
            if not found:
                return self._json(h, 404, {"error": "Model not found"})
            return self._json(h, 200, self.version_json(found[0].version_id))
        m = re.fullmatch(r"/api/v1/model-versions/([^/]+)/?", path)
        if m:
            vid = _int(m.group(1))
            if vid is None:
                return self._json(h, 400, {"error": f"Invalid id: {m.group(1)}"})
            with self._lock:
                known = vid in self._versions
            if not known:
                return self._json(h, 404, {"error": f"No model version with id {vid}"})
            return self._json(h, 200, self.version_json(vid))
        if re.fullmatch(r"/api/v1/models/?", path):
            return self._models_list(h, qs, query)
        m = re.fullmatch(r"/api/download/models/([^/]+)/?", path)
        if m:
            return self._download(h, m.group(1), qs)
        if path == "/login":
            msg = LOGIN_MESSAGE if "download-auth" in query else "Sign in"
            return self._respond(h, 200, _LOGIN_HTML.format(message=msg).encode(),
                                 "text/html; charset=utf-8")
        return self._json(h, 404, {"error": "Not found"})

    def _files_by_hash(self, match) -> list[_File]:
        """Hashed files of published versions whose hashes satisfy ``match``, oldest publication
        first (by-hash answers the oldest of duplicate uploads)."""
        with self._lock:
            files = [f for f in self._files.values() if f.hashed
                     and self._versions[f.version_id]["status"] == "Published"]
            published = {f.id: self._versions[f.version_id]["published_at"] for f in files}
        files.sort(key=lambda f: (published[f.id], f.version_id, f.id))
        return [f for f in files if match(f.hashes_json())]

    def _by_hashes(self, h: _Handler) -> None:
        """``POST /model-versions/by-hash``: a JSON array of up to 100 SHA-256 values; one
        version object per matching file, unmatched hashes simply absent (civitai/civitai
        src/pages/api/v1/model-versions/by-hash/index.ts)."""
        try:
            wanted = json.loads(getattr(h, "request_body", b"") or b"null")
        except ValueError:
            wanted = None
        problem = None
        if not isinstance(wanted, list):
            problem = "Expected array"
        elif len(wanted) > BY_HASH_MAX:
            problem = "Too many hashes"
        elif not all(isinstance(x, str) and len(x) == 64 for x in wanted):
            problem = "Invalid hash"
        if problem:
            return self._json(h, 400, {"error": f"Request must include an array of SHA256 Hashes. {problem}"})
        want = {x.upper() for x in wanted}
        found = self._files_by_hash(lambda hashes: hashes.get("SHA256") in want)
        self._json(h, 200, [self.version_json(f.version_id) for f in found])

    def metadata_fault(self, kind: str, times: int | None = 1, path: str = r"/api/v1/(models|model-versions)/") -> None:
        """Transient answers of the metadata API for the next ``times`` requests whose path
        matches ``path``: "404" (as moments after publishing), "html_403" (a Cloudflare check
        page), "500" (JSON) or "502"/"503" (Cloudflare's HTML error pages)."""
        if kind == "404":
            self.set_api_fault(path, 404, body={"error": "Model not found"}, times=times)
        elif kind == "html_403":
            self.set_api_fault(path, 403, body=_CLOUDFLARE_CHALLENGE, times=times,
                               headers={"Content-Type": "text/html; charset=UTF-8", "cf-mitigated": "challenge"})
        elif kind == "500":
            self.set_api_fault(path, 500, body={"error": "Failed to fetch model version details"}, times=times)
        elif kind in ("502", "503"):
            code = int(kind)
            reason = http.server.BaseHTTPRequestHandler.responses[code][0]
            self.set_api_fault(path, code, body=_CLOUDFLARE_5XX.format(code=code, reason=reason), times=times)
        else:
            raise ValueError(f"unknown metadata fault {kind!r}")

    def _apply_api_fault(self, h: _Handler, af: _ApiFault) -> None:
        if af.status == "reset":
            self._reset(h)
        if af.status == "stall":
            self._wait(af.delay_s or None)
            h.close_connection = True
            raise _Abort()
        if af.delay_s:
            self._wait(af.delay_s)
        code = int(af.status)
        body, ctype = af.body, "application/json; charset=utf-8"
        if body is None:
            # The metadata API's 429 is a plain rate limit: the quota's words belong to downloads.
            message = RATE_LIMIT_MESSAGE if code == 429 else _api_error_message(code)
            body = json.dumps({"error": message}).encode()
        elif isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        else:
            if isinstance(body, str):
                body = body.encode()
            ctype = "text/html; charset=utf-8" if body.lstrip()[:1] == b"<" else "text/plain"
        headers = dict(af.headers or {})
        if "Content-Type" in headers:
            ctype = headers.pop("Content-Type")
        self._respond(h, code, body, ctype, headers)

    def _models_list(self, h: _Handler, qs: dict, query: str) -> None:
        ids: list[int] | None = None
        if "ids" in qs:
            ids = []
            for raw in qs["ids"]:
                for part in raw.split(","):
                    n = _int(part.strip())
                    if n is None and part.strip():
                        return self._json(h, 400, {"error": f"Invalid ids: {raw}"})
                    if n is not None:
                        ids.append(n)
        limit = _int((qs.get("limit") or ["100"])[0])
        if limit is None or not 0 < limit <= 100:
            return self._json(h, 400, {"error": "limit must be between 1 and 100"})
        cursor = _int((qs.get("cursor") or ["0"])[0]) or 0
        types = set(t for raw in qs.get("types", []) for t in raw.split(","))
        with self._lock:
            mids = [mid for mid in self._models
                    if (ids is None or mid in ids)
                    and (not types or self._models[mid]["type"] in types)]
        page = mids[cursor:cursor + limit]
        items = [self.model_json(mid) for mid in page]
        meta: dict = {"currentPage": cursor // limit + 1, "pageSize": limit}
        if cursor + limit < len(mids):
            nxt = cursor + limit
            meta["nextCursor"] = str(nxt)
            q = {k: v for k, v in urllib.parse.parse_qsl(query) if k != "cursor"}
            q["cursor"] = str(nxt)
            meta["nextPage"] = f"{self.api_url}/models?{urllib.parse.urlencode(q)}"
        self._json(h, 200, {"items": items, "metadata": meta})

    def _download(self, h: _Handler, raw_vid: str, qs: dict) -> None:
        vid = _int(raw_vid)
        if vid is None:
            return self._json(h, 400, {"error": f"Invalid id: {raw_vid}"})
        with self._lock:
            v = self._versions.get(vid)
            files = [self._files[fid] for fid in v["files"]] if v else []
        if v is None:
            return self._json(h, 404, {"error": "Model not found"})
        f = None
        if "fileId" in qs:
            fid = _int(qs["fileId"][0])
            f = next((x for x in files if x.id == fid), None)
        else:
            filt = {k: qs[k][0] for k in ("type", "format", "size", "fp") if k in qs}
            if filt:
                for x in files:
                    attrs = {"type": x.type, "format": x.format, "size": x.size_label, "fp": x.fp}
                    if all(str(attrs[k]) == val for k, val in filt.items()):
                        f = x
                        break
            else:
                f = next((x for x in files if x.primary), files[0] if files else None)
        if f is None:
            return self._json(h, 404, {"error": "File not found"})

        if h.command == "GET":
            flt = self._take_fault(f.id, "api")
            if flt is not None:
                return self._apply_body_fault(h, f, flt, side="api")

        with self._lock:
            over_quota = self.download_quota is not None and self.downloads_resolved >= self.download_quota
        if over_quota:  # checked first, like the rolling 24 h count of the real endpoint
            return self._json(h, 429, {"error": _api_error_message(429)})
        if self.api_key is not None:
            auth = h.headers.get("Authorization", "")
            if auth != f"Bearer {self.api_key}":
                return self._json(h, 401, {"error": "Unauthorized", "message": LOGIN_MESSAGE})
        if self.enforce_early_access and self._availability(v) == "EarlyAccess":
            return self._json(h, 403, _early_access_body(v["early_access_ends_at"]))
        if v["usage_control"] != "Download":
            return self._json(h, 401, {"error": "Unauthorized", "message": DISABLED_MESSAGE})
        with self._lock:
            self.downloads_resolved += 1
        self._respond(h, 307, b"", None, {"Location": self.cdn_url(f.id),
                                          "Cache-Control": "no-store"})

    def _apply_body_fault(self, h: _Handler, f: _File, flt: _Fault, side: str) -> None:
        """Faults that replace the answer (both sides): status, html_login, json_error,
        and stall/reset before headers."""
        p = flt.params
        mode = flt.mode
        if mode == "status":
            code = int(p["code"])
            headers = dict(p.get("headers") or {})
            if p.get("retry_after") is not None:
                headers["Retry-After"] = str(p["retry_after"])
            body = p.get("body")
            if side == "cdn":
                ctype = "application/xml"
                if body is None:
                    body = _cdn_error_body(code)
            else:
                ctype = "application/json; charset=utf-8"
                if body is None:
                    if code == 403 and p.get("early_access", True):
                        dl = p.get("deadline") or _iso_now(3 * 86400)
                        body = _early_access_body(dl, p.get("message"))
                    elif code in (502, 503, 504):
                        reason = http.server.BaseHTTPRequestHandler.responses[code][0]
                        body = _CLOUDFLARE_5XX.format(code=code, reason=reason)
                        ctype = "text/html"
                    elif code == 429 and not p.get("quota"):
                        body = {"error": RATE_LIMIT_MESSAGE}  # quota=True: the daily quota's answer
                    else:
                        body = {"error": _api_error_message(code)}
                        if code == 401:
                            body["message"] = LOGIN_MESSAGE
                        if p.get("message"):
                            body["message"] = p["message"]
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            if isinstance(body, str):
                body = body.encode()
            if "Content-Type" in headers:
                ctype = headers.pop("Content-Type")
            return self._respond(h, code, body, ctype, headers)
        if mode == "html_login":
            if p.get("via_redirect") and side == "api":
                loc = (f"{self.origin}/login?reason=download-auth&returnUrl="
                       f"{urllib.parse.quote(f'/model-versions/{f.version_id}')}")
                return self._respond(h, 307, b"", None, {"Location": loc})
            return self._respond(h, 200, _LOGIN_HTML.format(message=LOGIN_MESSAGE).encode(),
                                 "text/html; charset=utf-8")
        if mode == "json_error":
            body = p.get("body") or {"error": "Unauthorized", "message": LOGIN_MESSAGE}
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            if isinstance(body, str):
                body = body.encode()
            return self._respond(h, 200, body, "application/json; charset=utf-8")
        if mode == "stall":  # before any answer
            self._wait(p.get("seconds"))
            h.close_connection = True
            raise _Abort()
        if mode == "reset":
            self._reset(h)
        if mode == "expire_cdn":  # meaningful on the CDN; on the API side answer like the CDN
            code = int(p.get("code", self.cdn_expired_status))
            return self._respond(h, code, _expired_body(time.time() - 1), "application/xml")
        if mode == "redirect_loop":
            return self._respond(h, 307, b"", None, {"Location": self.download_url(
                f.version_id, f.id)})
        raise ValueError(f"fault {mode} cannot be used where={side}")

    # -- CDN server

    def _image(self, h: _Handler, key: str) -> None:
        with self._lock:
            img = self._images.get(key)
            stalling = img is not None and img["stall"] > 0
            failing = img is not None and not stalling and img["fail"] > 0
            if stalling:
                img["stall"] -= 1
            elif failing:
                img["fail"] -= 1
        if stalling:
            self._wait(None)  # until the fake closes
        if img is None:
            return self._respond(h, 404, _NO_SUCH_KEY, "application/xml")
        if failing:
            return self._respond(h, img["status"], b"<html><body>temporarily unavailable</body></html>",
                                 "text/html", {"Retry-After": "1"})
        self._respond(h, 200, img["data"], img["ctype"], {"Cache-Control": "public, max-age=31536000"})

    def _handle_cdn(self, h: _Handler, parts) -> None:
        m = re.fullmatch(r"/images/([0-9a-f]+)/.*", parts.path)
        if m:
            return self._image(h, m.group(1))
        m = re.fullmatch(r"(?:/hop/([^/]+))?/files/(\d+)/([^/]*)", parts.path)
        if not m:
            return self._respond(h, 404, _NO_SUCH_KEY, "application/xml")
        hop, fid = m.group(1), int(m.group(2))
        qs = urllib.parse.parse_qs(parts.query)
        sig = (qs.get("sig") or [""])[0]
        with self._lock:
            entry = self._sigs.get(sig)
            f = self._files.get(fid)
        if entry is None or entry[0] != fid:
            return self._respond(h, 403, _s3_error(
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided."),
                "application/xml")
        if time.time() > entry[1]:
            return self._respond(h, self.cdn_expired_status, _expired_body(entry[1]),
                                 "application/xml")
        if f is None:
            return self._respond(h, 404, _NO_SUCH_KEY, "application/xml")
        file_path = f"/files/{fid}/{m.group(3)}?{parts.query}"
        if hop == "loop":
            return self._respond(h, 302, b"", None,
                                 {"Location": f"{self.cdn_origin}/hop/loop{file_path}"})
        if hop is not None:
            n = _int(hop) or 0
            if n > 0:
                return self._respond(h, 302, b"", None,
                                     {"Location": f"{self.cdn_origin}/hop/{n - 1}{file_path}"})
            # hop 0: the end of a chain -> serve, without taking another fault

        flt = None
        if h.command == "GET" and hop is None:
            rng = re.match(r"\s*bytes=(\d+)-", h.headers.get("Range") or "")
            flt = self._take_fault(fid, "cdn", int(rng.group(1)) if rng else 0)
        if flt is not None and flt.mode == "change":
            self.replace_file(fid, data=flt.params.get("data"), sha256=flt.params.get("sha256"))
            flt = None  # served as the new content: an If-Range of the old ETag now brings it whole
        if flt is not None:
            if flt.mode == "expire_cdn":
                code = int(flt.params.get("code", self.cdn_expired_status))
                return self._respond(h, code, _expired_body(time.time() - 1), "application/xml")
            if flt.mode == "redirect_loop":
                return self._respond(h, 302, b"", None,
                                 {"Location": f"{self.cdn_origin}/hop/loop{file_path}"})
            if flt.mode == "redirect_chain":
                n = int(flt.params.get("n", 3))
                if n > 0:
                    return self._respond(h, 302, b"", None,
                                         {"Location": f"{self.cdn_origin}/hop/{n - 1}{file_path}"})
                flt = None
            elif flt.mode in ("status", "html_login", "json_error") or (
                    flt.mode in ("stall", "reset") and flt.params.get("before_headers")):
                return self._apply_body_fault(h, f, flt, side="cdn")
        self._serve_file(h, f, flt)

    def _serve_file(self, h: _Handler, f: _File, flt: _Fault | None) -> None:
        f = f.snapshot()
        size = f.size
        etag = f.etag
        lastmod = f.last_modified
        mode = flt.mode if flt else None
        start, end, partial = 0, size, False
        rng = h.headers.get("Range")
        if rng is not None and mode != "ignore_range":
            if_range = h.headers.get("If-Range")
            honour = True
            if if_range is not None and not self.cdn_ignores_if_range:
                if_range = if_range.strip()
                if if_range.startswith('"') or if_range.startswith("W/"):
                    honour = if_range == etag  # strong comparison
                else:
                    honour = _same_date(if_range, f.mtime)
            if honour:
                r = _parse_range(rng, size)
                if r == "unsatisfiable":
                    return self._respond(h, 416, _s3_error(
                        "InvalidRange", "The requested range is not satisfiable"),
                        "application/xml", {"Content-Range": f"bytes */{size}",
                                            "Accept-Ranges": "bytes"})
                if r is not None:
                    start, end = r
                    partial = True
        cd = _content_disposition(f.cd_name if f.cd_name is not None else f.name)
        h.send_response(206 if partial else 200)
        h.send_header("Content-Type", "application/octet-stream")
        p = flt.params if flt else {}
        extra = int(p.get("extra_bytes", BLOCK_SIZE)) if mode == "overlong" else 0
        if mode == "endless":
            # No length at all: the body ends when the connection closes (or the last chunk
            # comes), here only when the client gives up.
            if p.get("framing", "close") == "chunked":
                h.send_header("Transfer-Encoding", "chunked")
            else:
                h.send_header("Connection", "close")
        elif mode == "overlong" and p.get("declared", "file") == "body":
            h.send_header("Content-Length", str(end - start + extra))  # claims the extra too
        else:
            h.send_header("Content-Length", str(end - start))
        h.send_header("Accept-Ranges", "bytes")
        if self.cdn_validators:
            h.send_header("ETag", etag)
            h.send_header("Last-Modified", lastmod)
        h.send_header("Content-Disposition", cd)
        h.send_header("Cache-Control", "private, max-age=0")
        if partial:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        if h.command == "HEAD":
            return h.end_headers_with()
        if mode in ("endless", "overlong"):
            h.end_headers_with()
            return self._stream_past_end(h, f, start, end, mode, p, extra)
        if flt is None and end - start <= SMALL_BODY and not self.cdn_conn_bps:
            body = b"".join(bytes(c) for _, c in f.chunks(start, end))
            self._sent(f.id, len(body), h.end_headers_with, body)
            return
        h.end_headers_with()
        self._stream(h, f, start, end, flt)

    def _stream_past_end(self, h: _Handler, f: _File, start: int, end: int, mode: str, p: dict,
                         extra: int) -> None:
        """The file's bytes [start, end), then more: ``extra`` bytes (overlong), or for endless
        ``extra_bytes`` bytes (None: without end, until the client closes or the fake does).
        The bytes past the end continue the file's generator, so they look like model data."""
        chunked = mode == "endless" and p.get("framing", "close") == "chunked"
        limit = p.get("extra_bytes") if mode == "endless" else extra
        bps = p.get("bps")
        closing = self._closing
        write = h.wfile.write
        t0 = time.monotonic()
        sent = 0

        def out(view) -> None:
            nonlocal sent
            if closing.is_set():
                raise _Abort()
            if chunked:
                self._sent(f.id, len(view), write, b"%x\r\n" % len(view) + bytes(view) + b"\r\n")
            else:
                self._sent(f.id, len(view), write, view)
            sent += len(view)
            if bps:
                delay = t0 + sent / float(bps) - time.monotonic()
                if delay > 0 and closing.wait(delay):
                    raise _Abort()

        step = BLOCK_SIZE if not bps else max(1, min(BLOCK_SIZE, int(float(bps) * 0.05)))
        for _, view in f.chunks(start, end):
            for i in range(0, len(view), step):
                out(view[i:i + step])
        idx = max(end, f.size) // BLOCK_SIZE + 1
        past = 0
        if p.get("extra_after_s") and closing.wait(float(p["extra_after_s"])):
            raise _Abort()  # the extra bytes come late: after a client has taken the connection back
        while limit is None or past < int(limit):
            block = memoryview(_gen_block(f.seed + 1, idx))
            idx += 1
            n = len(block) if limit is None else min(len(block), int(limit) - past)
            for i in range(0, n, step):
                out(block[i:min(n, i + step)])
            past += n
        if chunked:
            write(b"0\r\n\r\n")
        h.close_connection = True  # a client that read only the declared length left bytes behind

    def _sent(self, fid: int, n: int, write, data) -> None:
        """Send `data` (n bytes of the file) and count them. Counted first: a client that has
        read the last byte may ask bytes_served() before this thread runs again, and must see
        every byte it got; a send that fails takes its count back."""
        self._count(fid, n)
        try:
            write(data)
        except BaseException:
            self._count(fid, -n)
            raise

    def _count(self, fid: int, n: int) -> None:
        with self._lock:
            self._served[fid] = self._served.get(fid, 0) + n
            rec = getattr(self._current, "rec", None)
            if rec is not None:
                rec.sent += n

    def _stream(self, h: _Handler, f: _File, start: int, end: int, flt: _Fault | None) -> None:
        mode = flt.mode if flt else None
        p = flt.params if flt else {}
        total = end - start
        cut = None
        if mode in ("stall", "reset", "short"):
            ab = p.get("after_bytes")
            cut = total // 2 if ab is None else max(0, min(int(ab), total))
        flips: list[int] = []
        if mode == "wrong_bytes":
            if p.get("offsets") is not None:
                flips = [int(o) for o in p["offsets"]]
            elif p.get("offset") is not None:
                flips = [int(p["offset"])]
            else:
                flips = [start + total // 2]
        bps = float(p["bps"]) if mode == "drip" else None
        drip_after = int(p.get("after_bytes", 0) or 0) if mode == "drip" else 0
        if bps is None and self.cdn_conn_bps:
            bps = float(self.cdn_conn_bps)  # the per-connection cap (a drip fault sets its own rate)
            drip_after = int(self.cdn_conn_burst)  # like nginx's limit_rate_after
        write = h.wfile.write
        fid = f.id
        sent = 0
        closing = self._closing

        def out(view) -> None:
            nonlocal sent
            if bps is None or sent + len(view) <= drip_after:
                self._sent(fid, len(view), write, view)
                sent += len(view)
                return
            if sent < drip_after:
                k = drip_after - sent
                self._sent(fid, k, write, view[:k])
                sent += k
                view = view[k:]
            tick = 0.05
            step = max(1, int(bps * tick))
            t0 = time.monotonic()
            done = 0
            while done < len(view):
                piece = view[done:done + step]
                self._sent(fid, len(piece), write, piece)
                done += len(piece)
                sent += len(piece)
                delay = t0 + done / bps - time.monotonic()
                if delay > 0 and closing.wait(delay):
                    raise _Abort()

        if cut is None or cut > 0:
            for off, view in f.chunks(start, end):
                if closing.is_set():
                    raise _Abort()
                if flips:
                    hit = [o - off for o in flips if off <= o < off + len(view)]
                    if hit:
                        b = bytearray(view)
                        for i in hit:
                            b[i] ^= 0xFF
                        view = memoryview(b)
                if cut is not None and sent + len(view) >= cut:
                    out(view[:cut - sent])
                    break
                out(view)
        if cut is None:
            return
        h.close_connection = True
        if mode == "reset":
            self._reset(h)
        if mode == "short":
            raise _Abort()  # graceful close (FIN) with the body incomplete
        if mode == "stall":
            self._wait(p.get("seconds"))
            if not p.get("resume"):
                raise _Abort()
            for _, view in f.chunks(start + cut, end):
                if closing.is_set():
                    raise _Abort()
                out(view)


# --------------------------------------------------------------------------- module helpers


def _int(s: str) -> int | None:
    try:
        return int(s)
    except (TypeError, ValueError):
        return None


def _iso_of(ts: float) -> str:
    t = datetime.fromtimestamp(ts, UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _api_error_message(code: int) -> str:
    return {
        400: "Bad Request",
        401: "Unauthorized",
        403: "Forbidden",
        404: "File not found",
        410: "Model archived, not available for download",
        429: ("We've noticed an unusual amount of downloading from your account. "
              "Contact support@civitai.com or come back later."),
        500: "Error getting file",
    }.get(code, http.server.BaseHTTPRequestHandler.responses.get(code, ("Error",))[0])


def _early_access_body(deadline: str | None, message: str | None = None) -> dict:
    """As the download endpoint answers a version in early access (civitai-api.md §3.2)."""
    return {"error": "Early Access", "deadline": deadline or _iso_now(3 * 86400),
            "message": message or EARLY_ACCESS_MESSAGE}


def _expired_body(exp: float) -> bytes:
    return _s3_error(
        "AccessDenied", "Request has expired",
        f"<Expires>{_iso_of(exp)}</Expires><ServerTime>{_iso_of(time.time())}</ServerTime>")


def _cdn_error_body(code: int) -> str:
    code_name, msg = {
        400: ("InvalidArgument", "Invalid Argument"),
        401: ("Unauthorized", "Unauthorized"),
        403: ("AccessDenied", "Access Denied"),
        404: ("NoSuchKey", "The specified key does not exist."),
        410: ("NoSuchKey", "The specified key does not exist."),
        429: ("SlowDown", "Please reduce your request rate."),
        500: ("InternalError", "We encountered an internal error. Please try again."),
        502: ("InternalError", "Bad Gateway"),
        503: ("ServiceUnavailable", "Please reduce your request rate."),
        504: ("InternalError", "Gateway Timeout"),
    }[code]
    return _s3_error(code_name, msg).decode()


def _parse_range(value: str, size: int):
    """(start, end_exclusive), "unsatisfiable", or None (ignore the header)."""
    value = value.strip()
    if not value.startswith("bytes=") or "," in value:
        return None
    spec = value[6:].strip()
    if "-" not in spec:
        return None
    a, b = spec.split("-", 1)
    a, b = a.strip(), b.strip()
    try:
        if a == "":
            if b == "":
                return None
            n = int(b)
            if n <= 0 or size == 0:
                return "unsatisfiable"
            return max(0, size - n), size
        start = int(a)
        end = int(b) + 1 if b else size
    except ValueError:
        return None
    if start < 0 or (b and end <= start):
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size)


def _same_date(value: str, mtime: float) -> bool:
    try:
        d = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return False
    return d is not None and int(d.timestamp()) == int(mtime)


def _content_disposition(name: str) -> str:
    safe = name.replace("\\", "\\\\").replace('"', '\\"')
    try:
        safe.encode("latin-1")
        ascii_ok = all(32 <= ord(c) < 127 for c in safe)
    except UnicodeEncodeError:
        ascii_ok = False
    if ascii_ok:
        return f'attachment; filename="{safe}"'
    fallback = "".join(c if 32 <= ord(c) < 127 else "_" for c in safe)
    return (f'attachment; filename="{fallback}"; '
            f"filename*=UTF-8''{urllib.parse.quote(name, safe='')}")


@contextlib.contextmanager
def running_fake(api_key: str | None = None):
    """A FakeCivitai for one test, optionally requiring `api_key`: closed afterwards, and the
    test fails if the fake itself raised while serving (a bug of the fake is no pass)."""
    fake = FakeCivitai()
    if api_key is not None:
        fake.api_key = api_key
    try:
        yield fake
    finally:
        fake.close()
        assert not fake.errors, fake.errors


# --------------------------------------------------------------------------- pytest fixture

try:
    import pytest
except ImportError:  # usable outside pytest (benchmarks)
    pytest = None

if pytest is not None:
    @pytest.fixture
    def fake_civitai():
        """A running FakeCivitai, closed after the test."""
        fake = FakeCivitai()
        try:
            yield fake
        finally:
            fake.close()
