"""JSON with `//` and `/* */` comments and trailing commas, with errors that give line and column."""
from __future__ import annotations

import json


class JsoncError(ValueError):
    def __init__(self, message: str, line: int, column: int):
        super().__init__(f"line {line}, column {column}: {message}")
        self.message = message
        self.line = line
        self.column = column


def strip_comments(text: str) -> str:
    """Blank out comments and trailing commas, keeping every other character where it was,
    so json's line/column numbers still point into the user's file."""
    out = list(text)
    i, n = 0, len(text)
    in_string = False
    last_significant = None  # index of the last non-space, non-comment char outside strings
    while i < n:
        c = text[i]
        if in_string:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                in_string = False
                last_significant = i
            i += 1
            continue
        if c == '"':
            in_string = True
            i += 1
            continue
        if c == "/" and i + 1 < n and text[i + 1] == "/":
            while i < n and text[i] != "\n":
                out[i] = " "
                i += 1
            continue
        if c == "/" and i + 1 < n and text[i + 1] == "*":
            end = text.find("*/", i + 2)
            if end < 0:
                line = text.count("\n", 0, i) + 1
                col = i - (text.rfind("\n", 0, i) + 1) + 1
                raise JsoncError("unterminated /* comment", line, col)
            for j in range(i, end + 2):
                if out[j] != "\n":
                    out[j] = " "
            i = end + 2
            continue
        if c in "]}" and last_significant is not None and out[last_significant] == ",":
            out[last_significant] = " "
        if not c.isspace():
            last_significant = i
        i += 1
    return "".join(out)


def loads(text: str):
    if text.startswith("\ufeff"):
        text = " " + text[1:]  # a BOM from Windows Notepad; keep columns
    try:
        return json.loads(strip_comments(text))
    except json.JSONDecodeError as exc:
        raise JsoncError(exc.msg, exc.lineno, exc.colno) from None
