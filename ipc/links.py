"""What users paste to name a model: an id, or a Civitai page or download link. One parser for the
GUI, the REST API and the command line."""
from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

# civitai.com (since 2026-04 the SFW site), civitai.red (everything), and the older green name.
CIVITAI_HOSTS = ("civitai.com", "civitai.red", "civitai.green")

_PATTERNS = (
    (r"(?:/api/v1)?/models/(\d+)(?:/[^/]*)?", "model_id"),
    (r"(?:/api/v1)?/model-versions/(\d+)", "version_id"),
    (r"/api/download/models/(\d+)", "version_id"),
)


def parse_model_url(url: str, extra_hosts: tuple[str, ...] = ()) -> dict:
    """A Civitai page or download URL as {"model_id"?, "version_id"?, "file_id"?}.

    Raises ValueError with a message for the user."""
    text = url.strip()
    if "://" not in text and re.match(r"^(www\.)?civitai\.(com|red|green)/", text, re.IGNORECASE):
        text = "https://" + text  # pasted without the scheme
    parts = urlsplit(text)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("'url' must be an http(s) URL of a civitai.com model page")
    known = any(host == h or host.endswith("." + h) for h in CIVITAI_HOSTS) or host in extra_hosts
    if not known:
        raise ValueError(f"'url' must point to civitai.com or civitai.red, not {host}")
    query = parse_qs(parts.query)

    def qint(key):
        values = query.get(key)
        if not values:
            return None
        if not values[0].isdigit():
            raise ValueError(f"'{key}' in the URL must be a number")
        return int(values[0])

    path = parts.path.rstrip("/")
    for pattern, key in _PATTERNS:
        match = re.fullmatch(pattern, path)
        if match:
            out = {key: int(match.group(1))}
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
