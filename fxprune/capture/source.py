"""Where in the user's source a capture failure happened."""

from __future__ import annotations

import linecache
import traceback


def user_frame(tb) -> str:
    """The innermost traceback frame outside torch itself, as 'file:line: code'."""
    where = ""
    for frame in traceback.extract_tb(tb):
        fname = frame.filename.replace("\\", "/")
        if "/torch/" in fname or "/fxprune/" in fname:
            continue
        code = frame.line or linecache.getline(frame.filename, frame.lineno).strip()
        where = f"{frame.filename}:{frame.lineno}: {code}"
    return where
