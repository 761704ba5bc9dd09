"""What users paste to name a model: an id, or a Civitai page or download link. One parser for the
GUI, the REST API and the command line."""
from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

# civitai.com (since 2026-04 the SFW site), civitai.red (everything), and the older green name.
CIVITAI_HOSTS = ("civitai.com", "civitai.red", "civitai.green")

_PATTERNS = (
    (r"(?:/api/v1)?/models/([0-9]{1,40})(?:/[^/]*)?", "model_id"),
    (r"(?:/api/v1)?/model-versions/([0-9]{1,40})", "version_id"),
    (r"/api/download/models/([0-9]{1,40})", "version_id"),
)


MAX_ID = 2**53  # what a browser's JSON numbers hold exactly


def parse_model_url(url: str, extra_hosts: tuple[str, ...] = ()) -> dict:
    """A Civitai page or download URL as {"model_id"?, "version_id"?, "file_id"?}.

    Raises ValueError with a message for the user."""
    text = url.strip(" \t\r\n")
    # urlsplit quietly drops tabs and newlines inside a URL; a URL that needs that is not one to trust.
    if re.search(r"[\x00-\x20\x7f]", text):
        raise ValueError("'url' must not contain spaces or control characters")
    if "://" not in text and re.match(r"^(www\.)?civitai\.(com|red|green)/", text, re.IGNORECASE):
        text = "https://" + text  # pasted without the scheme
    try:
        parts = urlsplit(text)
        host = (parts.hostname or "").lower()
    except ValueError:
        raise ValueError("'url' is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("'url' must be an http(s) URL of a civitai.com model page")
    known = any(host == h or host.endswith("." + h) for h in CIVITAI_HOSTS) or host in extra_hosts
    if not known:
        raise ValueError(f"'url' must point to civitai.com or civitai.red, not {host}")
    query = parse_qs(parts.query)

    def checked(key, digits):
        value = int(digits)
        if not 1 <= value <= MAX_ID:
            raise ValueError(f"the URL's {key} must be from 1 to {MAX_ID}, got {digits[:40]}")
        return value

    def qint(key):
        values = query.get(key)
        if not values:
            return None
        if not re.fullmatch(r"[0-9]{1,40}", values[0]):
            raise ValueError(f"'{key}' in the URL must be a number")
        return checked(key, values[0])

    path = parts.path.rstrip("/")
    for pattern, key in _PATTERNS:
        match = re.fullmatch(pattern, path)
        if match:
            out = {key: checked(key, match.group(1))}
            version_id = qint("modelVersionId")
            if version_id is not None:
                out["version_id"] = version_id
            file_id = qint("fileId")
            if file_id is not None:
                out["file_id"] = file_id
            return out
    raise ValueError("'url' is not a Civitai model URL (expected https://civitai.com/models/<id>)")


def parse_model_ref(text: str, extra_hosts: tuple[str, ...] = ()) -> dict:
    """A model id ("4468"), a version id ("v:73710" or "version 73710"), or a link."""
    value = text.strip()
    if value.isdigit():
        return {"model_id": int(value)}
    match = re.fullmatch(r"(?i)(?:v|version)[:\s]*(\d+)", value)
    if match:
        return {"version_id": int(match.group(1))}
    return parse_model_url(value, extra_hosts)
