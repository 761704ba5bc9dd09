"""Safe names on disk: model_type folders, file names from the API or Content-Disposition."""
from __future__ import annotations

import os
import re
import unicodedata

MODEL_TYPE_RE = re.compile(r"^[a-z0-9_-]{1,64}$")

# Windows refuses these as a file's stem whatever the extension.
_WINDOWS_RESERVED = {
    "con", "prn", "aux", "nul",
    *(f"com{i}" for i in range(1, 10)),
    *(f"lpt{i}" for i in range(1, 10)),
}
_UNSAFE_CHARS_RE = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')
MAX_NAME_BYTES = 200  # leaves room for ".<name>.part" and "_<versionId>" under 255


def is_valid_model_type(value: object) -> bool:
    return isinstance(value, str) and bool(MODEL_TYPE_RE.match(value))


def model_type_from_api(api_type: object) -> str:
    """Civitai's model type ("Checkpoint", "LORA", "TextualInversion") as a folder name."""
    text = str(api_type or "other").lower()
    text = re.sub(r"[^a-z0-9_-]+", "_", text).strip("_-")
    return text[:64] or "other"


def safe_filename(name: object, fallback: str = "model.bin") -> str:
    """Reduce any string to one path component that is safe on Linux and Windows.

    Path separators and parent references are dropped rather than escaped: only the last
    component of a name like "../../etc/passwd" survives, so nothing can leave its folder.
    """
    text = unicodedata.normalize("NFC", str(name or ""))
    text = text.replace("\\", "/").split("/")[-1]
    text = _UNSAFE_CHARS_RE.sub("_", text)
    text = text.strip().strip(".").strip()
    stem, ext = os.path.splitext(text)
    if not stem or stem.lower() in _WINDOWS_RESERVED:
        stem = f"_{stem}" if stem else ""
    text = stem + ext
    if not text or text in {".", ".."}:
        text = fallback
    encoded = text.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        stem, ext = os.path.splitext(text)
        ext = ext[:16]
        budget = MAX_NAME_BYTES - len(ext.encode("utf-8"))
        stem = stem.encode("utf-8")[:budget].decode("utf-8", "ignore")
        text = stem + ext
    return text


def alternate_filename(filename: str, version_id: int | None, file_id: int | None = None) -> str:
    """The deterministic name used when `filename` is taken by a different file."""
    stem, ext = os.path.splitext(filename)
    suffix = f"_{version_id}" if version_id is not None else ""
    if file_id is not None:
        suffix += f"_{file_id}"
    return safe_filename(f"{stem}{suffix}{ext}")


def part_filename(filename: str) -> str:
    return f".{filename}.part"
