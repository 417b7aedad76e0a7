"""Writing files so that a reader never sees half of one: to a temporary file beside it, then renamed over it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, content: str | Callable[[Path], None]) -> Path:
    """Write `content` (text, or a function that writes the file it is given) to `path` in one step: a killed writer
    leaves the old file or none, never a partial one, and two writers never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            content(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
