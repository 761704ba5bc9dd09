"""Safe names on disk: the folders a user writes as `model_type`, and file names that come from
the API or a Content-Disposition header.

A folder the user wrote is checked and refused with a reason (a person should fix it); a file
name from outside is reduced to one safe component (nobody is there to ask). Both follow the
same rules, which hold on Linux and Windows alike (SPEC §3).
"""
from __future__ import annotations

import os
import re
import unicodedata

# Windows refuses these as a name's stem, whatever follows the first dot ("aux.tar.gz" too).
_WINDOWS_RESERVED = {
    "con", "prn", "aux", "nul", "conin$", "conout$",
    *(f"com{i}" for i in (*range(1, 10), "¹", "²", "³")),
    *(f"lpt{i}" for i in (*range(1, 10), "¹", "²", "³")),
}
# NTFS refuses these characters in a name; "/" and "\\" separate components.
_NTFS_FORBIDDEN = set('<>:"/\\|?*')
# Letters that render as nothing although Unicode files them as letters or marks.
_INVISIBLE_LETTERS = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u034f", "\u17b4", "\u17b5", "\u180e"}
MAX_NAME_BYTES = 200  # leaves room for ".<name>.part.json" and "_<versionId>_<fileId>" under 255
MAX_FOLDER_DEPTH = 16


def _is_hidden_char(ch: str) -> bool:
    """Control, format (bidi overrides, zero-width spaces, BOM), private-use, unassigned and
    separator characters other than the plain space: they hide or reorder what a name shows."""
    if ch == " ":
        return False
    cat = unicodedata.category(ch)
    return cat[0] in ("C", "Z") or ch in _INVISIBLE_LETTERS


def is_reserved_name(name: str) -> bool:
    """A Windows device name: the part before the first dot, trailing spaces ignored."""
    return name.split(".", 1)[0].rstrip(" ").lower() in _WINDOWS_RESERVED


def component_problem(part: str) -> str | None:
    """Why `part` cannot be one folder or file name, or None when it can."""
    if part == "":
        return "it is empty"
    if part in (".", ".."):
        return f"'{part}' is not allowed"
    hidden = next((ch for ch in part if _is_hidden_char(ch)), None)
    if hidden is not None:
        return f"it holds the invisible or control character U+{ord(hidden):04X}"
    bad = sorted({ch for ch in part if ch in _NTFS_FORBIDDEN})
    if bad:
        return f"it holds {' '.join(bad)}, which Windows does not allow in names"
    if is_reserved_name(part):
        return f"'{part.split('.', 1)[0]}' is a reserved device name on Windows"
    if part[-1] in ". ":
        return "it ends in a dot or a space, which Windows drops"
    if len(part.encode("utf-8")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes"
    return None


class FolderError(ValueError):
    """str() says which component is wrong and why."""


def check_folder(value: object) -> str:
    """A `model_type` as the user wrote it: one or more components separated by "/", relative
    to download_dir, case kept. Returns it in NFC; raises FolderError naming the component."""
    if not isinstance(value, str):
        raise FolderError(f"expected a folder such as \"Lora\" or \"models/Stable-diffusion\", got {value!r}")
    text = unicodedata.normalize("NFC", value)
    if text.strip() == "":
        raise FolderError("the folder is empty")
    if "\\" in text:
        raise FolderError(f"{value!r}: separate folders with '/', not '\\'")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise FolderError(f"{value!r}: the folder must be relative to download_dir, not an absolute path")
    parts = text.split("/")
    if len(parts) > MAX_FOLDER_DEPTH:
        raise FolderError(f"{value!r}: more than {MAX_FOLDER_DEPTH} levels of folders")
    for part in parts:
        problem = component_problem(part)
        if problem:
            shown = part.encode("unicode_escape").decode("ascii") if part else ""
            raise FolderError(f"{value!r}: the component '{shown}' is refused: {problem}")
    return text


def folder_problem(value: object) -> str | None:
    try:
        check_folder(value)
    except FolderError as exc:
        return str(exc)
    return None


def is_valid_model_type(value: object) -> bool:
    return folder_problem(value) is None


def model_type_from_api(api_type: object) -> str:
    """Civitai's model type ("Checkpoint", "LORA", "TextualInversion") as the `plain` layout's
    folder name: lower case, one safe component."""
    text = str(api_type or "other").lower()
    text = re.sub(r"[^a-z0-9_-]+", "_", text).strip("_-")
    return text[:64] or "other"


def safe_filename(name: object, fallback: str = "model.bin") -> str:
    """Reduce any string to one path component that is safe on Linux and Windows.

    Path separators and parent references are dropped rather than escaped: only the last
    component of a name like "../../etc/passwd" survives, so nothing can leave its folder.
    Invisible and control characters are removed, NTFS's forbidden ones become "_", trailing
    dots and spaces go, and a reserved device stem gets a "_" in front.
    """
    text = unicodedata.normalize("NFC", str(name or ""))
    text = text.replace("\\", "/").split("/")[-1]
    text = "".join("_" if ch in _NTFS_FORBIDDEN else ch for ch in text if not _is_hidden_char(ch))
    text = text.strip(" .")
    if is_reserved_name(text):
        text = "_" + text
    if not text or text in {".", ".."}:
        text = fallback
    encoded = text.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        stem, ext = os.path.splitext(text)
        ext = ext[:16]
        budget = MAX_NAME_BYTES - len(ext.encode("utf-8"))
        stem = stem.encode("utf-8")[:budget].decode("utf-8", "ignore").rstrip(" .")
        text = (stem or "_") + ext
    return text


def alternate_filename(filename: str, version_id: int | None, file_id: int | None = None) -> str:
    """The deterministic name used when `filename` is taken by a different file."""
    stem, ext = os.path.splitext(filename)
    suffix = f"_{version_id}" if version_id is not None else ""
    if file_id is not None:
        suffix += f"_{file_id}"
    return safe_filename(f"{stem}{suffix}{ext}")


# The files other tools read beside a model file (SPEC §10): never model files themselves.
SIDECAR_INFO_SUFFIX = ".civitai.info"
SIDECAR_PREVIEW_INFIX = ".preview."
SIDECAR_PREVIEW_EXTS = ("png", "jpeg", "jpg", "webp", "gif")


def part_filename(filename: str) -> str:
    return f".{filename}.part"


def fold_case(path: str) -> str:
    """The key two names collide under on Windows and macOS (case-insensitive file systems)."""
    return unicodedata.normalize("NFC", path).casefold()
